"""Batched subpixel translation estimation by phase correlation.

The TRANSLATION model of `registration_calculation`, written from Kuglin & Hines (1975)
and Guizar-Sicairos, Thurman & Fienup, Opt. Lett. 33, 156 (2008).

Method
------
When mov is ref translated, mov(x) = ref(x - d), the Fourier transforms obey
M(u) = R(u) exp(-2 pi i u.d / N), so the normalised ("whitened") cross-power spectrum

    Q(u) = M(u) conj(R(u)) / (|M(u) conj(R(u))| + eps)  ~  exp(-2 pi i u.d / N)

has an inverse DFT that is a sharp peak at s = d (un-normalised, it is the circular
cross-correlation sum_x ref(x) mov(x + s), whose peak is as broad as the structures).
Per pair:

1. mean removed and (``window=True``) a separable Hann window
   w(k) = sin^2(pi (k + 1/2) / n), zero half a pixel beyond each border, so that the
   periodicity the DFT assumes does not see the jump between opposite borders;
2. real FFTs (``torch.fft.rfft2``) and the cross-power spectrum P = M conj(R),
   whitened with a regularisation eps = ``eps`` * mean|P| (at least 1e-6 max|P|, so
   that numerically empty frequencies, e.g. the far tail of a smooth image, never get
   a random phase of weight one): components stronger than average keep their phase
   only, weaker ones are weighted by their magnitude. Pure phase correlation
   (``eps`` -> 0) gives each noise-only frequency the weight of the signal and loses
   ~0.5 px on a smooth texture with 5 % noise, where eps = 1 stays at ~0.02 px;
3. coarse peak: argmax of the inverse FFT over the whole image, wrapped around (an
   index beyond half the size is a negative shift);
4. Guizar-Sicairos et al.: the same inverse DFT on a fine grid only, ``upsample``
   points per pixel over +-0.75 px around the coarse peak, as two small matrix
   products per pair, K_y (m x H) @ Q (H x W/2+1) @ K_x (W/2+1 x m), batched with
   ``torch.matmul``. The real correlation's band-limited interpolant is the real part
   of that product, with the Hermitian weights of the half spectrum (2 off the DC and
   Nyquist columns) and the Nyquist terms of even sizes split symmetrically (cos).
   Above upsample = 32 the search has two stages (16x over +-0.75 px, then
   ``upsample`` x over +-1.5/16 px) to keep the matrices small;
5. argmax on the fine grid, then (``refine=True``, not in the paper) the vertex of the
   parabola through it and its two neighbours along each axis (at most half a fine
   step): removes most of the 1 / (2 upsample) quantisation;
6. (``window`` and ``recentre=True``, not in the papers) one fixed window on both
   images biases the peak toward zero, as the windowed images are not translates of
   each other (~0.5 d / n px: 0.1 px for 4 px on 64 px). A second pass windows ref
   over the part that mov also shows when moved by the first estimate d1, and mov with
   the same window moved by d1, then repeats 2, 4 and 5 around d1 (no new coarse
   peak): the windowed images are translates up to (d - d1), the bias is gone. This
   doubles the cost. With it, shifts up to ~1/3 of the size along an axis are found
   on crops of a larger scene (beyond, the fixed window of the first pass leaves too
   little common weight).

Sign convention (pystackreg's, i.e. PyStack3D's)
------------------------------------------------
Images are (b, H, W), row y, column x. The shift of a pair is (dx, dy) such that

    mov[y, x] = ref[y - dy, x - dx]   (mov is ref moved right by dx and down by dy),

the displacement of mov's content relative to ref. The matrix
[[1, 0, dx], [0, 1, dy], [0, 0, 1]] equals
``pystackreg.StackReg(StackReg.TRANSLATION).register(ref, mov)`` for a pure
translation. It is an inverse map in scikit-image's sense:
``skimage.transform.warp(mov, matrix)`` samples mov at (x + dx, y + dy), which aligns
mov onto ref (so does ``gpustack.kernels.warp.warp_affine``).
``skimage.registration.phase_cross_correlation(ref, mov)`` returns the opposite, in
(row, col) order: (-dy, -dx).

Quality
-------
The normalised cross-correlation of the two prepared images (mean removed, windowed:
over their overlap with ``recentre``) at the final subpixel shift, clipped to [0, 1]:
sum(ref' mov'(. + d)) / sqrt(sum ref'^2 sum mov'^2). The numerator is a one-point
inverse DFT of the un-whitened cross-power spectrum (band-limited circular
interpolation, no resampling). ~1 for a clean translated pair, 0 when an image is
constant, near 0 for unrelated images: ~0.05 for independent white noise of 128 x 96,
but up to ~0.35 for unrelated smooth textures (few independent samples).

Device: pure torch (FFT, matmul, elementwise), one code path for every device, no loop
over pairs and no host synchronisation (no `.item()`, no data-dependent Python
branch). Inputs must be finite.
"""

