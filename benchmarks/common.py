"""Shared benchmark plumbing: the machine's description, timed subprocesses, page-cache control, RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
TIME = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        pass
    try:
        mem = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        mem = float("nan")
    import numpy
    import tifffile
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    versions = f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, " \
               f"tifffile {tifffile.__version__}"
    try:
        import importlib.metadata as md

        versions += f", pystack3d {md.version('pystack3d')}"
    except Exception:  # noqa: BLE001
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, GPU: {gpu}; {versions}"


def evict(paths: list[Path]) -> bool:
    """Drop files from the page cache (cold-cache runs); False where the OS does not support it."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def timed(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB, NaN if unknown) of one command."""
    full = [TIME, "-f", "%M"] + cmd if TIME else cmd
    os.sync()  # no run pays for the write-back of an earlier run's output (or of the set-up's files)
    start = time.perf_counter()
    proc = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    peak = float("nan")
    if TIME:
        try:
            peak = int(proc.stderr.strip().splitlines()[-1]) / 1024
        except (ValueError, IndexError):
            pass
    return seconds, peak


def summary(values: list[float]) -> float:
    return statistics.median(values)


def update_results(section: str, body: str) -> None:
    """Replace (or add) one section of RESULTS.md, between markers, keeping the others."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEvery number here was measured " \
        "by the script named in its section, on the machine it names, in one run.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def python() -> str:
    return sys.executable


def cached_stack(root: Path, spec):
    """The synthetic stack of `spec` in root: generated once, reused while the spec and its files are there."""
    from gpustack.synthetic import SyntheticStack, generate

    if (root / "truth.json").exists():
        stack = SyntheticStack.load(root)
        if stack.spec == spec and all(p.exists() for ch in spec.channels for p in stack.files(ch)):
            return stack
        shutil.rmtree(root)
    print(f"generating {spec.n_slices} slices of {spec.width}x{spec.height} {spec.dtype} x {len(spec.channels)} "
          f"channel(s) in {root} ...", flush=True)
    start = time.perf_counter()
    stack = generate(root, spec)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    return stack
