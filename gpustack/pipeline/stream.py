"""One streaming pass over one channel: read -> device -> step chain -> host -> write, IO overlapping compute.

Reader threads decode slices into a ring of host buffers (pinned on CUDA), `prefetch` batches ahead of the
compute. Each batch goes to the device once, through every step of the pass, and each written step's output
goes back to the host and to writer threads. Memory is bounded: ring size x batch size slices on the host, a
bounded number of pending writes, one batch (plus halo) on the device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpustack.io.tiff import StackSource, read_slice, write_slice
from gpustack.kernels.cast import to_storage
from gpustack.kernels.stats import slice_stats
from gpustack.steps.base import Batch, Step

N_STATS = 9  # input, output, written x (min, max, mean)


@dataclass
class StepRun:
    """A step inside a pass: the step, its fitted state, where its slices go, and its statistics."""

    step: Step
    state: Any = None
    out_dir: Path | None = None  # None: this step's slices are not written in this pass
    out_dtype: torch.dtype = torch.float32
    stats: np.ndarray | None = None  # (n, 9), filled by the pass


@dataclass
class PassSpec:
    source: StackSource
    runs: list[StepRun]
    fit: Step | None = None  # step whose statistics pass runs on this pass's output
    fit_partials: list[Any] = field(default_factory=list)


def _halo(runs: list[StepRun], fit: Step | None) -> tuple[int, int]:
    """Context a pass must read around each batch: the halos of its steps add up along the chain."""
    before = sum(r.step.halo[0] for r in runs) + (fit.fit_halo[0] if fit else 0)
    after = sum(r.step.halo[1] for r in runs) + (fit.fit_halo[1] if fit else 0)
    return before, after


def run_pass(spec: PassSpec, *, device: torch.device, batch_size: int, io_threads: int = 4, prefetch: int = 2,
             on_progress: Callable[[int], None] | None = None) -> None:
    source, runs = spec.source, spec.runs
    n = len(source)
    before, after = _halo(runs, spec.fit)
    window = batch_size + before + after
    cuda = device.type == "cuda"
    torch_in = torch.from_numpy(np.empty(0, source.dtype)).dtype
    ring = [torch.empty((window, *source.shape), dtype=torch_in, pin_memory=cuda) for _ in range(prefetch + 1)]
    ring_free: list[torch.cuda.Event | None] = [None] * len(ring)
    nan_in = source.dtype.kind == "f"
    for r in runs:
        r.stats = np.full((n, N_STATS), np.nan, dtype=np.float32)
    starts = list(range(0, n, batch_size))

    readers = ThreadPoolExecutor(io_threads, thread_name_prefix="gpustack-read")
    writers = ThreadPoolExecutor(io_threads, thread_name_prefix="gpustack-write")
    pending_reads: deque[tuple[int, int, int, list[Future]]] = deque()
    pending_writes: deque[Future] = deque()
    max_writes = 2 * batch_size * max(1, sum(r.out_dir is not None for r in runs))

    def submit(batch_no: int) -> None:
        b0 = starts[batch_no]
        w0, w1 = max(0, b0 - before), min(n, b0 + batch_size + after)
        slot = batch_no % len(ring)
        if ring_free[slot] is not None:
            ring_free[slot].synchronize()  # sync: the buffer's last upload must be done before it is refilled
        host = ring[slot].numpy()
        futures = [readers.submit(read_slice, source.slices[i], host[i - w0]) for i in range(w0, w1)]
        pending_reads.append((slot, w0, w1, futures))

    try:
        for k in range(min(prefetch, len(starts))):
            submit(k)
        for batch_no, b0 in enumerate(starts):
            slot, w0, w1, futures = pending_reads.popleft()
            for f in futures:
                f.result()  # raises the reader's InputError, naming the file
            if batch_no + prefetch < len(starts):
                submit(batch_no + prefetch)
            b1 = min(n, b0 + batch_size)
            x = ring[slot][: w1 - w0]
            if cuda:
                x = x.to(device, non_blocking=True)
                ring_free[slot] = torch.cuda.Event()
                ring_free[slot].record()
            # On the CPU the ring buffer itself would be the batch: copy, since readers refill it meanwhile.
            x = x.to(torch.float32, copy=not cuda)
            core = slice(b0 - w0, b1 - w0)
            names = [s.name for s in source.slices[w0:w1]]
            batch = Batch(x, w0, core, names, n)
            stats = [slice_stats(x[core], nan_aware=nan_in)]
            for r in runs:
                batch = Batch(r.step.apply(batch, r.state), w0, core, names, n)
                out = batch.data[core]
                stats.append(slice_stats(out, nan_aware=True))
                if r.out_dir is not None:
                    stored = to_storage(out, r.out_dtype)
                    stats.append(slice_stats(stored, nan_aware=False))
                    host_out = stored.to(r.out_dtype).cpu().numpy()  # sync: slices go to the writer threads
                    for i in range(b0, b1):
                        pending_writes.append(writers.submit(
                            write_slice, r.out_dir / source.slices[i].name, host_out[i - b0], source.slices[i]))
                else:
                    stats.append(torch.full_like(stats[-1], float("nan")))
            if spec.fit is not None:
                spec.fit_partials.append(spec.fit.fit_batch(batch))
            host_stats = torch.cat(stats, dim=1).cpu().numpy()  # sync: (batch, 3 + 6 per step) statistics
            for j, r in enumerate(runs):  # columns: input, then (output, written) per step
                o = 3 + 6 * j
                r.stats[b0:b1, :3] = host_stats[:, o - 6:o - 3] if j else host_stats[:, :3]
                r.stats[b0:b1, 3:] = host_stats[:, o:o + 6]
            while len(pending_writes) > max_writes:
                pending_writes.popleft().result()
            if on_progress:
                on_progress(b1 - b0)
        while pending_writes:
            pending_writes.popleft().result()
    finally:
        for _slot, _w0, _w1, futures in pending_reads:
            for f in futures:
                f.cancel()
        for f in pending_writes:
            f.cancel()
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