from __future__ import annotations

import math

import torch

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}
_FLOOR = 1e-6  # whitening floor relative to max|P|: numerical noise gets no weight
_STAGE = 16  # above 2 * _STAGE, the fine search runs in two stages

Windows = tuple[torch.Tensor | None, ...]  # ref y, ref x, mov y, mov x: (1 or b, n)


def _hann(pos: torch.Tensor, lo: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """sin^2(pi (pos - lo) / length) on [lo, lo + length], 0 outside (broadcast)."""
    t = (pos - lo) / length
    inside = (t >= 0) & (t <= 1)
    return torch.where(inside, torch.sin(math.pi * t) ** 2, torch.zeros_like(t))


def _windows(n: int, d: torch.Tensor | None, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows along an axis of n pixels for ref and for mov: (1, n) each, or (b, n).

    d None: the Hann window sin^2(pi (k + 1/2) / n) for both.
    d (b,), mov being ref moved by d: for ref, the Hann window over the part of ref that
    mov also shows, [max(-1/2, -1/2 - d), min(n - 1/2, n - 1/2 - d)]; for mov, the same
    window moved by d. The two windowed images are then translates of each other.
    """
    k = torch.arange(n, dtype=dtype, device=device)[None]
    if d is None:
        lo = torch.tensor(-0.5, dtype=dtype, device=device)
        w = _hann(k, lo, torch.tensor(float(n), dtype=dtype, device=device))
        return w, w
    d = d.to(dtype)[:, None]
    lo = torch.clamp(-0.5 - d, min=-0.5)
    length = (n - d.abs()).clamp(min=1.0)
    return _hann(k, lo, length), _hann(k - d, lo, length)


def _prepare(img: torch.Tensor, wy: torch.Tensor | None, wx: torch.Tensor | None,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, H, W) -> rfft2 of the mean-removed, windowed image in `dtype`, its energy
    (b,), and whether the image is constant (b,) bool."""
    x = img.to(dtype, copy=True)
    flat = x.reshape(x.shape[0], -1)
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    x.sub_(x.mean(dim=(1, 2), keepdim=True))
    if wy is not None and wx is not None:
        x.mul_(wy[:, :, None]).mul_(wx[:, None, :])
    energy = torch.linalg.vector_norm(x, dim=(1, 2)) ** 2
    return torch.fft.rfft2(x), energy, constant


def _cross_power(ref: torch.Tensor, mov: torch.Tensor, wins: Windows, normalise: bool,
                 eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """P = M conj(R) (b, H, W/2+1), whose inverse DFT peaks at +d; its regularised
    whitened version P / (|P| + eps mean|P|) (P itself without `normalise`); the two
    energies; and whether either image is constant."""
    spec_r, energy_r, const_r = _prepare(ref, wins[0], wins[1], dtype)
    cross, energy_m, const_m = _prepare(mov, wins[2], wins[3], dtype)
    cross.mul_(spec_r.conj())
    del spec_r
    constant = const_r | const_m
    if not normalise:
        return cross, cross, energy_r, energy_m, constant
    mag = cross.abs()
    reg = torch.maximum(eps * mag.mean(dim=(1, 2), keepdim=True),
                        _FLOOR * mag.amax(dim=(1, 2), keepdim=True))
    mag.add_(reg + torch.finfo(dtype).tiny)  # a constant image: 0 / tiny = 0, no NaN
    return cross, cross / mag, energy_r, energy_m, constant


def _nyquist(centre: torch.Tensor, offsets: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """cos(pi (centre + offsets)) = (-1)^centre cos(pi offsets), (b, m)."""
    sign = 1 - 2 * torch.remainder(centre, 2).to(dtype)
    return sign[:, None] * torch.cos(math.pi * offsets)


def _kernel_y(n: int, centre: torch.Tensor, offsets: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """(b, m, n) complex: exp(2 pi i u y / n) for the n signed frequencies u (FFT
    order) at y = centre[k] + offsets[k, j]; centre (b,) integer, offsets (b, m) small.
    The integer part's phase is reduced modulo n in integers, so the angles stay small
    and accurate in float32. Even n: the Nyquist term is split symmetrically between
    +-n/2, i.e. cos(pi y)."""
    u = torch.fft.fftfreq(n, d=1.0 / n, device=centre.device).round().to(torch.int64)
    whole = torch.remainder(centre[:, None, None] * u, n).to(dtype)  # (b, 1, n)
    angle = (2 * math.pi / n) * (whole + offsets[:, :, None] * u.to(dtype))
    k = torch.polar(torch.ones_like(angle), angle)
    if n % 2 == 0:
        k[:, :, n // 2] = _nyquist(centre, offsets, dtype).to(k.dtype)
    return k


def _kernel_x(n: int, centre: torch.Tensor, offsets: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """(b, n // 2 + 1, m) complex: `_kernel_y` for the half-spectrum (rfft) axis, with
    the Hermitian weights (1 for the DC, 1 for the Nyquist column of an even n, as
    cos(pi x); 2 otherwise), so that Re(K_y @ Q @ K_x) is the full-spectrum sum."""
    v = torch.arange(n // 2 + 1, dtype=torch.int64, device=centre.device)
    whole = torch.remainder(centre[:, None, None] * v, n).to(dtype)  # (b, 1, n//2+1)
    angle = (2 * math.pi / n) * (whole + offsets[:, :, None] * v.to(dtype))
    weight = torch.full((n // 2 + 1,), 2.0, dtype=dtype, device=centre.device)
    weight[0] = 1.0
    k = torch.polar(weight.expand_as(angle), angle)
    if n % 2 == 0:
        k[:, :, n // 2] = _nyquist(centre, offsets, dtype).to(k.dtype)
    return k.transpose(1, 2)


def _parabola(c0: torch.Tensor, cm: torch.Tensor, cp: torch.Tensor,
              ok: torch.Tensor) -> torch.Tensor:
    """Vertex of the parabola through (-1, cm), (0, c0), (1, cp), within [-0.5, 0.5];
    0 where not `ok` or not a maximum."""
    curv = cm - 2 * c0 + cp
    good = ok & (curv < 0)
    off = 0.5 * (cm - cp) / torch.where(good, curv, torch.ones_like(curv))
    return torch.where(good, off.clamp(-0.5, 0.5), torch.zeros_like(off))


def _fine_search(q: torch.Tensor, size: tuple[int, int], cy: torch.Tensor,
                 cx: torch.Tensor, start: torch.Tensor, upsample: int, refine: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    """Maximum of the band-limited inverse DFT of q (b, H, W/2+1) near the integer
    positions (cy, cx) + start, start (b, 2) as (y, x): `upsample` points per pixel over
    +-0.75 px (two stages above 2 * _STAGE), then the parabola's vertex. Returns the
    position (b, 2) as (y, x) offsets from (cy, cx)."""
    h, w = size
    b = q.shape[0]
    rows = torch.arange(b, device=q.device)
    if upsample <= 2 * _STAGE:
        stages = [(upsample, 0.75)]
    else:
        stages = [(_STAGE, 0.75), (upsample, 1.5 / _STAGE)]
    y, x = start[:, 0].to(dtype), start[:, 1].to(dtype)
    for factor, reach in stages:
        half = math.ceil(reach * factor) if factor > 1 else 0
        m = 2 * half + 1
        step = 1.0 / factor
        grid = (torch.arange(m, dtype=dtype, device=q.device) - half) * step
        offy, offx = y[:, None] + grid, x[:, None] + grid  # (b, m)
        ky = _kernel_y(h, cy, offy, dtype)  # (b, m, H)
        kx = _kernel_x(w, cx, offx, dtype)  # (b, W/2+1, m)
        fine = torch.matmul(torch.matmul(ky, q), kx).real  # (b, m, m), rows = y
        j = fine.reshape(b, -1).argmax(dim=1)
        jy, jx = j // m, j % m
        y, x = offy[rows, jy], offx[rows, jx]
    if refine and m > 1:
        c0 = fine[rows, jy, jx]
        ym, yp = (jy - 1).clamp(min=0), (jy + 1).clamp(max=m - 1)
        xm, xp = (jx - 1).clamp(min=0), (jx + 1).clamp(max=m - 1)
        in_y, in_x = (jy > 0) & (jy < m - 1), (jx > 0) & (jx < m - 1)
        y = y + step * _parabola(c0, fine[rows, ym, jx], fine[rows, yp, jx], in_y)
        x = x + step * _parabola(c0, fine[rows, jy, xm], fine[rows, jy, xp], in_x)
    return torch.stack([y, x], dim=1)


def _correlation_at(cross: torch.Tensor, size: tuple[int, int], cy: torch.Tensor,
                    cx: torch.Tensor, off: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """sum_x ref(x) mov(x + d) at d = (cy, cx) + off, band-limited: a one-point inverse
    DFT of the cross-power spectrum `cross`."""
    h, w = size
    ky = _kernel_y(h, cy, off[:, 0:1], dtype)[:, 0]  # (b, H)
    kx = _kernel_x(w, cx, off[:, 1:2], dtype)[:, :, 0]  # (b, W/2+1)
    return torch.einsum("bh,bhw,bw->b", ky, cross, kx).real / (h * w)


def estimate_shifts(ref: torch.Tensor, mov: torch.Tensor, *, upsample: int = 20,
                    window: bool = True, normalise: bool = True, eps: float = 1.0,
                    recentre: bool = True, refine: bool = True,
                    dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Translation of each mov[k] relative to ref[k] by (regularised) phase correlation.

    ref, mov: (b, H, W) real tensors on one device; any sizes >= 2, odd or even, H != W.
    upsample: fine-grid points per pixel (1: integer shifts).
    window: Hann window before the FFT (edge effects).
    normalise: whitened cross-power spectrum (phase correlation); False: plain
    cross-correlation. eps: whitening regularisation relative to mean|P| (0: pure phase
    correlation, floored at 1e-6 max|P|).
    recentre: with `window`, a second pass with the windows on the overlap.
    refine: parabolic vertex on the fine grid.
    dtype: compute dtype, torch.float32 (complex64) or torch.float64 (complex128).
    The module docstring details each step.

    Returns ``shifts`` (b, 2) float64 (dx, dy), pystackreg's convention:
    mov[y, x] = ref[y - dy, x - dx]; and ``quality`` (b,) in `dtype`, the normalised
    cross-correlation in [0, 1] after alignment. A pair with a constant image gets
    shift (0, 0) and quality 0. No host synchronisation.
    """
    if ref.shape != mov.shape or ref.ndim != 3 or min(ref.shape[1:]) < 2:
        raise ValueError("ref and mov must both be (b, H, W) with H, W >= 2, got "
                         f"{tuple(ref.shape)} and {tuple(mov.shape)}")
    if dtype not in _COMPLEX:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    upsample = max(int(upsample), 1)
    b, h, w = ref.shape
    dev = ref.device

    # pass 1: fixed window, coarse peak over the whole correlation, fine search there
    wins: Windows = (None,) * 4
    if window:
        wy, _ = _windows(h, None, dtype, dev)
        wx, _ = _windows(w, None, dtype, dev)
        wins = (wy, wx, wy, wx)
    cross, q, energy_r, energy_m, constant = _cross_power(ref, mov, wins, normalise,
                                                          eps, dtype)
    idx = torch.fft.irfft2(q, s=(h, w)).reshape(b, -1).argmax(dim=1)
    cy, cx = idx // w, idx % w
    cy = torch.where(cy > h // 2, cy - h, cy)  # wrap-around: negative shifts
    cx = torch.where(cx > w // 2, cx - w, cx)
    zero = torch.zeros(b, 2, dtype=dtype, device=dev)
    off = _fine_search(q, (h, w), cy, cx, zero, upsample, refine, dtype)

    # pass 2: windows on the overlap, fine search around the first estimate
    if window and recentre:
        del cross, q
        d = torch.stack([cy, cx], dim=1).to(dtype) + off
        wry, wmy = _windows(h, d[:, 0], dtype, dev)
        wrx, wmx = _windows(w, d[:, 1], dtype, dev)
        cross, q, energy_r, energy_m, _ = _cross_power(ref, mov, (wry, wrx, wmy, wmx),
                                                       normalise, eps, dtype)
        centre = d.round()
        cy, cx = centre[:, 0].to(torch.int64), centre[:, 1].to(torch.int64)
        off = _fine_search(q, (h, w), cy, cx, d - centre, upsample, refine, dtype)
    del q

    # quality: normalised cross-correlation at the final shift (un-whitened spectrum)
    corr = _correlation_at(cross, (h, w), cy, cx, off, dtype)
    denom = torch.sqrt(energy_r * energy_m)
    bad = constant | (denom <= 0)
    quality = (corr / torch.where(bad, torch.ones_like(denom), denom)).clamp(0.0, 1.0)
    quality = torch.where(bad, torch.zeros_like(quality), quality)

    off = off.to(torch.float64)
    shifts = torch.stack([cx.to(torch.float64) + off[:, 1],
                          cy.to(torch.float64) + off[:, 0]], dim=1)
    shifts = torch.where(constant[:, None], torch.zeros_like(shifts), shifts)
    return shifts, quality


def fourier_shift(img: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Move each img[k] (b, H, W) by shifts[k] = (dx, dy) px (any real values) by the
    Fourier shift theorem: out[y, x] = img[y - dy, x - dx], circular and band-limited,
    so that ``estimate_shifts(img, fourier_shift(img, s))`` finds s. Even sizes: the
    Nyquist terms are split symmetrically (cos), which keeps the result real. Computed
    in img's floating dtype (float32 for an integer img)."""
    x = img if img.is_floating_point() else img.to(torch.float32)
    b, h, w = x.shape
    dtype = x.dtype
    s = torch.as_tensor(shifts, device=x.device).to(dtype).reshape(b, 2)
    zero = torch.zeros(b, dtype=torch.int64, device=x.device)
    ey = _kernel_y(h, zero, -s[:, 1:2], dtype)[:, 0]  # (b, H): exp(-2 pi i u dy / H)
    ex = _kernel_x(w, zero, -s[:, 0:1], dtype)[:, :, 0]  # (b, W/2+1), weights 1, 2, ...
    weight = torch.full((w // 2 + 1,), 0.5, dtype=dtype, device=x.device)  # ... undone
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    spec = torch.fft.rfft2(x) * ey[:, :, None] * (ex * weight)[:, None, :]
    return torch.fft.irfft2(spec, s=(h, w))
