"""Outputs of `destriping`: stripes.csv (per slice: stripe ratio, correction weight, VSNR iterations, RMS of
what was removed) and stripes.png (the ratio along the stack against the gate's range, and the work done)."""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING

import numpy as np

from gpustack.report.plotting import new_figure, save

if TYPE_CHECKING:
    from gpustack.steps.base import Report
    from gpustack.steps.destriping import DestripingConfig


def write_destriping_report(report: Report, config: DestripingConfig) -> None:
    rec = report.records
    ratio, weight = rec["stripe_ratio"], rec["weight"]
    iterations, removed = rec["iterations"], rec["removed_rms"]
    out = report.outputs_dir
    tmp = out / ".stripes.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slice", "stripe_ratio", "weight", "iterations", "removed_rms"])
        for row in zip(report.names, ratio, weight, iterations, removed):
            w.writerow([row[0], f"{row[1]:.4f}", f"{row[2]:.3f}", int(row[3]), f"{row[4]:.6g}"])
    tmp.replace(out / "stripes.csv")

    gated = config.stripe_gate and np.isfinite(ratio).any()
    if gated:
        lo, hi = config.stripe_gate_range
        report.warn(f"{int((weight == 0).sum())} of {len(weight)} slice(s) measured no stripes (ratio < {lo:g}) "
                    f"and were left as they are; {int((weight >= 1).sum())} fully corrected")
    k = np.arange(len(ratio))
    fig = new_figure(10, 6, margins=(0.8, 0.8, 0.55, 0.45))  # right: the iterations axis
    fig.subplots_adjust(hspace=0.12)
    top, bottom = fig.subplots(2, 1, sharex=True)
    if gated:
        top.plot(k, ratio, ".-", lw=0.8, ms=3, label="stripe ratio (about 1 without stripes)")
        top.axhspan(*config.stripe_gate_range, color="tab:orange", alpha=0.2, label="partial correction")
        top.axhline(config.stripe_gate_range[1], color="tab:red", lw=0.8, label="full correction from here")
        top.set_yscale("log")
        top.legend(loc="upper right", fontsize=8)
    else:
        top.note("stripe_gate = false: every slice corrected, stripes not measured")
    top.set_ylabel("ridge / isotropic power")
    top.set_title("destriping: stripes measured per slice")
    bottom.plot(k, weight, ".-", lw=0.8, ms=3, color="tab:green", label="correction weight")
    bottom.set_ylabel("weight")
    bottom.set_ylim(-0.05, 1.05)
    if (iterations > 0).any():
        right = bottom.twinx()
        right.plot(k, iterations, lw=0.8, color="tab:purple", label="VSNR iterations")
        right.set_ylabel("iterations")
        right.legend(loc="lower right", fontsize=8)
    bottom.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("slice")
    save(fig, out / "stripes.png")
