"""intensity_rescaling and intensity_rescaling_area: the histogram kernels against NumPy/SciPy, known answers for
the steps through the public API (identity, gain and offset, NaN and constant slices, windows, monotonicity,
continuity), a synthetic stack against its ground truth (and PyStack3D's own mapping), the gain factors of the
area step, parameter mistakes, and the runner's outputs.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import tifffile
import torch
from scipy.ndimage import uniform_filter1d

import gpustack
from gpustack.cli import main as cli_main
from gpustack.config import load_workflow
from gpustack.device import resolve_device
from gpustack.errors import ConfigError
from gpustack.kernels.histogram import (
    apply_maps,
    apply_maps_to_integers,
    interp,
    level_counts,
    running_mean,
    running_median,
    slice_cdfs,
)
from gpustack.metrics import psnr, ssim
from gpustack.pipeline.runner import prepare, run
from gpustack.synthetic import SyntheticSpec, generate, parse_name
from tests.conftest import write_params, write_stack

CPU = resolve_device("cpu")


# ---------------------------------------------------------------------------------------------------- helpers

def smooth_image(h: int = 48, w: int = 48, seed: int = 1, noise: float = 20.0) -> np.ndarray:
    """A smooth positive float32 image around 1000 (no sparse tails) plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    return (1000 + 300 * np.sin(xx / 7) * np.cos(yy / 9) + rng.normal(0, noise, (h, w))).astype(np.float32)


