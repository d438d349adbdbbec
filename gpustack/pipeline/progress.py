"""Progress per pass: a live bar with slices/s and ETA on a terminal, one summary line otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def progress_bar(label: str, total: int, *, enabled: bool, log: Callable[[str], None]) -> Iterator[Callable[[int], None]]:
    start = time.perf_counter()
    live = enabled and sys.stderr.isatty()
    if live:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(label, total=total, rate="")

            def advance(k: int) -> None:
                elapsed = time.perf_counter() - start
                done = bar.tasks[0].completed + k
                bar.update(task, advance=k, rate=f"{done / elapsed:.1f} slices/s" if elapsed > 0 else "")

            yield advance
    else:
        yield lambda k: None
    elapsed = time.perf_counter() - start
    if enabled and not live:
        log(f"{label}: {total} slices in {elapsed:.2f} s ({total / elapsed if elapsed > 0 else 0:.1f} slices/s)")
