"""The one process pool of the CPU reference engines (pystackreg, pyvsnr), and its shutdown at exit.

The console entry ends with `os._exit` (no interpreter teardown), which would also skip the pool's own exit
handler: its spawned workers would outlive gpustack, holding the terminal's pipes open (`out=$(gpustack run ...)`
would never return). `entry` calls `shutdown` first.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

_POOL: ProcessPoolExecutor | None = None


def process_pool() -> ProcessPoolExecutor:
    """A pool of one worker per core, started on first use (spawned: no fork of a process holding threads)."""
    global _POOL
    if _POOL is None:
        _POOL = ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn"))
    return _POOL


def shutdown() -> None:
    """Stop the workers, if any were started, and wait for them."""
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=True, cancel_futures=True)
        _POOL = None
