"""A pass whose steps only select pixels (cropping, cropping_final), run on the host with NumPy.

Such a pass does no arithmetic: slices are read (only the kept rows of the first region), cut, measured and
written as they are. Neither torch nor a device is needed, and not importing torch saves more than a second of
every cropping-only run (measured on this project's 2-core machine: `import torch` 1.2-1.6 s; a whole crop of
200 slices x 2 channels of 2048² now 1.3-1.5 s, 3.0-3.6 s before; RESULTS.md). The files are the same, byte for
byte, as the device pass's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from gpustack.io.tiff import read_slice
from gpustack.pipeline.spec import N_STATS, PassSpec
from gpustack.pipeline.writes import SliceWrites, close_io

HOST_MAX_BATCH = 16


def host_batch_size(slice_bytes: int, *, budget: int | None = None, requested: int | None = None) -> int:
    """Slices per batch for a host pass: what the user asked for, else what the budget holds, at most 16."""
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
    if x.dtype.kind in "ui":  # on the view itself: reshaping a cropped view would copy it
        out[:, 0], out[:, 1] = x.min(axis=(1, 2)), x.max(axis=(1, 2))
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
    NumPy's (which converts to int64 first): called from reader threads, it does not oversubscribe the cores."""
    import torch

    info = np.iinfo(x.dtype)
    shifted = x.astype(np.int32)
    if info.min:
        shifted -= info.min
    return torch.bincount(torch.from_numpy(shifted).view(-1), minlength=info.max - info.min + 1).numpy()


def run_host_pass(spec: PassSpec, *, batch_size: int, io_threads: int = 4, prefetch: int = 2,
                  on_progress: Callable[[int], None] | None = None, fit_device: Any = None) -> None:
    """`stream.run_pass` for a pass of region steps (`spec.selects_only`), on the host.

    With a fit that needs only level counts (`spec.counts_levels`), the readers also count the grey levels of what
    the steps keep, and the fit's partial results are computed from those counts on `fit_device` (a torch device).
    """
    if not (spec.selects_only or spec.counts_levels):
        raise ValueError("run_host_pass runs passes whose steps only select pixels, with nothing to fit but "
                         "level counts")
    source, runs = spec.source, spec.runs
    n = len(source)
    prefetch = max(prefetch, min(16, -(-2 * io_threads // batch_size)))
    if spec.push_region:
        rows, cols = runs[0].region
    else:
        rows, cols = slice(0, source.shape[0]), slice(None)
    band = (rows.stop - rows.start, source.shape[1])
    ring = [np.empty((batch_size, *band), source.dtype) for _ in range(prefetch + 1)]
    for r in runs:
        r.stats = np.full((n, N_STATS), np.nan, dtype=np.float32)
    starts = list(range(0, n, batch_size))
    readers = ThreadPoolExecutor(io_threads, thread_name_prefix="gpustack-read")
    pending_reads: deque[tuple[int, int, list[Future]]] = deque()
    writes = SliceWrites(source, threads=io_threads, slots=len(ring),
                         limit=2 * batch_size * max(1, sum(r.out_dir is not None for r in runs)))
    band_rows = rows if spec.push_region else None
    # The first step's region is what the readers read: its statistics are taken by the reader right after
    # each read, beside the main thread, while the slice is in the cache (1.1 ms per 1024² slice; 200 x 2 slices
    # of 2048² cropped to 1024², warm, medians of 7 alternating runs: 1.72 against 1.95 s, then 2.05 against 2.10).
    read_stats = np.full((n, 3), np.nan, np.float32) if spec.push_region else None

    def kept(x: np.ndarray) -> np.ndarray:
        """What the pass's steps keep of slices x (n, band rows, W) as read."""
        for j, r in enumerate(runs):
            x = x[:, :, cols] if j == 0 and spec.push_region else x[:, r.region[0], r.region[1]]
        return x

    def read(i: int, out: np.ndarray) -> np.ndarray | None:
        read_slice(source.slices[i], out, band_rows)
        if read_stats is not None:
            read_stats[i] = host_stats(out[None, :, cols])[0]
        return level_counts(kept(out[None])[0]) if spec.fit is not None else None

    def submit(batch_no: int) -> None:
        b0 = starts[batch_no]
        b1 = min(n, b0 + batch_size)
        slot = batch_no % len(ring)
        writes.free(slot)  # slices are written straight from the ring buffer: done before it is refilled
        futures = [readers.submit(read, i, ring[slot][i - b0]) for i in range(b0, b1)]
        pending_reads.append((slot, b1, futures))

    try:
        for k in range(min(prefetch, len(starts))):
            submit(k)
        for batch_no, b0 in enumerate(starts):
            slot, b1, futures = pending_reads.popleft()
            counts = [f.result() for f in futures]  # raises the reader's InputError, naming the file
            if spec.fit is not None:
                import torch

                lowest = int(np.iinfo(source.dtype).min)
                spec.fit_partials.append(spec.fit.fit_level_counts(torch.from_numpy(np.stack(counts)).to(fit_device),
                                                                   lowest))
            if batch_no + prefetch < len(starts):
                submit(batch_no + prefetch)
            x = ring[slot][: b1 - b0, :, cols]
            known = spec.push_region or spec.input_stats is not None
            in_stats = np.full((b1 - b0, 3), np.nan, np.float32) if known else host_stats(x)
            for j, r in enumerate(runs):
                if j == 0 and spec.push_region:
                    out_stats = read_stats[b0:b1]
                else:
                    x = x[:, r.region[0], r.region[1]]
                    out_stats = host_stats(x)
                r.stats[b0:b1, :3] = in_stats
                r.stats[b0:b1, 3:6] = out_stats
                in_stats = out_stats
                if r.out_dir is None:
                    continue
                # Pixels are untouched: an integer stack written as float32 holds the same values (exact up to
                # 2**24, i.e. for uint8 and uint16), so the written statistics are the output's.
                stored = x if x.dtype == np.dtype(r.out_dtype) else x.astype(r.out_dtype)
                r.stats[b0:b1, 6:9] = out_stats
                writes.write(r.out_dir, stored, b0, b1, slot)
            writes.throttle()
            if on_progress:
                on_progress(b1 - b0)
        writes.drain()
        if spec.input_stats is not None and runs:
            runs[0].stats[:, :3] = spec.input_stats
    finally:
        close_io(readers, (futures for *_, futures in pending_reads), writes)
