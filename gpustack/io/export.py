"""`gpustack export`: a step's output (or the input) as one multi-page BigTIFF per channel, for Fiji and napari.

Streaming: slices are read ahead by a thread into two reused buffers while the previous one is written; two
slices in memory, never the stack. Calibration is written the way ImageJ stores it: on the first page an ImageJ
description with `unit` and `spacing`, and X/Y resolution in pixels per unit with ResolutionUnit NONE (1), as
ImageJ's own writer does. ImageJ 1.x cannot open a BigTIFF itself; Fiji opens it with Bio-Formats, which reads
that description (unit, spacing, slices) and converts X/Y resolution with the ResolutionUnit tag: the TIFF
default INCH would make it multiply the pixel size by 25400 (inch -> micron). tifffile (`imagej_metadata`,
`pages[0].resolution`) and napari read the same. Each page keeps its slice's private tags (e.g. the Fibics XML).
The file appears under its final name only when complete.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from gpustack.errors import ConfigError, InputError
from gpustack.io.tiff import StackSource, list_slice_files, open_channel, read_slice

IMAGEJ_UNITS = {"um": "micron", "µm": "micron", "micron": "micron", "nm": "nm", "mm": "mm", "pixel": "pixel"}


def imagej_description(n: int, unit: str, z_spacing: float | None) -> str:
    lines = ["ImageJ=1.54f", f"images={n}", f"slices={n}", f"unit={IMAGEJ_UNITS.get(unit, unit)}"]
    if z_spacing is not None:
        lines.append(f"spacing={z_spacing:.10g}")
    return "\n".join([*lines, "loop=false", ""])


def export_stack(source: StackSource, out_path: Path, *, pixel_size: float | None = None,
                 z_spacing: float | None = None, unit: str = "um", keep_private_tags: bool = True,
                 compression: str | None = None, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the slices of `source` into one BigTIFF at `out_path`; returns it."""
    out_path = Path(out_path)
    inputs = {s.path.resolve() for s in source.slices}
    if out_path.resolve() in inputs:
        raise InputError(f"{out_path} is one of the input files; choose another output name")
    if out_path.exists() and not overwrite:
        raise ConfigError(f"{out_path} exists; pass --overwrite to replace it")
    if pixel_size is not None and not pixel_size > 0:
        raise ConfigError(f"pixel size must be > 0, got {pixel_size}", key="--pixel-size")
    if z_spacing is not None and not z_spacing > 0:
        raise ConfigError(f"z spacing must be > 0, got {z_spacing}", key="--z-spacing")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.part")
    n = len(source)
    # Without a pixel size the stack is uncalibrated: ImageJ would read a z spacing in "pixel" units.
    first = {"description": imagej_description(n, unit, z_spacing) if pixel_size else
             imagej_description(n, "pixel", None)}
    if pixel_size:
        # pixels per unit of the description; NONE, not tifffile's default INCH (see the module docstring)
        first["resolution"] = (1.0 / pixel_size, 1.0 / pixel_size)
        first["resolutionunit"] = tifffile.RESUNIT.NONE
    # slice k is read into buffers[k % 2] while slice k - 1 is written from the other one
    buffers = [np.empty(source.shape, source.dtype) for _ in range(min(n, 2))]

    def load(k: int) -> np.ndarray:
        buf = buffers[k % 2]
        read_slice(source.slices[k], buf)
        return buf

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="gpustack-export") as reader, \
                tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            pending = reader.submit(load, 0) if n else None
            for k in range(n):
                data = pending.result()
                if k + 1 < n:
                    pending = reader.submit(load, k + 1)
                tags = list(source.slices[k].private_tags) if keep_private_tags else []
                tif.write(data, contiguous=False, metadata=None, compression=compression, extratags=tags,
                          **(first if k == 0 else {}))
                if progress:
                    progress(k + 1, n)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _has_slices(folder: Path) -> bool:
    return bool(list_slice_files(folder)[0])  # the files open_channel would take


def find_channels(base: Path, exclude: tuple[Path, ...] = ()) -> list[str]:
    """The channels in `base`: ["."] when the slices lie in it, else its sub-folders holding slices, sorted."""
    if _has_slices(base):
        return ["."]
    skip = {p.resolve() for p in exclude}
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and p.resolve() not in skip and _has_slices(p))
    if not found:
        raise InputError(f"no .tif or .tiff slices in {base} nor in its sub-folders")
    return found


def export_step(project_dir: Path, step: str | None, out_dir: Path, channels: list[str] | None = None, *,
                process_dir: Path | None = None, **kw) -> list[Path]:
    """One BigTIFF per channel, `<step or 'input'>_<channel>.tif` in `out_dir` (`<step or 'input'>.tif` for the
    channel "."), from `process/<step>/<channel>/` (or the input slices when `step` is None). `channels` None: the
    channels found there (see `find_channels`). `kw` goes to `export_stack`."""
    project_dir = Path(project_dir)
    process_dir = Path(process_dir) if process_dir else project_dir / "process"
    if step is not None and not (process_dir / step).is_dir():
        done = sorted(p.name for p in process_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if process_dir.is_dir() else []
        raise InputError(f"no output of {step!r} in {process_dir}; steps there: {', '.join(done) or 'none'}"
                         + ("" if done else " (if the run wrote elsewhere with --output-dir, give export the same "
                                            "--output-dir)"))
    base = project_dir if step is None else process_dir / step
    if step is not None:
        from gpustack.steps import REGISTRY

        if step in REGISTRY and not REGISTRY[step].writes_slices:
            raise InputError(f"{step!r} writes no slices (its results are in {base}): export a step that does, "
                             "e.g. the one after it")
    if channels is None:
        channels = find_channels(base, exclude=(process_dir, Path(out_dir)))
    written = []
    for channel in channels:
        source, _notes = open_channel(base, channel)
        label = re.sub(r"\.tiff?$", "", channel, flags=re.IGNORECASE)  # a multi-page input: stack.tif -> stack
        name = f"{step or 'input'}{'' if channel == '.' else '_' + label}.tif"
        written.append(export_stack(source, out_dir / name, **kw))
    return written
