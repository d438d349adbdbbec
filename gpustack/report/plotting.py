"""Figures for the reports (drawn by `gpustack.report.raster`, no display needed), saved atomically from any
thread."""

from __future__ import annotations

from pathlib import Path

from gpustack.report.raster import Figure, new_figure

SINGLE = (0.8, 0.3, 0.55, 0.45)  # margins in inches (left, right, bottom, top) for one axes with labels, title
# subplots_adjust of the 12 x 3.6 in min / max / mean figures (stats.png, bkg_removal's stats_X/Y.png)
THREE_PANELS = {"left": 0.07, "right": 0.99, "bottom": 0.15, "top": 0.83, "wspace": 0.28}


def save(fig: Figure, path: Path) -> None:
    """Write atomically: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp)
    tmp.replace(path)


__all__ = ["SINGLE", "THREE_PANELS", "new_figure", "save"]