def reflect_windows(n: int, size: int) -> np.ndarray:
    """(n, size) row indices of the window [k - size//2, k - size//2 + size - 1] with scipy's 'reflect' boundary,
    built with np.pad(mode='symmetric') (d c b a | a b c d | d c b a), independently of gpustack."""
    pad = size + n
    padded = np.pad(np.arange(n), (pad, pad), mode="symmetric")
    return np.stack([padded[pad + k - size // 2: pad + k - size // 2 + size] for k in range(n)])


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def run_params(path):
    return run(prepare(load_workflow(path)), device_choice=CPU, show_progress=False, log=lambda m: None)


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(list(argv))
    _out, err = capsys.readouterr()
    return code, err


# ---------------------------------------------------------------------------------------------------- 1. kernels

@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 15, 16])
def test_running_mean_matches_uniform_filter1d(device, size):
    """All weights 1: scipy's uniform_filter1d (reflect), odd, even and larger-than-n windows (n = 7)."""
    values = np.random.default_rng(size).normal(size=(7, 5))
    mean, weight = running_mean(torch.tensor(values, device=device), torch.ones(7, device=device), size)
    np.testing.assert_allclose(to_np(mean), uniform_filter1d(values, size, axis=0, mode="reflect"),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(to_np(weight), np.full(7, float(size)))


def test_running_mean_leaves_out_zero_weight_rows(device):
    v = np.array([[1.0, 10.0], [1e6, -1e6], [3.0, 30.0], [5.0, 70.0], [-1e6, 1e6]])
    w = torch.tensor([1, 0, 1, 1, 0], device=device)
    mean, weight = running_mean(torch.tensor(v, device=device), w.bool(), 3)
    # size 3, reflect: windows {0,0,1}, {0,1,2}, {1,2,3}, {2,3,4}, {3,4,4}; rows 1 and 4 do not count
    expected = np.array([v[0], (v[0] + v[2]) / 2, (v[2] + v[3]) / 2, (v[2] + v[3]) / 2, v[3]])
    np.testing.assert_allclose(to_np(mean), expected, rtol=1e-12)
    np.testing.assert_array_equal(to_np(weight), [2, 2, 2, 2, 1])


@pytest.mark.parametrize("size", [1, 3, 5, 9, 15])
def test_running_median_matches_numpy_nanmedian_odd_windows(device, size):
    rng = np.random.default_rng(size)
    values = rng.normal(size=(7, 6))
    values[:, 0] = np.nan  # an all-NaN column stays NaN
    got = to_np(running_median(torch.tensor(values, device=device), size))
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if size > 1 else nullcontext():
        expected = np.nanmedian(values[reflect_windows(7, size)], axis=1) if size > 1 else values
    np.testing.assert_allclose(got, expected, rtol=1e-12, equal_nan=True)


def test_running_median_global_odd_n(device):
    values = np.random.default_rng(3).normal(size=(7, 4))
    got = to_np(running_median(torch.tensor(values, device=device), -1))
    np.testing.assert_allclose(got, np.broadcast_to(np.nanmedian(values, axis=0), values.shape), rtol=1e-12)


@pytest.mark.parametrize("size, nan", [(2, False), (4, False), (-1, False), (3, True), (-1, True)])
def test_running_median_even_counts_match_numpy(device, size, nan):
    """Even windows, an even number of rows, or an odd window with one NaN (an unmeasured slice) in it."""
    values = np.random.default_rng(4).normal(size=(6 if not nan else 7, 5))
    if nan:
        values[3] = np.nan  # a slice that cannot be measured
    got = to_np(running_median(torch.tensor(values, device=device), size))
    if size == -1:
        expected = np.broadcast_to(np.nanmedian(values, axis=0), values.shape)
    else:
        expected = np.nanmedian(values[reflect_windows(len(values), size)], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_interp_matches_numpy_row_by_row(device):
    rng = np.random.default_rng(5)
    xp = np.cumsum(rng.uniform(0.1, 1.0, size=(4, 9)), axis=1)
    fp = rng.normal(size=(4, 9))
    x = rng.uniform(xp[:, :1] - 1, xp[:, -1:] + 1, size=(4, 50))  # inside and outside the table
    x[:, :9] = xp  # exactly at the points
    got = to_np(interp(*(torch.tensor(a, device=device) for a in (x, xp, fp))))
    expected = np.stack([np.interp(x[r], xp[r], fp[r]) for r in range(4)])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side, at_flat", [("left", 10.0), ("right", 30.0)])
def test_interp_flat_runs_take_the_first_or_last_equal_point(device, side, at_flat):
    xp = np.array([[0.0, 1.0, 1.0, 1.0, 2.0, 3.0]])
    fp = np.array([[0.0, 10.0, 20.0, 30.0, 40.0, 50.0]])
    x = np.array([[-1.0, 0.0, 0.5, 0.999, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]])
    got = to_np(interp(*(torch.tensor(a, device=device) for a in (x, xp, fp)), side=side))[0]
    # documented: at the flat value 1 the first (left) or last (right) of the equal points; around it, the
    # straight segments
    np.testing.assert_allclose(got, [0.0, 0.0, 5.0, 9.99, at_flat, 35.0, 40.0, 45.0, 50.0, 50.0], rtol=1e-12)
    off = x[0] != 1.0  # off the flat value it is numpy.interp
    np.testing.assert_allclose(got[off], np.interp(x[0], xp[0], fp[0])[off], rtol=1e-12)


def test_interp_flat_tail_at_the_last_point(device):
    xp = torch.tensor([[0.0, 1.0, 2.0, 2.0]], dtype=torch.float64, device=device)
    fp = torch.tensor([[0.0, 10.0, 20.0, 30.0]], dtype=torch.float64, device=device)
    got = to_np(interp(torch.tensor([[2.0]], dtype=torch.float64, device=device), xp, fp, side="right"))
    assert got[0, 0] == np.interp(2.0, xp[0].cpu().numpy(), fp[0].cpu().numpy()) == 30.0
    first = to_np(interp(torch.tensor([[2.0]], dtype=torch.float64, device=device), xp, fp, side="left"))
    assert first[0, 0] == 20.0  # the first point where the flat tail starts


def test_slice_cdfs_of_a_ramp(device):
    """Values 100 + 3 v, v = 0..1023 shuffled, 256 bins: 4 values per bin, the CDF is i / 256 at edge i."""
    rng = np.random.default_rng(6)
    ramp = (100 + 3 * rng.permutation(1024)).astype(np.float32).reshape(1, 32, 32)
    out = slice_cdfs(torch.tensor(ramp, device=device), bins=256)
    assert to_np(out["lo"])[0] == 100 and to_np(out["hi"])[0] == 100 + 3 * 1023
    assert to_np(out["count"])[0] == 1024
    np.testing.assert_allclose(to_np(out["cdf"])[0], np.arange(257) / 256, rtol=0, atol=1e-12)
    # the same ramp with 256 NaN pixels: the NaN pixels count nowhere
    with_nan = np.full((1, 32, 40), np.nan, np.float32)
    with_nan.reshape(-1)[rng.permutation(1280)[:1024]] = ramp.ravel()
    out = slice_cdfs(torch.tensor(with_nan, device=device), bins=256)
    assert to_np(out["count"])[0] == 1024
    assert to_np(out["lo"])[0] == 100 and to_np(out["hi"])[0] == 100 + 3 * 1023
    np.testing.assert_allclose(to_np(out["cdf"])[0], np.arange(257) / 256, rtol=0, atol=1e-12)


def test_slice_cdfs_of_constant_and_infinite_slices(device):
    """A constant slice (a blank frame) beside a ramp, without NaN anywhere: every pixel in bin 0, no error (its
    span of 0 once made inf * 0 = NaN bin indices); infinite pixels count nowhere, like NaN."""
    ramp = (100 + 3 * np.arange(1024)).astype(np.float32).reshape(32, 32)
    stack = np.stack([ramp, np.zeros_like(ramp), np.full_like(ramp, 777.0)])
    out = slice_cdfs(torch.tensor(stack, device=device), bins=256)
    cdf = to_np(out["cdf"])
    np.testing.assert_allclose(cdf[0], np.arange(257) / 256, rtol=0, atol=1e-12)
    for k in (1, 2):
        assert cdf[k, 0] == 0 and (cdf[k, 1:] == 1).all()
        assert to_np(out["lo"])[k] == to_np(out["hi"])[k] == stack[k, 0, 0]
    stack[0, 0, :3] = [np.inf, -np.inf, np.inf]
    out = slice_cdfs(torch.tensor(stack, device=device), bins=256)
    assert to_np(out["count"]).tolist() == [1021, 1024, 1024]
    assert to_np(out["lo"])[0] == 109 and to_np(out["hi"])[0] == 100 + 3 * 1023
    assert to_np(out["cdf"])[0, -1] == 1.0 and (to_np(out["cdf"])[1:, 1:] == 1).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.uint16, torch.int16])
def test_slice_cdfs_of_integers_equal_those_of_their_float32_values(device, dtype):
    """The integer path (one bincount of the levels, then the levels into the fine bins) gives exactly the float
    path's result: same range, counts and CDFs, to the bit; so does a constant slice and one at the dtype's ends."""
    info = torch.iinfo(dtype)
    rng = np.random.default_rng(11)
    x = rng.integers(info.min, info.max, (4, 37, 53), endpoint=True)
    x[1] = info.min + 7  # constant
    x[2] = rng.integers(info.min, info.min + 50, (37, 53))  # a narrow range at the bottom
    x[3, :3] = info.max
    ints = torch.tensor(x, device=device).to(dtype)
    got, want = slice_cdfs(ints), slice_cdfs(ints.to(torch.float32))
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    counts = level_counts(ints[:, 5:30, 2:40])  # a view, as a crop hands it over
    for k in range(4):
        expected = np.bincount(x[k, 5:30, 2:40].ravel() - info.min, minlength=info.max - info.min + 1)
        np.testing.assert_array_equal(to_np(counts[k]), expected)


def test_slice_cdfs_of_a_narrow_range_far_from_zero(device):
    """Values 63403..63410: lo / (hi - lo) is large, and float32 rounding puts lo's bin index at -1.8. It is bin
    0 (it once crashed the bincount, or went to the previous slice's last bin); floats and integers agree."""
    rng = np.random.default_rng(13)
    x = rng.integers(63403, 63410, (3, 20, 30), endpoint=True)
    x[0, 0, 0], x[0, 0, 1] = 63403, 63410
    floats = slice_cdfs(torch.tensor(x, dtype=torch.float32, device=device), bins=4096)
    ints = slice_cdfs(torch.tensor(x, device=device).to(torch.uint16), bins=4096)
    for key in floats:
        assert torch.equal(floats[key], ints[key]), key
    cdf = to_np(floats["cdf"])
    assert (cdf[:, -1] == 1.0).all() and (np.diff(cdf, axis=1) >= 0).all()
    for k in range(3):  # halfway between two levels (~290 bins from each), the CDF counts the levels below
        v = x[k].ravel()
        for level in np.unique(v)[1:]:
            i = round(4096 * (level - 0.5 - v.min()) / (v.max() - v.min()))
            assert cdf[k, i] == pytest.approx((v < level).mean(), abs=1e-12)


def test_level_counts_refuse_wider_integers():
    with pytest.raises(TypeError, match="at most 16 bits"):
        level_counts(torch.zeros(1, 2, 2, dtype=torch.int32))


def test_slice_cdfs_match_numpy_histogram_with_nan(device):
    rng = np.random.default_rng(7)
    x = rng.gamma(2.0, 50.0, size=(3, 40, 40)).astype(np.float32)
    x[0, ::7, ::3] = np.nan
    x[2, :20] = np.nan
    out = slice_cdfs(torch.tensor(x, device=device), bins=64)
    for k in range(3):
        v = x[k][np.isfinite(x[k])]
        assert to_np(out["count"])[k] == v.size
        hist, _ = np.histogram(v, 64, range=(v.min(), v.max()))
        expected = np.concatenate([[0], np.cumsum(hist)]) / v.size
        # a pixel sitting on a bin edge may fall on either side in float32: allow one pixel
        np.testing.assert_allclose(to_np(out["cdf"])[k], expected, rtol=0, atol=1.01 / v.size)


def test_apply_maps_interpolates_each_slice_table_as_numpy(device):
    """Each pixel through its slice's table over [lo, hi] (np.interp); NaN pixels and inactive slices as they
    were; values at hi, and above it by rounding, take the table's last point."""
    rng = np.random.default_rng(8)
    x = rng.uniform(100, 5000, size=(4, 30, 50)).astype(np.float32)
    x[0, 3, ::4] = np.nan
    lo, hi = np.nanmin(x, axis=(1, 2)), np.nanmax(x, axis=(1, 2))
    lut = np.cumsum(rng.uniform(0, 3, size=(4, 129)), axis=1).astype(np.float32)
    active = np.array([True, True, False, True])
    out = to_np(apply_maps(torch.tensor(x, device=device), torch.tensor(lo, device=device),
                           torch.tensor(hi, device=device), torch.tensor(lut, device=device),
                           torch.tensor(active, device=device)))
    for k in range(4):
        if not active[k]:
            np.testing.assert_array_equal(out[k], x[k])
            continue
        finite = np.isfinite(x[k])
        expected = np.interp(x[k][finite], np.linspace(lo[k], hi[k], 129), lut[k])
        np.testing.assert_allclose(out[k][finite], expected, rtol=1e-5, atol=1e-3)
        assert np.isnan(out[k][~finite]).all()
        assert out[k].flat[np.nanargmax(x[k])] == pytest.approx(lut[k, -1])


@pytest.mark.parametrize("dtype, shape", [(torch.uint8, (3, 20, 30)),  # more pixels than levels: a table
                                          (torch.uint16, (3, 270, 250)),  # 67,500 > 65,536 levels: a table
                                          (torch.uint16, (3, 20, 30))])  # fewer: mapped as float32
def test_apply_maps_to_integers_equal_apply_maps_of_their_float32_values(device, dtype, shape):
    """Mapping each grey level once and looking pixels up gives, to the bit, what every pixel's own mapping
    gives; inactive slices come back as their float32 values."""
    info = torch.iinfo(dtype)
    rng = np.random.default_rng(12)
    values = rng.integers(info.min, info.max, shape, endpoint=True)
    values[1] = values[1] // 4 + 9  # its own, narrower range
    x = torch.tensor(values, device=device).to(dtype)
    xf = x.to(torch.float32)
    lo, hi = xf.amin(dim=(1, 2)), xf.amax(dim=(1, 2))
    lut = torch.tensor(np.cumsum(rng.uniform(0, 300, size=(3, 257)), axis=1), dtype=torch.float32, device=device)
    active = torch.tensor([True, True, False], device=device)
    got = apply_maps_to_integers(x, lo, hi, lut, active)
    assert got.dtype == torch.float32
    assert torch.equal(got, apply_maps(xf, lo, hi, lut, active))
    assert torch.equal(got[2], xf[2]) and not torch.equal(got[0], xf[0])


# ---------------------------------------------------------------------------------------------------- 2. intensity_rescaling

@pytest.mark.parametrize("mapping", ["linear", "histogram"])
@pytest.mark.parametrize("reference", ["median", "mean"])
def test_identical_slices_are_left_unchanged(device, mapping, reference):
    base = smooth_image()
    stack = np.stack([base] * 5)
    out = gpustack.rescale_intensity(stack, mapping=mapping, reference=reference, device=str(device))
    assert out.shape == stack.shape and out.dtype == np.float32
    span = float(base.max() - base.min())
    err = np.abs(out - stack) / span
    if mapping == "linear":
        assert err.max() < 1e-3
    else:
        # the bulk stays within a small fraction of one reference bin (span / 256); sparse tail pixels can move
        # more (the reference has a resolution of nbins), but never by more than a few bins
        assert np.median(err) < 1e-3
        assert np.quantile(err, 0.99) < 1 / 256
        assert err.max() < 0.05


@pytest.mark.parametrize("mapping", ["linear", "histogram"])
def test_rescaled_slices_keep_their_grey_levels(mapping):
    """~20000 distinct uint16-like levels stay > 10000 after rescaling with 256 bins (PyStack3D: <= 256 levels)."""
    rng = np.random.default_rng(8)
    base = (20000 + rng.permutation(128 * 160)).reshape(128, 160).astype(np.float32)
    stack = np.stack([base, base + 500, np.rint(1.2 * base - 3000), np.rint(30000 + 0.9 * (base - 30000))])
    assert min(len(np.unique(s)) for s in stack) > 18000
    out = gpustack.rescale_intensity(stack.astype(np.float32), nbins=256, mapping=mapping)
    levels = [len(np.unique(s)) for s in out]
    assert min(levels) > 10000, levels


@pytest.mark.parametrize("mapping, tolerance", [("linear", 0.005), ("histogram", 0.03)])
def test_known_contrast_drop_is_undone(mapping, tolerance):
    base = smooth_image()
    m = float(base.mean())
    stack = np.stack([base] * 5)
    stack[2] = m + 0.6 * (base - m)
    out = gpustack.rescale_intensity(stack, mapping=mapping, reference="median")
    span = float(base.max() - base.min())
    assert np.abs(out[2] - base).max() < tolerance * span  # brought back to the others
    for k in (0, 1, 3, 4):  # the clean slices are the median: nearly untouched (histogram: up to its resolution)
        assert np.abs(out[k] - base).max() < (1e-3 if mapping == "linear" else 0.01) * span
    if mapping == "linear":
        gain, offset = np.polyfit(stack[2].ravel().astype(np.float64), out[2].ravel().astype(np.float64), 1)
        assert gain == pytest.approx(1 / 0.6, rel=1e-3)
        assert offset == pytest.approx(m - gain * m, abs=1e-3 * span)


def test_default_rescaling_of_an_even_number_of_slices_keeps_a_common_mean():
    base = smooth_image()
    m = float(base.mean())
    stack = np.stack([base, m + 0.6 * (base - m)] * 2)  # all four slices have mean m
    out = gpustack.rescale_intensity(stack)
    # numpy's median of the two quantile functions is m + 0.8 (s - m): every slice keeps the mean m
    np.testing.assert_allclose(out.mean(axis=(1, 2)), m, rtol=1e-4)


def test_histogram_median_mapping_stays_inside_the_reference_range():
    base = smooth_image()
    stack = np.stack([base * (1 + 0.1 * k) for k in range(5)])  # the median slice is stack[2]
    out = gpustack.rescale_intensity(stack, mapping="histogram", reference="median")
    bin_width = (stack.max() - stack.min()) / 256
    assert out.max(axis=(1, 2)).max() <= stack[2].max() + 2 * bin_width


@pytest.mark.parametrize("mapping", ["linear", "histogram"])
@pytest.mark.parametrize("reference", ["median", "mean"])
def test_constant_empty_and_nan_pixels(mapping, reference):
    base = smooth_image()
    m = float(base.mean())
    stack = np.stack([base] * 7)
    stack[1] = m + 0.6 * (base - m)
    stack[2] = 777.0  # constant
    stack[3] = np.nan  # all NaN
    holes = np.zeros(base.shape, bool)
    holes[::3, ::5] = True
    stack[4] = np.where(holes, np.nan, m + 0.7 * (base - m))
    out = gpustack.rescale_intensity(stack, mapping=mapping, reference=reference)
    np.testing.assert_array_equal(out[2], stack[2])
    assert np.isnan(out[3]).all()
    np.testing.assert_array_equal(np.isnan(out[4]), holes)
    assert np.isfinite(out[[0, 1, 5, 6]]).all()
    span = float(base.max() - base.min())
    if reference == "median":  # the clean slices are the reference: the damaged ones come back to them
        tol = 1e-3 if mapping == "linear" else 0.03
        assert np.abs(out[4][~holes] - base[~holes]).max() < tol * span
        assert np.abs(out[1] - base).max() < tol * span
    else:  # the mean reference mixes the slices: the mapped pixels still change towards the others
        assert np.abs(out[4][~holes] - base[~holes]).mean() < 0.5 * np.abs(stack[4][~holes] - base[~holes]).mean()


@pytest.mark.parametrize("mapping", ["linear", "histogram"])
def test_blank_slice_without_nan_is_left_intact(mapping):
    """A uint16 stack with a black frame and a constant one, and no NaN anywhere (the usual FIB-SEM case)."""
    base = smooth_image()
    stack = np.stack([base, 0.8 * base, np.zeros_like(base), np.full_like(base, 777.0), 1.1 * base])
    stack = np.round(stack).astype(np.uint16)
    out = gpustack.rescale_intensity(stack, mapping=mapping, correct="all")
    np.testing.assert_array_equal(out[2:4], stack[2:4])
    assert np.abs(out[1].astype(float) - stack[0]).mean() < 0.25 * np.abs(stack[1].astype(float) - stack[0]).mean()


@pytest.mark.parametrize("mapping", ["linear", "histogram"])
def test_nearly_blank_slice_is_left_intact(mapping):
    """A black frame with a few pixels left (a 3D background took it below 0, and it was clipped): its 2-98 %
    quantiles barely differ, and a gain or map measured on it would stretch those few pixels over the range."""
    base = smooth_image()
    nearly = np.zeros_like(base)
    nearly[:2, :5] = np.linspace(10, 900, 10).reshape(2, 5)  # 10 of 2304 pixels
    stack = np.stack([base, 0.8 * base, nearly, 1.1 * base, base])
    out = gpustack.rescale_intensity(stack, mapping=mapping, correct="all")
    np.testing.assert_array_equal(out[2], nearly)
    assert np.abs(out[1] - base).mean() < 0.25 * np.abs(stack[1] - base).mean()
    # most of the stack blank (before the sample enters the field of view): still those that are left alone
    stack = np.stack([nearly, nearly, base, nearly, 0.8 * base])
    out = gpustack.rescale_intensity(stack, mapping=mapping, correct="all")
    np.testing.assert_array_equal(out[[0, 1, 3]], stack[[0, 1, 3]])
    # the two measured slices meet between them (not crushed by a reference taken from the blank ones)
    assert np.abs(out[2] - out[4]).mean() < 0.15 * np.abs(stack[2] - stack[4]).mean()
    assert 0.85 * base.mean() < out[[2, 4]].mean() < 0.95 * base.mean()


def test_constant_and_nan_slices_only():
    stack = np.stack([np.full((16, 16), 5.0), np.full((16, 16), np.nan), np.full((16, 16), 9.0)]).astype(np.float32)
    for mapping in ("linear", "histogram"):
        out = gpustack.rescale_intensity(stack, mapping=mapping)
        np.testing.assert_array_equal(out, stack)  # NaN == NaN for assert_array_equal


@pytest.mark.parametrize("reference", ["median", "mean"])
def test_window_follows_a_slow_drift_and_global_flattens_it(reference):
    base = smooth_image(32, 32)
    m = float(base.mean())
    gains = np.linspace(0.7, 1.3, 13)
    stack = np.stack([m + g * (base - m) + 40 * k for k, g in enumerate(gains)]).astype(np.float32)
    local = gpustack.rescale_intensity(stack, filter_size=3, reference=reference)
    flat = gpustack.rescale_intensity(stack, filter_size=-1, reference=reference, correct="all")
    drift = np.abs(stack - stack[6]).mean()
    # the default over the whole stack corrects jumps only: a smooth drift (the content's) is kept as it is
    kept = gpustack.rescale_intensity(stack, reference=reference)
    assert np.abs(kept - stack).max() < 1e-3 * drift
    # -1: every slice goes to the same distribution, far from where it was
    assert np.abs(flat - flat[6]).max() < 1e-3 * drift
    assert np.abs(flat - stack).mean() > 0.5 * drift
    # a window of 3 follows the drift: the slices stay (nearly) where they are
    assert np.abs(local - stack).mean() < 0.05 * drift
    if reference == "median":
        # exactly: the median of 3 slices on a linear drift is the middle one (ends: {0, 0, 1} has median 0)
        assert np.abs(local - stack).max() < 1e-3 * drift
        np.testing.assert_allclose(flat.std(axis=(1, 2)), stack[6].std(), rtol=1e-3)


@pytest.mark.parametrize("mapping", ["linear", "histogram"])
@pytest.mark.parametrize("reference", ["median", "mean"])
def test_map_never_inverts_grey_levels(mapping, reference):
    rng = np.random.default_rng(9)
    shape = (40, 40)
    stack = []
    for k in range(6):  # different mixtures of three phases per slice, with ties and gaps
        phase = rng.choice(3, size=shape, p=[0.2 + 0.1 * k, 0.5 - 0.05 * k, 0.3 - 0.05 * k])
        levels = np.array([100.0, 400.0 + 30 * k, 900.0 - 20 * k])
        stack.append(np.rint(levels[phase] + rng.normal(0, 25 + 5 * k, shape)))
    stack = np.stack(stack).astype(np.float32)
    out = gpustack.rescale_intensity(stack, mapping=mapping, reference=reference, nbins=64)
    for k in range(len(stack)):
        order = np.argsort(stack[k].ravel(), kind="stable")
        assert np.diff(out[k].ravel()[order].astype(np.float64)).min() >= -1e-3
        # equal inputs give equal outputs
        v, y = stack[k].ravel(), out[k].ravel()
        for level in np.unique(v)[::25]:
            assert np.ptp(y[v == level]) == 0


# ---------------------------------------------------------------------------------------------------- 3. synthetic stack

@pytest.fixture(scope="module")
def contrast_stack(tmp_path_factory):
    """Contrast drops only, low noise: (data, truth, data_range) cropped to the real region, float32."""
    spec = SyntheticSpec(n_slices=24, height=96, width=96).without_defects(noise_sigma=0.005,
                                                                            contrast_range=(0.25, 0.4))
    stack = generate(tmp_path_factory.mktemp("synthetic"), spec)
    assert (stack.contrast < 1).sum() >= 3
    files = stack.files()
    data = np.stack([stack.crop(tifffile.imread(f)).astype(np.float32) for f in files])
    truth = np.stack([stack.truth(parse_name(f.name)[1]) for f in files])
    return data, truth, float(truth.max() - truth.min()), stack.contrast < 1


def stack_psnr(x: np.ndarray, truth: np.ndarray, data_range: float) -> float:
    return float(psnr(x.reshape(1, -1, x.shape[-1]), truth.reshape(1, -1, x.shape[-1]), data_range)[0])


def test_default_rescaling_improves_a_synthetic_stack(contrast_stack):
    data, truth, r, dropped = contrast_stack
    out = gpustack.rescale_intensity(data)
    assert stack_psnr(out, truth, r) > stack_psnr(data, truth, r) + 2.0
    assert ssim(out, truth, r).mean() >= ssim(data, truth, r).mean()
    # the damaged slices themselves get much closer to the truth
    assert psnr(out[dropped], truth[dropped], r).min() > psnr(data[dropped], truth[dropped], r).min() + 3.0


@pytest.mark.reference
def test_synthetic_stack_against_pystack3d_mapping(contrast_stack):
    """PyStack3D's own per-slice mapping (its eval / cdf_calculation on arrays, reference = mean histogram)."""
    ps = pytest.importorskip("pystack3d.intensity_rescaling")
    data, truth, r, _ = contrast_stack
    nbins = 256
    range_bins = [float(data.min()), float(data.max())]
    histos = np.stack([np.histogram(s, nbins, range=range_bins)[0] for s in data])
    edges = np.histogram_bin_edges(data[0], nbins, range=range_bins)
    centres = (edges[1:] + edges[:-1]) / 2
    cdf_target = np.cumsum(histos.mean(axis=0))
    cdf_target /= cdf_target.max()
    theirs = np.stack([ps.eval(s, cdf_target, centres, nbins, range_bins) for s in data])
    assert max(len(np.unique(s)) for s in theirs) <= nbins  # one output level per input bin
    ours = gpustack.rescale_intensity(data, nbins=nbins)
    assert min(len(np.unique(s)) for s in ours) > 10 * nbins
    assert ssim(ours, truth, r).mean() >= ssim(theirs, truth, r).mean()
    # PyStack3D's method, made continuous, is not worse than PyStack3D itself
    continuous = gpustack.rescale_intensity(data, nbins=nbins, mapping="histogram", reference="mean")
    assert ssim(continuous, truth, r).mean() >= ssim(theirs, truth, r).mean()


# ---------------------------------------------------------------------------------------------------- 4. intensity_rescaling_area

def test_area_factors_from_known_gains():
    base = smooth_image(32, 32)
    gains = np.array([0.9, 1.1, 1.0, 0.95])  # even count: numpy's median, the mean of the middle two
    stack = (gains[:, None, None] * base).astype(np.float32)
    out, factors = gpustack.rescale_intensity_area(stack)
    np.testing.assert_allclose(factors, np.median(gains) / gains, rtol=1e-5)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), np.median(gains) * base.mean(dtype=np.float64), rtol=1e-5)
    np.testing.assert_allclose(out, np.broadcast_to(np.median(gains) * base, out.shape), rtol=1e-5)


