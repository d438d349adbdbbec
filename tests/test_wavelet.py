"""Wavelet-FFT destriping: the transform against PyWavelets, the filter against PyStack3D's own function, stripe
orientations, shapes, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt
import torch

from gpustack.kernels.wavelet import destripe_wavelet, wavedec2, wavelet_level_max, waverec2


@pytest.mark.parametrize("name", ["haar", "db2", "coif3", "sym4"])
@pytest.mark.parametrize("shape", [(64, 64), (101, 77), (37, 50)])
def test_transform_matches_pywavelets(device, name, shape):
    x = np.random.default_rng(0).normal(size=(2, *shape))
    for level in range(1, wavelet_level_max(shape, name) + 1):
        ref = [pywt.wavedec2(xi, name, level=level) for xi in x]
        got = wavedec2(torch.as_tensor(x, device=device), name, level)
        for i in range(2):
            np.testing.assert_allclose(got[0][i].cpu().numpy(), ref[i][0], atol=1e-12)
            for g_level, r_level in zip(got[1:], ref[i][1:]):
                for g, r in zip(g_level, r_level):
                    np.testing.assert_allclose(g[i].cpu().numpy(), r, atol=1e-12)
        rec = waverec2(got, name).cpu().numpy()
        np.testing.assert_allclose(rec, np.stack([pywt.waverec2(r, name) for r in ref]), atol=1e-12)


def _reference(img: np.ndarray, wavelet: str, level: int, sigma: float) -> np.ndarray:
    """Münch et al.'s filter written plainly with PyWavelets and NumPy (vertical stripes)."""
    coeffs = pywt.wavedec2(img, wavelet, level=level)
    for j in range(1, len(coeffs)):
        ch, cv, cd = coeffs[j]
        f = np.fft.fftshift(np.fft.fft(cv, axis=0), axes=0)
        k = np.arange(cv.shape[0]) - cv.shape[0] // 2
        f *= (1 - np.exp(-k ** 2 / (2 * sigma ** 2)))[:, None]
        coeffs[j] = (ch, np.real(np.fft.ifft(np.fft.ifftshift(f, axes=0), axis=0)), cd)
    return pywt.waverec2(coeffs, wavelet)[:img.shape[0], :img.shape[1]]


def _striped(shape=(96, 120), seed=0, angle=0.0):
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(float)
    clean = 100 + 20 * np.sin(x / 9.0) * np.cos(y / 11.0) + rng.normal(0, 1, shape)
    r = math.radians(angle)
    across = x * math.cos(r) + y * math.sin(r)  # constant along the stripes' direction (-sin, cos)
    profile = rng.normal(0, 15, int(2 * (h + w)) + 4)
    stripes = np.interp(across, np.arange(len(profile)) - (h + w), profile)
    return clean, clean + stripes


@pytest.mark.parametrize("shape", [(96, 120), (101, 77)])
def test_filter_matches_the_algorithm_written_with_pywavelets(device, shape):
    _, img = _striped(shape)
    ref = _reference(img, "coif3", 2, 4.0)
    got64 = destripe_wavelet(torch.as_tensor(img[None], device=device), "coif3", 2, 4.0)[0].cpu().numpy()
    np.testing.assert_allclose(got64, ref, atol=1e-9)
    got32 = destripe_wavelet(torch.as_tensor(img[None], dtype=torch.float32, device=device), "coif3", 2, 4.0)
    assert got32.dtype == torch.float32 and got32.shape == (1, *shape)  # odd sizes keep their shape
    np.testing.assert_allclose(got32[0].cpu().numpy(), ref, atol=1e-3)


