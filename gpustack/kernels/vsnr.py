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
the scaled dual mu = lambda / beta and the stripe field b = psi * x, with the differences done in space: one
forward and one inverse real FFT of one field per iteration (pyvsnr does two of each), and one fused pass over
the slice for the rest (torch.compile on large slices).

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

    def as_table(self) -> dict:
        """The filter as PyStack3D's params.toml and pyvsnr write it."""
        if self.name == "Dirac":
            return {"name": "Dirac", "noise_level": self.noise_level}
        return {"name": "Gabor", "noise_level": self.noise_level, "sigma": list(self.sigma), "theta": self.theta}


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

    `base` is the merged filter's spectrum for a slice of unit norm (psi^ of a slice = sqrt(|u0|_2) * base) and
    `diff_power` the summed power of the two difference operators' spectra; both (H, W // 2 + 1) on the device,
    float32.
    """

    def __init__(self, shape: tuple[int, int], filters: list[NoiseFilter], device: torch.device, *,
                 beta: float = 10.0, fused: bool | None = None, fast_fft: bool = False):
        import torch

        from gpustack.kernels.fft_sizes import fast_size

        if not filters:
            raise ValueError("filters: at least one noise filter is needed")
        self.slice_shape = (int(shape[0]), int(shape[1]))
        # `fast_fft`: slices are mirrored out to the next fast FFT size and the model is solved there (see
        # `solve`); otherwise on the slice's own periodic grid, as pyvsnr does.
        self.shape = tuple(fast_size(n) for n in self.slice_shape) if fast_fft else self.slice_shape
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
        self.diff_power = (diff.abs() ** 2).sum(dim=0).to(torch.float32)
        self.work: dict = {}  # reusable buffers of `solve`
        self.fused = _fuse_by_default(self.shape) if fused is None else fused

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
    """Where a slice's iteration ended, in units of its maximum: the stripe field and the scaled dual. The next
    batch can start from it. Measured: this pays only when neighbouring slices are nearly identical; the dual
    follows the content's edges, and on slices whose content changes it costs iterations."""

    stripes: torch.Tensor  # (H, W) float32
    mu: torch.Tensor  # (2, H, W) float32
    vmax: torch.Tensor  # () float32


@dataclass
class VsnrResult:
    stripes: torch.Tensor  # (B, H, W) float32: the stripe field removed from each slice (input units)
    iterations: torch.Tensor  # (B,) int64: iterations each slice ran (pyvsnr's count)
    warm: WarmState | None  # the last slice's final state


# -- the iteration's arithmetic, fused by torch.compile on large slices ----------------------------------------
#
# Everything but the division by (1 + beta |psi^ d^|^2) is local in space: A x = grad(b) with b = psi * x the
# stripe field, and the x-update's right-hand side sum_k conj(d_k^) F(v_k) is F(div v) with the adjoint
# differences. So each iteration transforms one field back (z^ -> b) and one forward (div v -> z^), instead of
# pyvsnr's two and two, and the rest is one pass over the slice.

FUSE_MIN_PIXELS = 1024 * 1024  # one batch: below this, compiling costs more than it saves
FUSE_MIN_STACK_PIXELS = 64 * 1024 * 1024  # a whole stack (see fuse_for_stack)


def _iterate(grad: torch.Tensor, mu: torch.Tensor, stripes: torch.Tensor, div_v: torch.Tensor, beta: float) -> None:
    """y- and dual update, in place. With A x = grad b (periodic differences d_k f = f - f shifted by one),
    t = grad u0 - A x - mu is shrunk by c = max(0, 1 - 1/(beta |t|)); mu <- (c - 1) t; v = grad u0 + (1 - 2c) t
    (the x-update's data term y - mu) and div_v <- sum_k d_k^T v_k."""
    import torch

    t1 = grad[:, 0] - mu[:, 0] - (stripes - torch.roll(stripes, -1, -1))
    t2 = grad[:, 1] - mu[:, 1] - (stripes - torch.roll(stripes, -1, -2))
    c = torch.clamp(1.0 - 1.0 / (beta * (torch.hypot(t1, t2) + EPS)), min=0.0)
    mu.copy_(torch.stack(((c - 1.0) * t1, (c - 1.0) * t2), dim=1))
    v1 = grad[:, 0] + (1.0 - 2.0 * c) * t1
    v2 = grad[:, 1] + (1.0 - 2.0 * c) * t2
    div_v.copy_(v1 - torch.roll(v1, 1, -1) + v2 - torch.roll(v2, 1, -2))