def test_area_factors_are_clipped():
    base = smooth_image(32, 32)
    gains = np.array([0.5, 1.0, 1.0, 1.0, 2.0])
    stack = (gains[:, None, None] * base).astype(np.float32)
    _, factors = gpustack.rescale_intensity_area(stack)
    np.testing.assert_allclose(factors, [1.2, 1.0, 1.0, 1.0, 0.8], rtol=1e-6)
    out, factors = gpustack.rescale_intensity_area(stack, factors_range=(0.6, 1.5))
    np.testing.assert_allclose(factors, [1.5, 1.0, 1.0, 1.0, 0.6], rtol=1e-6)
    np.testing.assert_allclose(out, stack * factors[:, None, None], rtol=1e-6)


def test_area_uses_only_its_pixels_origin_bottom_left():
    """The bottom half (area y 0..16 of a 32-row image = rows 16..32) carries the gains; the top half is noise."""
    rng = np.random.default_rng(10)
    gains = np.array([0.9, 1.0, 1.1, 1.05, 0.95])
    stack = rng.uniform(10, 5000, size=(5, 32, 40)).astype(np.float32)
    stack[:, 16:] = (gains[:, None, None] * 200.0).astype(np.float32)
    _, factors = gpustack.rescale_intensity_area(stack, area=[0, 40, 0, 16])
    np.testing.assert_allclose(factors, 1.0 / gains, rtol=1e-5)
    _, top = gpustack.rescale_intensity_area(stack, area=[0, 40, 16, 32])  # the noise: other factors
    assert np.abs(top - 1.0 / gains).max() > 0.01


