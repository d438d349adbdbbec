"""Polynomial backgrounds: bases from `orders` or an expression, and their evaluation on slices.

A basis is a tuple of powers, one (px, py[, pz]) per term, sorted ascending (PyStack3D's "invlex" order, so the
constant comes first). Coordinates are normalised to [0, 1]: x along the columns, y along the rows (top row 0),
z = slice index / (n - 1). No torch at import: the config checks the expression without loading it.
"""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Powers = tuple[tuple[int, ...], ...]
VARIABLES = "xyz"


def powers_from_orders(orders: tuple[int, ...], cross_terms: bool) -> Powers:
    """Every monomial up to the per-variable `orders`; without cross terms, only single-variable ones."""
    terms = itertools.product(*(range(o + 1) for o in orders))
    if not cross_terms:
        terms = (p for p in terms if sum(1 for e in p if e) <= 1)
    return tuple(sorted(terms))


_TERM = re.compile(r"^(?:1|[xyz](?:\*\*\d+)?(?:\*[xyz](?:\*\*\d+)?)*)$")


def powers_from_expr(expr: str, dim: int) -> Powers:
    """Parse a basis such as "1 + x + y + x*y + x**2 + z"; the constant term is always added.

    Grammar: terms joined by '+', a term is '1' or a product of x, y, z with optional '**<integer>' (repeated
    factors multiply: x*x is x**2). Coefficients, other operators and duplicates are errors, never guessed.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError("the polynomial basis is empty")
    allowed = VARIABLES[:dim]
    seen: dict[tuple[int, ...], str] = {}
    for raw in expr.split("+"):
        term = re.sub(r"\s+", "", raw)
        if not term:
            raise ValueError(f"{expr!r}: empty term (two '+' in a row, or one at an end)")
        if not _TERM.match(term):
            raise ValueError(f"{expr!r}: cannot read the term {raw.strip()!r}; terms are 1 or products of x, y, z "
                             "with integer powers, e.g. 1 + x + y**2 + x*y*z (no coefficients)")
        powers, last = [0] * dim, 0
        if term != "1":
            for factor in term.split("*"):
                if not factor:
                    continue  # the empty piece between the two '*' of '**'
                if factor.isdigit():  # the exponent of the previous variable
                    powers[last] += int(factor) - 1
                    continue
                if factor not in allowed:
                    raise ValueError(f"{expr!r}: {factor!r} is not a variable of a {dim}D basis "
                                     f"(use {', '.join(allowed)}{'; z needs dim = 3' if factor == 'z' else ''})")
                last = allowed.index(factor)
                powers[last] += 1
        key = tuple(powers)
        if key in seen:
            raise ValueError(f"{expr!r}: the terms {seen[key]!r} and {raw.strip()!r} are the same monomial")
        seen[key] = raw.strip()
    seen.setdefault((0,) * dim, "1")
    return tuple(sorted(seen))


def expr_from_powers(powers: Powers) -> str:
    return " + ".join(term_name(p) for p in powers)


def term_name(power: tuple[int, ...]) -> str:
    factors = [v if e == 1 else f"{v}**{e}" for v, e in zip(VARIABLES, power) if e]
    return "*".join(factors) or "1"


def axis_powers(coords: torch.Tensor, max_power: int) -> torch.Tensor:
    """(len(coords), max_power + 1): coords**0, coords**1, ..."""
    import torch

    return coords[:, None] ** torch.arange(max_power + 1, dtype=coords.dtype, device=coords.device)


def unit_coords(n: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """PyStack3D's coordinates along an axis of n pixels: linspace(0, 1, n)."""
    import torch

    return torch.linspace(0.0, 1.0, n, dtype=dtype, device=device) if n > 1 else torch.zeros(1, dtype=dtype,
                                                                                             device=device)


def design_matrix(powers: Powers, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """(len(z) * len(y) * len(x), q) basis on the grid z × y × x (row-major: x fastest), for a least-squares fit."""
    import torch

    dim = len(powers[0])
    zs = z if dim == 3 else torch.zeros(1, dtype=x.dtype, device=x.device)
    grids = torch.meshgrid(zs, y, x, indexing="ij")
    cols = []
    for p in powers:
        term = grids[2] ** p[0] * grids[1] ** p[1]
        if dim == 3:
            term = term * grids[0] ** p[2]
        cols.append(term.reshape(-1))
    return torch.stack(cols, dim=1)


def slice_coefficients(powers: Powers, coefs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """Fold a basis into per-slice (b, ny, nx) coefficient grids C[py, px], so that bkg = Y @ C @ X^T.

    `coefs` is (b, q) for per-slice 2D fits, or (q,) for one 3D fit evaluated at the slices' `z` (b,).
    """
    import torch

    nx = max(p[0] for p in powers) + 1
    ny = max(p[1] for p in powers) + 1
    if coefs.dim() == 1:
        zpow = torch.stack([z ** p[2] for p in powers], dim=1)  # (b, q)
        coefs = coefs[None, :] * zpow
    grid = torch.zeros(coefs.shape[0], ny * nx, dtype=coefs.dtype, device=coefs.device)
    flat = torch.tensor([p[1] * nx + p[0] for p in powers], device=coefs.device)
    grid.index_add_(1, flat, coefs)  # 3D terms differing only in z land on the same (py, px)
    return grid.view(-1, ny, nx)


def evaluate(grid: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Backgrounds (b, height, width) from coefficient grids (b, ny, nx): two small matmuls, no (H*W, q) basis."""
    ny, nx = grid.shape[1:]
    ycoef = axis_powers(unit_coords(height, dtype=grid.dtype, device=grid.device), ny - 1)  # (H, ny)
    xcoef = axis_powers(unit_coords(width, dtype=grid.dtype, device=grid.device), nx - 1)  # (W, nx)
    partial = (ycoef @ grid).to(dtype)  # (b, H, nx), float64 where the coefficients cancel
    return partial @ xcoef.T.to(dtype)


def mean_value(powers: Powers, coefs: torch.Tensor, height: int, width: int,
               z: torch.Tensor | None = None) -> torch.Tensor:
    """Exact mean of the polynomial over every pixel of a slice ((b, q) coefficients -> (b,)), or, for one 3D fit
    ((q,) coefficients), over every pixel of the slices at `z`."""
    import torch

    def axis_mean(n: int, p: int) -> torch.Tensor:
        return (unit_coords(n, dtype=torch.float64, device=coefs.device) ** p).mean()

    factors = torch.stack([axis_mean(width, p[0]) * axis_mean(height, p[1]) for p in powers])
    if coefs.dim() == 1:
        factors = factors * torch.stack([(z ** p[2]).mean() for p in powers])
    return torch.nan_to_num(coefs) @ factors
