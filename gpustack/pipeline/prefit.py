"""Per-slice fits read ahead of their pass: the samples come straight from the files, the fits in large batches.

A step whose per-slice fit uses only a strided grid of its input (2D `bkg_removal`, `Step.sample_grid`), placed
right after steps that only select pixels, has that grid in the pass's input files as they are: every sy-th row,
every sx-th column of the region. Reading the region's rows costs less than a pass's read, and fitting
64 slices at once instead of the pass's few per batch costs a third as much: a robust fit's time is mostly per
tensor operation (a few dozen per IRLS step on tiny problems; 200 slices of 8281 samples, on 2 CPU cores: 0.64 s
in batches of 4, 0.21 s in one batch). The pass then takes each slice's result from its state (`fit_samples`).
Compressed files are left to the pass, which decodes each slice once anyway.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from gpustack.errors import InputError
from gpustack.io.tiff import SliceInfo
from gpustack.pipeline.spec import PassSpec, StepRun

PREFIT_BATCH = 64
BAND_BYTES = 8 << 20  # per reader thread: rows read at once


def sampled_run(spec: PassSpec) -> tuple[StepRun, slice, slice, tuple[int, int]] | None:
    """The run to fit ahead, the source rows and columns of its input, and its (row, column) sampling step; None
    if the pass has none, or something other than a pixel selection before it, or compressed input files."""
    shape = spec.source.shape
    rows, cols = slice(0, shape[0]), slice(0, shape[1])
    for r in spec.runs:
        grid = r.step.sample_grid()
        if grid is not None:
            break
        if r.region is None:  # arithmetic before the fit: its input is not in the files
            return None
        sub_rows, sub_cols = r.region
        rows = slice(rows.start + sub_rows.start, rows.start + sub_rows.stop)
        cols = slice(cols.start + sub_cols.start, cols.start + sub_cols.stop)
    else:
        return None
    if any(info.offset is None for info in spec.source.slices):
        return None
    return r, rows, cols, grid


def _read_samples(info: SliceInfo, out: np.ndarray, rows: range, cols: slice, sx: int, band: np.ndarray) -> None:
    """One slice's grid: runs of consecutive rows, as many as `band` (this thread's buffer) holds, each in one
    read, then every sy-th row and sx-th column of the region. One read per sampled row instead cost five times
    as much here, in Python calls; a band bounds the memory whatever the slice size."""
    row_bytes = info.shape[1] * info.dtype.itemsize
    per_read = max(1, (band.shape[0] - 1) // rows.step + 1)  # sampled rows a band spans
    try:
        with open(info.path, "rb", buffering=0) as fh:
            for k in range(0, len(rows), per_read):
                chunk = rows[k:k + per_read]
                view = band[: chunk[-1] - chunk[0] + 1]
                fh.seek(info.offset + chunk[0] * row_bytes)
                if fh.readinto(memoryview(view).cast("B")) != view.nbytes:
                    raise InputError(f"{info.path}: the file is truncated (it changed since it was inspected)")
                out[k:k + len(chunk)] = view[:: rows.step, cols.start:cols.stop:sx]
    except OSError as exc:
        raise InputError(f"{info.path}: cannot read the slice ({exc.strerror or exc})") from None
    if info.byteswap:
        out.byteswap(inplace=True)


def prefit(spec: PassSpec, device: torch.device, *, io_threads: int = 4,
           on_progress: Any = None) -> bool:
    """Fit the pass's sampled run ahead (see the module's doc); its state gets {"prefit": results}. False if the
    pass has no such run."""
    found = sampled_run(spec)
    if found is None:
        return False
    run, rows, cols, (sy, sx) = found
    source = spec.source
    row_index = range(rows.start, rows.stop, sy)
    width = len(range(cols.start, cols.stop, sx))
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    n = len(source)
    parts: list[dict[str, torch.Tensor]] = []
    buffer = np.empty((min(PREFIT_BATCH, n), len(row_index), width), source.dtype)
    bands = threading.local()

    def read(k: int) -> None:
        if not hasattr(bands, "buffer"):
            fit_rows = max(1, BAND_BYTES // (source.shape[1] * source.dtype.itemsize))
            bands.buffer = np.empty((min(fit_rows, row_index[-1] - row_index[0] + 1), source.shape[1]), source.dtype)
        _read_samples(source.slices[k], buffer[k - b0], row_index, cols, sx, bands.buffer)

    with ThreadPoolExecutor(io_threads, thread_name_prefix="gpustack-samples") as pool:
        for b0 in range(0, n, PREFIT_BATCH):
            b1 = min(n, b0 + PREFIT_BATCH)
            list(pool.map(read, range(b0, b1)))  # list(): a reader's error is raised here
            values = torch.from_numpy(buffer[: b1 - b0]).to(device).to(torch.float32)
            parts.append(run.step.fit_samples(values, shape))
            if on_progress:
                on_progress(b1 - b0)
    results = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    run.state = {**(run.state or {}), "prefit": results}
    return True
