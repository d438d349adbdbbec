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
