"""Jumps along z told from smooth changes (intensity_rescaling's default correction)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gpustack
from gpustack.kernels.jumps import MIN_SLICES, steps_of
from tests.test_intensity import smooth_image


def _series(device, values):
    return torch.tensor(values, dtype=torch.float64, device=device)


def test_a_steady_drift_has_no_steps(device):
    drift = _series(device, 0.3 * np.arange(40) + 0.002 * np.arange(40) ** 2)
    assert torch.equal(steps_of(drift, 0.02), torch.zeros_like(drift))


def test_an_excursion_on_a_noisy_drift_is_found_exactly(device):
    rng = np.random.default_rng(1)
    k = np.arange(60)
    smooth = 0.01 * k + np.cumsum(rng.normal(0, 0.01, 60))  # the content: a random walk on a drift
    excursion = np.where((k >= 20) & (k < 28), 0.5, 0.0)
    steps = steps_of(_series(device, smooth + excursion), 0.02).cpu().numpy()
    inside = (k >= 20) & (k < 28)
    assert np.all(steps[~inside] == 0)  # outside: left exactly as they are
    np.testing.assert_allclose(steps[inside], 0.5, atol=0.05)  # inside: the excursion, up to one content step


def test_a_lasting_jump_moves_the_minority_side(device):
    values = np.r_[np.zeros(30), np.full(12, -0.3)] + np.random.default_rng(2).normal(0, 0.003, 42)
    steps = steps_of(_series(device, values), 0.02).cpu().numpy()
    assert np.all(steps[:30] == 0)
    np.testing.assert_allclose(steps[30:], -0.3, atol=0.02)


def _drifting_stack(n=30, drop=(12, 18), f=0.6):
    """Slices whose contrast and level drift smoothly (the content), and a contrast drop around the mean."""
    base = smooth_image(48, 48)
    stack = []
    for k in range(n):
        m = float(base.mean())
        s = m + (1 + 0.01 * k) * (base - m) + 3.0 * k  # smooth: 1 % contrast and 3 grey levels per slice
        if drop[0] <= k < drop[1]:
            c = float(s.mean())
            s = c + f * (s - c)
        stack.append(s)
    return np.stack(stack).astype(np.float32)


def test_default_undoes_a_contrast_drop_and_leaves_the_other_slices(device):
    stack = _drifting_stack()
    clean = _drifting_stack(f=1.0)
    out = gpustack.rescale_intensity(stack, device=str(device))
    dropped = np.zeros(len(stack), bool)
    dropped[12:18] = True
    np.testing.assert_array_equal(out[~dropped], stack[~dropped])  # exactly as they were
    span = float(clean.max() - clean.min())
    assert np.abs(out[dropped] - clean[dropped]).max() < 0.02 * span
    # correct = "all" maps every slice to the median: the smooth drift is flattened, far from where it was
    flat = gpustack.rescale_intensity(stack, correct="all", device=str(device))
    assert np.abs(flat[~dropped] - stack[~dropped]).mean() > 10 * np.abs(out[~dropped] - stack[~dropped]).mean() + 1


def test_short_stacks_are_mapped_slice_by_slice():
    stack = _drifting_stack(n=MIN_SLICES - 1, drop=(3, 5))
    np.testing.assert_array_equal(gpustack.rescale_intensity(stack), gpustack.rescale_intensity(stack, correct="all"))


@pytest.mark.parametrize("kwargs", [{"mapping": "histogram"}, {"filter_size": 5}])
def test_jumps_need_the_linear_mapping_over_the_whole_stack(kwargs):
    with pytest.raises(ValueError, match="correct"):
        gpustack.rescale_intensity(_drifting_stack(), correct="jumps", **kwargs)
    gpustack.rescale_intensity(_drifting_stack(), **kwargs)  # without `correct`: mapped slice by slice


def test_runner_names_and_draws_the_corrected_slices(tmp_path):
    import tifffile

    from gpustack.config import load_workflow
    from gpustack.device import resolve_device
    from gpustack.pipeline.runner import prepare, run
    from tests.conftest import write_params

    stack = np.rint(_drifting_stack() * 20).astype(np.uint16)  # grey levels ~20,000: uint16 without clipping
    for k, img in enumerate(stack):
        tifffile.imwrite(tmp_path / f"slice_{k:04d}.tif", img)
    params = write_params(tmp_path, 'process_steps = ["intensity_rescaling"]\n')
    warnings = []
    run(prepare(load_workflow(params)), device_choice=resolve_device("cpu"), show_progress=False,
        log=warnings.append)
    outputs = tmp_path / "process" / "intensity_rescaling" / "outputs"
    log = (outputs / "log.txt").read_text().splitlines()
    assert log[0].startswith("correct = jumps: 6 of 30 measured slice(s) corrected")
    assert log[1:7] == [f"slice_{k:04d}.tif" for k in range(12, 18)]
    # the stack's own contrast drift (1 % per slice, 1.00 -> 1.29) is kept, and said so
    assert log[7].startswith("the contrast drifts smoothly by 29 % along the stack and is kept")
    assert len(log) == 8
    assert (outputs / "intensity_rescaling_jumps.png").stat().st_size > 1000
    assert any("6 slice(s) corrected for a jump" in w for w in warnings)
    for k in (0, 11, 18, 29):  # written exactly as read
        np.testing.assert_array_equal(
            tifffile.imread(tmp_path / "process" / "intensity_rescaling" / f"slice_{k:04d}.tif"), stack[k])


def test_an_excursion_whose_jumps_do_not_cancel_moves_only_its_own_slices(device):
    """The content drifts while some slices are off: the jump out (+0.506) and back (-0.485) differ by more than
    the floor (measured on the demo stack); the slices outside stay, those inside take the mean jump."""
    k = np.arange(50)
    smooth = 0.004 * k
    values = smooth + np.where((k >= 15) & (k < 20), 0.5, 0.0)
    values[20:] -= 0.021  # the content moved by 0.021 more during the excursion than the steady drift says
    steps = steps_of(_series(device, values), 0.02).cpu().numpy()
    inside = (k >= 15) & (k < 20)
    assert np.all(steps[~inside] == 0)
    np.testing.assert_allclose(steps[inside], (0.5 + 0.521) / 2, atol=1e-9)
