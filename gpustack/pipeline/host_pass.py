"""A pass whose steps only select pixels (cropping, cropping_final), run on the host with NumPy.

Such a pass does no arithmetic: slices are read (only the kept rows of the first region), cut, measured and
written as they are. Neither torch nor a device is needed, and not importing torch saves more than a second of
every cropping-only run (measured on this project's 2-core machines: `import torch` 1.2-1.8 s; a whole crop of
200 slices x 2 channels of 2048² takes about 1 s; RESULTS.md). The files are the same, byte for byte, as the
device pass's.

On a CPU device, a pass of such steps whose fit needs only grey-level counts (intensity_rescaling's statistics)
runs here too: the counts are taken beside the copy, and only they go through torch.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from gpustack.io.tiff import read_slice, write_slice
from gpustack.pipeline.spec import N_STATS, PassSpec

HOST_MAX_BATCH = 16


def host_batch_size(slice_bytes: int, *, budget: int | None = None, requested: int | None = None) -> int:
    """Slices per batch of a host pass's fit (a pass of slices copies them one by one): what the user asked for,
    else what the budget holds, at most 16."""
    if requested:
        return requested
    if budget is None:
        from gpustack.device import available_host_memory

        budget = available_host_memory()
    return max(1, min(HOST_MAX_BATCH, budget // max(1, slice_bytes)))


def host_stats(x: np.ndarray) -> np.ndarray:
    """(n, H, W) -> (n, 3) float32 min, max, mean per slice; floats ignore NaN and inf (as `slice_stats`), and
    a slice with no finite value gives NaN."""
    out = np.empty((x.shape[0], 3), np.float32)
    if x.dtype.kind in "ui":  # on a cropped view itself (reshaping it would copy it), flat if contiguous (faster)
        flat = x.reshape(x.shape[0], -1) if x.flags.c_contiguous else x
        axes = 1 if x.flags.c_contiguous else (1, 2)
        out[:, 0], out[:, 1] = flat.min(axis=axes), flat.max(axis=axes)
        if x.dtype.kind == "u" and x.dtype.itemsize <= 2 and x.shape[1] <= 65537:
            # column sums fit in uint32 (at most 65537 x 65535 < 2**32): 1.7x faster than accumulating in uint64
            total = x.sum(axis=1, dtype=np.uint32).sum(axis=1, dtype=np.uint64)
        else:
            total = x.sum(axis=(1, 2), dtype=np.uint64 if x.dtype.kind == "u" else np.int64)
        out[:, 2] = total / (x.shape[1] * x.shape[2])
        return out
    flat = x.reshape(x.shape[0], -1)
    finite = np.isfinite(flat)
    count = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, 0] = np.where(finite, flat, np.inf).min(axis=1)
        out[:, 1] = np.where(finite, flat, -np.inf).max(axis=1)
        out[:, 2] = np.where(finite, flat, 0).sum(axis=1, dtype=np.float64) / count
    out[count == 0] = np.nan
    return out


def level_counts(x: np.ndarray) -> np.ndarray:
    """(H, W) integers of at most 16 bits -> (levels,) int64 pixel counts of each value, from the dtype's minimum
    (`kernels.histogram.level_counts` of one slice). torch's bincount is single-threaded and 1.8x faster than
    NumPy's (which converts to int64 first), and called from the pass's threads it does not oversubscribe the cores."""
    import torch

    info = np.iinfo(x.dtype)
    shifted = x.astype(np.int32)
    if info.min:
        shifted -= info.min
    return torch.bincount(torch.from_numpy(shifted).view(-1), minlength=info.max - info.min + 1).numpy()


def run_host_pass(spec: PassSpec, *, batch_size: int, io_threads: int = 4, on_progress: Callable[[int], None] | None
                  = None, fit_device: Any = None) -> None:
    """`stream.run_pass` for a pass of region steps (`spec.selects_only`), on the host.

    Each slice is one task on one of `io_threads` threads, start to end: read (only the first region's rows),
    measure, cut, write, while it is in the cache; the main thread only collects statistics in order. There is
    no arithmetic to batch, and handing slices from readers to a main thread to writers cost more than the
    work (200 x 2 slices of 2048² cropped to 1024², warm, on 2 cores: a pass of 0.65-1.0 s with 4 readers and 4
    writers against 0.45-0.6 s as tasks, in 5 runs each).

    With a fit that needs only level counts (`spec.counts_levels`), each task also counts the grey levels of
    what the steps keep, and the fit's partial results are computed from the counts of `batch_size` slices at
    a time on `fit_device` (a torch device).
    """
    if not (spec.selects_only or spec.counts_levels):
        raise ValueError("run_host_pass runs passes whose steps only select pixels, with nothing to fit but "
                         "level counts")
    source, runs = spec.source, spec.runs
    n = len(source)
    if spec.push_region:
        rows, cols = runs[0].region
    else:
        rows, cols = slice(0, source.shape[0]), slice(None)
    band_rows = rows if spec.push_region else None
    band = (rows.stop - rows.start, source.shape[1])
    for r in runs:
        r.stats = np.full((n, N_STATS), np.nan, dtype=np.float32)
    known = spec.push_region or spec.input_stats is not None
    local = threading.local()  # one band buffer per thread, reused for each of its slices

    def process(i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Slice i through the pass: its statistics (runs, 9) and, with a fit, its level counts."""
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = np.empty((1, *band), source.dtype)
        read_slice(source.slices[i], buffer[0], band_rows)
        x = buffer
        stats = np.full((len(runs), N_STATS), np.nan, np.float32)
        in_stats = np.full(3, np.nan, np.float32) if known else host_stats(x)[0]
        for j, r in enumerate(runs):
            x = x[:, :, cols] if j == 0 and spec.push_region else x[:, r.region[0], r.region[1]]
            if r.out_dir is not None:  # the copy the writer would make, made first: measured contiguous, in cache
                x = np.ascontiguousarray(x)
            out_stats = host_stats(x)[0]
            stats[j, :3], stats[j, 3:6] = in_stats, out_stats
            in_stats = out_stats
            if r.out_dir is not None:
                # Pixels are untouched: an integer stack written as float32 holds the same values (exact up to
                # 2**24, i.e. for uint8 and uint16), so the written statistics are the output's.
                stored = x if x.dtype == np.dtype(r.out_dtype) else x.astype(r.out_dtype)
                write_slice(r.out_dir / source.slices[i].name, stored[0], source.slices[i])
                stats[j, 6:9] = out_stats
        return stats, (level_counts(x[0]) if spec.fit is not None else None)

    pending: deque[Future] = deque()
    counts: list[np.ndarray] = []
    pool = ThreadPoolExecutor(io_threads, thread_name_prefix="gpustack-io")
    try:
        ahead = 2 * io_threads  # tasks queued beyond the running ones: the threads never wait for the main one
        submitted = 0
        for i in range(n):
            while submitted < min(n, i + 1 + ahead):
                pending.append(pool.submit(process, submitted))
                submitted += 1
            stats, slice_counts = pending.popleft().result()  # raises the task's InputError, naming the file
            for j, r in enumerate(runs):
                r.stats[i] = stats[j]
            if slice_counts is not None:
                counts.append(slice_counts)
                if len(counts) == batch_size or i == n - 1:
                    _fit_counts(spec, counts, fit_device)
                    counts = []
            if on_progress:
                on_progress(1)
        if spec.input_stats is not None and runs:
            runs[0].stats[:, :3] = spec.input_stats
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _fit_counts(spec: PassSpec, counts: list[np.ndarray], device: Any) -> None:
    import torch

    lowest = int(np.iinfo(spec.source.dtype).min)
    spec.fit_partials.append(spec.fit.fit_level_counts(torch.from_numpy(np.stack(counts)).to(device), lowest))