def _iterate_in_place(grad: torch.Tensor, mu: torch.Tensor, stripes: torch.Tensor, div_v: torch.Tensor,
                      beta: float, t1: torch.Tensor, t2: torch.Tensor, c: torch.Tensor) -> None:
    """`_iterate` without torch.compile: the same arithmetic through three scratch buffers (t1, t2, c), no
    allocation, about half the memory traffic of the plain expressions."""
    import torch

    for t, g, m, dim in ((t1, grad[:, 0], mu[:, 0], -1), (t2, grad[:, 1], mu[:, 1], -2)):
        n = stripes.shape[dim]
        t.copy_(stripes)  # t = grad u0 - mu - (b - b shifted by one)
        t.narrow(dim, 0, n - 1).sub_(stripes.narrow(dim, 1, n - 1))
        t.narrow(dim, n - 1, 1).sub_(stripes.narrow(dim, 0, 1))
        t.neg_().add_(g).sub_(m)
    torch.hypot(t1, t2, out=c)
    c.add_(EPS).reciprocal_().mul_(-1.0 / beta).add_(1.0).clamp_(min=0.0)
    for t, g, m, dim in ((t1, grad[:, 0], mu[:, 0], -1), (t2, grad[:, 1], mu[:, 1], -2)):
        torch.mul(t, c, out=m).sub_(t)  # mu = (c - 1) t
        t.neg_().add_(g).sub_(m, alpha=2.0)  # v = grad u0 + (1 - 2c) t = grad u0 - t - 2 mu
    n1, n2 = t1.shape[-1], t2.shape[-2]
    div_v.copy_(t1)  # div_v = v1 - v1 shifted back + v2 - v2 shifted back
    div_v[..., 1:].sub_(t1[..., :n1 - 1])
    div_v[..., :1].sub_(t1[..., n1 - 1:])
    div_v.add_(t2)
    div_v[..., 1:, :].sub_(t2[..., :n2 - 1, :])
    div_v[..., :1, :].sub_(t2[..., n2 - 1:, :])


_FUSED: dict[str, object] = {}


def _compiled():
    """`_iterate` compiled once per process, or None where torch.compile cannot be set up."""
    if "iterate" not in _FUSED:
        import torch

        try:
            _FUSED["iterate"] = torch.compile(_iterate, dynamic=True)
        except Exception:  # noqa: BLE001 - any failure to set up compilation means: run unfused
            _FUSED["iterate"] = None
    return _FUSED["iterate"]


def _forced() -> bool | None:
    import os

    forced = os.environ.get("GPUSTACK_COMPILE")
    return None if forced is None else forced not in ("0", "false", "no")


def _fuse_by_default(shape: tuple[int, int]) -> bool:
    forced = _forced()
    return shape[0] * shape[1] >= FUSE_MIN_PIXELS if forced is None else forced


def fuse_for_stack(shape: tuple[int, int], n_slices: int) -> bool:
    """Whether compiling the iteration pays for a whole stack: compiling takes a few seconds once per process
    (measured 3.5-5 s on 2 CPU cores), fusing saves about 60% of each iteration; worth it from about 64 slices
    of 1024^2 (GPUSTACK_COMPILE=0/1 decides instead)."""
    forced = _forced()
    if forced is not None:
        return forced
    return shape[0] * shape[1] >= 256 * 256 and n_slices * shape[0] * shape[1] >= FUSE_MIN_STACK_PIXELS


def _run_fused(fn, *args) -> bool:
    """Run the compiled iteration; False (with one warning, and never again in this process) if compiling fails
    on first use, e.g. without a C++ compiler or Triton: the caller then runs `_iterate_in_place`."""
    try:
        fn(*args)
        return True
    except Exception as exc:  # noqa: BLE001 - compilation errors come in many types; the inputs are untouched
        import warnings

        warnings.warn(f"gpustack: torch.compile is not usable here ({type(exc).__name__}); VSNR runs unfused",
                      RuntimeWarning, stacklevel=2)
        _FUSED["iterate"] = None
        return False


