"""The writer threads of a streaming pass: slices written in the background, a bounded number pending, and per
ring slot the writes that still read from that slot's host buffer (it is refilled only once they are done)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gpustack.io.tiff import StackSource, write_slice


class SliceWrites:
    def __init__(self, source: StackSource, *, threads: int, limit: int, slots: int):
        self.source = source
        self.limit = limit  # pending writes beyond which the pass waits for the oldest
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gpustack-write")
        self.pending: deque[Future] = deque()
        self.by_slot: list[list[Future]] = [[] for _ in range(slots)]

    def write(self, out_dir: Path, data: np.ndarray, b0: int, b1: int, slot: int) -> None:
        """Slices b0..b1 of the stack, `data[i - b0]` each, under their input names; `data` may be a view of the
        ring buffer `slot`."""
        for i in range(b0, b1):
            info = self.source.slices[i]
            future = self.pool.submit(write_slice, out_dir / info.name, data[i - b0], info)
            self.pending.append(future)
            self.by_slot[slot].append(future)

    def free(self, slot: int) -> None:
        """Wait until no write reads from ring buffer `slot` any more."""
        for f in self.by_slot[slot]:
            f.result()
        self.by_slot[slot] = []

    def throttle(self) -> None:
        while len(self.pending) > self.limit:
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()


def close_io(readers: ThreadPoolExecutor, reads: Iterable[list[Future]], writes: SliceWrites) -> None:
    """End a pass's IO, also on error: what has not started is cancelled, what runs is waited for."""
    for futures in reads:
        for f in futures:
            f.cancel()
    for f in writes.pending:
        f.cancel()
    readers.shutdown(wait=True, cancel_futures=True)
    writes.pool.shutdown(wait=True, cancel_futures=True)
