"""Float32 working data -> the dtype written to disk."""

from __future__ import annotations

import torch

INT_RANGES = {torch.uint8: (0, 255), torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


def to_storage(x: torch.Tensor, dtype: torch.dtype, *, nan_possible: bool = True) -> torch.Tensor:
    """Round to nearest and clip into an integer dtype (PyStack3D truncates); NaN becomes 0 explicitly
    (`nan_possible=False` skips that pass for data that cannot hold NaN).

    Returns float32 values already rounded and clipped, so statistics of what is written can be taken
    before the final, exact, `.to(dtype)`. With `nan_possible=False`, NaN pixels (if any) stay NaN.
    """
    if dtype not in INT_RANGES:
        return x.to(dtype)
    lo, hi = INT_RANGES[dtype]
    if not x.is_floating_point():
        return x
    rounded = torch.nan_to_num(x, nan=0.0).round_() if nan_possible else x.round()
    return rounded.clamp_(lo, hi)