def _work(op: VsnrOperator, b: int, device, convergence: bool) -> dict[str, torch.Tensor]:
    """Work buffers for b slices, kept by the operator across batches: large tensors allocated afresh every
    iteration cost page faults on the CPU (glibc maps anything above 32 MB anew each time)."""
    import torch

    h, w = op.shape
    wr = w // 2 + 1
    have = op.work.get("b", 0)
    if have < b or (convergence and "x_old" not in op.work):
        b = max(b, have)
        real, cplx = torch.float32, torch.complex64
        op.work = {"b": b, "grad": torch.empty((b, 2, h, w), dtype=real, device=device),
                   "mu": torch.empty((b, 2, h, w), dtype=real, device=device),
                   "stripes": torch.empty((b, h, w), dtype=real, device=device),
                   "div_v": torch.empty((b, h, w), dtype=real, device=device),
                   "z": torch.empty((b, h, wr), dtype=cplx, device=device),
                   # t1, t2 and c of the unfused iteration
                   "scratch": torch.empty((3, b, h, w), dtype=real, device=device)}
        if convergence:
            op.work["x"] = torch.empty((b, h, wr), dtype=cplx, device=device)
            op.work["x_old"] = torch.empty((b, h, wr), dtype=cplx, device=device)
    return op.work


def _compact(tensors: list[torch.Tensor], m: int, keep: torch.Tensor) -> None:
    """Move the rows `keep` of each tensor's first m rows to its front, in place."""
    for t in tensors:
        rows = t[:m][keep]
        t[:rows.shape[0]].copy_(rows)


def solve(op: VsnrOperator, u: torch.Tensor, *, maxit: int, cvg_threshold: float = 0.0,
          warm: WarmState | None = None) -> VsnrResult:
    """Run VSNR on a batch (B, H, W) float32 and return the stripe field of each slice (u - stripes is the
    result). Slices are divided by their maximum inside, as pyvsnr does with `norm=False`; a slice whose maximum
    is not positive, or whose norm is zero, has no stripe field (left intact, where pyvsnr returns NaN).

    `maxit` counts iterations as pyvsnr does; `cvg_threshold` > 0 stops each slice when its relative change of
    x^ falls to the threshold. `warm` starts every slice from a previous slice's final state instead of zero.
    """
    import torch
    import torch.nn.functional as F

    b, h, w = u.shape
    if (h, w) != op.slice_shape:
        raise ValueError(f"slices of {w}x{h} given to a VSNR operator built for {op.slice_shape[1]}x"
                         f"{op.slice_shape[0]}")
    if op.shape != op.slice_shape:
        # Mirrored out to the operator's fast FFT size, half on each side: the periodic grid's seams (bottom to
        # top, right to left) then join mirrored copies of the same borders, away from the slice. Measured on
        # bench_workflow.py's 451^2 slices (solved at 480^2): destriping output 24.59 -> 24.57 dB against the
        # truth (SSIM 0.798 -> 0.800), its pass (warp and VSNR of 83 slices) 3.6 -> 2.0 s.
        top, left = (op.shape[0] - h) // 2, (op.shape[1] - w) // 2
        padded = F.pad(u.to(torch.float32)[:, None], (left, op.shape[1] - w - left, top, op.shape[0] - h - top),
                       mode="reflect")[:, 0]
        inner = _solve_batches(op, padded, maxit, cvg_threshold, warm)
        return VsnrResult(inner.stripes[:, top:top + h, left:left + w], inner.iterations, inner.warm)
    return _solve_batches(op, u, maxit, cvg_threshold, warm)


def _solve_batches(op: VsnrOperator, u: torch.Tensor, maxit: int, cvg_threshold: float,
                   warm: WarmState | None) -> VsnrResult:
    import torch

    b = u.shape[0]
    if u.device.type == "cpu" and b > 1:
        # On the CPU one slice at a time is faster (measured: batched FFTs of large slices thrash the caches,
        # 31 ms per iteration for one 2000^2 slice, 44 ms each for two).
        parts = [_solve(op, u[i:i + 1], maxit, cvg_threshold, warm) for i in range(b)]
        return VsnrResult(torch.cat([p.stripes for p in parts]), torch.cat([p.iterations for p in parts]),
                          parts[-1].warm)
    return _solve(op, u, maxit, cvg_threshold, warm)


