"""Outputs of the intensity steps, in PyStack3D's layout.

intensity_rescaling: histo_orig.npy, histos_ref.npy, histos_final.npy (nslices, nbins), bin_edges.npy,
intensity_rescaling_maps.png, intensity_rescaling_profiles.png; with correct = "jumps", also
intensity_rescaling_jumps.png and log.txt (the corrected slices). intensity_rescaling_area: means.npy,
factors.npy, means.png, factors.png, log.txt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gpustack.report.plotting import SINGLE, new_figure, save
from gpustack.report.raster import viridis

if TYPE_CHECKING:
    from gpustack.steps.base import Report
    from gpustack.steps.intensity import IntensityRescalingAreaConfig

MAX_PROFILES = 40  # lines per panel in the profiles plot
SMOOTH_DRIFT_NOTE = 0.1  # correct = "jumps": a smooth contrast drift above 10 % along the stack is pointed out


def _skipped(report: Report, active: np.ndarray, why: str) -> None:
    names = [name for name, ok in zip(report.names, active) if not ok]
    if names:
        report.warn(f"{len(names)} slice(s) {why} and were left as they are: {', '.join(names[:5])}"
                    f"{', ...' if len(names) > 5 else ''}")


def write_rescaling_report(report: Report) -> None:
    out, state = report.outputs_dir, report.state
    active = state["active"].cpu().numpy()
    _skipped(report, active, "are constant, empty or nearly so (nothing to rescale)")
    if "histo_orig" not in state:
        return
    if "measured_gain" in state:
        _report_jumps(report, active)
    hists = {key: state[key].cpu().numpy() for key in ("histo_orig", "histo_ref", "histo_final")}
    np.save(out / "histo_orig.npy", hists["histo_orig"])
    np.save(out / "histos_ref.npy", hists["histo_ref"])
    np.save(out / "histos_final.npy", hists["histo_final"])
    edges = state["edges"].cpu().numpy()
    np.save(out / "bin_edges.npy", edges)
    titles = ("original", "reference", "final")
    # the colour bars take their room from each panel
    fig = new_figure(13, 4)
    fig.subplots_adjust(left=0.05, right=0.965, bottom=0.13, top=0.92, wspace=0.3)
    for ax, title, h in zip(fig.subplots(1, 3), titles, hists.values()):
        image = ax.imshow(h, origin="lower", extent=(edges[0], edges[-1], -0.5, len(h) - 0.5))
        ax.set_title(title)
        ax.set_xlabel("grey level")
        ax.set_ylabel("frame")
        fig.colorbar(image, ax=ax, shrink=0.8)
    save(fig, out / "intensity_rescaling_maps.png")
    centres = (edges[1:] + edges[:-1]) / 2
    fig = new_figure(13, 4)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.13, top=0.92, wspace=0.08)
    frames = np.unique(np.linspace(0, len(active) - 1, min(MAX_PROFILES, len(active))).round().astype(int))
    colours = [tuple(c / 255) for c in viridis(frames / max(1, len(active) - 1))]
    for ax, title, h in zip(fig.subplots(1, 3, sharey=True), titles, hists.values()):
        for k, colour in zip(frames, colours):
            ax.plot(centres, h[k], lw=0.7, color=colour)
        ax.set_title(title)
        ax.set_xlabel("grey level")
    save(fig, out / "intensity_rescaling_profiles.png")


def _report_jumps(report: Report, active: np.ndarray) -> None:
    """correct = "jumps": the measured gain and level of every slice against the median, what was applied, the
    corrected slices named (log.txt, a warning) and drawn (intensity_rescaling_jumps.png)."""
    out, state = report.outputs_dir, report.state
    measured = {"gain": state["measured_gain"].double().cpu().numpy(),
                "level": state["measured_level"].double().cpu().numpy()}
    gain, offset = state["gain"].double().cpu().numpy(), state["offset"].double().cpu().numpy()
    corrected = active & ((np.abs(gain - 1) > 1e-6) | (np.abs(offset) > 1e-6 * np.abs(measured["level"]).max()))
    names = [name for name, c in zip(report.names, corrected) if c]
    lines = [(f"correct = jumps: {len(names)} of {int(active.sum())} measured slice(s) corrected for a jump in "
              "contrast or level, the others left as they are"), *names]
    if names:
        report.warn(f"{len(names)} slice(s) corrected for a jump in contrast or level: {', '.join(names[:5])}"
                    f"{', ...' if len(names) > 5 else ''}")
    kept = measured["gain"][active] / gain[active]  # what is left after the correction: the smooth part
    if kept.size and kept.max() / kept.min() > 1 + SMOOTH_DRIFT_NOTE:
        note = (f"the contrast drifts smoothly by {100 * (kept.max() / kept.min() - 1):.0f} % along the stack and is "
                'kept (the content, or a slow detector drift: correct = "all" flattens it)')
        lines.append(note)
        report.warn(note)
    (out / "log.txt").write_text("\n".join(lines) + "\n")
    k = np.arange(len(gain))
    level_out = measured["level"] + offset + (gain - 1) * measured["level"]  # the corrected slice's level
    fig = new_figure(10, 6, margins=SINGLE)
    fig.subplots_adjust(hspace=0.12)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(k, measured["gain"], ".-", lw=0.8, ms=3, label="measured gain towards the median slice")
    top.plot(k, np.where(active, measured["gain"] / gain, np.nan), lw=0.8, label="after the correction")
    top.set_ylabel("gain")
    top.set_title("intensity_rescaling: only jumps along z are corrected")
    top.legend(fontsize=8)
    bottom.plot(k, measured["level"], ".-", lw=0.8, ms=3, label="measured level (mean of the 2-98 % quantiles)")
    bottom.plot(k, np.where(active, level_out, np.nan), lw=0.8, label="after the correction")
    bottom.set_ylabel("grey level")
    bottom.set_xlabel("frame")
    bottom.legend(fontsize=8)
    save(fig, out / "intensity_rescaling_jumps.png")


def write_area_report(report: Report, config: IntensityRescalingAreaConfig) -> None:
    out, state = report.outputs_dir, report.state
    means, factors = state["means"].cpu().numpy(), state["factors"].cpu().numpy()
    measured = state["measured"].cpu().numpy()
    np.save(out / "means.npy", means)
    np.save(out / "factors.npy", factors)
    _skipped(report, measured, "have no pixel of the area inside the thresholds")
    frames = np.arange(len(means))
    for name, values, label in (("means", means, "area mean"), ("factors", factors, "factor")):
        fig = new_figure(8, 3.5, margins=SINGLE)
        ax = fig.subplots()
        ax.plot(frames, values, ".-", ms=3, lw=0.8)
        if name == "factors":
            for bound in config.factors_range:
                ax.axhline(bound, color="grey", ls="--", lw=0.8)
        else:
            ax.axhline(float(state["reference"]), color="grey", ls="--", lw=0.8, label="median (reference)")
            ax.legend(fontsize=8)
        ax.set_xlabel("frame")
        ax.set_ylabel(label)
        ax.set_title(f"intensity_rescaling_area: {label}")
        save(fig, out / f"{name}.png")
    clipped = int(((factors <= config.factors_range[0]) | (factors >= config.factors_range[1])).sum())
    (out / "log.txt").write_text(
        f"area [xmin, xmax, ymin, ymax] (origin bottom-left): {list(config.area) if config.area else 'whole image'}\n"
        f"reference (median of the area means): {float(state['reference']):.6g}\n"
        f"factors_range: {list(config.factors_range)}; {clipped} factor(s) at a limit\n")
