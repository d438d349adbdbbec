"""A workflow that only crops runs on the host, without torch: the same files and statistics as the device pass."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from gpustack.config import load_workflow
from gpustack.device import host_choice, resolve_device
from gpustack.kernels.stats import slice_stats
from gpustack.pipeline.host_pass import host_stats
from gpustack.pipeline.runner import prepare, run, selects_only
from tests.conftest import write_params, write_stack

CROPS = ('process_steps = ["cropping", "cropping_final"]\n'
         "[cropping]\narea = [5, 35, 2, 27]\n[cropping_final]\narea = [1, 21, 3, 20]\n")


def _run(params: Path, choice) -> None:
    run(prepare(load_workflow(params)), device_choice=choice, show_progress=False, log=lambda m: None)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_host_stats_equal_the_device_kernel(dtype):
    rng = np.random.default_rng(3)
    if dtype == "float32":
        x = rng.normal(0, 1e3, (5, 17, 23)).astype(np.float32)
        x[1, 2, 3], x[2, 0, 0], x[2, 5, 5] = np.nan, np.inf, -np.inf
        x[3] = np.nan  # no finite value: NaN for all three
    else:
        x = rng.integers(0, np.iinfo(dtype).max, (5, 17, 23), endpoint=True).astype(dtype)
    x = x[:, 2:15, 1:20]  # a view, as the pass measures it
    want = slice_stats(torch.from_numpy(np.ascontiguousarray(x)), nan_aware=True).numpy()
    got = host_stats(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    if dtype == "float32":
        assert np.isnan(got[3]).all() and np.isfinite(got[[0, 1, 2, 4]]).all()


CASES = {
    "uint16, two crops, intermediate kept, batches of 3": ("", "uint16", 1, "batch_size = 3\n"),
    "uint16, only the last crop written": ("", "uint16", 1, "save_intermediate = false\n"),
    "uint16 written as float32": ("", "uint16", 1, 'output_dtype = "float32"\nbatch_size = 2\n'),
    "float32 with NaN, two channels": ('channels = ["SE2", "ESB"]\n', "float32", 2, ""),
    "uint8, ind_min/ind_max, deflated": ("ind_min = 2\nind_max = 8\n", "uint8", 1, ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crop_on_the_host_writes_what_the_device_pass_writes(tmp_path, case):
    head, dtype, channels, extra = CASES[case]
    names = ["SE2", "ESB"] if channels == 2 else ["."]
    for k, channel in enumerate(names):
        folder = tmp_path / "host" / channel
        data = write_stack(folder, n=9, dtype=dtype, seed=k, compression="zlib" if dtype == "uint8" else None)
        if dtype == "float32":
            data[4, 10, 10] = np.nan
            tifffile.imwrite(folder / "slice_0004.tif", data[4],
                             extratags=[(51023, "s", 0, "<FibicsImage><ZPos>0.0400</ZPos></FibicsImage>", True)])
    shutil.copytree(tmp_path / "host", tmp_path / "device")
    for side in ("host", "device"):
        write_params(tmp_path / side, head + extra + CROPS)
    host = prepare(load_workflow(tmp_path / "host" / "params.toml"))
    assert selects_only(host)
    run(host, device_choice=host_choice("auto"), show_progress=False, log=lambda m: None)
    _run(tmp_path / "device" / "params.toml", resolve_device("cpu"))

    out_host, out_device = tmp_path / "host" / "process", tmp_path / "device" / "process"
    files = sorted(p.relative_to(out_host) for p in out_host.rglob("*.tif"))
    assert files == sorted(p.relative_to(out_device) for p in out_device.rglob("*.tif"))
    assert len(files) == (9 if "ind_min" not in head else 7) * channels * (1 if "save_intermediate" in extra else 2)
    for rel in files:  # byte for byte: pixels, tags, compression
        assert (out_host / rel).read_bytes() == (out_device / rel).read_bytes(), rel
    tables = sorted(p.relative_to(out_host) for p in out_host.rglob("stats.npy"))
    assert tables and tables == sorted(p.relative_to(out_device) for p in out_device.rglob("stats.npy"))
    for rel in tables:
        np.testing.assert_allclose(np.load(out_host / rel), np.load(out_device / rel), rtol=1e-6, equal_nan=True)
    manifest = json.loads((out_host / "gpustack.json").read_text())
    assert manifest["runs"][-1]["device"] == "host (no device needed)"


INTENSITY = {
    "uint16, linear (defaults), batches of 3": ("uint16", "batch_size = 3\n", ""),
    "uint8, histogram mapping, two channels": ("uint8", 'channels = ["SE2", "ESB"]\n',
                                              'mapping = "histogram"\nreference = "mean"\n'),
    "uint16, no crop: a pass that only counts": ("uint16", "", ""),
}


@pytest.mark.parametrize("case", list(INTENSITY))
def test_intensity_statistics_counted_on_the_host_equal_the_device_pass(tmp_path, monkeypatch, case):
    """A crop followed by intensity_rescaling on the CPU: the crop's pass counts grey levels as it copies (host
    pass) instead of streaming through torch. Same slices, byte for byte, and same statistics."""
    from gpustack.pipeline import host_pass
    from gpustack.pipeline.spec import PassSpec

    dtype, head, table = INTENSITY[case]
    channels = ["SE2", "ESB"] if "channels" in head else ["."]
    for k, channel in enumerate(channels):
        data = write_stack(tmp_path / "host" / channel, n=8, dtype=dtype, seed=k)
        if dtype == "uint8":  # a narrower range in some slices: real maps, not identities
            for i in (2, 5):
                tifffile.imwrite(tmp_path / "host" / channel / f"slice_{i:04d}.tif", data[i] // 3 + 40)
    shutil.copytree(tmp_path / "host", tmp_path / "device")
    crop = "no crop" not in case
    steps = '["cropping", "intensity_rescaling"]' if crop else '["intensity_rescaling"]'
    text = (f"{head}process_steps = {steps}\n" + ("[cropping]\narea = [5, 35, 2, 27]\n" if crop else "")
            + "[intensity_rescaling]\nnbins = 64\n" + table)
    for side in ("host", "device"):
        write_params(tmp_path / side, text)
    counted = []
    original = host_pass.level_counts
    monkeypatch.setattr(host_pass, "level_counts", lambda x: counted.append(x.shape) or original(x))
    _run(tmp_path / "host" / "params.toml", resolve_device("cpu"))
    assert len(counted) == 8 * len(channels) and set(counted) == {(25, 30) if crop else (30, 40)}
    monkeypatch.setattr(PassSpec, "counts_levels", property(lambda self: False))
    _run(tmp_path / "device" / "params.toml", resolve_device("cpu"))
    assert len(counted) == 8 * len(channels)

    out_host, out_device = tmp_path / "host" / "process", tmp_path / "device" / "process"
    files = sorted(p.relative_to(out_host) for p in out_host.rglob("*.tif"))
    assert len(files) == (2 if crop else 1) * 8 * len(channels)
    assert files == sorted(p.relative_to(out_device) for p in out_device.rglob("*.tif"))
    for rel in files:
        assert (out_host / rel).read_bytes() == (out_device / rel).read_bytes(), rel
    before = (out_host / "cropping") if crop else tmp_path / "host"
    changed = [rel for rel in files if rel.parts[0] == "intensity_rescaling"
               and not np.array_equal(tifffile.imread(out_host / rel), tifffile.imread(before / Path(*rel.parts[1:])))]
    assert changed  # the rescaling did something
    for rel in sorted(p.relative_to(out_host) for p in out_host.rglob("stats.npy")):
        np.testing.assert_allclose(np.load(out_host / rel), np.load(out_device / rel), rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("mapping", ["histogram", "linear"])
def test_intensity_maps_integer_slices_as_their_float32_values(tmp_path, monkeypatch, mapping):
    """intensity_rescaling takes the uint16 slices it reads as they are (a table per slice, or a float copy for
    the linear map): what it writes is what the same step gives the slices converted to float32 first."""
    from gpustack.steps.intensity import IntensityRescaling

    for side in ("ints", "floats"):
        data = write_stack(tmp_path / side, n=5, shape=(270, 250))  # more pixels than uint16 has levels
        tifffile.imwrite(tmp_path / side / "slice_0002.tif", data[2] // 3 + 500)
        write_params(tmp_path / side, 'process_steps = ["intensity_rescaling"]\n'
                     f'[intensity_rescaling]\nnbins = 64\nmapping = "{mapping}"\nreference = "mean"\n')
    seen = []
    original = IntensityRescaling.apply
    monkeypatch.setattr(IntensityRescaling, "apply",
                        lambda self, batch, state: seen.append(batch.data.dtype) or original(self, batch, state))
    _run(tmp_path / "ints" / "params.toml", resolve_device("cpu"))
    assert seen and set(seen) == {torch.uint16}
    monkeypatch.setattr(IntensityRescaling, "takes_integers", False)
    _run(tmp_path / "floats" / "params.toml", resolve_device("cpu"))
    assert set(seen) == {torch.uint16, torch.float32}
    for i in range(5):
        name = f"intensity_rescaling/slice_{i:04d}.tif"
        assert (tmp_path / "ints" / "process" / name).read_bytes() == (tmp_path / "floats" / "process" /
                                                                        name).read_bytes()
    out = tifffile.imread(tmp_path / "ints" / "process" / "intensity_rescaling" / "slice_0002.tif")
    assert out.std() > 1.5 * (data[2] // 3 + 500).std()  # the narrow slice was stretched


def test_a_workflow_that_computes_is_not_run_on_the_host(tmp_path):
    write_stack(tmp_path)
    params = write_params(tmp_path, 'process_steps = ["cropping", "intensity_rescaling_area"]\n'
                          "[cropping]\narea = [5, 35, 2, 27]\n[intensity_rescaling_area]\narea = [0, 10, 0, 10]\n")
    prepared = prepare(load_workflow(params))
    assert not selects_only(prepared)
    with pytest.raises(ValueError, match="only steps that select pixels"):
        run(prepared, device_choice=host_choice("auto"), show_progress=False, log=lambda m: None)


def test_only_auto_runs_a_crop_on_the_host():
    assert host_choice(None).device is None and host_choice(" Auto ").device is None
    assert host_choice("cpu") is None and host_choice("cuda") is None and host_choice("cuda:1") is None


def test_a_crop_run_never_imports_torch(tmp_path):
    data = write_stack(tmp_path, n=5)
    params = write_params(tmp_path, CROPS)
    code = ("import sys; from gpustack.cli import main; code = main(['run', '-q', sys.argv[1]]); "
            "print(code, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(params)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["0", "False"], proc.stdout + proc.stderr
    out = tifffile.imread(tmp_path / "process" / "cropping_final" / "slice_0003.tif")
    np.testing.assert_array_equal(out, data[3][3:28, 5:35][25 - 20:25 - 3, 1:21])
    manifest = json.loads((tmp_path / "process" / "gpustack.json").read_text())
    assert manifest["runs"][-1]["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("rows", [65537, 65538])  # the last height whose column sums fit in uint32, and the next
def test_host_mean_of_full_scale_uint16_does_not_overflow(rows):
    x = np.full((2, rows, 3), 65535, np.uint16)
    x[1, 0, 0] = 0
    got = host_stats(x)
    np.testing.assert_array_equal(got[:, :2], [[65535, 65535], [0, 65535]])
    np.testing.assert_allclose(got[:, 2], [65535, 65535 - 65535 / (rows * 3)], rtol=1e-7)


def test_torch_version_is_read_without_importing_torch(monkeypatch):
    """From torch's version.py, found without running the package; where it cannot be found that way, from the
    installed package's metadata. Either way torch's own __version__."""
    import importlib.util

    from gpustack.pipeline import manifest

    monkeypatch.delitem(sys.modules, "torch")  # as in a crop-only run (put back after the test)
    assert manifest._torch_version() == torch.__version__
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert manifest._torch_version() == torch.__version__
