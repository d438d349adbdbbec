"""Which device runs the kernels, and how many slices fit in one batch there.

`auto` takes the first usable CUDA device and says so; `cuda`/`cuda:N` without a usable GPU is a DeviceError
that names the reason. Kernels never ask: they run on the tensors they are given. A workflow that only selects
pixels (cropping) needs no device at all (`host_choice`): torch is imported only when a device is resolved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpustack.errors import DeviceError

if TYPE_CHECKING:
    import torch

CPU_BUDGET_CAP = 4 << 30  # larger CPU batches only add latency: the CPU is busy either way
CPU_MAX_BATCH = 16
CPU_TEMPORARY_BYTES = 30 << 20  # a batch-sized float32 temporary below malloc_tuning.MMAP (32 MiB)
CPU_STREAM_BYTES = 13 << 20  # the same for passes without a halo: temporaries that stay in the cache
CUDA_MAX_BATCH = 128


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device | None  # None: no kernel runs, the slices are only copied on the host (`host_choice`)
    description: str  # e.g. "cuda:0 (NVIDIA H100, 79.1 GiB)" or "cpu (2 threads)"
    reason: str  # why this device: shown to the user

    @property
    def is_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"


def host_choice(spec: str | None) -> DeviceChoice | None:
    """The choice for a workflow whose steps only select pixels: no device, unless one was named.

    `auto` gives the host: no torch import (about a second), and a GPU would only add two transfers per slice.
    An explicit `cpu`, `cuda` or `cuda:N` gives None: it is resolved (a CUDA one refused without a GPU) and the
    steps run there, as for any workflow.
    """
    if (spec or "auto").strip().lower() != "auto":
        return None
    return DeviceChoice(None, "host (no device needed)", "the steps only crop: slices are copied as they are")


def _cuda_unavailable_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return ("this PyTorch build has no CUDA support (torch " + torch.__version__ + "); install a CUDA-enabled "
                "PyTorch build for your driver")
    try:
        count = torch.cuda.device_count()
    except Exception as exc:  # noqa: BLE001 - the driver's own words are the most useful reason
        return f"the CUDA driver cannot be used ({exc})"
    if count == 0:
        return "no CUDA device is visible (check the NVIDIA driver with nvidia-smi, and CUDA_VISIBLE_DEVICES)"
    return "CUDA is not usable in this process"


def _describe_cuda(index: int) -> str:
    import torch

    props = torch.cuda.get_device_properties(index)
    return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"


def resolve_device(spec: str = "auto", origin: str | None = None) -> DeviceChoice:
    """`origin`: where the choice was made, for the messages (default: the --device option)."""
    import torch

    spec = (spec or "auto").strip().lower()
    where = origin or f"--device {spec}"
    if spec == "cpu":
        return DeviceChoice(torch.device("cpu"), f"cpu ({torch.get_num_threads()} threads)", "requested")
    if spec == "auto":
        if torch.cuda.is_available():
            return DeviceChoice(torch.device("cuda", 0), _describe_cuda(0), "auto: a CUDA device is available")
        return DeviceChoice(torch.device("cpu"), f"cpu ({torch.get_num_threads()} threads)",
                            "auto: no usable GPU, " + _cuda_unavailable_reason())
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{where}: {_cuda_unavailable_reason()}. Use --device cpu or auto to run "
                              "on the CPU.")
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"{where}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                              f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
        return DeviceChoice(torch.device("cuda", index), _describe_cuda(index), "requested")
    raise DeviceError(f"{where}: expected auto, cpu, cuda or cuda:N")


def available_memory(device: torch.device) -> int:
    """Bytes the run may use on `device` if nobody said otherwise."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.6)  # leave room for cuFFT workspaces and other processes
    return available_host_memory()


def available_host_memory() -> int:
    """Bytes a run may use in host memory for its batches: a quarter of what is free, at most 4 GiB."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(min(avail * 0.25, CPU_BUDGET_CAP))


def batch_size_for(device: torch.device, slice_bytes: int, *, budget: int | None = None,
                   requested: int | None = None, plane_bytes: int | None = None, halo: int = 0) -> int:
    """Slices per batch: what the user asked for, else as many as the memory budget holds (at least 1).

    On the CPU, also few enough that a float32 batch (`plane_bytes` per slice) stays under glibc's mmap
    threshold, as `malloc_tuning` sets it: above it every temporary the size of a batch is mapped and
    page-faulted in afresh, which made an elementwise operation on 16 slices of 901² cost 1.3 ms per slice
    against 0.3 ms on 8 (measured). Never fewer than twice the halo, which every batch reads again.
    A pass without a halo reads nothing twice: its batches are smaller still (CPU_STREAM_BYTES), so that a
    step's temporaries are still in the cache for the next operation. Measured on 200 slices of 901², 2 cores,
    medians of 5 runs: intensity rescaling 4.04 -> 3.11 s with 4 slices a batch instead of 9, the registration
    warp 1.97 -> 1.72 s, background removal 3.41 -> 3.34 s; the registration estimate (a halo of 1) was slower
    in batches of 2-4.
    """
    if requested:
        return requested
    budget = budget if budget is not None else available_memory(device)
    cap = CUDA_MAX_BATCH if device.type == "cuda" else CPU_MAX_BATCH
    if device.type == "cpu" and plane_bytes:
        cap = min(cap, max((CPU_TEMPORARY_BYTES if halo else CPU_STREAM_BYTES) // plane_bytes, 2 * halo, 1))
    return max(1, min(cap, budget // max(1, slice_bytes)))
