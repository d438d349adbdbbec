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
from typing import Any

import numpy as np
import torch

from gpustack.io.tiff import read_slice
from gpustack.kernels.cast import INT_RANGES, to_storage
from gpustack.kernels.stats import slice_stats
from gpustack.pipeline.spec import N_STATS, PassSpec, StepRun
from gpustack.pipeline.writes import SliceWrites, close_io
from gpustack.steps.base import Batch, Step

TORCH_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "float32": torch.float32}


def _halo(runs: list[StepRun], fit: Step | None) -> tuple[int, int]:
    """Context a pass must read around each batch: the halos of its steps add up along the chain."""
    before = sum(r.step.halo[0] for r in runs) + (fit.fit_halo[0] if fit else 0)
    after = sum(r.step.halo[1] for r in runs) + (fit.fit_halo[1] if fit else 0)
    return before, after


_BUFFERS: dict[Any, torch.Tensor] = {}


def _buffer(key: Any, shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool,
            device: torch.device | None = None) -> torch.Tensor:
    """A buffer kept across batches, channels and passes: fresh large host allocations cost page faults."""
    full = (key, dtype, pin, str(device))
    numel = int(np.prod(shape))
    buf = _BUFFERS.get(full)
    if buf is None or buf.numel() < numel:
        _BUFFERS[full] = buf = torch.empty(numel, dtype=dtype, pin_memory=pin, device=device)
    return buf[:numel].view(shape)


def release_buffers() -> None:
    _BUFFERS.clear()


def _storage(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.untyped_storage().data_ptr()


def _stored_stats(stored: torch.Tensor, out_stats: torch.Tensor, dtype: torch.dtype,
                  nan_possible: bool) -> torch.Tensor:
    """Statistics of what is written. For integers from data without NaN, min and max follow from the output's
    (rounding and clipping are monotonic, so they commute with min and max): only the mean takes a pass."""
    if dtype.is_floating_point or nan_possible:
        return slice_stats(stored, nan_aware=dtype.is_floating_point and nan_possible)
    lo, hi = INT_RANGES[dtype]
    ends = out_stats[:, :2].round().clamp(lo, hi)
    mean = stored.reshape(stored.shape[0], -1).mean(dim=1, dtype=torch.float32)
    return torch.cat([ends, mean[:, None]], dim=1)


def _nan_row(like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0], 3), float("nan"), dtype=torch.float32, device=like.device)


def _keep_records(r: StepRun, records: dict[str, torch.Tensor], core: slice, b0: int, n: int) -> None:
    for key, value in records.items():
        host = value[core].cpu().numpy()  # sync: small per-slice values (coefficients, scores)
        if key not in r.records:
            r.records[key] = np.full((n, *host.shape[1:]), np.nan if host.dtype.kind == "f" else 0, host.dtype)
        r.records[key][b0:b0 + host.shape[0]] = host