def _solve(op: VsnrOperator, u: torch.Tensor, maxit: int, cvg_threshold: float,
           warm: WarmState | None) -> VsnrResult:
    import torch

    b, h, w = u.shape
    maxit = max(int(maxit), 1)
    check = cvg_threshold > 0
    buf = _work(op, b, u.device, check)
    grad, mu, field, div_v, z = (buf[k][:b] for k in ("grad", "mu", "stripes", "div_v", "z"))
    x, x_old = (buf["x"][:b], buf["x_old"][:b]) if check else (None, None)

    u = u.to(torch.float32)
    vmax = u.amax(dim=(1, 2))
    usable = vmax > 0
    scale = torch.where(usable, vmax, torch.ones_like(vmax))
    u0 = u / scale[:, None, None]
    norms = torch.linalg.vector_norm(u0, dim=(1, 2))
    usable &= norms > 0
    norms = torch.where(usable, norms, torch.ones_like(norms))
    torch.sub(u0, torch.roll(u0, -1, -1), out=grad[:, 0])  # the slice's periodic gradient
    torch.sub(u0, torch.roll(u0, -1, -2), out=grad[:, 1])
    del u0
    gain_z = op.gains(norms, for_x=False)
    gain_x = op.gains(norms, for_x=True) if check else None
    if warm is not None:  # the previous slice's state, rescaled to this slice's maximum
        ratio = (warm.vmax / scale).to(torch.float32)
        torch.mul(warm.stripes[None], ratio[:, None, None], out=field)
        torch.mul(warm.mu[None], ratio[:, None, None, None], out=mu)
    else:
        field.zero_()
        mu.zero_()

    fused = _compiled() if op.fused else None
    scratch = buf["scratch"]
    result = torch.zeros((b, h, w), dtype=torch.float32, device=u.device)
    iterations = torch.full((b,), maxit, dtype=torch.int64, device=u.device)
    active = torch.arange(b, device=u.device)
    m = b  # slices still iterating: the first m rows of every buffer
    have_old = False
    final: tuple[torch.Tensor, torch.Tensor] | None = None
    for k in range(1, maxit):
        B, MU, Z = field[:m], mu[:m], z[:m]
        if fused is None or not _run_fused(fused, grad[:m], MU, B, div_v[:m], op.beta):
            fused = None
            _iterate_in_place(grad[:m], MU, B, div_v[:m], op.beta, scratch[0, :m], scratch[1, :m], scratch[2, :m])
        torch.fft.rfft2(div_v[:m], out=Z)
        if check:
            X = x[:m]
            torch.mul(Z, gain_x[:m], out=X)
        Z.mul_(gain_z[:m])
        torch.fft.irfft2(Z, s=(h, w), out=B)  # the new stripe field
        if not check:
            continue
        X_OLD = x_old[:m]
        if have_old and k < maxit - 1:
            change = (X - X_OLD).abs().amax(dim=(1, 2)) / X.abs().amax(dim=(1, 2)).clamp_min(1e-30)
            done = change <= cvg_threshold
            if bool(done.any()):  # sync: the one host decision per iteration the convergence test needs
                iterations[active[done]] = k + 1
                result[active[done]] = B[done]
                if bool(active[done][-1] == b - 1):  # sync: already synchronised above
                    final = (B[done][-1].clone(), MU[done][-1].clone())
                keep = ~done
                active = active[keep]
                _compact([grad, mu, field, x, gain_z, gain_x], m, keep)
                m = active.numel()
                if m == 0:
                    break
                X, X_OLD = x[:m], x_old[:m]
        X_OLD.copy_(X)
        have_old = True
    if m:
        result[active] = field[:m]
        if bool(active[-1] == b - 1):  # sync: once per batch
            final = (field[m - 1].clone(), mu[m - 1].clone())
    result *= torch.where(usable, scale, torch.zeros_like(scale))[:, None, None]
    new_warm = None
    if final is not None and bool(usable[-1]):  # sync: once per batch
        new_warm = WarmState(final[0], final[1], scale[-1])
    return VsnrResult(result, iterations, new_warm)