def test_area_with_no_pixel_inside_the_thresholds_keeps_factor_one():
    base = 100 + 100 * (smooth_image(24, 24) - 600) / 800  # within [100, 200]
    assert 100 <= base.min() and base.max() <= 200
    gains = np.array([0.9, 1.0, 1.0, 1.1, 0.8])
    stack = (gains[:, None, None] * base).astype(np.float32)
    stack[2] += 1000  # every pixel above threshold_max
    out, factors = gpustack.rescale_intensity_area(stack, threshold_max=500, factors_range=(0.5, 2.0))
    reference = np.median(gains[[0, 1, 3, 4]])  # the median of the measured slices only
    expected = reference / gains
    expected[2] = 1.0
    np.testing.assert_allclose(factors, expected, rtol=1e-5)
    np.testing.assert_array_equal(out[2], stack[2])


def test_area_outside_the_image_is_a_config_error(tmp_path, capsys):
    write_stack(tmp_path, n=3, shape=(30, 40))
    params = write_params(tmp_path, 'process_steps = ["intensity_rescaling_area"]\n'
                          "[intensity_rescaling_area]\narea = [0, 41, 0, 30]\n")
    with pytest.raises(ConfigError) as info:
        prepare(load_workflow(params))
    err = info.value
    assert (err.table, err.key) == ("intensity_rescaling_area", "area")
    assert "[intensity_rescaling_area]" in str(err) and "40x30" in str(err) and str(params) in str(err)
    for command in ("validate", "run"):
        code, stderr = cli(capsys, command, str(params))
        assert code == 2
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in stderr
        assert "[intensity_rescaling_area]" in lines[0] and " area" in lines[0]
    assert not list(tmp_path.glob("process/*/*.tif"))
    with pytest.raises(ValueError, match="area"):
        gpustack.rescale_intensity_area(np.ones((2, 30, 40), np.float32), area=[0, 41, 0, 30])


