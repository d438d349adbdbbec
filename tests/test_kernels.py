import numpy as np
import pytest
import torch

from gpustack.kernels.cast import to_storage
from gpustack.kernels.stats import slice_stats


@pytest.mark.parametrize("nan_aware", [True, False])
def test_slice_stats_match_numpy(device, nan_aware):
    rng = np.random.default_rng(1)
    data = rng.normal(5, 3, size=(4, 17, 23)).astype(np.float32)
    got = slice_stats(torch.from_numpy(data).to(device), nan_aware=nan_aware).cpu().numpy()
    want = np.stack([data.min((1, 2)), data.max((1, 2)), data.mean((1, 2))], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_slice_stats_ignore_nan(device):
    data = np.array([[[1.0, np.nan], [3.0, 5.0]], [[np.nan, np.nan], [np.nan, np.nan]]], dtype=np.float32)
    got = slice_stats(torch.from_numpy(data).to(device)).cpu().numpy()
    np.testing.assert_allclose(got[0], [1.0, 5.0, 3.0])
    assert np.isnan(got[1]).all()  # a slice with nothing finite has no statistics


def test_to_storage_rounds_clips_and_zeroes_nan(device):
    x = torch.tensor([-3.2, 0.4, 0.6, 2.5, 65534.7, 70000.0, float("nan")], device=device)
    got = to_storage(x, torch.uint16).to(torch.uint16).cpu().numpy()
    # round-half-even like numpy.rint; PyStack3D truncates (0.6 -> 0) and casts NaN undefined
    np.testing.assert_array_equal(got, [0, 0, 1, 2, 65535, 65535, 0])
    got8 = to_storage(torch.tensor([255.6, -1.0, 127.5], device=device), torch.uint8).to(torch.uint8).cpu().numpy()
    np.testing.assert_array_equal(got8, [255, 0, 128])


def test_to_storage_float_is_unchanged(device):
    x = torch.tensor([1.25, float("nan")], device=device)
    out = to_storage(x, torch.float32)
    assert out[0].item() == 1.25 and torch.isnan(out[1]).item()
