"""`gpustack demo DIR`: a synthetic two-channel stack with known defects, its params.toml, and the workflow run
on it, with the result measured against the ground truth the generator knows."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gpustack.area import Area
from gpustack.errors import ConfigError

CHANNELS = ("SE2", "ESB")


def run_demo(folder: Path, *, device: str = "auto", slices: int = 60, size: int = 256, quiet: bool = False,
             log: Callable[[str], None] = print) -> int:
    from gpustack.config import load_workflow
    from gpustack.synthetic import SyntheticSpec, generate
    from gpustack.steps import PYSTACK3D_STEPS
    from gpustack.template import render_template

    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} already exists and is not an empty folder; the demo makes a new stack, so "
                          "give it a new folder")
    if slices < 10 or size < 64:
        raise ConfigError("the demo needs at least 10 slices of 64x64 px (--slices, --size)")
    spec = SyntheticSpec(n_slices=slices, height=size, width=size, channels=CHANNELS, seed=0)
    say = (lambda m: None) if quiet else log
    say(f"making a synthetic stack: {slices} slices of {size}x{size} uint16, channels {list(CHANNELS)}, with a "
        "border band, shifted slices, curtains, a contrast drop, an x*y*z background, deleted slices")
    stack = generate(folder, spec)

    # cropping removes the border band; cropping_final trims the margin that registration will sweep.
    area = Area(*stack.area)
    inner_h, inner_w = area.shape(size, size)
    margin = math.ceil(spec.max_shift) + 1
    final = Area(margin, inner_w - margin, margin, inner_h - margin)
    steps = list(PYSTACK3D_STEPS)
    params = folder / "params.toml"
    params.write_text(render_template(
        channels=list(CHANNELS), process_steps=steps,
        # Registration: the demo's structures are tilted, so a chain of pairwise matches drifts slowly (as
        # PyStack3D's does); removing the running average keeps the jumps' correction and drops that drift.
        # The 3D background's z terms need a few sampled slice groups: PyStack3D's skip of 10 slices leaves too
        # few in a short demo stack.
        steps={"cropping": {"area": list(area)}, "cropping_final": {"area": list(final)},
               "bkg_removal": {"skip_factors": [10, 10, max(1, min(10, slices // 5))]},
               "registration_transformation": {"mode": "edge", "box_size_averaging": 15}},
        header=f"gpustack demo: synthetic stack, ground truth in {folder / 'truth.json'}"))
    say(f"wrote {params}")

    from gpustack.device import resolve_device
    from gpustack.pipeline.runner import prepare, run

    workflow = load_workflow(params, device=device)
    prepared = prepare(workflow)
    choice = resolve_device(workflow.device)
    say(f"device: {choice.description} ({choice.reason})")
    summary = run(prepared, device_choice=choice, show_progress=not quiet, log=say)

    # Judge the output against the ground truth: each written plane against the truth at its z (resampled
    # planes too), and each raw slice against the truth at its own z, on the same region.
    import tifffile

    from gpustack.synthetic import parse_name

    out_dir = workflow.process_dir / steps[-1]
    rows, cols = final.rows_cols(inner_h, inner_w)
    lines = []
    for channel in CHANNELS:
        files = sorted((out_dir / channel).glob("*.tif"))
        errors, before, peak = [], [], 0.0
        for path in files:
            truth = stack.truth(parse_name(path.name)[1], channel)[rows, cols]
            got = tifffile.imread(path).astype(np.float32)
            if got.shape != truth.shape:
                raise RuntimeError(f"{path}: shape {got.shape} != ground truth {truth.shape}")
            errors.append(float(np.mean((got - truth) ** 2)))
            peak = max(peak, float(truth.max()))
        for raw_path, z in zip(stack.files(channel), stack.z):
            raw = stack.crop(tifffile.imread(raw_path).astype(np.float32))[rows, cols]
            before.append(float(np.mean((raw - stack.truth(float(z), channel)[rows, cols]) ** 2)))
        rmse, rmse_in = math.sqrt(np.mean(errors)), math.sqrt(np.mean(before))
        lines.append(f"  {channel}: {len(stack.files(channel))} slices -> {len(files)} planes of "
                     f"{cols.stop - cols.start}x{rows.stop - rows.start} at uniform z, no border band left; RMSE "
                     f"against the ground truth {rmse_in:.0f} -> {rmse:.0f} ({20 * math.log10(peak / rmse_in):.1f} -> "
                     f"{20 * math.log10(peak / rmse):.1f} dB PSNR)")
    say(f"done in {summary.seconds:.1f} s; outputs in {workflow.process_dir}")
    say("\n".join(lines))
    say(f"open {out_dir / CHANNELS[0]} in Fiji (File > Import > Image Sequence) or napari to look at it")
    return 0
