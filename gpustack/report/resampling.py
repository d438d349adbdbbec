"""Outputs of `resampling`, as PyStack3D writes them: zpos_in.npy, zpos_out.npy, z_positions.png,
z_increments.png, log.txt."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gpustack.report.plotting import SINGLE, new_figure, save

if TYPE_CHECKING:
    from gpustack.steps.base import Report


def write_resampling_report(report: Report) -> None:
    plan, out = report.state, report.outputs_dir
    np.save(out / "zpos_in.npy", plan.z_in)
    np.save(out / "zpos_out.npy", plan.z_out)
    fig = new_figure(8, 4, margins=SINGLE)
    ax = fig.subplots()
    ax.plot(plan.z_in, ".", ms=3, label=f"input ({len(plan.z_in)} slices)")
    ax.plot(np.interp(plan.z_out, plan.z_in, np.arange(len(plan.z_in))), plan.z_out, "-", lw=0.8,
            label=f"output ({len(plan.z_out)} planes)")
    ax.set_xlabel("input slice")
    ax.set_ylabel("z")
    ax.legend()
    ax.set_title(f"resampling: z from {plan.source}")
    save(fig, out / "z_positions.png")
    fig = new_figure(8, 4, margins=SINGLE)
    ax = fig.subplots()
    ax.plot(np.diff(plan.z_in), ".-", lw=0.6, ms=3, label="input increments")
    if len(plan.z_out) > 1:
        ax.axhline(float(np.median(np.diff(plan.z_out))), color="tab:red", lw=0.8, label="output step")
    ax.set_xlabel("input slice")
    ax.set_ylabel("dz")
    ax.legend()
    save(fig, out / "z_increments.png")
    lines = [f"z from {plan.source}", f"{len(plan.z_in)} slices, z {plan.z_in[0]:g} .. {plan.z_in[-1]:g}",
             f"{len(plan.z_out)} planes, z {plan.z_out[0]:g} .. {plan.z_out[-1]:g}", *plan.notes]
    (out / "log.txt").write_text("\n".join(lines) + "\n")
    for note in plan.notes:
        report.warn(note)
