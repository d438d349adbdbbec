"""bkg_removal's outputs: coefficients (coefs.npz, coefs_3d.txt), coefs.png, background thumbnails (bkgs/),
x and y profiles of the input and output (stats_X.png, stats_Y.png) and log.txt, as PyStack3D lays them out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpustack.kernels.polynomial import expr_from_powers, term_name
from gpustack.report.plotting import THREE_PANELS, new_figure, save

if TYPE_CHECKING:
    from gpustack.steps.background import BkgRemoval
    from gpustack.steps.base import Report

THUMBNAIL = 100  # px, the longer side of the background thumbnails


def write_background_report(step: BkgRemoval, report: Report) -> None:
    out = report.outputs_dir
    n, q = len(report.names), len(step.powers)
    state = report.state
    if step.dim == 3:
        coefs = np.tile(state["coefs"].double().cpu().numpy(), (n, 1))
        offsets = np.full(n, float(state["offset"]))
        np.savetxt(out / "coefs_3d.txt", coefs[0])
        extra = {"scale": np.float64(state["scale"]), "iterations": int(state["iterations"])}
    else:
        coefs = report.records.get("coefs", np.full((n, q), np.nan))
        offsets = report.records.get("offset", np.full(n, np.nan))
        extra = {k: report.records[k] for k in ("scale", "iterations") if k in report.records}
    np.savez(out / "coefs.npz", coefs=coefs, powers=np.asarray(step.powers), offset=offsets, **extra)
    _plot_coefs(out / "coefs.png", coefs, step.powers)
    _write_thumbnails(out / "bkgs", step, coefs, report.names, report.in_shape)
    for axis in ("x", "y"):
        if f"profile_{axis}" in report.records:
            _plot_profiles(out / f"stats_{axis.upper()}.png", report.records[f"profile_{axis}"], axis)
    unfitted = [name for name, c in zip(report.names, coefs) if not np.isfinite(c).all()]
    lines = [f"basis: {expr_from_powers(step.powers)}",
             f"mode: {'3D, one fit over the stack' if step.dim == 3 else '2D, one fit per slice'}",
             f"weight_func: {step.config.weight_func}",
             f"skip_factors: {[step.sampling.sx, step.sampling.sy] + ([step.skip_z] if step.dim == 3 else [])}"
             f"{' (block means)' if step.sampling.averaging else ''}"]
    if step.dim == 3:
        lines.append(f"fit: {state['samples']} samples from {state['groups']} slice groups, "
                     f"{int(state['iterations'])} iterations, robust scale {float(state['scale']):.4g}")
    if unfitted:
        message = (f"{len(unfitted)} slice(s) were left as they are, the {q}-term background could not be fitted: "
                   f"{step.unfitted_reason}: {', '.join(unfitted[:5])}{', ...' if len(unfitted) > 5 else ''}")
        lines.append(message)
        report.warn(message)
    (out / "log.txt").write_text("\n".join(lines) + "\n")


def _plot_coefs(path: Path, coefs: np.ndarray, powers) -> None:
    q = len(powers)
    cols = math.ceil(math.sqrt(q))
    rows = math.ceil(q / cols)
    width, height = 3.2 * cols, 2.4 * rows
    # Margins and gaps in inches, so that they hold for any grid
    left, right, bottom, top, gap = 0.6, 0.15, 0.45, 0.55, 0.65
    fig = new_figure(width, height, margins=(left, right, bottom, top))
    fig.subplots_adjust(wspace=gap / ((width - left - right - (cols - 1) * gap) / cols),
                        hspace=gap / ((height - bottom - top - (rows - 1) * gap) / rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    frames = np.arange(len(coefs))
    for k, ax in enumerate(axes):
        if k >= q:
            ax.set_visible(False)
            continue
        ax.plot(frames, coefs[:, k], ".-", ms=2, lw=0.8)
        ax.set_title(term_name(powers[k]), fontsize=9)
        ax.set_xlabel("frame", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("bkg_removal coefficients: " + expr_from_powers(powers), fontsize=10)
    save(fig, path)


def _thumbnail_backgrounds(step: BkgRemoval, coefs: np.ndarray, n: int, shape: tuple[int, int]) -> np.ndarray:
    """Each slice's fitted background on a grid of about THUMBNAIL px (the same unit coordinates as the fit,
    fewer points), in NumPy without BLAS: this runs on the reporter thread, and a torch (OpenMP) or BLAS kernel
    there leaves that thread's worker threads spinning beside the passes' (measured: the next pass's VSNR
    iterations 2.6 -> 6.3 ms each on 2 cores)."""
    height, width = shape
    f = THUMBNAIL / max(height, width)
    h, w = max(2, round(height * f)), max(2, round(width * f))
    powers = np.asarray(step.powers)  # (q, 2 or 3): x, y (and z) exponents of each term
    c = np.ascontiguousarray(coefs, dtype=np.float64)
    if step.dim == 3:  # one polynomial for the stack (coefs holds it once per slice), taken at each slice's z
        z = np.arange(n, dtype=np.float64) / max(1, n - 1)
        c = c[0][None, :] * z[:, None] ** powers[:, 2][None, :]
    ys = np.linspace(0.0, 1.0, h)[:, None] ** powers[:, 1][None, :]  # (h, q)
    xs = np.linspace(0.0, 1.0, w)[:, None] ** powers[:, 0][None, :]  # (w, q)
    return np.einsum("bk,hk,wk->bhw", c, ys, xs)  # optimize=False: plain loops, no BLAS threads


def _write_thumbnails(folder: Path, step: BkgRemoval, coefs: np.ndarray, names: list[str],
                      shape: tuple[int, int]) -> None:
    """One PNG per slice: its background in grey levels 0-254 of a palette whose last entry is the red of the
    vmin/vmax text. A palette image is a third of an RGB one to encode (0.3 against 0.8 ms here); zlib and the
    file writes release the GIL, so two threads share the encoding (this runs after the pass, on its own)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, ImageDraw, ImageFont

    folder.mkdir(parents=True, exist_ok=True)
    fonts = threading.local()  # one per thread, loaded once: text() would load it for every label
    palette = [v for level in range(255) for v in (level, level, level)] + [255, 0, 0]
    backgrounds = _thumbnail_backgrounds(step, np.nan_to_num(coefs), len(names), shape)

    def write(k: int) -> None:
        bkg, c = backgrounds[k], coefs[k]
        vmin, vmax = float(bkg.min()), float(bkg.max())
        grey = np.zeros(bkg.shape) if vmax <= vmin else np.round(254 * (bkg - vmin) / (vmax - vmin))
        image = Image.fromarray(grey.astype(np.uint8), mode="P")
        image.putpalette(palette)
        text = f"vmin={vmin:.1f}\nvmax={vmax:.1f}" if np.isfinite(c).all() else "not fitted"
        if not hasattr(fonts, "font"):  # PIL's bitmap font: 0.06 ms a label here, FreeType's default 0.42
            fonts.font = (ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont")
                          else ImageFont.load_default())
        ImageDraw.Draw(image).text((1, 1), text, fill=255, font=fonts.font)
        image.save(folder / (Path(names[k]).stem + ".png"), compress_level=1)  # tiny files: speed over size

    with ThreadPoolExecutor(2, thread_name_prefix="gpustack-thumbnails") as pool:
        list(pool.map(write, range(len(names))))  # list(): raises a thread's error here


def _plot_profiles(path: Path, profiles: np.ndarray, axis: str) -> None:
    """Stack-wide profiles from per-slice ones (n, {in, out}, {min, max, mean}, points)."""
    with np.errstate(all="ignore"):
        lo = np.nanmin(profiles[:, :, 0], axis=0)
        hi = np.nanmax(profiles[:, :, 1], axis=0)
        mean = np.nanmean(profiles[:, :, 2], axis=0)
    fig = new_figure(12, 3.6)  # the stats.png plots' panels and margins
    fig.subplots_adjust(**THREE_PANELS)
    axes = fig.subplots(1, 3)
    for ax, what, values in zip(axes, ("Min", "Max", "Mean"), (lo, hi, mean)):
        ax.plot(values[0], label="input", lw=1)
        ax.plot(values[1], label="output", lw=1)
        ax.set_title(what)
        ax.set_xlabel(f"{axis} (subsampled px)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"bkg_removal: statistics along {axis.upper()}")
    save(fig, path)
