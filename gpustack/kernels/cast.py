"""Float32 working data -> the dtype written to disk."""

from __future__ import annotations

import torch

_INT_RANGES = {torch.uint8: (0, 255), torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


def to_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to nearest and clip into an integer dtype (PyStack3D truncates); NaN becomes 0 explicitly.

    Returns float32 values already rounded and clipped, so statistics of what is written can be taken
    before the final, exact, `.to(dtype)`.
    """
    if dtype not in _INT_RANGES:
        return x.to(dtype)
    lo, hi = _INT_RANGES[dtype]
    return torch.nan_to_num(x, nan=0.0).round_().clamp_(lo, hi) if x.is_floating_point() else x
