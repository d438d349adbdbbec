"""Histogram specification with continuous maps: each slice's grey levels moved so that its distribution follows
a reference, without collapsing them onto bin centres (PyStack3D's output has at most `nbins` levels).

Each slice's CDF is measured at FINE_BINS bins over its own range and treated as piecewise linear; references are
means of the slices' CDFs on `nbins` bins over the stack's range; a slice's map is F_ref^-1(F_slice(v)), tabulated
at the slice's fine bin edges and interpolated linearly between them, so it is continuous and monotone.
"""

from __future__ import annotations

import torch

FINE_BINS = 4096


def slice_cdfs(x: torch.Tensor, bins: int = FINE_BINS) -> dict[str, torch.Tensor]:
    """Per slice of x (b, H, W): lo, hi (finite range), count (finite pixels), cdf (b, bins + 1) at the edges
    lo + i (hi - lo) / bins. NaN and infinite pixels are left out; a constant slice has every pixel in bin 0."""
    if not x.is_floating_point():
        return _integer_slice_cdfs(x, bins)
    b = x.shape[0]
    lo, hi = x.amin(dim=(1, 2)), x.amax(dim=(1, 2))  # NaN if the slice holds any NaN
    nan_slices = bool((~torch.isfinite(lo) | ~torch.isfinite(hi)).any())  # sync: picks the NaN-aware path
    finite = None
    if nan_slices:
        finite = torch.isfinite(x)
        lo = torch.where(finite, x, float("inf")).amin(dim=(1, 2))
        hi = torch.where(finite, x, float("-inf")).amax(dim=(1, 2))
        count = finite.sum(dim=(1, 2))
    else:
        count = torch.full((b,), x.shape[1] * x.shape[2], dtype=torch.int64, device=x.device)
    # One bincount over every slice at once, bin index + slice * (bins + 1): bin `bins` holds the pixels at hi
    # (and float32 rounding just past it) and is folded into the last bin; non-finite pixels go to a last, dropped
    # bin. The index costs one fused multiply-add and one conversion: (x - lo) * s >= 0 only up to rounding, by
    # more than a bin where lo is large against hi - lo (-1.8 for values 63403..63410), hence the clamp at 0.
    s = bins / (hi - lo)
    s = torch.where(torch.isfinite(s), s, 0.0)[:, None, None]  # constant slices: inf * 0 would be NaN
    t = torch.addcmul((-lo)[:, None, None] * s, x, s)
    if finite is not None:
        t.nan_to_num_(0.0, 0.0, 0.0)  # non-finite pixels, dropped below
    idx = t.to(torch.int32).clamp_(0, bins).add_((torch.arange(b, dtype=torch.int32, device=x.device)
                                                   * (bins + 1))[:, None, None])
    del t
    if finite is not None:
        idx = torch.where(finite, idx, b * (bins + 1))
    hist = torch.bincount(idx.reshape(-1), minlength=b * (bins + 1) + 1)[: b * (bins + 1)].view(b, bins + 1)
    return _cdfs(hist, lo, hi, count)