@pytest.mark.reference
def test_matches_pystack3d():
    destriping = pytest.importorskip("pystack3d.destriping")
    _, img = _striped((96, 120))  # bands of even height at both levels
    theirs = destriping.destriping_from_wavelets(img, wavelet="coif3", level=2, sigma=4)
    ours = destripe_wavelet(torch.as_tensor(img[None]), "coif3", 2, 4.0)[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    _, odd = _striped((101, 77))
    assert destriping.destriping_from_wavelets(odd, wavelet="coif3", level=2, sigma=4).shape == (102, 78)
    # (and on bands of odd height PyStack3D's frequency axis is off by one: it damps the zero frequency by
    # 1 - exp(-1 / (2 sigma^2)) instead of removing it; gpustack follows the paper there)


def _stripe_error(out, clean):
    return float(np.sqrt(np.mean((out - clean) ** 2)))


def test_horizontal_stripes_are_the_transpose(device):
    clean, img = _striped(angle=0)
    t = torch.as_tensor(img.T.copy()[None], device=device)
    out = destripe_wavelet(t, "db4", 3, 3.0, angle=90)[0].cpu().numpy()
    direct = destripe_wavelet(torch.as_tensor(img[None], device=device), "db4", 3, 3.0)[0].cpu().numpy()
    np.testing.assert_allclose(out, direct.T, atol=1e-9)


@pytest.mark.parametrize("angle", [0.0, 30.0, -20.0])
def test_stripes_at_an_angle_are_removed_only_with_that_angle(device, angle):
    clean, img = _striped((128, 128), angle=angle)
    t = torch.as_tensor(img[None], dtype=torch.float32, device=device)
    before = _stripe_error(img, clean)
    right = _stripe_error(destripe_wavelet(t, "db4", 3, 3.0, angle=angle)[0].cpu().numpy(), clean)
    assert right < 0.7 * before  # the approximation band keeps the stripes' coarsest part (the method's limit)
    if angle != 0.0:
        vertical = _stripe_error(destripe_wavelet(t, "db4", 3, 3.0, angle=0.0)[0].cpu().numpy(), clean)
        assert right < 0.75 * vertical


def test_constant_slice_unchanged_and_batch_equals_single_calls(device):
    const = torch.full((1, 64, 80), 7.0, dtype=torch.float64, device=device)
    torch.testing.assert_close(destripe_wavelet(const, "coif3", 1, 4.0), const, atol=1e-9, rtol=0)
    stack = torch.as_tensor(np.stack([_striped(seed=s)[1] for s in range(3)]), device=device)
    batch = destripe_wavelet(stack, "sym4", 3, 4.0, angle=25)
    singles = torch.cat([destripe_wavelet(stack[i:i + 1], "sym4", 3, 4.0, angle=25) for i in range(3)])
    torch.testing.assert_close(batch, singles)


@pytest.mark.parametrize("kwargs, message", [
    ({"wavelet": "nope"}, "unknown wavelet"),
    ({"level": 9}, "too deep"),
    ({"level": 0}, ">= 1"),
    ({"sigma": 0.0}, "> 0"),
])
def test_errors_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        destripe_wavelet(torch.zeros((1, 64, 80)), **{"wavelet": "coif3", "level": 2, "sigma": 4.0, **kwargs})


@pytest.mark.parametrize("angle", [0.0, 90.0, 30.0])
def test_integer_slices_come_back_in_their_dtype_rounded(device, angle):
    _, img = _striped((96, 120), angle=angle)
    as_float = torch.as_tensor(img[None] * 100, dtype=torch.float32, device=device)
    as_int = as_float.round().to(torch.uint16)
    out = destripe_wavelet(as_int, "coif3", 2, 4.0, angle=angle)
    assert out.dtype == torch.uint16 and out.shape == as_int.shape
    reference = destripe_wavelet(as_int.to(torch.float32), "coif3", 2, 4.0, angle=angle).round().clamp(0, 65535)
    assert torch.equal(out, reference.to(torch.uint16))


@pytest.mark.parametrize("name", ["haar", "db2", "sym5", "bior2.2"])
@pytest.mark.parametrize("shape", [(9, 13), (17, 31), (64, 48)])
def test_filter_matches_pywavelets_at_every_level_and_odd_sizes(device, name, shape):
    img = np.random.default_rng(1).normal(100, 20, size=shape)
    for level in range(1, wavelet_level_max(shape, name) + 1):
        got = destripe_wavelet(torch.as_tensor(img[None], device=device), name, level, 2.0)[0].cpu().numpy()
        np.testing.assert_allclose(got, _reference(img, name, level, 2.0), atol=1e-9)
