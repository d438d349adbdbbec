"""VSNR destriping (Variational Stationary Noise Remover; Fehrenbach, Weiss & Lorenzo, IEEE TIP 21(10), 2012),
batched over slices on torch.

Model: an observed slice u0 = u + b, where the stationary noise b = sum_i psi_i * lambda_i is a sum of known
patterns psi_i (a Dirac for white noise, elongated Gaussians, "Gabor" filters, for curtains) convolved with
unknown fields. With Gaussian priors on the lambda_i the patterns merge into one filter psi with
|psi^|^2 = sum_i |psi_i^|^2 / alpha_i, and the problem becomes

    min_x  1/2 |x|^2 + | grad u0 - A x |_{1,2},      A x = grad(psi * x),

the isotropic total variation of the cleaned slice u0 - psi * x plus a penalty on the noise field, solved by
ADMM with penalty beta. Every operator is a convolution, so the x-update is a division in the Fourier domain and
the y-update a pointwise vector shrinkage; gradients are periodic differences. The weights alpha_i follow
pyvsnr's convention (the reference implementation PyStack3D calls; PEERS.md §5.1) so that `noise_level` means the
same in both and outputs agree: alpha_i = sqrt(N) N^2 max_xi(|d_k^| |psi_i^|^2) / (|u0|_2 eta_i) with u0 the
slice divided by its maximum.

What is done once instead of per slice: the filters' spectra depend on the slice only through the scalar |u0|_2,
so `VsnrOperator` builds them once per slice shape; a slice contributes one factor. The iteration is rewritten on
the scaled dual mu = lambda / beta and the stripe field's spectrum z^ = psi^ x^, which leaves two real fields and
two spectra per slice, and costs one batched forward and one batched inverse real FFT (of the two gradient
components) per iteration.

Convergence is per slice: pyvsnr's criterion max|x^_k - x^_(k-1)| / max|x^_k| is evaluated slice by slice, and a
slice that has converged is taken out of the batch (its result is final) while the others go on. Checking needs
one host synchronisation per iteration, and only when a threshold is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EPS = 1.1920929e-07  # float32 machine epsilon: keeps the shrinkage finite where the gradient vanishes


@dataclass(frozen=True)
class NoiseFilter:
    """One noise pattern: `Dirac` (white noise) or `Gabor` (a Gaussian of standard deviations sigma = (across,
    along) the stripes in pixels, rotated by `theta` degrees; sigma[1] >> sigma[0] gives vertical curtains)."""

    name: str
    noise_level: float
    sigma: tuple[float, float] = (1.0, 1.0)
    theta: float = 0.0

    @property
    def oriented(self) -> bool:
        return self.name == "Gabor" and self.sigma[0] != self.sigma[1]


def _pattern(f: NoiseFilter, shape: tuple[int, int], dtype, device) -> torch.Tensor:
    """The filter sampled on the slice grid (Gabor centred at (H/2 + 1, W/2 + 1), as the Fiji plugin and pyvsnr
    place it: only |psi^| matters, but where the Gaussian is cut by the border changes it slightly)."""
    import torch

    h, w = shape
    if f.name == "Dirac":
        psi = torch.zeros(shape, dtype=dtype, device=device)
        psi[0, 0] = 1.0
        return psi
    x = torch.arange(w, dtype=dtype, device=device) - (w / 2.0 + 1.0)
    y = torch.arange(h, dtype=dtype, device=device) - (h / 2.0 + 1.0)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    th = math.radians(f.theta)
    across = xx * math.cos(th) + yy * math.sin(th)
    along = yy * math.cos(th) - xx * math.sin(th)
    sx, sy = f.sigma
    return torch.exp(-0.5 * ((across / sx) ** 2 + (along / sy) ** 2)) * (math.sqrt(sx * sy) / math.pi)


def _difference_spectra(shape: tuple[int, int], dtype, device) -> torch.Tensor:
    """rfft2 of the periodic differences along columns (d1) and rows (d2): (2, H, W // 2 + 1) complex."""
    import torch

    h, w = shape
    d = torch.zeros((2, h, w), dtype=dtype, device=device)
    d[:, 0, 0] = 1.0
    d[0, 0, w - 1] = -1.0
    d[1, h - 1, 0] = -1.0
    return torch.fft.rfft2(d)


class VsnrOperator:
    """Everything about VSNR that depends only on the slice shape and the filters, built once per stack.

    `base` is the merged filter's spectrum for a slice of unit norm (psi^ of a slice = sqrt(|u0|_2) * base), and
    `diff` the spectra of the two difference operators; both (.., H, W // 2 + 1) on the device, float32.
    """

    def __init__(self, shape: tuple[int, int], filters: list[NoiseFilter], device: torch.device, *,
                 beta: float = 10.0):
        import torch

        if not filters:
            raise ValueError("filters: at least one noise filter is needed")
        self.shape = (int(shape[0]), int(shape[1]))
        self.filters = list(filters)
        self.beta = float(beta)
        self.device = device
        n = float(self.shape[0] * self.shape[1])
        # Built in float64: the spectra of narrow Gaussians span many decades; the iteration runs in float32.
        diff = _difference_spectra(self.shape, torch.float64, device)
        dmax = diff.abs().amax(dim=0)
        total = torch.zeros(diff.shape[1:], dtype=torch.float64, device=device)
        for f in self.filters:
            power = torch.fft.rfft2(_pattern(f, self.shape, torch.float64, device)).abs() ** 2
            peak = (dmax * power).max()
            total += power * (f.noise_level / (math.sqrt(n) * n * n * peak))
        # pyvsnr carries psi through an unnormalised inverse FFT, which scales its spectrum by N.
        self.base = (n * total.sqrt()).to(torch.float32)
        self.diff = diff.to(torch.complex64)
        self.diff_conj = self.diff.conj()
        self.diff_power = (diff.abs() ** 2).sum(dim=0).to(torch.float32)

    def gains(self, norms: torch.Tensor, *, for_x: bool) -> torch.Tensor:
        """Per-slice Fourier gains (B, H, Wr) from the slices' norms |u0|_2 (B,): the x-update's division folded
        with psi^ (the map from the data term to z^ = psi^ x^), or, with `for_x`, to x^ itself."""
        import torch

        s2 = norms.to(torch.float32)[:, None, None]
        p = self.base[None]
        bp2 = self.beta * s2 * p * p
        denominator = 1.0 + bp2 * self.diff_power
        if for_x:
            return self.beta * s2.sqrt() * p / denominator
        return bp2 / denominator


@dataclass
class WarmState:
    """Where a slice's iteration ended, in units of its maximum: the stripe field's spectrum and the scaled dual.
    The next batch can start from it. Measured: this pays only when neighbouring slices are nearly identical;
    the dual follows the content's edges, and on slices whose content changes it costs iterations."""

    z_hat: torch.Tensor  # (H, Wr) complex64
    mu: torch.Tensor  # (2, H, W) float32
    vmax: torch.Tensor  # () float32


@dataclass
class VsnrResult:
    stripes: torch.Tensor  # (B, H, W) float32: the stripe field removed from each slice (input units)
    iterations: torch.Tensor  # (B,) int64: iterations each slice ran (pyvsnr's count)
    warm: WarmState | None  # the last slice's final state


def solve(op: VsnrOperator, u: torch.Tensor, *, maxit: int, cvg_threshold: float = 0.0,
          warm: WarmState | None = None) -> VsnrResult:
    """Run VSNR on a batch (B, H, W) float32 and return the stripe field of each slice (u - stripes is the
    result). Slices are divided by their maximum inside, as pyvsnr does with `norm=False`; a slice whose maximum
    is not positive, or whose norm is zero, has no stripe field (left intact, where pyvsnr returns NaN).

    `maxit` counts iterations as pyvsnr does; `cvg_threshold` > 0 stops each slice when its relative change of
    x^ falls to the threshold. `warm` starts every slice from a previous slice's final state instead of zero.
    """
    import torch

    b, h, w = u.shape
    if (h, w) != op.shape:
        raise ValueError(f"slices of {w}x{h} given to a VSNR operator built for {op.shape[1]}x{op.shape[0]}")
    u = u.to(torch.float32)
    vmax = u.amax(dim=(1, 2))
    usable = vmax > 0
    scale = torch.where(usable, vmax, torch.ones_like(vmax))
    u0 = u / scale[:, None, None]
    norms = torch.linalg.vector_norm(u0, dim=(1, 2))
    usable &= norms > 0
    norms = torch.where(usable, norms, torch.ones_like(norms))

    u0_hat = torch.fft.rfft2(u0)
    grad_u0 = torch.fft.irfft2(op.diff[None] * u0_hat[:, None], s=(h, w))  # (B, 2, H, W)
    del u0_hat, u0
    gain_z = op.gains(norms, for_x=False)
    gain_x = op.gains(norms, for_x=True) if cvg_threshold > 0 else None

    mu = torch.zeros_like(grad_u0)
    z_hat = None
    if warm is not None:  # the previous slice's state, rescaled to this slice's maximum
        ratio = (warm.vmax / scale).to(torch.float32)
        z_hat = warm.z_hat[None] * ratio[:, None, None]
        mu = warm.mu[None] * ratio[:, None, None, None]

    stripes = torch.zeros((b, h, w), dtype=torch.float32, device=u.device)
    iterations = torch.full((b,), max(int(maxit), 1), dtype=torch.int64, device=u.device)
    active = torch.arange(b, device=u.device)
    x_old = None
    final_z = final_mu = None
    for k in range(1, max(int(maxit), 1)):
        # y-update: shrink t = grad u0 - A x - mu, then the dual; both written through t (see module docstring).
        t = grad_u0 - mu
        if z_hat is not None:
            t -= torch.fft.irfft2(op.diff[None] * z_hat[:, None], s=(h, w))
        c = torch.relu(1.0 - 1.0 / (op.beta * (torch.hypot(t[:, 0], t[:, 1]) + EPS)))[:, None]
        mu = (c - 1.0) * t
        v = grad_u0 - t - 2.0 * mu  # y - mu: the x-update's data term (beta y - lambda) / beta
        del t, c
        # x-update: one division in the Fourier domain.
        num = (op.diff_conj[None] * torch.fft.rfft2(v)).sum(dim=1)
        del v
        z_hat = gain_z * num
        if gain_x is None:
            continue
        x_hat = gain_x * num
        if x_old is not None:
            change = (x_hat - x_old).abs().amax(dim=(1, 2)) / x_hat.abs().amax(dim=(1, 2)).clamp_min(1e-30)
            done = change <= cvg_threshold
            if k == maxit - 1:
                continue
            if bool(done.any()):  # sync: the one host decision per iteration the convergence test needs
                iterations[active[done]] = k + 1
                stripes[active[done]] = torch.fft.irfft2(z_hat[done], s=(h, w))
                if active[done][-1] == b - 1:  # sync: already synchronised above
                    final_z, final_mu = z_hat[done][-1], mu[done][-1]
                keep = ~done
                active, grad_u0, mu, z_hat, x_hat = active[keep], grad_u0[keep], mu[keep], z_hat[keep], x_hat[keep]
                gain_z, gain_x = gain_z[keep], gain_x[keep]
                if active.numel() == 0:
                    break
        x_old = x_hat
    if active.numel():
        if z_hat is not None:
            stripes[active] = torch.fft.irfft2(z_hat, s=(h, w))
        if active[-1] == b - 1:  # sync: once per batch
            final_z = final_mu = None if z_hat is None else z_hat[-1]
    stripes *= torch.where(usable, scale, torch.zeros_like(scale))[:, None, None]
    new_warm = None
    if final_z is not None and bool(usable[-1]):  # sync: once per batch
        new_warm = WarmState(final_z, final_mu, scale[-1])
    return VsnrResult(stripes, iterations, new_warm)