def _cdfs(hist: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """slice_cdfs' result from counts (b, bins + 1) whose last bin holds the pixels at hi."""
    bins = hist.shape[1] - 1
    hist = torch.cat([hist[:, : bins - 1], hist[:, bins - 1:].sum(dim=1, keepdim=True)], dim=1)
    cum = torch.cumsum(hist.to(torch.float64), dim=1) / count.clamp_min(1)[:, None]
    cdf = torch.cat([torch.zeros_like(cum[:, :1]), cum], dim=1)
    return {"lo": lo, "hi": hi, "count": count, "cdf": cdf}


def _integer_slice_cdfs(x: torch.Tensor, bins: int) -> dict[str, torch.Tensor]:
    """slice_cdfs of integer slices (8 or 16 bits), exactly as of their float32 values: one bincount over the raw
    values, then the few distinct levels are put into the fine bins (`cdfs_from_level_counts`). Three passes over
    the pixels (conversion, offset, bincount) instead of eight, and no float32 copy of the batch."""
    return cdfs_from_level_counts(level_counts(x), int(torch.iinfo(x.dtype).min), bins)


def level_counts(x: torch.Tensor) -> torch.Tensor:
    """(b, H, W) integers of at most 16 bits -> (b, levels) int64: each slice's pixels at each value of the
    dtype, from its minimum (column 0) to its maximum."""
    info = torch.iinfo(x.dtype)
    levels = info.max - info.min + 1
    if levels > 1 << 16:
        raise TypeError(f"level counts take integers of at most 16 bits, not {x.dtype}")
    b = x.shape[0]
    offsets = torch.arange(b, dtype=torch.int32, device=x.device) * levels - info.min
    idx = x.to(torch.int32).add_(offsets[:, None, None])
    return torch.bincount(idx.reshape(-1), minlength=b * levels).view(b, levels)


def cdfs_from_level_counts(counts: torch.Tensor, lowest: int, bins: int = FINE_BINS) -> dict[str, torch.Tensor]:
    """slice_cdfs from each slice's pixel counts (b, levels) at the values lowest, lowest + 1, ...: every level
    goes to the fine bin the float path gives its float32 value, by the same arithmetic."""
    b, levels = counts.shape
    present = counts > 0
    level = torch.arange(levels, dtype=torch.int32, device=counts.device)
    first = torch.where(present, level, levels - 1).amin(dim=1)  # (argmax is several times slower on the CPU)
    last = torch.where(present, level, 0).amax(dim=1)
    values = torch.arange(lowest, lowest + levels, dtype=torch.float32, device=counts.device)
    lo, hi = values[first], values[last]
    count = counts.sum(dim=1)
    s = bins / (hi - lo)
    s = torch.where(torch.isfinite(s), s, 0.0)[:, None]
    # levels below lo get a negative bin and hold no pixel: any bin will do
    t = torch.addcmul((-lo)[:, None] * s, values, s)
    bin_of = t.to(torch.int32).clamp_(0, bins).to(torch.int64)
    hist = torch.zeros(b, bins + 1, dtype=torch.int64, device=counts.device).scatter_add_(1, bin_of, counts)
    return _cdfs(hist, lo, hi, count)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, side: str = "left") -> torch.Tensor:
    """Row-wise linear interpolation (numpy.interp per row): x (n, m), xp (n, k) non-decreasing, fp (n, k).

    Where xp is flat (an empty bin of a CDF, a constant run of a quantile function), x equal to the flat value
    takes the first of the equal points with side="left" (inverse CDFs: the quantile is the smallest level whose
    CDF reaches p) and the last with side="right" (CDFs from quantile functions: right-continuous).
    """
    k = xp.shape[1]
    idx = torch.searchsorted(xp.contiguous(), x.contiguous(), right=side == "right").clamp(1, k - 1)
    x0, x1 = xp.gather(1, idx - 1), xp.gather(1, idx)
    f0, f1 = fp.gather(1, idx - 1), fp.gather(1, idx)
    rising = x1 > x0
    t = torch.where(rising, ((x - x0) / torch.where(rising, x1 - x0, 1.0)).clamp(0.0, 1.0),
                    1.0 if side == "right" else 0.0)
    return f0 + t * (f1 - f0)


