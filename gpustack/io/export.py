"""`gpustack export`: a step's output (or the input) as one multi-page BigTIFF per channel, for Fiji and napari.

Streaming: slices are read ahead by a thread while the previous one is written; one or two slices in memory,
never the stack. Calibration is written the way ImageJ stores it (an ImageJ description with `unit` and
`spacing`, and X/Y resolution in pixels per unit), which Fiji (Bio-Formats for BigTIFF), napari and tifffile
read back; each page keeps its slice's private tags (e.g. the Fibics XML). The file appears under its final name
only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from gpustack.errors import ConfigError, InputError
from gpustack.io.tiff import StackSource, open_channel, read_slice

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
        first["resolution"] = (1.0 / pixel_size, 1.0 / pixel_size)

    def load(k: int) -> np.ndarray:
        buf = np.empty(source.shape, source.dtype)
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


def export_step(project_dir: Path, step: str | None, out_dir: Path, channels: list[str], *,
                process_dir: Path | None = None, **kw) -> list[Path]:
    """One BigTIFF per channel, `<step or 'input'>_<channel>.tif` in `out_dir`, from `process/<step>/<channel>/`
    (or the input slices when `step` is None)."""
    process_dir = process_dir or project_dir / "process"
    if step is not None and not (process_dir / step).is_dir():
        done = sorted(p.name for p in process_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if process_dir.is_dir() else []
        raise InputError(f"no output of {step!r} in {process_dir}; steps there: {', '.join(done) or 'none'}")
    base = project_dir if step is None else process_dir / step
    written = []
    for channel in channels:
        source, _notes = open_channel(base, channel)
        name = f"{step or 'input'}{'' if channel == '.' else '_' + channel}.tif"
        written.append(export_stack(source, out_dir / name, **kw))
    return written
