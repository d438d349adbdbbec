"""Batched least squares and robust M-estimation (IRLS) for many small linear models sharing one design matrix.

Each row of `y` (b, m) is one problem y_k ≈ A c_k, with its own validity mask (masked samples weigh 0). The
estimator follows statsmodels' RLM with its defaults, so RLM is the oracle: start from ordinary least squares,
scale = MAD of the residuals about 0 (median |r| / 0.6745), weights from the norm at r / scale, re-solve, update
the scale, repeat. Two deliberate differences: convergence is tested per problem (a converged slice stops
changing while the others go on), and on the fitted surface (its RMS change below `tol` x scale, or below what
float32 rounding of the residuals resolves) rather than on statsmodels' absolute 1e-8 change of the deviance.

Numerics: A is orthonormalised once (A = QR), the weighted normal equations are formed in float32 on Q, whose
columns are orthonormal so the Gram matrices stay well conditioned, and solved in float64; the coefficients
come back to A's basis through R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAD_NORMAL = 0.6744897501960817  # Phi^-1(3/4): MAD / this estimates the standard deviation of normal noise
HUBER_T = 1.345
HAMPEL_ABC = (2.0, 4.0, 8.0)
NORMS = ("None", "HuberT", "Hampel")


def norm_weights(z: torch.Tensor, norm: str) -> torch.Tensor:
    """IRLS weights psi(z)/z of statsmodels' HuberT(t=1.345) and Hampel(a=2, b=4, c=8) norms."""
    a = z.abs()
    if norm == "HuberT":
        return torch.where(a <= HUBER_T, 1.0, HUBER_T / a.clamp_min(HUBER_T))
    if norm == "Hampel":
        ha, hb, hc = HAMPEL_ABC
        safe = a.clamp_min(ha)
        w = torch.where(a <= hb, ha / safe, ha * (hc - a) / (safe * (hc - hb)))
        return torch.where(a <= ha, 1.0, torch.where(a <= hc, w, 0.0))
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


@dataclass
class Fit:
    coefs: torch.Tensor  # (b, q) float64 in the basis of A; NaN rows: not fitted (too few valid samples)
    scale: torch.Tensor  # (b,) robust scale of the residuals (MAD/0.6745; for "None", the same statistic)
    iterations: torch.Tensor  # (b,) IRLS iterations each problem took (0 for least squares)
    fitted: torch.Tensor  # (b,) bool


class Basis:
    """A design matrix prepared for repeated batched solves: A = Q R with Q (m, q) float32."""

    def __init__(self, a: torch.Tensor):
        a64 = a.to(torch.float64)
        # Column scaling first, so that R's conditioning reflects the basis and not the units.
        self.col_norm = a64.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        q, r = torch.linalg.qr(a64 / self.col_norm)
        self.q = q.to(torch.float32)
        self.r = r
        self.m, self.n_terms = a.shape
        # Too few distinct sample positions for the basis (e.g. one slice group for a z term): nothing to fit.
        diag = r.diagonal().abs()
        self.full_rank = bool(diag.min() > 1e-9 * diag.max()) if self.m >= self.n_terms else False  # sync: once

    def to_basis(self, c_q: torch.Tensor) -> torch.Tensor:
        """Coefficients on Q (b, q) -> coefficients on A."""
        c = torch.linalg.solve_triangular(self.r, c_q.T, upper=True).T
        return c / self.col_norm

    def predict(self, c_q: torch.Tensor) -> torch.Tensor:
        return c_q.to(torch.float32) @ self.q.T


def _gram(q: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Q^T diag(w_k) Q and Q^T (w_k y_k) per problem, chunked over samples to bound the (b, m, q) temporary."""
    b, m = w.shape
    step = max(1, chunk // max(1, b * q.shape[1]))
    gram = torch.zeros(b, q.shape[1], q.shape[1], dtype=torch.float64, device=q.device)
    rhs = torch.zeros(b, q.shape[1], dtype=torch.float64, device=q.device)
    for s in range(0, m, step):
        qs, ws = q[s:s + step], w[:, s:s + step]
        wq = ws[:, :, None] * qs  # (b, chunk, q)
        gram += (wq.transpose(1, 2) @ qs).to(torch.float64)
        rhs += (ws * y[:, s:s + step]).matmul(qs).to(torch.float64)
    return gram, rhs


def _step(basis: Basis, w: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted least-squares correction dc = (Q^T W Q)^-1 Q^T W r, and whether each solve succeeded.

    Solving for a correction from the residual, rather than for c from y, keeps float32 rounding at the scale
    of the residuals (noise) instead of the scale of the data (the mean grey level).
    """
    gram, rhs = _gram(basis.q, w, resid)
    dc, info = torch.linalg.solve_ex(gram, rhs)
    ok = (info == 0) & torch.isfinite(dc).all(dim=1)
    return torch.where(ok[:, None], dc, 0.0), ok


def _mad_scale(resid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """statsmodels' `mad(resid, center=0)` per problem, over the valid samples (torch's median is the lower one)."""
    a = torch.where(valid, resid.abs(), float("nan"))
    return torch.nanmedian(a, dim=1).values / MAD_NORMAL


def fit(basis: Basis, y: torch.Tensor, valid: torch.Tensor, *, norm: str = "HuberT", maxiter: int = 50,
        tol: float = 1e-4) -> Fit:
    """Fit every row of `y` (b, m) on `basis`; `valid` (b, m) bool masks samples out. Never in place.

    Rows with fewer valid samples than terms are not fitted (NaN coefficients, `fitted` False). A row fitted
    exactly (zero scale, e.g. a constant slice) stops at once with its least-squares solution.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    y = torch.where(valid, y.to(torch.float32), 0.0)
    w = valid.to(torch.float32)
    c = torch.zeros(y.shape[0], basis.n_terms, dtype=torch.float64, device=y.device)
    resid = y
    for _ in range(2):  # least squares, then one refinement on its residual
        dc, ok = _step(basis, w, resid)
        c = c + dc
        resid = y - basis.predict(c)
    fitted = ok & (valid.sum(dim=1) >= basis.n_terms) & basis.full_rank
    scale = _mad_scale(resid, valid)
    iterations = torch.zeros(y.shape[0], dtype=torch.int32, device=y.device)
    if norm != "None":
        done = ~fitted | ~(scale > 0)
        # Below this change float32 rounding of the residuals dominates and the iteration only dithers.
        floor = 8 * torch.finfo(torch.float32).eps * y.abs().amax(dim=1).to(torch.float64)
        for _ in range(maxiter):
            if bool(done.all()):  # sync: the only host synchronisation per iteration
                break
            z = resid / torch.where(done, 1.0, scale)[:, None]
            w = norm_weights(z, norm) * valid
            dc, ok = _step(basis, w, resid)
            dc = torch.where(done[:, None], 0.0, dc)
            c = c + dc
            iterations += (~done).to(torch.int32)
            resid = y - basis.predict(c)
            scale = torch.where(done, scale, _mad_scale(resid, valid))
            # Q is orthonormal: |Q dc| = |dc|, so this is the RMS change of the fitted surface.
            change = dc.norm(dim=1) / basis.m ** 0.5
            done = done | (change <= tol * scale + floor) | ~(scale > 0) | ~ok
    c = torch.where(fitted[:, None], c, float("nan"))
    if not basis.full_rank:
        return Fit(torch.full_like(c, float("nan")), scale, iterations, fitted)
    return Fit(basis.to_basis(c), scale, iterations, fitted)
