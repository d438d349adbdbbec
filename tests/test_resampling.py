"""resampling: the plan (input z from names, metadata or a list; output grid with its last plane), the
interpolation against a direct computation, errors before any slice is read, and a multi-channel workflow."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import write_params, write_stack
from gpustack.config import load_workflow
from gpustack.errors import ConfigError, GpustackError
from gpustack.pipeline.runner import prepare, run
from gpustack.synthetic import SyntheticSpec, generate
from test_runner import CPU


def _run(path, **kw):
    return run(prepare(load_workflow(path)), device_choice=CPU, show_progress=False, log=lambda m: None, **kw)


def _named_stack(folder, zs, shape=(12, 16), seed=0, dtype="uint16"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = rng.integers(0, 60000, size=(len(zs), *shape)).astype(dtype)
    for k, (z, img) in enumerate(zip(zs, data)):
        tifffile.imwrite(folder / f"slice_{k:04d}_z={z:.4f}um.tif", img,
                         extratags=[(51023, "s", 0, f"<FibicsImage><ZPos>{z:.4f}</ZPos></FibicsImage>", True)])
    return data


def test_uniform_grid_keeps_the_last_plane_and_interpolates_linearly(tmp_path):
    zs = [0.0, 0.01, 0.02, 0.04, 0.05, 0.07]  # two slices missing
    data = _named_stack(tmp_path, zs).astype(np.float64)
    _run(write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\ndz = 0.01\n'))
    out_dir = tmp_path / "process" / "resampling"
    files = sorted(out_dir.glob("*.tif"))
    assert [f.name for f in files] == [f"slice_{j:04d}_z={0.01 * j:.4f}um.tif" for j in range(8)]
    planes = np.stack([tifffile.imread(f) for f in files])
    expected = np.stack([[np.interp(0.01 * j, zs, data[:, r, c]) for c in range(16) for r in range(12)]
                         for j in range(8)]).reshape(8, 16, 12).transpose(0, 2, 1)
    assert np.abs(planes - np.rint(expected)).max() <= 1  # float32 interpolation: a half level may round up
    for j, k in ((0, 0), (2, 2), (4, 3), (7, 5)):  # planes on an input slice are that slice, exactly
        assert np.array_equal(planes[j], data[k])
    np.testing.assert_allclose(np.load(out_dir / "outputs" / "zpos_out.npy"), 0.01 * np.arange(8), atol=1e-12)
    for name in ("zpos_in.npy", "z_positions.png", "z_increments.png", "log.txt", "stats.csv"):
        assert (out_dir / "outputs" / name).exists()
    with tifffile.TiffFile(files[3]) as tif:
        assert "0.0400" in tif.pages[0].tags[51023].value  # the tags of the slice above the plane (PyStack3D's)


def test_zpos_out_as_a_toml_list(tmp_path):
    zs = [0.0, 0.01, 0.02, 0.03]
    data = _named_stack(tmp_path, zs)
    _run(write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\nzpos_out = [0.005, 0.03]\n'))
    files = sorted((tmp_path / "process" / "resampling").glob("*.tif"))
    assert len(files) == 2
    mid = np.rint((data[0].astype(float) + data[1]) / 2)
    assert np.array_equal(tifffile.imread(files[0]), mid.astype(np.uint16))
    assert np.array_equal(tifffile.imread(files[1]), data[3])


def test_z_from_fibics_metadata_when_the_names_carry_none(tmp_path):
    data = write_stack(tmp_path, n=5)  # slice_0000.tif ..., ZPos = k * 0.01 in tag 51023
    prepared = prepare(load_workflow(write_params(tmp_path, 'process_steps = ["resampling"]\n'
                                                            '[resampling]\ndz = 0.005\n')))
    plan = prepared.plans[0]
    assert plan.source == "Fibics metadata (ZPos)"
    assert any("do not match policy" in note for note in plan.notes)  # the user is told why
    assert len(plan.z_out) == 9
    _run(prepared.workflow.params_file)
    files = sorted((tmp_path / "process" / "resampling").glob("*.tif"))
    assert np.array_equal(tifffile.imread(files[4]), data[2])


@pytest.mark.parametrize("zs, message", [
    ([0.0, 0.01, 0.01, 0.03], "the same z as"),
    ([0.0, 0.02, 0.01, 0.03], "a lower z than"),
])
def test_non_increasing_z_is_an_error_naming_the_slices(tmp_path, zs, message):
    _named_stack(tmp_path, zs)
    with pytest.raises(ConfigError, match=message) as err:
        prepare(load_workflow(write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\ndz = 0.01\n')))
    assert "slice_0002" in str(err.value) and err.value.key == "policy"


@pytest.mark.parametrize("table, key", [
    ("dz = 0.01\nzpos_out = [0.0]", "dz"),
    ("policy = \"slice_{slice_nb}.tif\"\ndz = 0.01", "policy"),
    ("policy = \"{z}.tif\"\ndz = 0.01", "policy"),
    ("dz = -1", "dz"),
    ("", "dz"),
    ("zpos_out = [0.02, 0.01]", "zpos_out"),
    ("dz = 0.01\nz_source = \"list\"", "zpos_in"),
])
def test_bad_parameters(tmp_path, table, key):
    _named_stack(tmp_path, [0.0, 0.01])
    with pytest.raises(ConfigError) as err:
        load_workflow(write_params(tmp_path, f'process_steps = ["resampling"]\n[resampling]\n{table}\n'))
    assert err.value.key == key


def test_zpos_out_outside_the_stack_is_an_error_before_any_slice_is_read(tmp_path, capsys):
    _named_stack(tmp_path, [0.0, 0.01, 0.02, 0.03])
    params = write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\nzpos_out = [-0.1, 0.005, 0.5]\n')
    with pytest.raises(ConfigError, match=r"2 value\(s\) outside the stack's z range \[0, 0.03\].*-0.1, 0.5") as err:
        prepare(load_workflow(params))
    assert err.value.key == "zpos_out"
    from gpustack.cli import main
    assert main(["run", str(params), "-q", "--device", "cpu"]) == 2
    assert "zpos_out" in capsys.readouterr().err and not (tmp_path / "process" / "resampling").exists()


def test_policy_error_names_the_first_file_that_does_not_match(tmp_path):
    folder = tmp_path
    for name in ("slice_0000_z=0.0000um.tif", "slice_0001_z=0.0100um.tif", "slice_0002_zz=0.02um.tif"):
        tifffile.imwrite(folder / name, np.zeros((4, 4), np.uint16))
    params = 'process_steps = ["resampling"]\n[resampling]\ndz = 0.01\n'
    with pytest.raises(ConfigError, match=r"'slice_0002_zz=0.02um.tif' does not match") as err:
        prepare(load_workflow(write_params(tmp_path, params)))
    assert "'slice_0000_z=0.0000um.tif' does not match" not in str(err.value) and err.value.key == "policy"
    with pytest.raises(ConfigError, match=r"1 file name\(s\) do not match .* 'slice_0002_zz=0.02um.tif'"):
        prepare(load_workflow(write_params(tmp_path, params + 'z_source = "names"\n')))


def test_resample_z_numpy_in_numpy_out_and_no_extrapolation():
    from gpustack.api import resample_z

    stack = np.stack([np.full((3, 4), v, np.uint16) for v in (0, 10, 40)])
    planes, z_out = resample_z(stack, [0.0, 1.0, 2.0], dz=0.5)
    assert isinstance(planes, np.ndarray) and isinstance(z_out, np.ndarray) and planes.dtype == np.float32
    np.testing.assert_allclose(planes[:, 0, 0], [0, 5, 10, 25, 40])
    np.testing.assert_allclose(z_out, [0, 0.5, 1, 1.5, 2])
    with pytest.raises(ValueError, match="outside the stack's z range"):
        resample_z(stack, [0.0, 1.0, 2.0], [0.5, 2.5])


def test_names_that_do_not_match_and_no_metadata(tmp_path):
    write_stack(tmp_path, n=3, tags=False)
    with pytest.raises(ConfigError, match="cannot be read"):
        prepare(load_workflow(write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\ndz = 0.01\n')))


def test_resample_z_api_matches_numpy(device):
    import torch

    from gpustack.api import resample_z

    rng = np.random.default_rng(1)
    stack = rng.normal(size=(5, 4, 6)).astype(np.float32)
    z_in = [0.0, 0.1, 0.3, 0.35, 0.6]
    planes, z_out = resample_z(torch.as_tensor(stack, device=device), z_in, dz=0.05)
    assert z_out.tolist() == pytest.approx([0.05 * k for k in range(13)])
    ref = np.stack([np.apply_along_axis(lambda v: np.interp(z, z_in, v), 0, stack) for z in z_out.tolist()])
    np.testing.assert_allclose(planes.cpu().numpy(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="increase"):
        resample_z(stack, [0.0, 0.1, 0.1, 0.2, 0.3], dz=0.1)


def test_two_channels_through_registration_destriping_and_resampling(tmp_path):
    spec = SyntheticSpec(n_slices=12, height=64, width=64, channels=("SE2", "ESB"), dtype="uint16",
                         shift_range=(0.3, 0.6), max_shift=3.0)
    generate(tmp_path, spec)
    params = write_params(tmp_path, '''channels = ["SE2", "ESB"]
process_steps = ["registration_calculation", "registration_transformation", "destriping", "resampling"]
[registration_calculation]
[registration_transformation]
mode = "edge"
[destriping]
maxit = 5
filters = [{ name = "Gabor", noise_level = 20, sigma = [0.5, 80], theta = 0 }]
[resampling]
dz = 0.005
''')
    _run(params)
    process = tmp_path / "process"
    assert (process / "registration_calculation" / "tmats.npy").exists()  # once, from SE2
    counts = {c: len(list((process / "resampling" / c).glob("*.tif"))) for c in ("SE2", "ESB")}
    n_out = len(np.load(process / "resampling" / "SE2" / "outputs" / "zpos_out.npy"))
    assert counts == {"SE2": n_out, "ESB": n_out} and n_out > 12
    for c in ("SE2", "ESB"):
        assert (process / "destriping" / c / "outputs" / "stripes.csv").exists()
        assert len(list((process / "registration_transformation" / c).glob("*.tif"))) == 10
    # the transforms estimated on SE2 moved the same slices of both channels, the shifted ones among them
    tmats = np.load(process / "registration_calculation" / "tmats.npy").reshape(-1, 3, 3)
    shifted = np.abs(np.cumsum(tmats[:, :2, 2], axis=0)).max(axis=1) > 1
    changed = {}
    for c in ("SE2", "ESB"):
        raw = sorted((tmp_path / c).glob("*.tif"))
        moved = sorted((process / "registration_transformation" / c).glob("*.tif"))
        changed[c] = np.array([not np.array_equal(tifffile.imread(a), tifffile.imread(b))
                               for a, b in zip(raw, moved)])
    assert shifted.any() and np.array_equal(changed["SE2"], changed["ESB"])
    assert changed["SE2"][shifted].all()


@pytest.mark.parametrize("n_esb, shape_esb", [(3, (30, 40)), (4, (30, 41))])
def test_channels_of_different_counts_or_shapes_are_refused(tmp_path, capsys, n_esb, shape_esb):
    write_stack(tmp_path / "SE2", n=4)
    write_stack(tmp_path / "ESB", n=n_esb, shape=shape_esb)
    params = write_params(tmp_path, 'channels = ["SE2", "ESB"]\nprocess_steps = ["cropping"]\n[cropping]\n')
    with pytest.raises(GpustackError, match="same number and size"):
        prepare(load_workflow(params))
    from gpustack.cli import main
    assert main(["run", str(params), "-q", "--device", "cpu"]) == 2
    assert "ESB" in capsys.readouterr().err and not (tmp_path / "process" / "cropping").exists()


def test_each_input_slice_is_read_once(tmp_path, monkeypatch):
    """Streaming: the resampling pass reads every input slice exactly once, whatever the planes that use it."""
    from gpustack.pipeline import reindex

    zs = [0.0, 0.01, 0.02, 0.04, 0.05, 0.07, 0.08, 0.1]
    _named_stack(tmp_path, zs)
    reads: list[int] = []
    original = reindex._read
    monkeypatch.setattr(reindex, "_read", lambda source, k: (reads.append(k), original(source, k))[1])
    _run(write_params(tmp_path, 'process_steps = ["resampling"]\n[resampling]\ndz = 0.005\n'))
    assert sorted(reads) == list(range(len(zs)))
    assert len(list((tmp_path / "process" / "resampling").glob("*.tif"))) == 21
