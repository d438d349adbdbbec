"""Standard statistics of a step: min, max and mean per slice of its input, its output and what was written.

`stats.csv` is the readable table, `stats.npy` keeps PyStack3D's layout (nslices, 3, 3) =
[slice, {input, output, written}, {min, max, mean}] for scripts written against PyStack3D, and `stats.png`
plots them against the slice index.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

COLUMNS = [f"{stage}_{what}" for stage in ("input", "output", "written") for what in ("min", "max", "mean")]


def write_stats(outputs_dir: Path, stats: np.ndarray, names: list[str], title: str,
                beam_current: np.ndarray | None = None) -> None:
    """`beam_current`: per-slice beam current from the acquisition metadata (Fibics 'Ext I'), an extra column
    when any slice has one (intensity drifts often follow it)."""
    outputs_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    current = beam_current is not None and bool(np.isfinite(beam_current).any())
    writer.writerow(["index", "name", *COLUMNS, *(["beam_current"] if current else [])])
    for i, (name, row) in enumerate(zip(names, stats)):
        writer.writerow([i, name, *(f"{v:.6g}" for v in row), *([f"{beam_current[i]:.6g}"] if current else [])])
    (outputs_dir / "stats.csv").write_text(buf.getvalue())
    np.save(outputs_dir / "stats.npy", stats.reshape(len(stats), 3, 3))
    plot_stats(outputs_dir / "stats.png", stats, title)


def plot_stats(path: Path, stats: np.ndarray, title: str) -> None:
    from gpustack.report.plotting import THREE_PANELS, new_figure, save

    # the three panels and their labels fit these margins at any slice count
    fig = new_figure(12, 3.6)
    fig.subplots_adjust(**THREE_PANELS)
    axes = fig.subplots(1, 3)
    x = np.arange(len(stats))
    input_read = bool(np.isfinite(stats[:, :3]).any())
    for k, (ax, what) in enumerate(zip(axes, ("Min", "Max", "Mean"))):
        if input_read:
            ax.plot(x, stats[:, k], label="input", lw=1)
        ax.plot(x, stats[:, 3 + k], label="output", lw=1, color="C1")
        if np.isfinite(stats[:, 6 + k]).any() and not np.allclose(stats[:, 6 + k], stats[:, 3 + k], equal_nan=True):
            ax.plot(x, stats[:, 6 + k], label="written", lw=1, ls="--")
        ax.set_title(what)
        ax.set_xlabel("slice")
    axes[0].legend(fontsize="small")
    fig.suptitle(title if input_read else f"{title} (input statistics: only the kept rows were read)")
    save(fig, path)
