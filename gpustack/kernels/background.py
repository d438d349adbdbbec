"""Polynomial background removal on batches of slices: sampling, masks, fits and the correction.

The fit runs on a subsampled grid (every `sx`-th column and `sy`-th row, or the means of sx × sy blocks), with
pixels outside [threshold_min, threshold_max] (and NaN) left out; the background is then evaluated at full
resolution and removed, keeping the fitted constant (or the mean background, `preserve_avg`) so that the grey
levels stay where they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpustack.kernels import polynomial, robust


@dataclass(frozen=True)
class Sampling:
    sx: int
    sy: int
    averaging: bool  # block means instead of strided picks

    def coords(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit coordinates (ys, xs) of the samples, float64: pixel positions, or block centres when averaging."""
        ys = polynomial.unit_coords(height, dtype=torch.float64, device=device)
        xs = polynomial.unit_coords(width, dtype=torch.float64, device=device)
        if not self.averaging:
            return ys[:: self.sy], xs[:: self.sx]
        hb, wb = self._blocks(height, width)
        return (ys[: hb * self.sy].view(hb, self.sy).mean(dim=1), xs[: wb * self.sx].view(wb, self.sx).mean(dim=1))

    def _blocks(self, height: int, width: int) -> tuple[int, int]:
        return max(1, height // self.sy), max(1, width // self.sx)

    def take_masked(self, x: torch.Tensor, threshold_min: float | None,
                    threshold_max: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`take` with the fit mask; strided sampling tests only the samples, not every pixel."""
        if not self.averaging:
            values = x[:, :: self.sy, :: self.sx]
            return values, fit_mask(values, threshold_min, threshold_max)
        return self.take(x, fit_mask(x, threshold_min, threshold_max))

    def take(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, valid) on the sample grid, (b, hs, ws); a block is valid if any of its pixels is."""
        if not self.averaging:
            return x[:, :: self.sy, :: self.sx], valid[:, :: self.sy, :: self.sx]
        hb, wb = self._blocks(*x.shape[1:])
        kernel = (min(self.sy, x.shape[1]), min(self.sx, x.shape[2]))
        weight = valid.to(torch.float32)[:, None, : hb * kernel[0], : wb * kernel[1]]
        values = torch.where(valid, x, 0.0)[:, None, : hb * kernel[0], : wb * kernel[1]]
        total = F.avg_pool2d(values, kernel)[:, 0]
        count = F.avg_pool2d(weight, kernel)[:, 0]
        return total / count.clamp_min(1e-12), count > 0


def fit_mask(x: torch.Tensor, threshold_min: float | None, threshold_max: float | None) -> torch.Tensor:
    """Pixels the fit may use: finite, and within the thresholds (inclusive, as PyStack3D)."""
    valid = torch.isfinite(x)
    if threshold_min is not None:
        valid &= x >= threshold_min
    if threshold_max is not None:
        valid &= x <= threshold_max
    return valid


@dataclass
class Background:
    """A polynomial background model for one slice shape, ready for repeated batched fits."""

    powers: polynomial.Powers
    sampling: Sampling
    height: int
    width: int
    device: torch.device

    def __post_init__(self) -> None:
        ys, xs = self.sampling.coords(self.height, self.width, self.device)
        self.sample_shape = (len(ys), len(xs))
        powers_2d = tuple(p[:2] for p in self.powers)
        self.design = polynomial.design_matrix(powers_2d, xs, ys)  # 2D fits (per slice)
        self._basis: robust.Basis | None = None

    @property
    def basis(self) -> robust.Basis:
        if self._basis is None:
            self._basis = robust.Basis(self.design)
        return self._basis

    def fit_slices(self, values: torch.Tensor, valid: torch.Tensor, norm: str, maxiter: int) -> robust.Fit:
        """One fit per slice: values/valid (b, hs, ws) on the sample grid."""
        b = values.shape[0]
        return robust.fit(self.basis, values.reshape(b, -1), valid.reshape(b, -1), norm=norm, maxiter=maxiter)

    def remove(self, x: torch.Tensor, grid: torch.Tensor, offset: torch.Tensor,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """x - background + offset; `grid` (b, ny, nx) from `polynomial.slice_coefficients`; `keep`: pixels left as
        they are (masked pixels with correct_masked = false). NaN grids (slices not fitted) leave slices intact."""
        ok = torch.isfinite(grid).flatten(1).all(dim=1)
        grid = torch.where(ok[:, None, None], grid, 0.0)
        offset = torch.where(ok, offset, 0.0)
        # x - (background - offset), computed in the background's buffer: one slice-sized temporary
        grid = grid.clone()
        grid[:, 0, 0] -= offset.to(grid.dtype)
        out = polynomial.evaluate(grid, self.height, self.width, torch.float32).neg_().add_(x)
        return out if keep is None else torch.where(keep, x, out)
