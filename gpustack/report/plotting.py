"""Matplotlib without pyplot's global state: figures made and saved from any thread, no display needed."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 150


SINGLE = (0.8, 0.3, 0.55, 0.45)  # margins in inches (left, right, bottom, top) for one axes with labels, title
# subplots_adjust of the 12 x 3.6 in min / max / mean figures (stats.png, bkg_removal's stats_X/Y.png)
THREE_PANELS = {"left": 0.07, "right": 0.99, "bottom": 0.15, "top": 0.83, "wspace": 0.28}


def new_figure(width: float = 10, height: float = 4, *, margins: tuple[float, float, float, float] | None = None,
               **kwargs) -> Figure:
    """A figure on the Agg canvas. `margins` (inches): fixed margins instead of the constrained layout, whose
    solver takes about 40 % of a simple plot's time."""
    if margins is not None:
        kwargs["layout"] = None
    kwargs.setdefault("layout", "constrained")
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    if margins is not None:
        left, right, bottom, top = margins
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    return fig


def save(fig: Figure, path: Path) -> None:
    """Write atomically: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    # zlib level 1: a third of the plot's time went into level 6's compression, for files ~1.5x smaller
    fig.savefig(tmp, dpi=DPI, format="png", pil_kwargs={"compress_level": 1})
    tmp.replace(path)
