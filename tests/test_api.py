import numpy as np
import pytest
import torch

import gpustack


def test_numpy_in_numpy_out():
    stack = np.random.default_rng(0).normal(size=(3, 8, 9)).astype(np.float32)
    stats = gpustack.slice_statistics(stack)
    assert isinstance(stats, np.ndarray)
    np.testing.assert_allclose(stats[:, 2], stack.mean((1, 2)), rtol=1e-5)
    assert isinstance(gpustack.crop(stack, [0, 4, 0, 8]), np.ndarray)


def test_torch_in_torch_out_on_its_device(device):
    stack = torch.arange(2 * 4 * 5, dtype=torch.float32, device=device).reshape(2, 4, 5)
    stats = gpustack.slice_statistics(stack)
    assert isinstance(stats, torch.Tensor) and stats.device == stack.device
    assert stats[1, 0].item() == 20 and stats[1, 1].item() == 39
    assert torch.equal(gpustack.crop(stack, [1, 3, 0, 2]), stack[:, 2:4, 1:3])


def test_big_endian_numpy_is_accepted():
    stack = np.arange(8, dtype=">u2").reshape(1, 2, 4)
    np.testing.assert_allclose(gpustack.slice_statistics(stack)[0], [0, 7, 3.5])


def test_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    stack = cupy.arange(24, dtype=cupy.float32).reshape(2, 3, 4)
    stats = gpustack.slice_statistics(stack)
    assert isinstance(stats, cupy.ndarray)
    assert float(stats[0, 1]) == 11.0


def test_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(H, W\) or a stack"):
        gpustack.crop(np.zeros(5), [0, 1, 0, 1])
    empty = np.zeros((0, 16, 20), np.float32)
    for call in (gpustack.slice_statistics, gpustack.remove_background, gpustack.rescale_intensity,
                 lambda s: gpustack.warp_stack(s, np.zeros((0, 3, 3)))):
        with pytest.raises(ValueError, match=r"the stack is empty: shape \(0, 16, 20\)"):
            call(empty)


def test_strided_views_give_what_their_copies_give(device):
    """A transposed torch stack or a strided NumPy one (a user's view) is taken as its contiguous copy; the
    histogram kernel used to fail on the former ('view size is not compatible')."""
    rng = np.random.default_rng(0)
    base = rng.normal(1000, 100, (12, 40, 32)).astype(np.float32)
    base[5] *= 0.6  # a contrast drop for the rescaling to correct
    view = torch.from_numpy(base).to(device).transpose(1, 2)
    assert not view.is_contiguous()
    copy = view.contiguous()
    for call in (gpustack.slice_statistics, lambda s: gpustack.rescale_intensity(s),
                 lambda s: gpustack.remove_background(s, orders=(1, 1), skip_factors=(2, 2))[0]):
        torch.testing.assert_close(call(view), call(copy), rtol=0, atol=0)
    strided = base[:, ::2, ::2]
    np.testing.assert_array_equal(gpustack.rescale_intensity(strided),
                                  gpustack.rescale_intensity(np.ascontiguousarray(strided)))


def test_remove_background_warns_when_nothing_could_be_fitted():
    rng = np.random.default_rng(1)
    stack = rng.normal(1000, 10, (6, 32, 32)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="could not be fitted over the stack.*z terms"):
        out, coefs = gpustack.remove_background(stack, orders=(1, 1, 1))  # z sampled every 10 slices: one group
    assert np.isnan(coefs).all() and np.array_equal(out, stack)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpustack.remove_background(stack, orders=(1, 1, 1), skip_factors=(4, 4, 1))  # fitted: no warning
