"""The array boundary: NumPy, torch or CuPy (any DLPack producer) in, the same kind out.

NumPy arrays are wrapped without a copy (`torch.from_numpy`) and moved to the requested device; CuPy arrays
stay on their GPU through DLPack. Kernels only ever see torch tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def to_torch(x: Any, device: str | torch.device | None = None) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """(tensor on the working device, function that turns a result back into the caller's kind of array).

    `device=None` keeps torch and CuPy data where they are and runs NumPy data on the CPU; "auto" picks CUDA
    when it is usable.
    """
    if device == "auto":
        from gpustack.device import resolve_device

        device = resolve_device("auto").device
    # Kernels take C-contiguous stacks (a transposed or strided view is copied once here, as NumPy's below)
    if isinstance(x, torch.Tensor):
        home = x.device
        return (x if device is None else x.to(device)).contiguous(), (lambda t: t.to(home))
    if _is_cupy(x):
        import cupy

        t = torch.from_dlpack(x)
        return (t if device is None else t.to(device)).contiguous(), (lambda r: cupy.from_dlpack(r.contiguous()))
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        t = torch.from_dlpack(x)
        return (t if device is None else t.to(device)).contiguous(), (lambda r: r)
    arr = np.ascontiguousarray(x)
    if not arr.dtype.isnative:  # torch only takes native byte order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    t = torch.from_numpy(arr)
    return (t if device is None else t.to(device)), (lambda r: r.detach().cpu().numpy())