# ---------------------------------------------------------------------------------------------------- 5. config errors

@pytest.mark.parametrize("table, body, key, text", [
    ("intensity_rescaling", "nbins = 0", "nbins", "out of range"),
    ("intensity_rescaling", "nbins = 2", "nbins", "use 3 or more"),
    ("intensity_rescaling", "filter_size = 0", "filter_size", "0 slices"),
    ("intensity_rescaling", "filter_size = -2", "filter_size", "out of range"),
    ("intensity_rescaling", 'mapping = "quantile"', "mapping", "'linear'"),
    ("intensity_rescaling", 'reference = "mode"', "reference", "'median'"),
    ("intensity_rescaling_area", "threshold_min = 5\nthreshold_max = 5", "threshold_max", "less than"),
    ("intensity_rescaling_area", "threshold_min = 9\nthreshold_max = 2", "threshold_max", "less than"),
    ("intensity_rescaling_area", "factors_range = [1.2, 0.8]", "factors_range", "low < high"),
    ("intensity_rescaling_area", "factors_range = [0, 1.2]", "factors_range", "positive"),
])
def test_parameter_mistakes_name_table_and_key(tmp_path, capsys, table, body, key, text):
    params = write_params(tmp_path, f'process_steps = ["{table}"]\n[{table}]\n{body}\n')
    with pytest.raises(ConfigError, match=text) as info:
        load_workflow(params)
    err = info.value
    assert (err.table, err.key) == (table, key)
    assert str(params) in str(err) and f"[{table}] {key}" in str(err)
    write_stack(tmp_path, n=2, shape=(16, 16))
    code, stderr = cli(capsys, "validate", str(params))
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"[{table}] {key}" in lines[0], stderr


