"""The destriping step: parameters and their errors, the stripe gate on a stack where curtains come and go,
pyvsnr as an engine, the runner's outputs, the public functions."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from conftest import write_params
from test_runner import CPU
from gpustack.errors import ConfigError
from gpustack.schema import build
from gpustack.steps.destriping import Destriping, DestripingConfig
from gpustack.synthetic import SyntheticSpec, generate

GABOR = {"name": "Gabor", "noise_level": 20, "sigma": [0.5, 80], "theta": 0}


def config(**table):
    return build(DestripingConfig, table, file="params.toml", name="destriping")


@pytest.mark.parametrize("table, key, message", [
    ({}, "filters", "no filters"),
    ({"filters": []}, "filters", "no filters"),
    ({"filters": [{"name": "Gauss", "noise_level": 1}]}, "filters", "not a filter"),
    ({"filters": [{"name": "Dirac", "noise_level": -1}]}, "filters", "out of range"),
    ({"filters": [{"name": "Dirac", "noise_level": 0}]}, "filters", "must be > 0"),
    ({"filters": [{"name": "Dirac"}]}, "filters", "noise_level: missing"),
    ({"filters": [{**GABOR, "sigma": [0.5]}]}, "filters", "sigma"),
    ({"filters": [{**GABOR, "sigma": [0.5, 80, 3]}]}, "filters", "sigma"),
    ({"filters": [{**GABOR, "sigma": [0, 80]}]}, "filters", "> 0"),
    ({"filters": [{**GABOR, "angle": 3}]}, "filters", "unknown key 'angle'"),
    ({"filters": [GABOR], "maxit": 0}, "maxit", "out of range"),
    ({"filters": [GABOR], "cvg_threshold": -1}, "cvg_threshold", "out of range"),
    ({"wavelet_decomposition": {"wavelet": "nope", "level": 2, "sigma": 4}}, "wavelet_decomposition", "unknown "
                                                                                                     "wavelet"),
    ({"wavelet_decomposition": {"wavelet": "coif3", "level": 0, "sigma": 4}}, "wavelet_decomposition", "level"),
    ({"wavelet_decomposition": {"wavelet": "coif3", "level": 2, "sigma": 0}}, "wavelet_decomposition", "sigma"),
    ({"wavelet_decomposition": "{'wavelet':'coif3', 'level':4, 'sigma':4}"}, "wavelet_decomposition", "valid TOML"),
    ({"filters": [GABOR], "engine": "cupy"}, "engine", "is not one of"),
    ({"filters": [GABOR], "stripe_gate_range": [2, 1]}, "stripe_gate_range", "low < high"),
])
def test_bad_parameters_name_their_key(table, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        config(**table)
    assert err.value.key == key


def test_too_deep_wavelet_level_is_an_error_naming_the_key():
    step = Destriping(config(wavelet_decomposition={"wavelet": "coif3", "level": 6, "sigma": 4}))
    with pytest.raises(Exception, match="too deep") as err:
        step.output_shape((64, 80))
    assert err.value.key == "wavelet_decomposition"


def test_a_single_filter_table_is_accepted_and_the_template_filters_parse():
    from gpustack.template import render_template
    import tomllib

    assert config(filters=GABOR).filters[0].sigma == (0.5, 80.0)
    table = tomllib.loads(render_template())["destriping"]
    cfg = config(**table)
    assert [f.sigma for f in cfg.filters] == [(0.5, 80.0), (0.5, 200.0)]


@pytest.fixture(scope="module")
def curtained(tmp_path_factory):
    """A stack where only some slices carry curtains; no other defect, little noise."""
    spec = SyntheticSpec(n_slices=8, height=128, width=128, dtype="float32", curtain_slices=(0.0, 0.45, 1.0),
                         curtain_amplitude=0.1, curtain_fade=None, shift_range=None, contrast_range=None,
                         background_amplitude=0.0, delete_from=None, noise_sigma=0.005, pad=0)
    stack = generate(tmp_path_factory.mktemp("curtained"), spec)
    observed = np.stack([stack.render(k)[0] for k in range(8)])
    clean = np.stack([observed[k] - stack.curtain(k) for k in range(8)])
    mask = np.array([stack.curtain(k).any() for k in range(8)])
    return stack, observed, clean, mask


def _psnr(a, b, peak):
    with np.errstate(divide="ignore"):  # a slice equal to the truth: infinite PSNR
        return 10 * np.log10(peak ** 2 / np.mean((a - b) ** 2, axis=(1, 2)))


def test_gate_leaves_clean_slices_exactly_and_corrects_curtain_slices(curtained, device):
    from gpustack.api import destripe_vsnr

    _, observed, clean, mask = curtained
    assert mask.tolist() == [True, False, False, True, False, False, False, True]
    peak = float(clean.max())
    gated, info = destripe_vsnr(torch.as_tensor(observed, device=device), [GABOR], maxit=60)
    full, info_full = destripe_vsnr(torch.as_tensor(observed, device=device), [GABOR], maxit=60, stripe_gate=False)
    gated, full = gated.cpu().numpy(), full.cpu().numpy()
    weight = info["weight"].cpu().numpy()
    assert np.all(weight[mask] == 1) and np.all(weight[~mask] == 0)
    assert np.array_equal(gated[~mask], observed[~mask])  # clean slices untouched
    np.testing.assert_array_equal(gated[mask], full[mask])
    before, after_full = _psnr(observed, clean, peak), _psnr(full, clean, peak)
    assert np.all(after_full[mask] > before[mask] + 3)  # curtains removed
    assert np.all(after_full[~mask] < before[~mask])  # ... and ungated VSNR damages the clean slices
    assert info_full["weight"].cpu().numpy().tolist() == [1.0] * 8


def test_vsnr_kernel_result_is_what_the_step_writes_without_the_gate(curtained, device):
    from gpustack.api import destripe_vsnr
    from gpustack.kernels.vsnr import NoiseFilter, VsnrOperator, solve

    _, observed, _, _ = curtained
    x = torch.as_tensor(observed, device=device)
    out, info = destripe_vsnr(x, [GABOR], maxit=7, stripe_gate=False, batch_size=3)
    op = VsnrOperator(observed.shape[1:], [NoiseFilter("Gabor", 20, (0.5, 80), 0)], device)
    ref = x - solve(op, x, maxit=7).stripes
    torch.testing.assert_close(out, ref, atol=1e-5 * float(x.abs().max()), rtol=0)
    assert info["iterations"].tolist() == [7] * 8


@pytest.mark.reference
def test_pyvsnr_engine_matches_the_gpustack_engine(curtained):
    pytest.importorskip("pyvsnr")
    from gpustack.api import destripe_vsnr

    _, observed, _, _ = curtained
    ours, _ = destripe_vsnr(observed[:3], [GABOR], maxit=5, stripe_gate=False)
    theirs, info = destripe_vsnr(observed[:3], [GABOR], maxit=5, stripe_gate=False, engine="pyvsnr")
    np.testing.assert_allclose(ours, theirs, atol=2e-5 * observed.max(), rtol=0)
    assert info["iterations"].tolist() == [-1] * 3


def test_numpy_in_numpy_out_and_single_slice(curtained):
    from gpustack.api import destripe_vsnr

    _, observed, _, _ = curtained
    out, info = destripe_vsnr(observed[0], [GABOR], maxit=3)
    assert isinstance(out, np.ndarray) and out.shape == observed[0].shape and out.dtype == np.float32
    assert info["weight"].shape == (1,)


def test_slices_too_small_to_measure_are_corrected_fully():
    from gpustack.api import destripe_vsnr

    out, info = destripe_vsnr(np.random.default_rng(0).random((2, 4, 4)).astype(np.float32), [GABOR], maxit=3)
    assert out.shape == (2, 4, 4) and np.isnan(info["stripe_ratio"]).all() and (info["weight"] == 1).all()


def test_constant_and_zero_slices_are_left_intact(device):
    from gpustack.api import destripe_vsnr

    stack = torch.zeros((3, 32, 40), device=device)
    stack[1] = 5.0
    stack[2] = torch.rand((32, 40), device=device)
    for gate in (True, False):
        out, _ = destripe_vsnr(stack, [GABOR], maxit=5, stripe_gate=gate)
        assert torch.isfinite(out).all()
        assert torch.equal(out[:2], stack[:2])


def test_runner_writes_slices_stripe_table_and_plot(curtained, tmp_path):
    from gpustack.config import load_workflow
    from gpustack.pipeline.runner import prepare, run

    stack, *_ = curtained
    params = write_params(tmp_path, f'project_dir = "{stack.root}"\nchannels = ["."]\nprocess_steps = ["destriping"]\n'
                                    f'output_dir = "{tmp_path}"\n'
                                    '[destriping]\nmaxit = 60\ncvg_threshold = 1e-2\n'
                                    'filters = [{ name = "Gabor", noise_level = 20, sigma = [0.5, 80], theta = 0 }]\n')
    run(prepare(load_workflow(params)), device_choice=CPU, show_progress=False, log=lambda m: None)
    out = tmp_path / "process" / "destriping"
    assert len(list(out.glob("*.tif"))) == 8
    with open(out / "outputs" / "stripes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["weight"]) for r in rows] == [1, 0, 0, 1, 0, 0, 0, 1]
    assert all(0 < int(r["iterations"]) < 60 for r in rows if float(r["weight"]) > 0)
    assert all(int(r["iterations"]) == 0 for r in rows if float(r["weight"]) == 0)
    assert (out / "outputs" / "stripes.png").stat().st_size > 1000


def test_missing_pyvsnr_is_a_config_error_before_the_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyvsnr" else real(name, *a))
    step = Destriping(config(filters=[GABOR], engine="pyvsnr"))
    with pytest.raises(Exception, match="pyvsnr is not installed") as err:
        step.output_shape((32, 32))
    assert err.value.key == "engine"


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("table", [{"filters": [GABOR], "maxit": 5},
                                   {"wavelet_decomposition": {"wavelet": "haar", "level": 2, "sigma": 4}}])
def test_nan_fill_of_a_registration_stays_where_it_was(device, table, fill):
    """A 'constant' warp fills NaN: it must not spread over the slice through the FFTs (every pixel NaN); nor
    must an infinite pixel of a float32 input (it did: every pixel of its slice NaN)."""
    from gpustack.steps.base import Batch

    _, img = _curtained_pair()
    x = torch.as_tensor(np.stack([img, img]), device=device)
    x[0, :, :6] = fill
    step = Destriping(config(**table, stripe_gate=False))
    out, _ = step.apply_recorded(Batch(x, 0, slice(0, 2), ["a", "b"], 2), None)
    hole = out[0, :, :6]
    assert torch.isnan(hole).all() if math.isnan(fill) else (hole == fill).all()  # put back as it was
    assert torch.isfinite(out[0, :, 6:]).all() and torch.isfinite(out[1]).all()
    clean_cols = out[0, :, 10:].cpu().numpy()
    assert np.abs(clean_cols - out[1, :, 10:].cpu().numpy()).mean() < 0.05 * np.abs(img).mean()


@pytest.mark.parametrize("table, holes", [({"filters": [GABOR], "maxit": 5}, False),
                                          ({"filters": [GABOR], "maxit": 5}, True),
                                          ({"wavelet_decomposition": {"wavelet": "db2", "level": 2, "sigma": 4},
                                            "stripe_gate": False}, True)])
def test_removed_rms_is_the_change_of_each_slice(device, table, holes):
    """The report's removed_rms: the RMS over the whole slice of output - input (0 where the input is NaN),
    whether a slice is corrected fully, in part by the gate, or left alone."""
    from gpustack.steps.base import Batch

    clean, img = _curtained_pair()
    x = torch.as_tensor(np.stack([img, clean, img]), device=device)
    if holes:
        x[2, :, :6] = float("nan")
    out, info = Destriping(config(**table)).apply_recorded(Batch(x.clone(), 0, slice(0, 3), ["a", "b", "c"], 3), None)
    change = torch.nan_to_num(out - x).cpu().double()
    expected = change.square().mean(dim=(1, 2)).sqrt().numpy()
    assert expected[0] > 5  # something was removed
    np.testing.assert_allclose(info["removed_rms"].cpu().numpy(), expected, rtol=1e-4, atol=1e-3)


def _curtained_pair():
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:64, 0:80]
    clean = (1000 + 100 * np.sin(x / 6.0) * np.cos(y / 8.0)).astype(np.float32)
    return clean, clean + rng.normal(0, 30, 80).astype(np.float32)[None, :]
