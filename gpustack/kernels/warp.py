"""Batched affine warps of slices (`registration_transformation`) and the region that
every warped slice covers.

Conventions
-----------
- Images are (b, H, W) float32 (float64 is accepted and then sampled in float64).
  Pixel (row y, column x) sits at integer coordinates; x = column, y = row.
- A (3, 3) matrix is in scikit-image's convention: it maps OUTPUT pixel coordinates,
  homogeneous [x, y, 1], to INPUT coordinates, `out[y, x] = in(M @ [x, y, 1])`, which is
  what `skimage.transform.warp(img, AffineTransform(matrix=M))` does. Only the first two
  rows are used (affine: the last row is taken to be [0, 0, 1]).
- Geometry (sample positions, mode folding, validity) is float64, cast to the data
  dtype only for `grid_sample` (align_corners=True: normalised -1 / +1 are the centres
  of the first / last pixel). grid_sample's own float32 unnormalisation is off by up to
  about (W - 1) * 2**-25 px plus half a float32 ulp of the position (~5e-5 px in all
  at 1024 px: 1.3e-4 relative to scikit-image's float64 warp on white noise in
  [50, 150]; ~1e-6 on small images). For axis-aligned maps (no rotation or
  shear: shifts, flips, scalings), a position within 1e-6 px of a pixel centre takes
  that pixel's value exactly: the identity and integer shifts return the input exactly.
- Modes follow numpy.pad as scikit-image uses them; for the values 'a b c d':
  constant `f f | a b c d | f f` (f = `fill`, NaN by default),
  edge `a a | a b c d | d d`, reflect `c b | a b c d | c b`,
  symmetric `b a | a b c d | d c`, wrap `c d | a b c d | a b`.
  They are implemented by folding the float64 positions into the image (exact at any
  distance) and sampling with 'border' padding; 'wrap' (and, for bicubic, every mode
  but 'constant') also gets one or two extended rows and columns so that neighbours
  across a seam are the right ones. So bilinear equals scikit-image's (interpolation of
  the integer-extended signal) in every mode, at any distance.
- Orders: 0 nearest (ties broken as scikit-image / scipy.ndimage do), 1 bilinear
  (scikit-image's default for float data, and PyStack3D's), 3 bicubic = grid_sample's
  cubic convolution (a = -0.75). Bicubic is NOT scikit-image's order 3 (Catmull-Rom,
  a = -0.5, for matrix warps; a spline otherwise) and is not tested for parity.
- 'constant': a sample whose position is outside [0, W-1] x [0, H-1] (1e-6 px tolerance)
  is `fill`; for order 0 the rounded position is tested instead, i.e. outside
  [-0.5, W-0.5) x [-0.5, H-0.5), as in scikit-image. Inside, bilinear never reads a
  neighbour outside the image, so it equals scikit-image's (whose outside neighbours are
  `cval`). Intentional differences: scikit-image has no tolerance (a position 1e-9 px
  outside is NaN there, the border value here); bicubic reads edge values for taps
  outside the image (scikit-image: `cval`, so NaN within 1 px of the border).
  NaN is never cast to an integer here: that is the caller's job.

`warp_affine` and `valid_mask` never synchronise with the host; `valid_region` does once
(marked `# sync`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("constant", "edge", "reflect", "symmetric", "wrap")
ORDERS = {0: "nearest", 1: "bilinear", 3: "bicubic"}
TOL = 1e-6  # px: this close outside the border is inside; this close to a centre snaps


def translation_matrices(shifts: torch.Tensor) -> torch.Tensor:
    """(b, 2) shifts (dx, dy) -> (b, 3, 3) float64 matrices: the output at (x, y)
    samples the input at (x + dx, y + dy), so the content moves by (-dx, -dy)."""
    shifts = torch.as_tensor(shifts, dtype=torch.float64)
    m = torch.eye(3, dtype=torch.float64, device=shifts.device)
    m = m.repeat(shifts.shape[0], 1, 1)
    m[:, :2, 2] = shifts
    return m


# ----------------------------------------------------------------------------- folding


def _fold(c: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Positions (float64 px) folded into an axis of n pixels, such that linear
    interpolation there (neighbours clamped) is that of the mode-extended signal."""
    if mode in ("constant", "edge"):
        return c.clamp(0, n - 1)
    if mode == "reflect":  # mirror about the first and last centres, period 2 (n - 1)
        if n == 1:
            return torch.zeros_like(c)
        t = torch.remainder(c, 2 * (n - 1))
        return (n - 1) - (t - (n - 1)).abs()
    if mode == "symmetric":  # mirror about the outer edges -0.5, n - 0.5; period 2 n
        t = torch.remainder(c + 0.5, 2 * n)
        return n - (t - n).abs() - 0.5  # in [-0.5, n - 0.5]
    return torch.remainder(c, n).clamp(max=n)  # wrap: [0, n]; n is an extended column


