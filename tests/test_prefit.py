"""Per-slice background fits read ahead from the files (pipeline/prefit.py): the same corrections as fits inside
the pass, and only where the files hold the fit's input as it is."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from gpustack.config import load_workflow
from gpustack.device import resolve_device
from gpustack.errors import InputError
from gpustack.io.tiff import open_channel
from gpustack.pipeline import prefit
from gpustack.pipeline.runner import prepare, run
from gpustack.pipeline.spec import PassSpec, StepRun
from gpustack.steps.background import BkgRemoval, BkgRemovalConfig
from gpustack.steps.cropping import Cropping, CroppingConfig
from tests.conftest import write_params

BKG_2D = ('process_steps = ["cropping", "bkg_removal"]\noutput_dtype = "float32"\n'
          "[cropping]\narea = [7, 71, 5, 53]\n"
          "[bkg_removal]\norders = [1, 1]\nskip_factors = [3, 4]\nthreshold_max = 2500\npreserve_avg = true\n")


def _stack(n=9, h=60, w=80, seed=4):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 60
    z = np.arange(n)[:, None, None] / n
    data = rng.normal(1000, 5, (n, h, w)) + 300 * xx + 200 * yy - 150 * xx * yy + 100 * z * xx
    data[:, 20:26, 30:40] = 3000  # bright structures above threshold_max
    return np.round(data).astype(np.uint16)


def _run(tmp_path, monkeypatch, name, table=BKG_2D, ahead=True, band_bytes=None, **imwrite):
    folder = tmp_path / name
    folder.mkdir()
    for k, img in enumerate(_stack()):
        tifffile.imwrite(folder / f"s_{k:02d}.tif", img, **imwrite)
    params = write_params(folder, table)
    calls = []
    original = prefit.prefit

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(prefit, "prefit", spy)
    if not ahead:
        monkeypatch.setattr(prefit, "sampled_run", lambda spec: None)
    if band_bytes:
        monkeypatch.setattr(prefit, "BAND_BYTES", band_bytes)
    run(prepare(load_workflow(params)), device_choice=resolve_device("cpu"), show_progress=False, log=lambda m: None)
    step = folder / "process" / "bkg_removal"
    out = np.stack([tifffile.imread(p) for p in sorted(step.glob("*.tif"))])
    monkeypatch.undo()
    return out, np.load(step / "outputs" / "coefs.npz"), calls


def test_fits_ahead_correct_as_fits_inside_the_pass(tmp_path, monkeypatch):
    ahead, coefs_ahead, calls = _run(tmp_path, monkeypatch, "ahead")
    assert calls == [True]
    inside, coefs_inside, calls = _run(tmp_path, monkeypatch, "inside", ahead=False)
    assert calls == []
    assert ahead.shape == (9, 48, 64)
    # the same samples, fitted in one batch of 9 instead of the pass's: float32 rounding of the batched sums only
    np.testing.assert_allclose(ahead, inside, atol=2e-3)
    np.testing.assert_allclose(coefs_ahead["coefs"], coefs_inside["coefs"], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(coefs_ahead["iterations"], coefs_inside["iterations"])
    # and the background is gone: each slice flat up to the noise (sigma 5) outside the bright structures
    rest = np.ones(ahead.shape[1:], bool)
    rest[20 - 7:26 - 7, 30 - 7:40 - 7] = False  # area's origin is bottom-left: rows 60 - 53 = 7 on are kept
    assert np.ptp(ahead[:, rest], axis=1).max() < 45


@pytest.mark.parametrize("rows", [1, 4, 8])  # rows of 80 uint16 per read: 1 or 2 sampled rows (every 3rd), or 3
def test_fits_ahead_read_in_bands_give_the_same(tmp_path, monkeypatch, rows):
    whole, coefs, _ = _run(tmp_path, monkeypatch, "whole")
    banded, coefs_banded, calls = _run(tmp_path, monkeypatch, "banded", band_bytes=rows * 80 * 2)
    assert calls == [True]
    np.testing.assert_array_equal(banded, whole)
    np.testing.assert_array_equal(coefs_banded["coefs"], coefs["coefs"])


def test_big_endian_files_fit_ahead_the_same(tmp_path, monkeypatch):
    little, _, _ = _run(tmp_path, monkeypatch, "little")
    big, _, calls = _run(tmp_path, monkeypatch, "big", byteorder=">")
    assert calls == [True]
    np.testing.assert_array_equal(big, little)


@pytest.mark.parametrize("table, imwrite", [
    (BKG_2D, {"compression": "zlib"}),  # decoded once by the pass anyway
    (BKG_2D.replace("preserve_avg = true", "skip_averaging = true"), {}),  # block means: every pixel
    (BKG_2D.replace("orders = [1, 1]\nskip_factors = [3, 4]", "orders = [1, 1, 1]\nskip_factors = [3, 4, 1]"),
     {}),  # 3D: one fit over the stack, in a statistics pass
])
def test_no_fits_ahead_where_the_files_do_not_hold_the_fit_input(tmp_path, monkeypatch, table, imwrite):
    out, _, calls = _run(tmp_path, monkeypatch, "x", table=table, **imwrite)
    assert calls in ([], [False])
    assert out.shape == (9, 48, 64)


def test_arithmetic_before_the_fit_keeps_it_in_the_pass(tmp_path):
    for k, img in enumerate(_stack(n=2)):
        tifffile.imwrite(tmp_path / f"s_{k}.tif", img)
    source, _ = open_channel(tmp_path, ".")
    bkg = BkgRemoval(BkgRemovalConfig(orders=(1, 1)))
    crop = Cropping(CroppingConfig(area=None))
    assert prefit.sampled_run(PassSpec(source, [StepRun(crop, region=(slice(2, 50), slice(3, 70))),
                                                StepRun(bkg)])) is not None
    other = BkgRemoval(BkgRemovalConfig(orders=(1, 1, 1)))  # computes: its output is not in the files
    assert prefit.sampled_run(PassSpec(source, [StepRun(other), StepRun(bkg)])) is None


def test_a_slice_truncated_after_the_header_check_is_named(tmp_path):
    for k, img in enumerate(_stack(n=2)):
        tifffile.imwrite(tmp_path / f"s_{k}.tif", img)
    source, _ = open_channel(tmp_path, ".")
    victim = source.slices[1].path
    victim.write_bytes(victim.read_bytes()[:3000])
    spec = PassSpec(source, [StepRun(BkgRemoval(BkgRemovalConfig(orders=(1, 1))))])
    with pytest.raises(InputError, match="s_1.tif: the file is truncated"):
        prefit.prefit(spec, resolve_device("cpu").device)
