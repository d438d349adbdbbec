"""Matplotlib without pyplot's global state: figures made and saved from any thread, no display needed."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 150


def new_figure(width: float = 10, height: float = 4, **kwargs) -> Figure:
    kwargs.setdefault("layout", "constrained")
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> None:
    """Write atomically: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    # zlib level 1: a third of the plot's time went into level 6's compression, for files ~1.5x smaller
    fig.savefig(tmp, dpi=DPI, format="png", pil_kwargs={"compress_level": 1})
    tmp.replace(path)