def cdf_at(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear CDFs (n, B + 1) over [lo, hi] evaluated at values (n, m) or (m,)."""
    bins = cdf.shape[1] - 1
    if values.dim() == 1:
        values = values.expand(cdf.shape[0], -1)
    u = ((values - lo[:, None]) / (hi - lo).clamp_min(1e-30)[:, None] * bins).clamp(0, bins)
    i = u.floor().clamp(max=bins - 1).long()
    f = u - i
    c0, c1 = cdf.gather(1, i), cdf.gather(1, i + 1)
    return c0 + f * (c1 - c0)


def reflect_index(j: torch.Tensor, n: int) -> torch.Tensor:
    """scipy.ndimage's 'reflect' boundary (d c b a | a b c d | d c b a) for any offset."""
    m = j.remainder(2 * n)
    return torch.where(m >= n, 2 * n - 1 - m, m)


def running_mean(values: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """Weighted running mean over rows, window [k - size//2, k - size//2 + size - 1] as scipy's uniform_filter1d,
    with the reflect boundary; rows of zero weight (slices that cannot be measured) do not count."""
    n = values.shape[0]
    j = torch.arange(-(size // 2), n - (size // 2) + size - 1, device=values.device)
    rows = reflect_index(j, n)
    w = weights.to(values.dtype)[rows]
    wv = values[rows] * w[:, None]
    zero = torch.zeros_like(wv[:1])
    csum_v = torch.cat([zero, torch.cumsum(wv, dim=0)])
    csum_w = torch.cat([torch.zeros_like(w[:1]), torch.cumsum(w, dim=0)])
    total = csum_v[size:size + n] - csum_v[:n]
    weight = csum_w[size:size + n] - csum_w[:n]
    return total / weight.clamp_min(1e-30)[:, None], weight


def running_median(values: torch.Tensor, size: int, chunk: int = 1 << 24) -> torch.Tensor:
    """Per column, the median of the finite values over the window of `running_mean` (size -1: all rows)."""
    n = values.shape[0]
    # nanquantile(0.5) is numpy's median: the mean of the two middle values for an even count (nanmedian is
    # the lower one).
    if size == -1:
        return torch.nanquantile(values, 0.5, dim=0).expand(n, -1)
    offsets = torch.arange(-(size // 2), size - size // 2, device=values.device)
    out = torch.empty_like(values)
    step = max(1, chunk // max(1, size * values.shape[1]))
    for s in range(0, n, step):
        rows = reflect_index(torch.arange(s, min(n, s + step), device=values.device)[:, None] + offsets, n)
        out[s:s + step] = torch.nanquantile(values[rows], 0.5, dim=1)
    return out


def apply_maps(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, lut: torch.Tensor,
               active: torch.Tensor) -> torch.Tensor:
    """Map every pixel of x (b, H, W) through its slice's tabulated map lut (b, B + 1) over [lo, hi], linearly
    between the table's points; slices with active False, and NaN pixels, are returned as they are.

    Written for few passes over the batch: the position in the table is one multiply-add, the table and its
    slopes are looked up by one int32 index into all slices' tables at once (index_select takes int32, gather
    would need an int64 copy of the index), and the fraction is taken in place.
    """
    b = x.shape[0]
    bins = lut.shape[1] - 1
    lut = lut.to(x.dtype)
    # value and slope per table point; the point at hi (u = bins) gets a zero slope, so no clamp below bins
    slope = torch.cat([lut.diff(dim=1), torch.zeros_like(lut[:, :1])], dim=1)
    s = (bins / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)).to(x.dtype)[:, None, None]
    u = torch.addcmul((-lo.to(x.dtype))[:, None, None] * s, x, s).nan_to_num_(0.0).clamp_(0, bins)
    idx = u.to(torch.int32).add_((torch.arange(b, dtype=torch.int32, device=x.device) * (bins + 1))[:, None, None])
    frac = u.frac_()
    y = lut.reshape(-1).index_select(0, idx.view(-1)).view_as(x)
    y.addcmul_(frac, slope.reshape(-1).index_select(0, idx.view(-1)).view_as(x))
    # x == x is False only for NaN: one comparison where isfinite takes four passes on the CPU (±inf pixels
    # are mapped to the ends of the table)
    return torch.where(active[:, None, None] & (x == x), y, x)  # noqa: PLR0124


def apply_maps_to_integers(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, lut: torch.Tensor,
                           active: torch.Tensor) -> torch.Tensor:
    """`apply_maps` of integer slices (8 or 16 bits), float32 out, exactly as of their float32 values.

    Slices with more pixels than the dtype has levels: every level is mapped once (`apply_maps` on the levels'
    float32 values, so each result is the one the pixel would get), then each pixel is one lookup in its slice's
    table: three passes over the pixels (conversion, offset, lookup) instead of a dozen.
    """
    info = torch.iinfo(x.dtype)
    levels = info.max - info.min + 1
    b = x.shape[0]
    if levels > 1 << 16 or x[0].numel() <= levels:  # wider integers or small slices: the table costs more
        return apply_maps(x.to(torch.float32), lo, hi, lut, active)
    values = torch.arange(info.min, info.max + 1, dtype=torch.float32, device=x.device)
    table = apply_maps(values.expand(b, 1, levels), lo, hi, lut, active)
    offsets = torch.arange(b, dtype=torch.int32, device=x.device) * levels - info.min
    idx = x.to(torch.int32).add_(offsets[:, None, None])
    return table.reshape(-1).index_select(0, idx.reshape(-1)).view(x.shape)
