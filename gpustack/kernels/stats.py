"""Per-slice statistics, computed where the slices are (no host round-trip per slice)."""

from __future__ import annotations

import torch


def slice_stats(x: torch.Tensor, *, nan_aware: bool = True) -> torch.Tensor:
    """(n, H, W) -> (n, 3) float32: min, max, mean of each slice, ignoring NaN when `nan_aware`.

    A slice with no finite value gives NaN for all three. `nan_aware=False` is a faster path for data that
    cannot hold NaN (integer inputs, steps that never make NaN).
    """
    flat = x.reshape(x.shape[0], -1)
    if not flat.is_floating_point():  # integer slices: exact in float32 up to 2**24, i.e. uint8 and uint16
        flat, nan_aware = flat.to(torch.float32), False
    if not nan_aware:  # amin and amax apart: torch's fused aminmax is several times slower on the CPU
        return torch.stack([flat.amin(dim=1), flat.amax(dim=1), flat.mean(dim=1, dtype=torch.float32)],
                           dim=1).to(torch.float32)
    finite = torch.isfinite(flat)
    count = finite.sum(dim=1)
    inf = torch.tensor(float("inf"), dtype=flat.dtype, device=flat.device)
    lo = torch.where(finite, flat, inf).amin(dim=1)
    hi = torch.where(finite, flat, -inf).amax(dim=1)
    mean = torch.where(finite, flat, 0).sum(dim=1, dtype=torch.float32) / count
    out = torch.stack([lo.to(torch.float32), hi.to(torch.float32), mean], dim=1)
    return torch.where((count > 0)[:, None], out, torch.full_like(out, float("nan")))
