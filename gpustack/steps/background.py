"""`bkg_removal`: remove a polynomial background, fitted per slice (2D) or once over the stack (3D) (PEERS §1.2).

2D bases fit every slice on its own, inside the fused pass (no statistics pass). 3D bases (a `z` variable, or 3
orders) fit one polynomial to the subsampled stack in a statistics pass, then remove each slice's background
at z = index / (n - 1). Differences from PyStack3D, all deliberate: exponents of any size and no silent
misreading of the basis; both modes work with `ind_min`/`ind_max`; masked pixels are corrected too unless
`correct_masked = false`; `preserve_avg` also works per slice in 2D; slices that cannot be fitted are left
intact and named in a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpustack.kernels.polynomial import Powers, powers_from_expr, powers_from_orders
from gpustack.schema import (
    Invalid,
    boolean,
    choice,
    int_list,
    integer,
    number,
    optional,
    param,
    string,
)
from gpustack.steps.base import Batch, ParamError, Report, Step

if TYPE_CHECKING:
    import torch

    from gpustack.kernels.background import Background


@dataclass(frozen=True)
class BkgRemovalConfig:
    dim: int | None = param(None, optional(integer(2, 3)),
                            "dimension of poly_basis: 2 (one fit per slice) or 3 (one fit over the stack); "
                            "default: 3 if the basis uses z")
    poly_basis: str | None = param(None, optional(string),
                                   'explicit basis, e.g. "1 + x + y + x*y + x**2 + z"; overrides orders')
    orders: tuple[int, ...] = param((1, 2, 1), int_list(lo=0),
                                    "maximum power per variable: [x, y] fits each slice, [x, y, z] the stack")
    cross_terms: bool = param(True, boolean, "with orders: products of variables too (false: 1, x, x**2, y, ...)")
    skip_factors: tuple[int, ...] | None = param(None, optional(int_list(lo=1)),
                                                 "fit on every n-th pixel in [x, y] (and slice in z); "
                                                 "default 10 per axis")
    skip_averaging: bool = param(False, boolean, "fit on block means instead of every n-th pixel")
    threshold_min: float | None = param(None, optional(number()), "grey levels below are left out of the fit")
    threshold_max: float | None = param(None, optional(number()), "grey levels above are left out of the fit")
    weight_func: str = param("HuberT", choice("HuberT", "Hampel", "None"),
                             "robust fit: HuberT, Hampel (M-estimators, IRLS) or None (least squares)")
    preserve_avg: bool = param(False, boolean, "keep the mean grey level exactly (of the stack in 3D, of each "
                                               "slice in 2D) instead of the fitted constant")
    correct_masked: bool = param(True, boolean,
                                 "gpustack: also correct pixels outside the thresholds (false: PyStack3D's way)")
    maxiter: int = param(50, integer(1), "gpustack: maximum robust-fit iterations")

    def __post_init__(self) -> None:
        powers = basis_powers(self)
        dim = len(powers[0])
        if self.skip_factors is not None and len(self.skip_factors) != dim:
            raise Invalid("skip_factors", f"{list(self.skip_factors)} has {len(self.skip_factors)} values; this "
                          f"{dim}D basis needs {dim} ([x, y{', z' if dim == 3 else ''}])")
        lo, hi = self.threshold_min, self.threshold_max
        if lo is not None and hi is not None and not lo < hi:
            raise Invalid("threshold_max", f"threshold_min ({lo:g}) must be less than threshold_max ({hi:g})")


def basis_powers(config: BkgRemovalConfig) -> Powers:
    """The basis a config asks for; an Invalid naming the key otherwise."""
    if config.poly_basis is not None:
        dim = config.dim or (3 if "z" in config.poly_basis else 2)
        try:
            return powers_from_expr(config.poly_basis, dim)
        except ValueError as exc:
            raise Invalid("poly_basis", str(exc)) from None
    if len(config.orders) not in (2, 3):
        raise Invalid("orders", f"{list(config.orders)}: give 2 orders [x, y] or 3 [x, y, z]")
    if config.dim is not None and config.dim != len(config.orders):
        raise Invalid("dim", f"dim = {config.dim} but orders {list(config.orders)} has {len(config.orders)} values")
    return powers_from_orders(config.orders, config.cross_terms)


class BkgRemoval(Step):
    name = "bkg_removal"
    Config = BkgRemovalConfig
    version = 2  # 2: statistics of the slices as written (rounded, clipped)
    work_buffers = 3  # the input, the background, the output

    def __init__(self, config: BkgRemovalConfig):
        from gpustack.kernels.background import Sampling

        super().__init__(config)
        self.powers = basis_powers(config)
        self.dim = len(self.powers[0])
        skip = config.skip_factors or (10,) * self.dim
        self.sampling = Sampling(skip[0], skip[1], config.skip_averaging)
        self.skip_z = skip[2] if self.dim == 3 else 1
        self._models: dict[tuple, Background] = {}

    @property
    def has_fit(self) -> bool:
        return self.dim == 3

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        samples = len(range(0, shape[0], self.sampling.sy)) * len(range(0, shape[1], self.sampling.sx))
        if self.dim == 2 and samples < len(self.powers):
            raise ParamError("skip_factors", f"{shape[1]}x{shape[0]} slices subsampled by {self.sampling.sx}x"
                             f"{self.sampling.sy} leave {samples} pixels for {len(self.powers)} terms")
        return shape

    def _model(self, height: int, width: int, device: torch.device) -> Background:
        from gpustack.kernels.background import Background

        key = (height, width, str(device))
        if key not in self._models:
            self._models[key] = Background(self.powers, self.sampling, height, width, device)
        return self._models[key]

    # -- 3D: one fit over the subsampled stack ------------------------------------------------------------
    def fit_batch(self, batch: Batch) -> dict[str, Any]:
        """Per group of `skip_z` slices: sums and counts of the sampled values (means when averaging, else the
        first slice of the group only), so that groups split across batches merge exactly."""
        import torch


        cfg = self.config
        x = batch.data[batch.core]
        first = batch.start + batch.core.start
        rows = [j for j in range(x.shape[0]) if cfg.skip_averaging or (first + j) % self.skip_z == 0]
        groups: dict[int, list] = {}
        if not rows:
            return {"shape": tuple(x.shape[1:]), "groups": groups, "n_total": batch.n_total}
        sel = x[rows]
        values, valid = self.sampling.take_masked(sel, cfg.threshold_min, cfg.threshold_max)
        weight = valid.to(torch.float32)
        for j, row in enumerate(rows):
            k = first + row
            z = k / max(1, batch.n_total - 1)
            entry = groups.setdefault(k // self.skip_z, [0.0, 0.0, 0.0, 0])
            entry[0] = entry[0] + torch.where(valid[j], values[j], 0.0)
            entry[1] = entry[1] + weight[j]
            entry[2] += z
            entry[3] += 1
        return {"shape": tuple(x.shape[1:]), "groups": groups, "n_total": batch.n_total}

    def fit_reduce(self, partials: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from gpustack.kernels import polynomial, robust

        merged: dict[int, list] = {}
        for part in partials:
            for g, (total, count, zsum, members) in part["groups"].items():
                m = merged.setdefault(g, [0.0, 0.0, 0.0, 0])
                m[0], m[1], m[2], m[3] = m[0] + total, m[1] + count, m[2] + zsum, m[3] + members
        keys = sorted(merged)
        n_total = partials[0]["n_total"]
        totals = torch.stack([merged[g][0] for g in keys])
        counts = torch.stack([merged[g][1] for g in keys])
        device = totals.device
        zs = torch.tensor([merged[g][2] / merged[g][3] for g in keys], dtype=torch.float64, device=device)
        ys, xs = self.sampling.coords(*partials[0]["shape"], device)
        design = polynomial.design_matrix(self.powers, xs, ys, zs)
        valid = (counts > 0).reshape(1, -1)
        values = (totals / counts.clamp_min(1)).reshape(1, -1)
        fit = robust.fit(robust.Basis(design), values, valid, norm=self.config.weight_func,
                         maxiter=self.config.maxiter)
        coefs = fit.coefs[0]
        if self.config.preserve_avg:  # the stack's mean background: the output's mean is the input's
            z_all = torch.arange(n_total, dtype=torch.float64, device=device) / max(1, n_total - 1)
            offset = polynomial.mean_value(self.powers, coefs, *partials[0]["shape"], z_all)
        else:
            offset = coefs[0]
        return {"coefs": coefs, "offset": offset, "scale": fit.scale[0], "iterations": fit.iterations[0],
                "fitted": fit.fitted[0], "samples": int(valid.sum()), "groups": len(keys)}  # sync: once per stack

    # -- the correction ---------------------------------------------------------------------------------
    def apply(self, batch: Batch, state: Any) -> torch.Tensor:
        return self.apply_recorded(batch, state)[0]

    def apply_recorded(self, batch: Batch, state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch

        from gpustack.kernels import polynomial
        from gpustack.kernels.background import fit_mask

        cfg = self.config
        x = batch.data
        model = self._model(x.shape[1], x.shape[2], x.device)
        # The full-resolution mask is only needed to leave masked pixels alone; the fit masks its samples.
        keep = None if cfg.correct_masked else ~fit_mask(x, cfg.threshold_min, cfg.threshold_max)
        records: dict[str, torch.Tensor] = {}
        if self.dim == 2:
            ahead = state.get("prefit") if isinstance(state, dict) else None
            if ahead is not None:  # fitted before the pass, from the files (pipeline/prefit.py)
                fit = {k: v[batch.start:batch.start + x.shape[0]] for k, v in ahead.items()}
            else:
                values, ok = self.sampling.take_masked(x, cfg.threshold_min, cfg.threshold_max)
                fit = self._fit(model, values, ok)
            coefs = fit["coefs"]
            offset = (polynomial.mean_value(self.powers, coefs, x.shape[1], x.shape[2]) if cfg.preserve_avg
                      else coefs[:, 0])
            grid = polynomial.slice_coefficients(self.powers, coefs)
            records.update(fit, offset=offset)
        else:
            ks = torch.arange(batch.start, batch.start + x.shape[0], dtype=torch.float64, device=x.device)
            z = ks / max(1, batch.n_total - 1)
            grid = polynomial.slice_coefficients(self.powers, state["coefs"], z)
            offset = state["offset"].expand(x.shape[0])
        out = model.remove(x, grid, offset, keep)
        records.update(_profiles(x, out, self.sampling.sx, self.sampling.sy))
        return out, records

    def _fit(self, model: Background, values: torch.Tensor, ok: torch.Tensor) -> dict[str, torch.Tensor]:
        fit = model.fit_slices(values, ok, self.config.weight_func, self.config.maxiter)
        return {"coefs": fit.coefs, "scale": fit.scale, "iterations": fit.iterations}

    def sample_grid(self) -> tuple[int, int] | None:
        """2D fits on every sy-th row and sx-th column use nothing else (block means use every pixel)."""
        if self.dim != 2 or self.sampling.averaging:
            return None
        return self.sampling.sy, self.sampling.sx

    def fit_samples(self, values: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        from gpustack.kernels.background import fit_mask

        model = self._model(shape[0], shape[1], values.device)
        return self._fit(model, values, fit_mask(values, self.config.threshold_min, self.config.threshold_max))

    @property
    def unfitted_reason(self) -> str:
        """Why a slice could not be fitted, for the report's and the public function's warnings."""
        if self.dim == 3:
            return "too few sampled slices for the z terms (lower skip_factors[2] or the z order)"
        return "too few pixels inside the thresholds (or too few sampled rows/columns for the orders)"

    def write_report(self, report: Report) -> None:
        from gpustack.report.background import write_background_report

        write_background_report(self, report)


def _profiles(before: torch.Tensor, after: torch.Tensor, sx: int, sy: int) -> dict[str, torch.Tensor]:
    """Min/max/mean along x (over rows) and along y (over columns) of the subsampled input and output slices."""
    import torch

    out = {}
    for axis, reduce_dim in (("x", 1), ("y", 2)):
        rows = []
        for t in (before, after):
            v = t[:, ::sy, ::sx]
            finite = torch.isfinite(v)
            lo = torch.where(finite, v, float("inf")).amin(dim=reduce_dim)
            hi = torch.where(finite, v, float("-inf")).amax(dim=reduce_dim)
            mean = torch.where(finite, v, 0.0).sum(dim=reduce_dim) / finite.sum(dim=reduce_dim).clamp_min(1)
            rows.append(torch.stack([lo, hi, mean], dim=1))
        out[f"profile_{axis}"] = torch.stack(rows, dim=1)  # (b, {input, output}, {min, max, mean}, points)
    return out
