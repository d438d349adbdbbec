"""Public functions on arrays: NumPy, torch or CuPy in, the same kind out (see gpustack.arrays)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpustack.area import Area


def crop(stack: Any, area: Sequence[int]) -> Any:
    """Keep `area = [xmin, xmax, ymin, ymax]` (px, origin bottom-left, PyStack3D's convention) of a slice (H, W)
    or a stack (N, H, W). Returns a view of the same kind of array; 9999/99999 as a max bound mean 'to the edge'.
    """
    if getattr(stack, "ndim", 0) not in (2, 3):
        raise ValueError(f"expected a slice (H, W) or a stack (N, H, W), got shape {getattr(stack, 'shape', None)}")
    rows, cols = Area(*(int(v) for v in area)).rows_cols(*stack.shape[-2:])
    return stack[..., rows, cols]


def slice_statistics(stack: Any, *, device: str | None = None) -> Any:
    """(N, 3) min, max, mean of each slice of a stack (N, H, W), NaN ignored; same kind of array as the input."""
    import torch

    from gpustack.arrays import to_torch
    from gpustack.kernels.stats import slice_stats

    t, back = to_torch(stack, device)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"expected a stack (N, H, W), got shape {tuple(t.shape)}")
    return back(slice_stats(t.to(torch.float32), nan_aware=True))

