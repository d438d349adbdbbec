"""Batched least squares and robust M-estimation (IRLS) for many small linear models sharing one design matrix.

Each row of `y` (b, m) is one problem y_k ≈ A c_k, with its own validity mask (masked samples weigh 0). The
estimator follows statsmodels' RLM with its defaults, so RLM is the oracle: start from ordinary least squares,
scale = MAD of the residuals about 0 (median |r| / 0.6745), weights from the norm at r / scale, re-solve, update
the scale, repeat. Three deliberate differences: convergence is tested per problem (a converged slice stops
changing while the others go on), and on the fitted surface (its RMS change below `tol` x scale, or below what
float32 rounding of the residuals resolves) rather than on statsmodels' absolute 1e-8 change of the deviance;
and the steps are mixed (Anderson acceleration, `_Anderson`), which reaches the same fixed point in fewer steps.

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
ANDERSON_DEPTH = 3  # steps mixed by the accelerated IRLS
OUTER_CACHE_ELEMENTS = 1 << 24  # 64 MiB of float32 per-sample products kept with a basis


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
        # Products Q_i Q_j per sample (m, q²): every problem's Gram matrix is then one matrix product w @ this.
        # Kept only while small; beyond, `_gram` forms them chunk by chunk.
        products = self.m * self.n_terms ** 2
        self.outer = (self.q[:, :, None] * self.q[:, None, :]).reshape(self.m, -1) \
            if products <= OUTER_CACHE_ELEMENTS else None
        # Too few distinct sample positions for the basis (e.g. one slice group for a z term): nothing to fit.
        diag = r.diagonal().abs()
        self.full_rank = bool(diag.min() > 1e-9 * diag.max()) if self.m >= self.n_terms else False  # sync: once

    def to_basis(self, c_q: torch.Tensor) -> torch.Tensor:
        """Coefficients on Q (b, q) -> coefficients on A."""
        c = torch.linalg.solve_triangular(self.r, c_q.T, upper=True).T
        return c / self.col_norm

    def predict(self, c_q: torch.Tensor) -> torch.Tensor:
        return c_q.to(torch.float32) @ self.q.T


def _gram(basis: Basis, w: torch.Tensor, y: torch.Tensor,
          chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Q^T diag(w_k) Q and Q^T (w_k y_k) per problem, as matrix products over the samples.

    Gram_k = sum_s w_ks (Q_s Q_s^T): with the products Q_s Q_s^T laid out as rows (m, q²), all problems' Gram
    matrices are one (b, m) @ (m, q²) product, far cheaper than a (b, m, q) temporary per problem. The products
    come from the basis when cached, otherwise chunk by chunk over the samples.
    """
    q = basis.q
    b, m = w.shape
    n = q.shape[1]
    rhs = (w * y).matmul(q).to(torch.float64)
    if basis.outer is not None:
        return (w @ basis.outer).to(torch.float64).view(b, n, n), rhs
    gram = torch.zeros(b, n * n, dtype=torch.float64, device=q.device)
    step = max(1, chunk // (n * n))
    for s in range(0, m, step):
        qs = q[s:s + step]
        gram += (w[:, s:s + step] @ (qs[:, :, None] * qs[:, None, :]).reshape(len(qs), -1)).to(torch.float64)
    return gram.view(b, n, n), rhs


def _step(basis: Basis, w: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted least-squares correction dc = (Q^T W Q)^-1 Q^T W r, and whether each solve succeeded.

    Solving for a correction from the residual, rather than for c from y, keeps float32 rounding at the scale
    of the residuals (noise) instead of the scale of the data (the mean grey level).
    """
    gram, rhs = _gram(basis, w, resid)
    dc, info = torch.linalg.solve_ex(gram, rhs)
    ok = (info == 0) & torch.isfinite(dc).all(dim=1)
    return torch.where(ok[:, None], dc, 0.0), ok


def _mad_scale(resid: torch.Tensor, valid: torch.Tensor, all_valid: bool = False) -> torch.Tensor:
    """statsmodels' `mad(resid, center=0)` per problem, over the valid samples (torch's median is the lower one).

    `all_valid` (every sample of every problem): the lower median is the ((m + 1) // 2)-th smallest, selected
    without the NaN mask (nanmedian took half of the background fits' time)."""
    if all_valid:
        return _lower_median(resid.abs()) / MAD_NORMAL
    a = torch.where(valid, resid.abs(), float("nan"))
    return torch.nanmedian(a, dim=1).values / MAD_NORMAL


def _lower_median(a: torch.Tensor) -> torch.Tensor:
    """The ((m + 1) // 2)-th smallest of each row of a temporary `a` (b, m), which it may reorder.

    On the CPU, NumPy's introselect in place: torch's CPU kthvalue copies its input and took 3-4x as long
    (4 x 8281 samples: 169 against 65 us; 200 x 8281: 11.0 against 2.7 ms), and it was most of a background
    fit's time. A CPU tensor shares its memory with the NumPy view: no copy, no synchronisation."""
    k = (a.shape[1] + 1) // 2
    if a.device.type != "cpu" or not a.is_contiguous():
        return torch.kthvalue(a, k, dim=1).values
    host = a.numpy()
    host.partition(k - 1, axis=1)
    return a[:, k - 1]


class _Anderson:
    """Anderson acceleration (type II, depth `ANDERSON_DEPTH`) of the IRLS fixed-point map, per problem.

    One IRLS step is a map c -> G(c) = c + dc whose fixed point is the M-estimate (the scale being the MAD of
    the residuals of c). Where the data are far from normal (bright structures on a smooth background) that
    map contracts slowly, by a few per cent per step, and plain iteration takes 50-100 steps. Anderson mixing
    combines the last few steps' G(c) so that the step differences f = dc cancel in least squares: same fixed
    point, typically a third of the steps. A problem whose step grows restarts its history (safeguard).

    The problems are tiny (a few coefficients), so a step costs what its number of tensor operations costs:
    the differences of f and of G are kept side by side in one (b, 2n, depth) history, updated in one write.
    """

    def __init__(self, b: int, n: int, device: torch.device):
        self.n = n
        self.history = torch.zeros(b, 2 * n, ANDERSON_DEPTH, dtype=torch.float64, device=device)
        self.last: torch.Tensor | None = None  # (b, 2n): the previous step's [f, G]
        self.last_norm: torch.Tensor | None = None  # (b,): |f|² of the previous step
        self.k = 0

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these problems' histories (the others left the working set)."""
        self.history = self.history[rows]
        if self.last is not None:
            self.last, self.last_norm = self.last[rows], self.last_norm[rows]

    def next(self, c: torch.Tensor, dc: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        n = self.n
        current = torch.cat([dc, c + dc], dim=1)  # [f, G]
        norm = (dc * dc).sum(dim=1)
        if self.last is not None:
            self.history[:, :, self.k % ANDERSON_DEPTH] = current - self.last
            # Safeguard: where the step grew, the history no longer describes the map here; forget it.
            self.history *= (norm <= self.last_norm).to(torch.float64)[:, None, None]
            self.k += 1
        self.last, self.last_norm = current, norm
        df, dg = self.history[:, :n], self.history[:, n:]
        gram = df.transpose(1, 2) @ df
        diagonal = gram.diagonal(dim1=1, dim2=2)
        diagonal += (1e-10 * diagonal.sum(dim=1) + torch.finfo(torch.float64).tiny)[:, None]  # ridge
        gamma, info = torch.linalg.solve_ex(gram, df.transpose(1, 2) @ dc[:, :, None])
        g = current[:, n:]
        mixed = g - (dg @ gamma)[:, :, 0]
        usable = (info == 0) & torch.isfinite(mixed).all(dim=1) & ~plain
        return torch.where(usable[:, None], mixed, g)


def _weights(resid: torch.Tensor, scale: torch.Tensor, norm: str) -> torch.Tensor:
    """`norm_weights(resid / scale)`; Huber's in three operations: min(1, t s / |r|) = t s / max(|r|, t s)."""
    if norm == "HuberT":
        threshold = (HUBER_T * scale)[:, None]
        return threshold / torch.maximum(resid.abs(), threshold)
    return norm_weights(resid / scale[:, None], norm)


def _irls(basis: Basis, y: torch.Tensor, valid: torch.Tensor, c: torch.Tensor, resid: torch.Tensor,
          scale: torch.Tensor, done: torch.Tensor, *, norm: str, maxiter: int, tol: float,
          accelerate: bool, all_valid: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reweighted iterations from a least-squares start; rows in `done` are left as they are.

    The rows still iterating form the working set, and a row leaves it when it converges: a batch costs what its
    running rows cost, not as many iterations of every row as its slowest one needs (7 to 28 on the background
    benchmark's slices, accelerated). Results go back to the batch only when rows leave, and at the end.
    """
    c, scale = c.clone(), scale.clone()
    iterations = torch.zeros(y.shape[0], dtype=torch.int32, device=y.device)
    # Below this change float32 rounding of the residuals dominates and the iteration only dithers; compared
    # with the squared step, as (tol x scale + floor)² x m.
    floor = 8 * torch.finfo(torch.float32).eps * y.abs().amax(dim=1).to(torch.float64)
    rows = (~done).nonzero()[:, 0]  # sync: once, the rows to iterate
    ya, va, ra, ca, sa, fa = y[rows], valid[rows], resid[rows], c[rows], scale[rows], floor[rows]
    mixer = _Anderson(len(rows), basis.n_terms, c.device)
    steps = 0
    while len(rows) and steps < maxiter:
        w = _weights(ra, sa, norm)
        if not all_valid:
            w = w * va
        dc, ok = _step(basis, w, ra)
        steps += 1
        # Q is orthonormal: |Q dc| = |dc|, so this is the RMS change of the fitted surface.
        converged = ((dc * dc).sum(dim=1) <= (tol * sa + fa).square() * basis.m) | ~ok
        # A converging row ends on the plain step c + dc, as statsmodels' iteration would.
        ca = mixer.next(ca, dc, plain=converged) if accelerate else ca + dc
        ra = ya - basis.predict(ca)
        sa = torch.where(converged, sa, _mad_scale(ra, va, all_valid))
        running = (~converged & (sa > 0)).nonzero()[:, 0]  # sync: the only host synchronisation per iteration
        if len(running) < len(rows):
            c[rows], scale[rows], iterations[rows] = ca, sa, steps
            rows, ya, va, ra, ca, sa, fa = (t[running] for t in (rows, ya, va, ra, ca, sa, fa))
            mixer.keep(running)
    if len(rows):  # stopped at maxiter
        c[rows], scale[rows], iterations[rows] = ca, sa, steps
    return c, scale, iterations


def fit(basis: Basis, y: torch.Tensor, valid: torch.Tensor, *, norm: str = "HuberT", maxiter: int = 50,
        tol: float = 1e-4, accelerate: bool = True) -> Fit:
    """Fit every row of `y` (b, m) on `basis`; `valid` (b, m) bool masks samples out. Never in place.

    Rows with fewer valid samples than terms are not fitted (NaN coefficients, `fitted` False). A row fitted
    exactly (zero scale, e.g. a constant slice) stops at once with its least-squares solution. `accelerate`
    mixes the steps (`_Anderson`); False iterates plainly, as statsmodels does (same fixed point, more steps).
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
    all_valid = bool(valid.all())  # sync: once per fit (no thresholds, no NaN: the usual case)
    scale = _mad_scale(resid, valid, all_valid)
    iterations = torch.zeros(y.shape[0], dtype=torch.int32, device=y.device)
    if norm != "None":
        c, scale, iterations = _irls(basis, y, valid, c, resid, scale, ~fitted | ~(scale > 0), norm=norm,
                                     maxiter=maxiter, tol=tol, accelerate=accelerate, all_valid=all_valid)
    c = torch.where(fitted[:, None], c, float("nan"))
    if not basis.full_rank:
        return Fit(torch.full_like(c, float("nan")), scale, iterations, fitted)
    return Fit(basis.to_basis(c), scale, iterations, fitted)