def _fold_sample(c: torch.Tensor, n: int, mode: str, order: int) -> torch.Tensor:
    """Positions to hand to grid_sample (order 1 or 3): with 'border' padding and the
    extension of `_pad`, they read exactly the mode-extended signal."""
    if mode in ("constant", "edge"):  # bicubic at -1 or n reads only edge values
        return c.clamp(0, n - 1) if order == 1 else c.clamp(-1, n)
    c = _fold(c, n, mode)
    if mode == "symmetric" and order == 1:  # the end half pixels are flat for bilinear
        return c.clamp_(0, n - 1)
    return c


def _pad(mode: str, order: int) -> tuple[int, int]:
    """Extended rows / columns needed before and after the image by `_fold_sample`."""
    if order == 3 and mode != "constant":  # taps floor - 1 .. floor + 2 of [-1, n]
        return 2, 2
    return (0, 1) if mode == "wrap" else (0, 0)  # bilinear wrap: seam n - 1 | n (= 0)


def _fold_index(k: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Integer positions (float64) mapped into [0, n - 1] as numpy.pad's modes do."""
    if mode == "symmetric":
        t = torch.remainder(k, 2 * n)
        return torch.where(t < n, t, 2 * n - 1 - t)
    if mode == "wrap":
        return torch.remainder(k, n)
    return _fold(k, n, mode)  # constant (clamped), edge, reflect: integers stay so


def _fold_nearest(c: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Nearest index (float64) on an axis of n pixels, ties broken as scikit-image's
    order 0 (scipy.ndimage) does: a position outside [0, n - 1] is folded once by
    scipy's rule, rounded half up, and the index then mapped into the image
    ('constant': left out of range)."""
    if n > 1 and mode in ("reflect", "symmetric", "wrap"):
        if mode == "reflect":  # scipy 'mirror'
            p = 2 * n - 2
            neg = p * torch.trunc(-c / p) + c
            neg = torch.where(neg <= 1 - n, neg + p, -neg)
            pos = c - p * torch.trunc(c / p)
            pos = torch.where(pos >= n, p - pos, pos)
        elif mode == "symmetric":  # scipy 'reflect'
            p = 2 * n
            neg = torch.where(c < -p, p * torch.trunc(-c / p) + c, c)
            neg = torch.where(neg < -n, neg + p, -neg - 1)
            pos = c - p * torch.trunc(c / p)
            pos = torch.where(pos >= n, p - pos - 1, pos)
        else:  # scipy 'grid-wrap'
            neg = c + n * (torch.trunc((-1 - c) / n) + 1)
            pos = c - n * torch.trunc(c / n)
        c = torch.where(c < 0, neg, torch.where(c > n - 1, pos, c))
    k = torch.floor(c + 0.5)
    return k if mode == "constant" else _fold_index(k, n, mode)


def _extend(images: torch.Tensor, lo: int, hi: int, mode: str) -> torch.Tensor:
    """Images with `lo` / `hi` extra rows and columns before / after, holding the mode's
    extension (edge values for 'constant')."""
    if lo == 0 and hi == 0:
        return images
    out = images
    for dim in (1, 2):
        n = images.shape[dim]
        k = torch.arange(-lo, n + hi, dtype=torch.float64, device=images.device)
        out = out.index_select(dim, _fold_index(k, n, mode).to(torch.long))
    return out


# ---------------------------------------------------------------------------- geometry


def _scale(n: int) -> float:
    """Pixels -> grid_sample's normalised units (align_corners=True), n samples."""
    return 2.0 / (n - 1) if n > 1 else 0.0


def _position(matrices: torch.Tensor, row: int, height: int, width: int, *,
              normalise: bool) -> torch.Tensor:
    """Input x (row 0) or y (row 1), (b, H, W) float64, of every output pixel: in
    pixels, or (`normalise`) in grid_sample's [-1, 1] of the unpadded image. One
    full-size operation."""
    dev = matrices.device
    xs = torch.arange(width, dtype=torch.float64, device=dev)[None, None, :]
    ys = torch.arange(height, dtype=torch.float64, device=dev)[None, :, None]
    m = matrices[:, row, :, None, None]  # (b, 3, 1, 1)
    a, b, c = m[:, 0], m[:, 1], m[:, 2]
    if normalise:  # g = (p - (n - 1) / 2) * 2 / (n - 1), folded into the coefficients
        n = (width, height)[row]
        s = _scale(n)
        a, b, c = a * s, b * s, (c - (n - 1) / 2) * s
    return a * xs + (b * ys + c)


def _to_grid(grid: torch.Tensor, axis: int, c: torch.Tensor, lo: int, n: int) -> None:
    """Pixel positions `c` (float64, unpadded image; overwritten) -> grid[..., axis],
    normalised for an axis of n samples whose first `lo` are extension."""
    grid[..., axis].copy_(c.add_(lo - (n - 1) / 2).mul_(_scale(n)))


def _snapping(matrices: torch.Tensor, height: int, width: int, mode: str, order: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where an axis-aligned map (no rotation or shear) samples on a pixel centre: mask
    (b, H, W), source rows (b, H) and columns (b, W); built from (b, H), (b, W)."""
    ok, idx = [], []
    for row, n in ((1, height), (0, width)):
        c = torch.arange(n, dtype=torch.float64, device=matrices.device)
        p = matrices[:, row, row, None] * c + matrices[:, row, 2, None]
        p = _fold_sample(p, n, mode, order)
        r = p.round()
        ok.append((p - r).abs() <= TOL)
        idx.append(_fold_index(r, n, mode).clamp_(0, n - 1).to(torch.long))
    # axis-aligned: the cross terms stay below 1e-9 px over the whole image
    axis = ((matrices[:, 0, 1].abs() * (height - 1) <= 1e-9)
            & (matrices[:, 1, 0].abs() * (width - 1) <= 1e-9))
    mask = (ok[0] & axis[:, None])[:, :, None] & ok[1][:, None, :]
    return mask, idx[0], idx[1]


# -------------------------------------------------------------------------------- warp


def warp_affine(images: torch.Tensor, matrices: torch.Tensor, *, mode: str = "constant",
                order: int = 1, fill: float = float("nan"), snap: bool = True) -> torch.Tensor:
    """Warp each slice by its matrix (output -> input pixel coordinates, scikit-image's
    convention); same shape out. images (b, H, W) float32, matrices (b, 3, 3) (used as
    float64). One `grid_sample` call for the whole batch, no host sync."""
    if images.ndim != 3:
        raise ValueError(f"images must be (b, H, W), got {tuple(images.shape)}")
    if images.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"images must be float32 (or float64), got {images.dtype}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {tuple(ORDERS)}, got {order!r}")
    matrices = torch.as_tensor(matrices).to(device=images.device, dtype=torch.float64)
    b, height, width = images.shape
    if matrices.shape != (b, 3, 3):
        raise ValueError(f"matrices must be ({b}, 3, 3), got {tuple(matrices.shape)}")
    grid = torch.empty((b, height, width, 2), dtype=images.dtype, device=images.device)
    src = images
    outside = None

    if order != 0 and mode in ("constant", "edge") and min(height, width) > 1:
        # fast path: normalised positions directly, 'border' padding clamps; one float64
        # (b, H, W) alive at a time
        for axis, n in ((0, width), (1, height)):
            g = _position(matrices, axis, height, width, normalise=True)
            grid[..., axis].copy_(g)
            if mode == "constant":  # |g| <= 1 <=> inside [0, n - 1]; TOL px of slack
                out_axis = g.abs_() > 1 + TOL * _scale(n)
                outside = out_axis if outside is None else outside.logical_or_(out_axis)
            del g
    else:
        px = _position(matrices, 0, height, width, normalise=False)
        py = _position(matrices, 1, height, width, normalise=False)
        if mode == "constant" and order == 0:  # scipy 'grid-constant': rounded position
            outside = ((px < -0.5) | (px >= width - 0.5)
                       | (py < -0.5) | (py >= height - 0.5))
        elif mode == "constant":
            outside = ((px < -TOL) | (px > width - 1 + TOL)
                       | (py < -TOL) | (py > height - 1 + TOL))
        if order == 0:  # integer indices: grid_sample's nearest lands on them exactly
            fx, fy = _fold_nearest(px, width, mode), _fold_nearest(py, height, mode)
            if mode == "constant":
                fx, fy = fx.clamp_(0, width - 1), fy.clamp_(0, height - 1)
            lo = hi = 0
        else:
            fx = _fold_sample(px, width, mode, order)
            fy = _fold_sample(py, height, mode, order)
            lo, hi = _pad(mode, order)
        del px, py
        src = _extend(images, lo, hi, mode)
        _to_grid(grid, 0, fx, lo, width + lo + hi)
        _to_grid(grid, 1, fy, lo, height + lo + hi)
        del fx, fy

    out = F.grid_sample(src[:, None], grid, mode=ORDERS[order], padding_mode="border",
                        align_corners=True)[:, 0]
    del grid, src
    if order != 0 and snap:  # on a pixel centre: that pixel, exactly (snap=False: the caller knows none is)
        snap, rows, cols = _snapping(matrices, height, width, mode, order)
        batch = torch.arange(b, device=images.device)[:, None, None]
        exact = images[batch, rows[:, :, None], cols[:, None, :]]
        out = torch.where(snap, exact, out)
    if outside is not None:
        out = out.masked_fill_(outside, fill)
    return out


# ------------------------------------------------------------------------ valid region


def _check_stack(matrices: torch.Tensor) -> torch.Tensor:
    matrices = torch.as_tensor(matrices).to(dtype=torch.float64)
    if matrices.ndim != 3 or matrices.shape[1:] != (3, 3):
        raise ValueError(f"matrices must be (n, 3, 3), got {tuple(matrices.shape)}")
    return matrices


def _row_intervals(matrices: torch.Tensor, height: int, width: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row, the columns [first, last] (float64, (H,) each; empty where
    first > last) mapped inside [0, W-1] x [0, H-1] (TOL px slack) by every matrix.

    Per matrix and row, the four half-planes 0 <= x_in, x_in <= W-1, 0 <= y_in,
    y_in <= H-1 are each a half-line in x, so the pixels inside form an interval; the
    intersection over matrices is the intersection of intervals: the same answer as
    testing every pixel of the (H, W) grid, in O(n H) instead of O(n H W)."""
    dev = matrices.device
    ys = torch.arange(height, dtype=torch.float64, device=dev)
    lo = torch.full((height,), -torch.inf, dtype=torch.float64, device=dev)
    hi = torch.full((height,), torch.inf, dtype=torch.float64, device=dev)
    chunk = max(1, (1 << 22) // max(height, 1))
    for start in range(0, matrices.shape[0], chunk):
        m = matrices[start:start + chunk, :2, :, None]  # (c, 2, 3, 1)
        for axis, n in ((0, width), (1, height)):
            a = m[:, axis, 0]  # coefficient of x, (c, 1)
            u = m[:, axis, 1] * ys + m[:, axis, 2]  # the rest, (c, H)
            # -TOL <= a x + u <= n - 1 + TOL
            bound1, bound2 = (-TOL - u) / a, (n - 1 + TOL - u) / a
            flat = a == 0  # then the whole row is in, or out
            ok = (u >= -TOL) & (u <= n - 1 + TOL)
            inf = torch.full_like(u, torch.inf)
            row_lo = torch.where(flat, torch.where(ok, -inf, inf),
                                 torch.minimum(bound1, bound2))
            row_hi = torch.where(flat, torch.where(ok, inf, -inf),
                                 torch.maximum(bound1, bound2))
            lo = torch.maximum(lo, row_lo.amax(dim=0))
            hi = torch.minimum(hi, row_hi.amin(dim=0))
    first = torch.ceil(lo).clamp(0, width)  # finite; empty rows keep first > last
    last = torch.floor(hi).clamp(-1, width - 1)
    return first, last


def valid_mask(matrices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool, on the matrices' device: the output pixels that every matrix
    (n, 3, 3) maps inside the input ([0, W-1] x [0, H-1], 1e-6 px slack), i.e. never
    extrapolated by a bilinear warp. No host sync."""
    height, width = (int(v) for v in shape)
    first, last = _row_intervals(_check_stack(matrices), height, width)
    cols = torch.arange(width, dtype=torch.float64, device=first.device)
    return (cols >= first[:, None]) & (cols <= last[:, None])


def _largest_rectangle(first: np.ndarray, last: np.ndarray
                       ) -> tuple[int, int, int, int]:
    """Largest all-True rectangle (r0, r1, c0, c1), half-open, of a mask whose row r is
    True exactly on columns first[r] .. last[r]. Rows r0 .. r1 - 1 allow the columns
    max(first) .. min(last) of those rows: exhaustive over row ranges, O(H^2) vectorised
    per top row, hence exact; the first of equal areas wins."""
    height = first.shape[0]
    best = (0, 0, 0, 0, 0)  # area, r0, r1, c0, c1
    for r0 in range(height):
        c0 = np.maximum.accumulate(first[r0:])
        c1 = np.minimum.accumulate(last[r0:]) + 1
        areas = np.maximum(c1 - c0, 0) * np.arange(1, height - r0 + 1)
        k = int(np.argmax(areas))
        if areas[k] > best[0]:
            best = (int(areas[k]), r0, r0 + k + 1, int(c0[k]), int(c1[k]))
    return best[1:]


def valid_region(matrices: torch.Tensor, shape: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, cols) slices of the largest axis-aligned rectangle of the (H, W) output
    that every matrix (n, 3, 3) maps inside the input (`valid_mask`), computed once for
    the whole stack. Empty slices (0:0) when no pixel qualifies.

    The mask's rows are single intervals (each slice's covered region is convex), so the
    maximal rectangle is found exactly from the (H,) row intervals rather than by the
    histogram-stack pass over the (H, W) mask."""
    height, width = (int(v) for v in shape)
    first, last = _row_intervals(_check_stack(matrices), height, width)
    first = first.cpu().numpy().astype(np.int64)  # sync: once per stack, (H,) values
    last = last.cpu().numpy().astype(np.int64)  # sync
    r0, r1, c0, c1 = _largest_rectangle(first, last)
    return slice(r0, r1), slice(c0, c1)


# ------------------------------------------------------------------------ translations


def shift_images(images: torch.Tensor, shifts: torch.Tensor, *, mode: str = "constant", order: int = 1,
                 fill: float = float("nan"), gather: bool = False) -> torch.Tensor:
    """`warp_affine` for pure translations, out[y, x] = in(x + dx, y + dy), shifts (b, 2) = (dx, dy): each output
    row and column reads the same two input rows and columns, so the warp is four gathers and two lerps instead of
    a sampling grid (or, for bilinear, padded windows: `gather=False`). Same modes, fill and results as
    `warp_affine` (orders 0 and 1)."""
    if order not in (0, 1):
        raise ValueError(f"shift_images does orders 0 and 1, got {order!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    b, height, width = images.shape
    shifts = torch.as_tensor(shifts).to(device=images.device, dtype=torch.float64)

    def taps(n: int, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        p = torch.arange(n, dtype=torch.float64, device=images.device)[None, :] + d[:, None]  # (b, n)
        if order == 0:
            k = _fold_nearest(p, n, mode)
            outside = (p < -0.5) | (p >= n - 0.5)
            k = k.clamp(0, n - 1)
            return k.long(), k.long(), torch.zeros_like(p), outside
        base = torch.floor(p)
        frac = p - base
        up = frac > 1 - TOL  # within TOL of the next centre: that pixel exactly
        base, frac = torch.where(up, base + 1, base), torch.where(up | (frac < TOL), 0.0, frac)
        outside = (p < -TOL) | (p > n - 1 + TOL)
        fold = "edge" if mode == "constant" else mode
        k0 = _fold_index(base, n, fold) if fold != "edge" else base.clamp(0, n - 1)
        k1 = _fold_index(base + 1, n, fold) if fold != "edge" else (base + 1).clamp(0, n - 1)
        return k0.long(), k1.long(), frac, outside

    if mode != "symmetric" and order == 1 and min(height, width) > 1 and not gather:
        return _shift_by_padding(images, shifts, mode, fill)
    c0, c1, fx, out_x = taps(width, shifts[:, 0])
    r0, r1, fy, out_y = taps(height, shifts[:, 1])
    batch = torch.arange(b, device=images.device)[:, None, None]
    wx = fx.to(images.dtype)[:, None, :]
    wy = fy.to(images.dtype)[:, :, None]
    top = torch.lerp(images[batch, r0[:, :, None], c0[:, None, :]], images[batch, r0[:, :, None], c1[:, None, :]], wx)
    if order == 0:
        out = top
    else:
        bottom = torch.lerp(images[batch, r1[:, :, None], c0[:, None, :]],
                            images[batch, r1[:, :, None], c1[:, None, :]], wx)
        out = torch.lerp(top, bottom, wy)
    if mode == "constant":
        out = out.masked_fill_(out_y[:, :, None] | out_x[:, None, :], fill)
    return out


_TORCH_PAD = {"constant": "replicate", "edge": "replicate", "reflect": "reflect", "wrap": "circular"}


def _shift_by_padding(images: torch.Tensor, shifts: torch.Tensor, mode: str, fill: float) -> torch.Tensor:
    """Bilinear shifts slice by slice, a few passes over each slice instead of four gathers (the loop is over
    slices, not pixels). 'edge' and 'constant': blend along x, then along y, straight from the slice, the edge
    line copied where a tap falls outside. Other modes: pad by the whole-pixel part (torch's pad has the numpy
    modes but 'symmetric'), take the shifted window and blend it with its neighbours by the fractional part."""
    b, height, width = images.shape
    base = torch.floor(shifts)
    frac = shifts - base
    up = frac > 1 - TOL
    base, frac = torch.where(up, base + 1, base), torch.where(up | (frac < TOL), 0.0, frac)
    base_host = base.to("cpu", torch.int64).tolist()  # sync: once per batch, b pairs of integers
    out = torch.empty_like(images)
    if _TORCH_PAD[mode] == "replicate":  # edge values: two blends straight from the slice, no padded copy
        frac = frac.to(images.dtype)
        line = torch.empty_like(images[0])
        for k, (ix, iy) in enumerate(base_host):
            _blend_edge(images[k], ix, frac[k, 0], 1, line)
            _blend_edge(line, iy, frac[k, 1], 0, out[k])
        if mode == "constant":
            _fill_outside(out, shifts, fill)
        return out
    for k, (ix, iy) in enumerate(base_host):
        # the window [iy, iy + H] x [ix, ix + W] (one extra row and column for the blend) of the padded slice
        left, right = max(0, -ix), max(0, ix + width + 1 - width)
        top, bottom = max(0, -iy), max(0, iy + height + 1 - height)
        pad_mode = _TORCH_PAD[mode]
        big = max(left, right) >= width or max(top, bottom) >= height
        if big and pad_mode != "replicate":  # torch pads reflect/circular by less than the size: fold instead
            out[k] = shift_images(images[k:k + 1], shifts[k:k + 1], mode=mode, order=1, fill=fill, gather=True)[0]
            continue
        src = images[k][None, None]
        if left or right or top or bottom:
            src = F.pad(src, (left, right, top, bottom), mode=pad_mode)
        src = src[0, 0, iy + top:iy + top + height + 1, ix + left:ix + left + width + 1]
        wx = frac[k, 0].to(images.dtype)
        wy = frac[k, 1].to(images.dtype)
        rows = torch.lerp(src[:, :width], src[:, 1:width + 1], wx)  # H + 1 rows blended along x once
        torch.lerp(rows[:height], rows[1:], wy, out=out[k])
    if mode == "constant":
        _fill_outside(out, shifts, fill)
    return out


def _fill_outside(out: torch.Tensor, shifts: torch.Tensor, fill: float) -> None:
    """`fill` where a shifted slice samples outside its input ('constant' mode), in place."""
    b, height, width = out.shape
    px = torch.arange(width, dtype=torch.float64, device=out.device)[None, :] + shifts[:, :1]
    py = torch.arange(height, dtype=torch.float64, device=out.device)[None, :] + shifts[:, 1:]
    outside = ((py < -TOL) | (py > height - 1 + TOL))[:, :, None] | ((px < -TOL) | (px > width - 1 + TOL))[:, None]
    out.masked_fill_(outside, fill)


def _blend_edge(x: torch.Tensor, i0: int, frac: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """out[j] = lerp(x[clamp(j + i0)], x[clamp(j + i0 + 1)], frac) along `dim` of a 2D x, clamped to the edge:
    one pass where both taps are inside, the edge line copied where they are not."""
    n = x.shape[dim]
    lo = min(max(0, -i0), n)  # from here both taps are inside ...
    hi = max(min(n, n - 1 - i0), lo)  # ... up to here
    if hi > lo:
        torch.lerp(x.narrow(dim, lo + i0, hi - lo), x.narrow(dim, lo + i0 + 1, hi - lo), frac,
                   out=out.narrow(dim, lo, hi - lo))
    if lo > 0:  # both taps at or before the first line
        out.narrow(dim, 0, lo).copy_(x.narrow(dim, 0, 1).expand_as(out.narrow(dim, 0, lo)))
    if hi < n:  # both taps at or after the last line
        out.narrow(dim, hi, n - hi).copy_(x.narrow(dim, n - 1, 1).expand_as(out.narrow(dim, hi, n - hi)))


# ------------------------------------------------------------------------ blocks


def _sample_at(images: torch.Tensor, px: torch.Tensor, py: torch.Tensor, mode: str, order: int,
               fill: float) -> torch.Tensor:
    """Images sampled at input positions px, py (b, H, W) float64 (overwritten), with the modes of warp_affine."""
    b, height, width = images.shape
    outside = None
    if mode == "constant" and order == 0:
        outside = (px < -0.5) | (px >= width - 0.5) | (py < -0.5) | (py >= height - 0.5)
    elif mode == "constant":
        outside = (px < -TOL) | (px > width - 1 + TOL) | (py < -TOL) | (py > height - 1 + TOL)
    if order == 0:
        fx, fy = _fold_nearest(px, width, mode), _fold_nearest(py, height, mode)
        if mode == "constant":
            fx, fy = fx.clamp_(0, width - 1), fy.clamp_(0, height - 1)
        lo = hi = 0
    else:
        fx, fy = _fold_sample(px, width, mode, order), _fold_sample(py, height, mode, order)
        lo, hi = _pad(mode, order)
    src = _extend(images, lo, hi, mode)
    grid = torch.empty((b, height, width, 2), dtype=images.dtype, device=images.device)
    _to_grid(grid, 0, fx, lo, width + lo + hi)
    _to_grid(grid, 1, fy, lo, height + lo + hi)
    out = F.grid_sample(src[:, None], grid, mode=ORDERS[order], padding_mode="border", align_corners=True)[:, 0]
    return out if outside is None else out.masked_fill_(outside, fill)


def _hat_weights(n: int, centres: torch.Tensor) -> torch.Tensor:
    """(n, k) piecewise-linear interpolation weights between k sorted centres, constant beyond the ends."""
    pos = torch.arange(n, dtype=torch.float64, device=centres.device)
    k = centres.shape[0]
    if k == 1:
        return torch.ones(n, 1, dtype=torch.float64, device=centres.device)
    idx = torch.searchsorted(centres, pos).clamp(1, k - 1)
    c0, c1 = centres[idx - 1], centres[idx]
    t = ((pos - c0) / (c1 - c0)).clamp(0, 1)
    w = torch.zeros(n, k, dtype=torch.float64, device=centres.device)
    w.scatter_(1, (idx - 1)[:, None], (1 - t)[:, None])
    w.scatter_add_(1, idx[:, None], t[:, None])
    return w


def warp_blocks(images: torch.Tensor, matrices: torch.Tensor, centres_y: torch.Tensor, centres_x: torch.Tensor, *,
                mode: str = "constant", order: int = 1, fill: float = float("nan")) -> torch.Tensor:
    """Piecewise warp: one matrix per block, matrices (b, p, q, 3, 3) in full-image coordinates, blended
    bilinearly between the block centres (rows `centres_y` (p,), columns `centres_x` (q,), in pixels) and held
    constant beyond the outer centres, so that the map is continuous. A smooth counterpart of PyStack3D's
    piecewise-affine triangulation over the same centres."""
    if mode not in MODES or order not in ORDERS:
        raise ValueError(f"mode must be one of {MODES} and order one of {tuple(ORDERS)}")
    b, height, width = images.shape
    wy = _hat_weights(height, centres_y.to(torch.float64))  # (H, p)
    wx = _hat_weights(width, centres_x.to(torch.float64))  # (W, q)
    m = matrices.to(device=images.device, dtype=torch.float64)
    xs = torch.arange(width, dtype=torch.float64, device=images.device)[None, None, :]
    ys = torch.arange(height, dtype=torch.float64, device=images.device)[None, :, None]

    def field(r: int, c: int) -> torch.Tensor:  # the blended matrix entry (r, c) at every pixel, (b, H, W)
        return torch.einsum("hi,bij,wj->bhw", wy, m[:, :, :, r, c], wx)

    px = field(0, 0).mul_(xs).add_(field(0, 1).mul_(ys)).add_(field(0, 2))
    py = field(1, 0).mul_(xs).add_(field(1, 1).mul_(ys)).add_(field(1, 2))
    return _sample_at(images, px, py, mode, order, fill)
