"""Image-quality metrics against a ground truth: RMSE, PSNR and SSIM, per slice.

Inputs are NumPy arrays or torch tensors (anything `gpustack.arrays.to_torch` takes), one slice (H, W) or a stack
(n, H, W); `x` and `truth` must have the same shape. Everything is computed in float64 with torch, batched over
the slices, on `device` (default: the tensor's own device, the CPU for NumPy data). A stack gives a NumPy float64
array of shape (n,), a single slice a Python float.

NaN: a NaN anywhere in a slice (of `x` or `truth`) makes that slice's value NaN; the other slices are unaffected.

SSIM follows Wang et al. (2004) with a Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11 taps), K1 = 0.01,
K2 = 0.03 and population covariances, averaged over the pixels whose window lies fully inside the slice (a border
of one window radius left out): the same value as `skimage.metrics.structural_similarity(x, truth,
data_range=R, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gpustack.arrays import to_torch

__all__ = ["psnr", "rmse", "ssim"]

_K1, _K2, _TRUNCATE = 0.01, 0.03, 3.5


def _prepare(x: Any, truth: Any, device: str | torch.device | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(x, truth) as float64 (n, H, W) tensors on one device, and whether the input was a single slice."""
    a, _ = to_torch(x, device)
    b, _ = to_torch(truth, a.device if device is None else device)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: x has shape {tuple(a.shape)}, truth has shape {tuple(b.shape)}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected a slice (H, W) or a stack (n, H, W), got shape {tuple(a.shape)}")
    single = a.ndim == 2
    a, b = a.to(torch.float64), b.to(a.device, torch.float64)
    return (a[None], b[None], True) if single else (a, b, False)


def _per_slice(value: torch.Tensor, single: bool) -> np.ndarray | float:
    """A (n,) tensor as a NumPy float64 array, or a float for a single slice."""
    out = value.detach().to("cpu", torch.float64).numpy()
    return float(out[0]) if single else out


def _range(data_range: Any, like: torch.Tensor) -> torch.Tensor:
    """`data_range` (scalar or one per slice) as a float64 (n,) tensor."""
    r = torch.as_tensor(data_range, dtype=torch.float64, device=like.device).reshape(-1)
    return r.expand(like.shape[0])


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-slice mean squared error (NaN propagates)."""
    return (a - b).square().mean(dim=(-2, -1))


def rmse(x: Any, truth: Any, *, device: str | torch.device | None = None) -> np.ndarray | float:
    """Root-mean-square error of each slice of `x` against `truth`."""
    a, b, single = _prepare(x, truth, device)
    return _per_slice(_mse(a, b).sqrt(), single)


def psnr(x: Any, truth: Any, data_range: Any, *, device: str | torch.device | None = None) -> np.ndarray | float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range² / MSE), per slice; inf where MSE is 0."""
    a, b, single = _prepare(x, truth, device)
    r = _range(data_range, a)
    return _per_slice(10.0 * torch.log10(r.square() / _mse(a, b)), single)


def _gaussian_taps(sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian window of radius int(3.5 sigma + 0.5), float64."""
    radius = int(_TRUNCATE * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (t / sigma).square())
    return w / w.sum()


def ssim(x: Any, truth: Any, data_range: Any, sigma: float = 1.5, *,
         device: str | torch.device | None = None) -> np.ndarray | float:
    """Mean SSIM of each slice of `x` against `truth` (Gaussian window, border of one radius excluded)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    a, b, single = _prepare(x, truth, device)
    taps = _gaussian_taps(sigma, a.device)
    k = taps.numel()
    if min(a.shape[-2:]) < k:
        raise ValueError(f"slices of shape {tuple(a.shape[-2:])} are smaller than the {k}x{k} SSIM window")
    n = a.shape[0]
    # The five moments as channels of one batch: a 'valid' separable convolution gives exactly the pixels whose
    # window lies inside the slice, so no padding mode is involved.
    stacked = torch.stack([a, b, a * a, b * b, a * b], dim=1).reshape(n * 5, 1, *a.shape[-2:])
    blurred = torch.nn.functional.conv2d(stacked, taps.view(1, 1, k, 1))
    blurred = torch.nn.functional.conv2d(blurred, taps.view(1, 1, 1, k))
    ux, uy, uxx, uyy, uxy = blurred.reshape(n, 5, *blurred.shape[-2:]).unbind(dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    r = _range(data_range, a).view(n, 1, 1)
    c1, c2 = (_K1 * r).square(), (_K2 * r).square()
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    mean = s.mean(dim=(-2, -1))
    has_nan = torch.isnan(a).any(dim=(-2, -1)) | torch.isnan(b).any(dim=(-2, -1))
    return _per_slice(torch.where(has_nan, torch.full_like(mean, math.nan), mean), single)
