"""Known answers for gpustack.metrics, and SSIM against scikit-image's structural_similarity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpustack.metrics import psnr, rmse, ssim


def _structured(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth pattern with edges and a little noise, values in about [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    img = 0.4 + 0.3 * np.sin(x / 3.0) * np.cos(y / 5.0)
    img += 0.25 * ((x - shape[1] / 2) ** 2 + (y - shape[0] / 2) ** 2 < (min(shape) / 3) ** 2)
    return img + rng.normal(0, 0.02, shape)


def test_constant_offset_rmse_psnr(device):
    truth = torch.rand(4, 20, 31, dtype=torch.float64, device=device) * 255
    r = rmse(truth + 3, truth)
    p = psnr(truth + 3, truth, data_range=255)
    assert isinstance(r, np.ndarray) and r.dtype == np.float64 and r.shape == (4,)
    np.testing.assert_allclose(r, 3.0, rtol=1e-12)
    np.testing.assert_allclose(p, 20 * math.log10(255 / 3), rtol=1e-12)


def test_single_slice_returns_float_and_numpy_input():
    truth = np.arange(12 * 13, dtype=np.uint16).reshape(12, 13)
    r = rmse(truth.astype(np.float32) - 3, truth)  # unsigned input: differences computed in float64
    assert isinstance(r, float) and r == pytest.approx(3.0)
    assert psnr(truth + 3, truth, data_range=1000) == pytest.approx(20 * math.log10(1000 / 3))


def test_identical_images(device):
    img = torch.rand(3, 16, 17, device=device)
    assert np.all(np.isinf(psnr(img, img, data_range=1.0)))
    np.testing.assert_array_equal(rmse(img, img), 0.0)
    np.testing.assert_allclose(ssim(img, img, data_range=1.0), 1.0, atol=1e-12)


def test_per_slice_data_range(device):
    truth = torch.zeros(2, 12, 12, device=device)
    np.testing.assert_allclose(psnr(truth + 1, truth, data_range=[10.0, 100.0], device=device), [20.0, 40.0])


@pytest.mark.parametrize("seed, shape", list(enumerate([(11, 11), (32, 32), (17, 45), (64, 23)])))
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_skimage_2d(seed, shape, kind):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(seed)
    if kind == "random":
        truth = rng.random(shape)
        x = truth + rng.normal(0, 0.2, shape)
    else:
        truth = _structured(shape, 1)
        x = 0.9 * _structured(shape, 2) + 0.05
    expected = skm.structural_similarity(x, truth, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False)
    got = ssim(x, truth, data_range=1.0)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_ssim_matches_skimage_3d_batched(device, sigma):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(7)
    truth = np.stack([_structured((37, 50), s) * 1000 for s in range(5)])
    x = truth + rng.normal(0, 40, truth.shape)
    x[2] = rng.random((37, 50)) * 1000  # one unrelated slice
    expected = [skm.structural_similarity(xi, ti, data_range=1000.0, gaussian_weights=True, sigma=sigma,
                                          use_sample_covariance=False) for xi, ti in zip(x, truth)]
    got = ssim(torch.from_numpy(x).to(device), torch.from_numpy(truth).to(device), data_range=1000.0, sigma=sigma)
    assert got.shape == (5,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_nan_slice_only(device):
    truth = torch.rand(3, 20, 20, dtype=torch.float64, device=device)
    x = truth + 0.1
    x[1, 0, 0] = math.nan  # a corner pixel: only at the edge of the SSIM windows
    t2 = truth.clone()
    t2[2, 19, 5] = math.nan
    for values in (rmse(x, truth), psnr(x, truth, 1.0), ssim(x, truth, 1.0)):
        assert np.isnan(values[1]) and np.all(np.isfinite(values[[0, 2]]))
    assert np.isnan(ssim(truth, t2, 1.0)[2]) and np.all(np.isfinite(ssim(truth, t2, 1.0)[:2]))


def test_shape_mismatch_raises():
    a = np.zeros((2, 16, 16))
    for fn, args in ((rmse, ()), (psnr, (1.0,)), (ssim, (1.0,))):
        with pytest.raises(ValueError, match="shape mismatch"):
            fn(a, np.zeros((2, 16, 17)), *args)
        with pytest.raises(ValueError, match="shape mismatch"):
            fn(a, np.zeros((16, 16)), *args)


def test_bad_dims_and_small_slices_raise():
    with pytest.raises(ValueError, match="expected a slice"):
        rmse(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(np.zeros((10, 30)), np.zeros((10, 30)), 1.0)
