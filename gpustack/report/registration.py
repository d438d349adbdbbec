"""Outputs of the registration steps, in PyStack3D's layout.

registration_calculation: `tmats.npy` (n, blocks, 3, 3) pairwise matrices in the step folder (PyStack3D's file),
`outputs/quality.npy` (n, blocks) and `outputs/pairs.csv` (every measurement used, with its quality),
`outputs/tmats_evol.png`, `outputs/tmats_cumul_evol.png`, `outputs/quality.png`, `outputs/log.txt`.
registration_transformation: `outputs/tmats_cumul.npy`, `outputs/tmats_cumul_evol.png`, and with cropping
`outputs/inds_crop.txt` and `outputs/registration_area.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpustack.report.plotting import SINGLE, new_figure, save
from gpustack.report.raster import Rectangle

if TYPE_CHECKING:
    from gpustack.steps.base import Report
    from gpustack.steps.registration import RegistrationCalculation, RegistrationTransformation


def components(mats: np.ndarray, transformation: str) -> dict[str, np.ndarray]:
    """Readable parts of (n, 3, 3) matrices: translations, and rotation/scale/shear for the richer models."""
    out = {"transl_x": mats[:, 0, 2], "transl_y": mats[:, 1, 2]}
    if transformation != "TRANSLATION":
        a, b, c, d = mats[:, 0, 0], mats[:, 0, 1], mats[:, 1, 0], mats[:, 1, 1]
        out["rotation (deg)"] = np.degrees(np.arctan2(c, a))
        if transformation in ("SCALED_ROTATION", "AFFINE"):
            out["scale - 1"] = np.sqrt(a * a + c * c) - 1
        if transformation == "AFFINE":
            out["shear"] = (a * b + c * d) / np.maximum(a * a + c * c, 1e-30)
    return out


def cumulate(pairwise: np.ndarray) -> np.ndarray:
    out = np.empty_like(pairwise)
    acc = np.eye(3)
    for k, t in enumerate(pairwise):
        acc = t @ acc  # pairwise t_k aligns k onto k-1: T_k = t_k T_(k-1) (pystackreg's register_stack)
        out[k] = acc
    return out


def _plot_components(path: Path, per_block: list[dict[str, np.ndarray]], title: str) -> None:
    keys = list(per_block[0])
    # margins in inches, whatever the number of panels
    fig = new_figure(3.6 * len(keys), 3.2)
    fig.subplots_adjust(left=0.6 / (3.6 * len(keys)), right=1 - 0.2 / (3.6 * len(keys)), bottom=0.16, top=0.8,
                        wspace=0.3)
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, key in zip(axes, keys):
        for b, comp in enumerate(per_block):
            ax.plot(comp[key], lw=0.9, label=f"block {b}" if len(per_block) > 1 else None)
        ax.set_title(key)
        ax.set_xlabel("frame")
    if len(per_block) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle(title)
    save(fig, path)


def write_calculation_report(step: "RegistrationCalculation", report: "Report") -> None:
    out, state = report.outputs_dir, report.state
    tmats, quality = state["tmats"], state["quality"]
    np.save(out.parent / "tmats.npy", tmats)
    geometry = {k: state[k] for k in ("grid", "origins", "centres_y", "centres_x") if k in state}
    (out / "blocks.json").write_text(json.dumps(geometry))  # where the blocks are: read back on resume
    np.save(out / "quality.npy", quality)
    lines = ["slice,reference,quality,transl_x,transl_y"]
    lines += [f"{int(k)},{int(j)},{q:.4f},{tx:.4f},{ty:.4f}" for k, j, q, tx, ty in state["pairs"]]
    (out / "pairs.csv").write_text("\n".join(lines) + "\n")
    t = step.config.transformation
    blocks = range(tmats.shape[1])
    _plot_components(out / "tmats_evol.png", [components(tmats[:, b], t) for b in blocks],
                     "registration_calculation: slice k against slice k-1")
    _plot_components(out / "tmats_cumul_evol.png", [components(cumulate(tmats[:, b]), t) for b in blocks],
                     "registration_calculation: cumulative")
    fig = new_figure(8, 3.2, margins=SINGLE)
    ax = fig.subplots()
    ax.plot(quality.min(axis=1), ".-", ms=3, lw=0.8)
    ax.axhline(0.1, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("frame")
    ax.set_ylabel("normalised correlation after alignment")
    ax.set_title("registration quality (slice k against k-1)")
    save(fig, out / "quality.png")
    low = [report.names[k] for k in range(1, len(report.names)) if quality[k].min() < 0.1]
    engine = ("pystackreg" if step.config.uses_pystackreg else "cross-correlation" + ("" if t == "TRANSLATION" else
              " + Gauss-Newton on an image pyramid") + " (gpustack)")
    log = [f"transformation: {t}", f"engine: {engine}",
           f"references per slice: {step.fit_halo[0]}", f"blocks: {list(step.config.nb_blocks)}",
           f"area: {list(step.config.area) if step.config.area else 'whole image'}"]
    if low and not step.config.uses_pystackreg:
        message = (f"{len(low)} slice(s) could not be matched to the slice before them (featureless, or an empty "
                   f"threshold); " + ("they keep their neighbour's position" if step.fit_halo[0] == 1 else
                                      "their positions come from the slices further back, or lie between their "
                                      "neighbours'") + f": {', '.join(low[:5])}"
                   f"{', ...' if len(low) > 5 else ''}")
        log.append(message)
        report.warn(message)
    (out / "log.txt").write_text("\n".join(log) + "\n")


def write_transformation_report(step: "RegistrationTransformation", report: "Report") -> None:
    out, state = report.outputs_dir, report.state
    cumulative = state["cumulative"]
    # PyStack3D's layout (n, blocks, 3, 3), even for one block
    np.save(out / "tmats_cumul.npy", state.get("blocks", cumulative[:, None]))
    _plot_components(out / "tmats_cumul_evol.png", [components(cumulative, "AFFINE")],
                     "registration_transformation: cumulative transforms applied")
    if step.config.cropping and step._crop is not None:
        rows, cols = step._crop
        height, width = report.in_shape
        (out / "inds_crop.txt").write_text(f"{rows.start} {rows.stop} {cols.start} {cols.stop}\n")
        fig = new_figure(5, 5 * height / max(1, width), margins=SINGLE)
        ax = fig.subplots()
        ax.add_patch(Rectangle((cols.start, rows.start), cols.stop - cols.start, rows.stop - rows.start,
                               color="red"))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_aspect("equal")
        ax.set_title("registration_transformation: area kept")
        save(fig, out / "registration_area.png")
