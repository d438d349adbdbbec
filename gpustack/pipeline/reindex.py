"""A pass that changes the number of slices (resampling): each output plane is made from the two input slices
around it, read once each, kept only while planes still need them, and written by writer threads while the next
planes are computed. A plane that falls on an input slice is that slice, written as read."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gpustack.io.tiff import StackSource, read_slice, write_slice
from gpustack.kernels.cast import to_storage
from gpustack.kernels.stats import slice_stats
from gpustack.pipeline.stream import N_STATS
from gpustack.steps.resampling import ResamplePlan

CPU_PLANES = 4


def _read(source: StackSource, k: int) -> np.ndarray:
    out = np.empty(source.shape, source.dtype)
    read_slice(source.slices[k], out)
    return out


def run_reindex_pass(source: StackSource, plan: ResamplePlan, out_dir: Path, out_dtype: torch.dtype, *,
                     device: torch.device, batch_size: int, io_threads: int = 4,
                     on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Write the planes of `plan` into `out_dir`; returns their statistics (n_out, 9), input columns NaN."""
    n_out = len(plan.z_out)
    if device.type == "cpu":  # a few planes at a time stay in the caches (measured: 16 at once is 2.6x slower)
        batch_size = min(batch_size, CPU_PLANES)
    stats = np.full((n_out, N_STATS), np.nan, dtype=np.float32)
    starts = list(range(0, n_out, batch_size))
    readers = ThreadPoolExecutor(io_threads, thread_name_prefix="gpustack-read")
    writers = ThreadPoolExecutor(io_threads, thread_name_prefix="gpustack-write")
    pending: dict[int, Future] = {}  # input slice -> its read
    raw: dict[int, np.ndarray] = {}  # input slice -> as read, on the host
    work: dict[int, torch.Tensor] = {}  # input slice -> float32 on the device (only those an interpolation needs)
    writes: deque[Future] = deque()
    copies = np.dtype(str(out_dtype).removeprefix("torch.")) == source.dtype  # exact planes are written as read

    def needed(b: int) -> range:
        j0, j1 = starts[b], min(n_out, starts[b] + batch_size)
        return range(int(plan.lower[j0]), int(plan.upper[j1 - 1]) + 1)

    def prefetch(b: int) -> None:
        if b < len(starts):
            for k in needed(b):
                if k not in raw and k not in pending:
                    pending[k] = readers.submit(_read, source, k)

    def on_device(k: int) -> torch.Tensor:
        if k not in work:
            work[k] = torch.from_numpy(raw[k]).to(device).to(torch.float32)
        return work[k]

    try:
        prefetch(0)
        for b, j0 in enumerate(starts):
            j1 = min(n_out, j0 + batch_size)
            for k in needed(b):
                if k not in raw:
                    raw[k] = pending.pop(k).result()
            prefetch(b + 1)  # the next planes' slices are read while these are computed and written
            for j in range(j0, j1):
                lo, hi = int(plan.lower[j]), int(plan.upper[j])
                if lo == hi and copies:  # a plane on an input slice is that slice: no arithmetic, no rounding
                    host = raw[lo]
                    finite = host if host.dtype.kind != "f" else host[np.isfinite(host)]
                    values = (finite.min(), finite.max(), finite.mean()) if finite.size else (np.nan,) * 3
                    stats[j, 3:6] = stats[j, 6:9] = values
                else:
                    plane = torch.lerp(on_device(lo), on_device(hi), float(plan.weight[j]))[None]
                    # integer slices are finite, and so is their lerp: no NaN pass
                    stored = to_storage(plane, out_dtype, nan_possible=source.dtype.kind == "f")
                    both = torch.cat([slice_stats(plane, nan_aware=False), slice_stats(stored, nan_aware=False)], 1)
                    host = stored.to(out_dtype)[0].cpu().numpy()  # sync: to the writer threads
                    stats[j, 3:] = both[0].cpu().numpy()
                info = source.slices[hi]  # the tags of the slice above, as PyStack3D copies them
                writes.append(writers.submit(write_slice, out_dir / plan.names[j], host, info))
            while len(writes) > 2 * batch_size:
                writes.popleft().result()
            keep_from = int(plan.lower[min(j1, n_out - 1)])
            for cache in (raw, work):
                for k in [k for k in cache if k < keep_from]:
                    del cache[k]
            if on_progress:
                on_progress(j1 - j0)
        while writes:
            writes.popleft().result()
    finally:
        for f in [*pending.values(), *writes]:
            f.cancel()
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
    return stats