def run_pass(spec: PassSpec, *, device: torch.device, batch_size: int, io_threads: int = 4, prefetch: int = 2,
             on_progress: Callable[[int], None] | None = None) -> None:
    source, runs = spec.source, spec.runs
    n = len(source)
    # About two reads per IO thread in flight whatever the batch size: CPU batches of large slices hold one or two
    # slices (device.batch_size_for), and two batches ahead would leave the readers idle on a slow disk.
    prefetch = max(prefetch, min(16, -(-2 * io_threads // batch_size)))
    before, after = _halo(runs, spec.fit)
    window = batch_size + before + after
    cuda = device.type == "cuda"
    rows, cols = runs[0].region if spec.push_region else (slice(0, source.shape[0]), slice(None))
    band = (rows.stop - rows.start, source.shape[1])
    torch_in = torch.from_numpy(np.empty(0, source.dtype)).dtype
    ring = [_buffer(("ring", k), (window, *band), torch_in, pin=cuda) for k in range(prefetch + 1)]
    ring_free: list[torch.cuda.Event | None] = [None] * len(ring)
    for r in runs:
        r.stats = np.full((n, N_STATS), np.nan, dtype=np.float32)
    starts = list(range(0, n, batch_size))

    readers = ThreadPoolExecutor(io_threads, thread_name_prefix="gpustack-read")
    pending_reads: deque[tuple[int, int, int, list[Future]]] = deque()
    writes = SliceWrites(source, threads=io_threads, slots=len(ring),
                         limit=2 * batch_size * max(1, sum(r.out_dir is not None for r in runs)))
    band_rows = rows if spec.push_region else None

    def submit(batch_no: int) -> None:
        b0 = starts[batch_no]
        w0, w1 = max(0, b0 - before), min(n, b0 + batch_size + after)
        slot = batch_no % len(ring)
        if ring_free[slot] is not None:
            ring_free[slot].synchronize()  # sync: the buffer's last upload must be done before it is refilled
        writes.free(slot)  # on the CPU, slices are written straight from the ring buffer
        host = ring[slot].numpy()
        futures = [readers.submit(read_slice, source.slices[i], host[i - w0], band_rows) for i in range(w0, w1)]
        pending_reads.append((slot, w0, w1, futures))

    scratch = _buffer("scratch", (window, *band), torch.float32, pin=False, device=device)
    # integer input that the first step computes on: converted once, into a reused buffer, for the statistics
    # of the input and for the step alike
    converts_first = (bool(runs) and runs[0].region is None and not spec.push_region
                      and not runs[0].step.takes_integers)
    converted = (_buffer("converted", (window, *band), torch.float32, pin=False, device=device)
                 if converts_first and not torch_in.is_floating_point else None)

    def stats_of(t: torch.Tensor, nan_aware: bool) -> torch.Tensor:
        """Integer slices are converted into a reused float32 buffer: no allocation (and page faults) per batch."""
        if not t.is_floating_point():
            t = scratch.view(-1)[: t.numel()].view(t.shape).copy_(t)
        return slice_stats(t, nan_aware=nan_aware)

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
            x = x[:, :, cols]  # on the CPU a view of the ring buffer: steps never write into their input
            core = slice(b0 - w0, b1 - w0)
            names = [s.name for s in source.slices[w0:w1]]
            # Integer data stays integer (and exact) while steps only select pixels; the first step that
            # computes gets float32, and from then on what is written is rounded and clipped.
            nan_possible = source.dtype.kind == "f"
            if converted is not None:
                x = converted.view(-1)[: x.numel()].view(x.shape).copy_(x)
            known = spec.push_region or spec.input_stats is not None
            stats = [_nan_row(x[core]) if known else stats_of(x[core], nan_possible)]
            written: tuple[int, torch.Tensor, torch.dtype] | None = None  # the fit's input: the last run written
            for j, r in enumerate(runs):
                if r.region is not None and not (j == 0 and spec.push_region):
                    x = x[:, r.region[0], r.region[1]]
                elif r.region is None and not x.is_floating_point() and not r.step.takes_integers:
                    x = x.to(torch.float32)
                x, records = r.step.apply_recorded(Batch(x, w0, core, names, n), r.state)
                if records:
                    _keep_records(r, records, core, b0, n)
                nan_possible = nan_possible or r.step.may_make_nan
                out = x[core]
                out_stats = stats_of(out, nan_possible)
                stats.append(out_stats)
                if r.out_dir is None:
                    stats.append(_nan_row(out))
                    continue
                out_dtype = TORCH_DTYPES[r.out_dtype]
                if out.dtype == out_dtype:  # integer here means untouched input pixels: written as they are
                    stored, stored_stats = out, out_stats
                else:
                    stored = to_storage(out.to(torch.float32), out_dtype, nan_possible=nan_possible)
                    stored_stats = _stored_stats(stored, out_stats, out_dtype, nan_possible)
                stats.append(stored_stats)
                if spec.fit is not None:
                    written = (j, stored, out_dtype)
                writes.write(r.out_dir, stored.to(out_dtype).cpu().numpy(), b0, b1, slot)  # sync: to the writers
            if spec.fit is not None:
                # The fitted step's pass reads what this one wrote last: its statistics are taken on exactly
                # that, rounded and clipped (a slice that bkg_removal takes below 0 is read back as 0s). NaN
                # (a warp's fill) stays NaN, which statistics leave out, rather than the 0 it is written as.
                # Only if the runs after the written one pass their input on (they write nothing).
                if (written is not None and x.is_floating_point() and written[2] != torch.float32
                        and not any(r.step.writes_slices for r in runs[written[0] + 1:])):
                    if nan_possible or x.shape[0] != written[1].shape[0]:
                        x = to_storage(x, written[2], nan_possible=False)  # rounds and clips; NaN stays NaN
                    else:
                        x = written[1]
                if not x.is_floating_point():
                    if not spec.fit.fits_level_counts:
                        x = x.to(torch.float32)
                elif x.untyped_storage().data_ptr() in (ring[slot].untyped_storage().data_ptr(),
                                                        _storage(converted)):
                    x = x.clone()  # a fit may keep (a view of) its batch; reused buffers will be refilled
                spec.fit_partials.append(spec.fit.fit_batch(Batch(x, w0, core, names, n)))
            host_stats = torch.cat(stats, dim=1).cpu().numpy()  # sync: (batch, 3 + 6 per step) statistics
            for j, r in enumerate(runs):  # columns: input, then (output, written) per step
                o = 3 + 6 * j
                r.stats[b0:b1, :3] = host_stats[:, o - 6:o - 3] if j else host_stats[:, :3]
                r.stats[b0:b1, 3:] = host_stats[:, o:o + 6]
            writes.throttle()
            if on_progress:
                on_progress(b1 - b0)
        writes.drain()
        if spec.input_stats is not None and runs:
            runs[0].stats[:, :3] = spec.input_stats
    finally:
        close_io(readers, (futures for *_, futures in pending_reads), writes)
