"""Rigid, similarity and affine registration of slice pairs by Gauss-Newton on the intensities, coarse to fine
(Lucas & Kanade 1981; the image pyramid as in Thévenaz, Ruttimann & Unser 1998, whose TurboReg pystackreg wraps),
batched over pairs on the device.

A pair (ref, mov) is aligned by the matrix M (skimage's `warp` convention, output pixel -> input pixel, as
pystackreg's) that makes mov(M x) match ref(x). M is parameterised about the image centre c:
p(x) = A (x - c) + c + t, with A a rotation (RIGID_BODY: angle), a scaled rotation (SCALED_ROTATION: a, b in
[[a, -b], [b, a]]) or any 2x2 matrix (AFFINE). Each iteration warps mov with the current M, takes the image
gradient of the warped slice (brought back to mov's frame by A^-T), and solves the normal equations of the
linearised residual ref - mov(p(x)) for the parameter update, in float64 (b, P, P). Levels are 2x2 means;
centred coordinates scale by exactly 1/2 between levels (sizes are cut to a multiple of 2^levels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpustack.kernels.warp import warp_affine

MODELS = ("TRANSLATION", "RIGID_BODY", "SCALED_ROTATION", "AFFINE")
FINEST_ITERATIONS = 3


def _matrices(model: str, q: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (b, 2, 2), full 3x3 matrices (b, 3, 3)) from parameters q (b, P): [params of A..., tx, ty]."""
    b = q.shape[0]
    if model == "TRANSLATION":
        a = torch.eye(2, dtype=q.dtype, device=q.device).expand(b, 2, 2)
    elif model == "RIGID_BODY":
        c, s = torch.cos(q[:, 0]), torch.sin(q[:, 0])
        a = torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)
    elif model == "SCALED_ROTATION":
        a = torch.stack([torch.stack([q[:, 0], -q[:, 1]], 1), torch.stack([q[:, 1], q[:, 0]], 1)], 1)
    else:
        a = q[:, :4].reshape(b, 2, 2)
    t = q[:, -2:]
    m = torch.zeros(b, 3, 3, dtype=q.dtype, device=q.device)
    m[:, :2, :2] = a
    m[:, :2, 2] = centre + t - (a @ centre)  # p(x) = A (x - c) + c + t
    m[:, 2, 2] = 1.0
    return a, m


def _identity(model: str, b: int, shifts: torch.Tensor) -> torch.Tensor:
    lead = {"TRANSLATION": [], "RIGID_BODY": [0.0], "SCALED_ROTATION": [1.0, 0.0], "AFFINE": [1.0, 0.0, 0.0, 1.0]}
    head = torch.tensor(lead[model], dtype=torch.float64, device=shifts.device).expand(b, -1)
    return torch.cat([head, shifts.to(torch.float64)], dim=1)


def _jacobian(model: str, q: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, u: torch.Tensor,
              v: torch.Tensor) -> list[torch.Tensor]:
    """d mov(p(x)) / d q, one (b, h, w) image per parameter; gx, gy = grad mov at p(x), u, v centred coords."""
    if model == "TRANSLATION":
        return [gx, gy]
    if model == "RIGID_BODY":
        c, s = torch.cos(q[:, 0]).to(gx.dtype)[:, None, None], torch.sin(q[:, 0]).to(gx.dtype)[:, None, None]
        return [gx * (-s * u - c * v) + gy * (c * u - s * v), gx, gy]
    if model == "SCALED_ROTATION":
        return [gx * u + gy * v, -gx * v + gy * u, gx, gy]
    return [gx * u, gx * v, gy * u, gy * v, gx, gy]


def estimate_affine(ref: torch.Tensor, mov: torch.Tensor, shifts: torch.Tensor, *, model: str = "RIGID_BODY",
                    levels: int | None = None, iterations: int = 12, tol: float = 1e-4) -> torch.Tensor:
    """(b, 3, 3) float64 matrices aligning mov onto ref (pairs (b, H, W)), from initial translations (b, 2)
    (dx, dy), e.g. the correlation peak. Featureless pairs keep their start (no NaN)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    b, height, width = ref.shape
    if levels is None:  # coarsest level about 64 px
        levels = max(0, int(math.log2(max(1, min(height, width) / 64))))
    f = 2 ** levels
    h, w = (height // f) * f, (width // f) * f
    r_pyr, m_pyr = [ref[:, :h, :w].to(torch.float32)], [mov[:, :h, :w].to(torch.float32)]
    for _ in range(levels):
        r_pyr.append(F.avg_pool2d(r_pyr[-1][:, None], 2)[:, 0])
        m_pyr.append(F.avg_pool2d(m_pyr[-1][:, None], 2)[:, 0])
    q = _identity(model, b, shifts)
    q[:, -2:] /= f
    for level in range(levels, -1, -1):
        r, m = r_pyr[level], m_pyr[level]
        lh, lw = r.shape[1:]
        centre = torch.tensor([(lw - 1) / 2, (lh - 1) / 2], dtype=torch.float64, device=ref.device)
        margin = max(2, min(lh, lw) // 16)
        inner = (slice(None), slice(margin, lh - margin), slice(margin, lw - margin))
        ys = torch.arange(lh, dtype=torch.float32, device=ref.device)[margin:lh - margin] - centre[1].float()
        xs = torch.arange(lw, dtype=torch.float32, device=ref.device)[margin:lw - margin] - centre[0].float()
        v, u = ys[None, :, None], xs[None, None, :]
        target = r[inner]
        active = torch.ones(b, dtype=torch.bool, device=ref.device)
        # the coarse levels do most of the work; the full-resolution level only polishes (it costs 4^levels more)
        for _ in range(iterations if level else min(iterations, FINEST_ITERATIONS)):
            if not bool(active.any()):  # sync: once per iteration, stops when every pair has converged
                break
            a, mats = _matrices(model, q, centre)
            warped = warp_affine(m, mats, mode="edge")
            dy, dx = torch.gradient(warped, dim=(1, 2))
            # grad of mov at p(x) = A^-T grad_x of the warped slice
            inv_t = torch.linalg.inv(a).transpose(1, 2).to(torch.float32)
            gx = inv_t[:, 0, 0, None, None] * dx + inv_t[:, 0, 1, None, None] * dy
            gy = inv_t[:, 1, 0, None, None] * dx + inv_t[:, 1, 1, None, None] * dy
            gx, gy, res = gx[inner], gy[inner], target - warped[inner]
            jac = _jacobian(model, q, gx, gy, u, v)
            n = len(jac)
            hess = torch.empty(b, n, n, dtype=torch.float64, device=ref.device)
            grad = torch.empty(b, n, dtype=torch.float64, device=ref.device)
            for i in range(n):
                grad[:, i] = (jac[i] * res).sum((1, 2)).double()
                for j in range(i, n):
                    hess[:, i, j] = hess[:, j, i] = (jac[i] * jac[j]).sum((1, 2)).double()
            step, info = torch.linalg.solve_ex(hess, grad)
            ok = (info == 0) & torch.isfinite(step).all(dim=1) & active
            step = torch.where(ok[:, None], step, 0.0)
            q = q + step
            # converged: the displacement of the image corners moves by less than tol px
            moved = step[:, -2:].norm(dim=1) + step[:, :-2].abs().sum(dim=1) * max(lh, lw)
            active = active & (moved > tol)
        if level:
            q[:, -2:] *= 2  # translations double at the next finer level; A is unchanged in centred coords
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64, device=ref.device)
    return _matrices(model, q, centre)[1]
