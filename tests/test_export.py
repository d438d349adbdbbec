"""gpustack export: one BigTIFF per channel, the exact slices, ImageJ calibration, private tags, atomic."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import write_params, write_stack
from gpustack.cli import main
from gpustack.errors import ConfigError, InputError
from gpustack.io import export as export_mod
from gpustack.io.export import export_stack, export_step
from gpustack.io.tiff import open_channel


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_round_trip_with_calibration_and_tags(tmp_path, dtype):
    data = write_stack(tmp_path / "in", n=5, dtype=dtype)
    source, _ = open_channel(tmp_path / "in", ".")
    out = export_stack(source, tmp_path / "out" / "stack.tif", pixel_size=0.005, z_spacing=0.01)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff and len(tif.pages) == 5
        assert np.array_equal(np.stack([p.asarray() for p in tif.pages]), data)
        ij = tif.imagej_metadata
        assert ij["unit"] == "micron" and ij["spacing"] == 0.01 and ij["slices"] == 5
        x_res = tif.pages[0].tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(200.0)
        assert tif.pages[0].resolution == pytest.approx((200.0, 200.0))
        # pixels per description unit: NONE, as ImageJ writes it (INCH would make Bio-Formats scale by 25400)
        assert tif.pages[0].tags["ResolutionUnit"].value == 1
        assert tif.series[0].shape == data.shape  # napari / tifffile see one Z stack, not N single pages
        for k, page in enumerate(tif.pages):
            assert f"{k * 0.01:.4f}" in page.tags[51023].value
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["stack.tif"]


def test_uncalibrated_export_says_pixel(tmp_path):
    write_stack(tmp_path / "in", n=2)
    source, _ = open_channel(tmp_path / "in", ".")
    out = export_stack(source, tmp_path / "s.tif", keep_private_tags=False, z_spacing=0.01)
    with tifffile.TiffFile(out) as tif:  # a z spacing without a pixel size would be read in pixels: left out
        assert tif.imagej_metadata["unit"] == "pixel" and "spacing" not in tif.imagej_metadata
        assert 51023 not in tif.pages[0].tags


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    write_stack(tmp_path / "in", n=5)
    source, _ = open_channel(tmp_path / "in", ".")
    real = export_mod.read_slice
    calls = []

    def broken(info, out, rows=None):
        calls.append(info)
        if len(calls) == 3:
            raise InputError(f"{info.path}: truncated")
        real(info, out, rows)

    monkeypatch.setattr(export_mod, "read_slice", broken)
    with pytest.raises(InputError, match="truncated"):
        export_stack(source, tmp_path / "out" / "s.tif")
    assert list((tmp_path / "out").iterdir()) == []
    # replacing an earlier export: a failure leaves the earlier file as it was
    monkeypatch.setattr(export_mod, "read_slice", real)
    earlier = export_stack(source, tmp_path / "out" / "s.tif", keep_private_tags=False).read_bytes()
    monkeypatch.setattr(export_mod, "read_slice", broken)
    calls.clear()
    with pytest.raises(InputError, match="truncated"):
        export_stack(source, tmp_path / "out" / "s.tif", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["s.tif"]
    assert (tmp_path / "out" / "s.tif").read_bytes() == earlier


def test_refuses_to_overwrite_or_to_write_onto_an_input(tmp_path):
    write_stack(tmp_path / "in", n=2)
    source, _ = open_channel(tmp_path / "in", ".")
    export_stack(source, tmp_path / "s.tif")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_stack(source, tmp_path / "s.tif")
    export_stack(source, tmp_path / "s.tif", overwrite=True)
    with pytest.raises(InputError, match="input files"):
        export_stack(source, source.slices[0].path, overwrite=True)


def test_export_step_per_channel_and_missing_step(tmp_path):
    data = {c: write_stack(tmp_path / "process" / "cropping" / c, n=3, seed=k) for k, c in enumerate(("SE2", "ESB"))}
    (tmp_path / "process" / "registration").mkdir()
    paths = export_step(tmp_path, "cropping", tmp_path / "exp", ["SE2", "ESB"])
    assert [p.name for p in paths] == ["cropping_SE2.tif", "cropping_ESB.tif"]
    for path, c in zip(paths, ("SE2", "ESB")):
        assert np.array_equal(tifffile.imread(path), data[c])
    with pytest.raises(InputError, match="steps there: cropping, registration"):
        export_step(tmp_path, "destriping", tmp_path / "exp", ["SE2"])


def test_export_step_finds_the_channels_and_reports_progress(tmp_path):
    for c in ("SE2", "ESB"):
        write_stack(tmp_path / c, n=3)
    write_stack(tmp_path / "process" / "cropping" / "SE2", n=2)  # an output inside the project: not a channel
    calls = []
    paths = export_step(tmp_path, None, tmp_path / "exp", None, progress=lambda *a: calls.append(a))
    assert [p.name for p in paths] == ["input_ESB.tif", "input_SE2.tif"]
    assert calls == [(1, 3), (2, 3), (3, 3)] * 2
    single = write_stack(tmp_path / "single", n=4)
    [path] = export_step(tmp_path / "single", None, tmp_path / "exp", None)
    assert path.name == "input.tif" and np.array_equal(tifffile.imread(path), single)


def test_cli_exports_the_last_step_with_resampling_spacing(tmp_path, capsys):
    zs = [0.0, 0.02, 0.04]
    for k, z in enumerate(zs):
        tifffile.imwrite(tmp_path / f"slice_{k:04d}_z={z:.4f}um.tif", np.full((8, 10), k, np.uint16))
    params = write_params(tmp_path, 'process_steps = ["cropping", "resampling"]\n[cropping]\n'
                                    '[resampling]\ndz = 0.01\n')
    assert main(["run", str(params), "-q", "--device", "cpu"]) == 0
    assert main(["export", str(params), "--pixel-size", "0.004"]) == 0
    out = tmp_path / "process" / "export" / "resampling.tif"
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == 5 and tif.imagej_metadata["spacing"] == 0.01
    assert main(["export", str(params), "--step", "input", "--out", str(tmp_path / "raw")]) == 0
    with tifffile.TiffFile(tmp_path / "raw" / "input.tif") as tif:
        assert len(tif.pages) == 3
    capsys.readouterr()
    assert main(["export", str(params), "--step", "nope"]) == 2
    assert "--step" in capsys.readouterr().err


def test_export_streams_two_slices_at_a_time(tmp_path):
    """Never the whole stack in memory: the peak of Python allocations stays at a few slices, 40 slices written."""
    import tracemalloc

    data = write_stack(tmp_path / "in", n=40, shape=(256, 256))
    source, _ = open_channel(tmp_path / "in", ".")
    one = data[0].nbytes
    tracemalloc.start()
    try:
        export_stack(source, tmp_path / "out.tif", pixel_size=0.01)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * one < data.nbytes / 6  # the stack is 40 slices
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), data)


def test_a_multipage_input_exports_without_a_double_extension(tmp_path):
    data = np.arange(6 * 4 * 5, dtype=np.uint16).reshape(6, 4, 5)
    tifffile.imwrite(tmp_path / "stack.tif", data)
    params = write_params(tmp_path, 'channels = ["stack.tif"]\nprocess_steps = ["cropping"]\n[cropping]\n')
    assert main(["run", str(params), "-q", "--device", "cpu"]) == 0
    assert main(["export", str(params)]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "process" / "export" / "cropping_stack.tif"), data)


def test_export_and_validate_take_the_runs_output_dir(tmp_path, capsys):
    data = write_stack(tmp_path / "raw", n=3)
    params = write_params(tmp_path / "raw", 'process_steps = ["cropping"]\n[cropping]\n')
    elsewhere = tmp_path / "results"
    assert main(["run", str(params), "-q", "--output-dir", str(elsewhere)]) == 0
    capsys.readouterr()
    assert main(["export", str(params)]) == 2  # not where the run wrote: the message says what to give
    assert "--output-dir" in capsys.readouterr().err
    # validate reads process/cropping for a later step: found only where the run wrote it
    two = write_params(tmp_path / "raw", 'process_steps = ["cropping", "cropping_final"]\n[cropping]\n'
                                         '[cropping_final]\n')
    assert main(["validate", str(two), "--steps", "cropping_final"]) == 2
    assert main(["validate", str(two), "--steps", "cropping_final", "--output-dir", str(elsewhere)]) == 0
    write_params(tmp_path / "raw", 'process_steps = ["cropping"]\n[cropping]\n')
    assert main(["export", str(params), "--output-dir", str(elsewhere)]) == 0
    out = elsewhere / "process" / "export" / "cropping.tif"
    np.testing.assert_array_equal(tifffile.imread(out), data)
    assert not (tmp_path / "raw" / "process").exists()


def test_exporting_a_step_without_slices_says_so(tmp_path, capsys):
    write_stack(tmp_path, n=3)
    params = write_params(tmp_path, 'process_steps = ["registration_calculation"]\n')
    assert main(["run", str(params), "-q", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["export", str(params), "--step", "registration_calculation"]) == 2
    err = capsys.readouterr().err
    assert "'registration_calculation' writes no slices" in err and "Traceback" not in err


def test_z_spacing_without_a_pixel_size_is_refused(tmp_path, capsys):
    write_stack(tmp_path, n=3)
    params = write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\n')
    assert main(["run", str(params), "-q"]) == 0
    capsys.readouterr()
    assert main(["export", str(params), "--z-spacing", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "--z-spacing" in err and "--pixel-size" in err and "Traceback" not in err
    assert not (tmp_path / "process" / "export").exists()
    assert main(["export", str(params), "--z-spacing", "0.02", "--pixel-size", "0.005"]) == 0
    with tifffile.TiffFile(tmp_path / "process" / "export" / "cropping.tif") as tif:
        assert tif.imagej_metadata["spacing"] == 0.02