def test_valid_parameters_are_accepted(tmp_path):
    params = write_params(tmp_path, 'process_steps = ["intensity_rescaling", "intensity_rescaling_area"]\n'
                          '[intensity_rescaling]\nnbins = 1\nfilter_size = 4\nmapping = "Histogram"\n'
                          'reference = "mean"\n[intensity_rescaling_area]\nthreshold_min = 1\nthreshold_max = 2\n'
                          "factors_range = [0.5, 1.5]\narea = [0, 9999, 0, 99999]\n")
    a, b = (s.config for s in load_workflow(params).steps)
    assert (a.nbins, a.filter_size, a.mapping, a.reference) == (1, 4, "histogram", "mean")
    assert (b.threshold_min, b.threshold_max, b.factors_range) == (1.0, 2.0, (0.5, 1.5))


# ---------------------------------------------------------------------------------------------------- 6. runner

def run_rescaling(tmp_path, mapping: str):
    data = write_stack(tmp_path, n=5, shape=(30, 40))
    params = write_params(tmp_path, f'process_steps = ["intensity_rescaling"]\n[intensity_rescaling]\n'
                          f'nbins = 64\nmapping = "{mapping}"\n')
    run_params(params)
    return data, tmp_path / "process" / "intensity_rescaling"


@pytest.mark.parametrize("mapping", ["linear", "histogram"])
def test_runner_outputs(tmp_path, mapping):
    data, step = run_rescaling(tmp_path, mapping)
    outputs = step / "outputs"
    histos = {name: np.load(outputs / f"{name}.npy") for name in ("histo_orig", "histos_ref", "histos_final")}
    for h in histos.values():
        assert h.shape == (5, 64)
        assert (h >= -1e-9).all()
    edges = np.load(outputs / "bin_edges.npy")
    np.testing.assert_allclose(edges, np.linspace(data.min(), data.max(), 65), rtol=1e-9)
    pixels = 30 * 40
    np.testing.assert_allclose(histos["histo_orig"].sum(axis=1), pixels, rtol=1e-6)
    np.testing.assert_allclose(histos["histos_ref"].sum(axis=1), pixels, rtol=1e-6)
    for k in range(5):  # the original histograms are the slices' histograms, up to the pixels of the fine bins
        counts, _ = np.histogram(data[k], bins=edges)  # that straddle a bin edge (split in proportion)
        assert np.abs(histos["histo_orig"][k] - counts).max() <= 2.5
        assert np.abs(np.cumsum(histos["histo_orig"][k]) - np.cumsum(counts)).max() <= 2.5
    for name in ("intensity_rescaling_maps.png", "intensity_rescaling_profiles.png", "stats.png"):
        assert (outputs / name).stat().st_size > 1000
    assert "index,name,input_min" in (outputs / "stats.csv").read_text()
    # the written slices: uint16, the public API's result rounded and clipped
    names = sorted(p.name for p in step.glob("*.tif"))
    assert names == [f"slice_{i:04d}.tif" for i in range(5)]
    written = np.stack([tifffile.imread(step / n) for n in names])
    assert written.dtype == np.uint16
    expected = gpustack.rescale_intensity(data, nbins=64, mapping=mapping)
    np.testing.assert_array_equal(written, np.clip(np.rint(expected), 0, 65535).astype(np.uint16))
    # the final histograms describe the mapped slices (pixels inside the stack's range)
    for k in range(5):
        # levels mapped beyond the stack's range are counted in the end bins
        counts, _ = np.histogram(np.clip(expected[k], edges[0], edges[-1]), bins=edges)
        assert np.abs(histos["histos_final"][k] - counts).max() <= 2.5
        assert np.abs(np.cumsum(histos["histos_final"][k]) - np.cumsum(counts)).max() <= 2.5
    np.testing.assert_allclose(histos["histos_final"].sum(axis=1), pixels, rtol=1e-6)  # every pixel counted


def test_runner_final_histograms_count_every_pixel_linear(tmp_path):
    _, step = run_rescaling(tmp_path, "linear")
    np.testing.assert_allclose(np.load(step / "outputs" / "histos_final.npy").sum(axis=1), 30 * 40, rtol=1e-6)
