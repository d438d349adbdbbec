"""What a microscopist gets when the input or the params.toml is wrong.

Each user mistake must end with a non-zero exit status (2 for parameter, input and device mistakes), exactly one
`gpustack: error: ...` line on stderr that names the offending thing (the file, or the [table] and key), no
traceback, no output that looks complete (no `process/<step>` folder holding slices, no `process/.partial-*`
left behind), and the raw input untouched. Most cases call `gpustack.cli.main` in-process; a few run the real
`gpustack` console script to check the same at the process level.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpustack.cli import main

N_SLICES, HEIGHT, WIDTH = 5, 32, 40


# ---------------------------------------------------------------------------------------------------- helpers

def write_stack(folder: Path, n: int = N_SLICES, shape: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """`n` distinct uint16 slices `s_0000.tif`... in `folder`; returns the data."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    data = rng.integers(0, 65535, size=(n, *shape), endpoint=True).astype(np.uint16)
    for i, img in enumerate(data):
        tifffile.imwrite(folder / f"s_{i:04d}.tif", img)
    return data


def write_params(folder: Path, text: str) -> Path:
    path = folder / "params.toml"
    path.write_text(text)
    return path


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except gpustack's own process/ folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != "process"}


def error_line(stderr: str, *needles: str) -> str:
    """stderr is exactly one `gpustack: error: ...` line containing every needle, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("gpustack: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_no_complete_output(project: Path) -> None:
    """No step folder with slices and no .partial-* folder under process/ (if process/ exists at all)."""
    process = project / "process"
    if not process.exists():
        return
    for entry in process.iterdir():
        assert not entry.name.startswith(".partial-"), f"{entry} left behind"
        if entry.is_dir():
            slices = list(entry.rglob("*.tif"))
            assert not slices, f"{entry} holds {len(slices)} slices after a failed run"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`gpustack ARGV` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out
    return code, out, err


def console_script() -> str:
    script = Path(sys.executable).with_name("gpustack")
    return str(script) if script.exists() else shutil.which("gpustack") or pytest.skip("no gpustack console script")


def run_script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(), *argv], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


CROP = 'process_steps = ["cropping"]\n[cropping]\narea = [0, 20, 0, 16]\n'


# ---------------------------------------------------------------------------------------------------- input data

@pytest.mark.parametrize("command", ["run", "validate"])
def test_project_folder_missing(tmp_path, capsys, command):
    params = write_params(tmp_path, 'project_dir = "nope"\n' + CROP)
    code, _, err = cli(capsys, command, str(params))
    assert code == 2
    error_line(err, str(tmp_path / "nope"), "not found")
    assert_no_complete_output(tmp_path)
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("command", ["run", "validate"])
def test_empty_folder(tmp_path, capsys, command):
    params = write_params(tmp_path, CROP)
    code, _, err = cli(capsys, command, str(params))
    assert code == 2
    error_line(err, str(tmp_path), ".tif")
    assert_no_complete_output(tmp_path)


@pytest.mark.parametrize("command", ["run", "validate"])
def test_text_file_named_tif(tmp_path, capsys, command):
    write_stack(tmp_path)
    bad = tmp_path / "s_0002.tif"
    bad.write_bytes(b"this is not an image, just some text\n" * 20)
    params = write_params(tmp_path, CROP)
    code, _, err = cli(capsys, command, str(params))
    assert code == 2
    line = error_line(err, str(bad), "TIFF")
    assert "s_0000.tif" not in line and "s_0001.tif" not in line
    assert_no_complete_output(tmp_path)


@pytest.mark.parametrize("command", ["run", "validate"])
def test_truncated_tiff(tmp_path, capsys, command):
    write_stack(tmp_path)
    bad = tmp_path / "s_0003.tif"
    truncate_half(bad)
    params = write_params(tmp_path, CROP)
    code, _, err = cli(capsys, command, str(params))
    assert code == 2
    error_line(err, str(bad), "truncated")
    assert_no_complete_output(tmp_path)


def test_truncated_tiff_console_script(tmp_path):
    write_stack(tmp_path)
    bad = tmp_path / "s_0003.tif"
    truncate_half(bad)
    params = write_params(tmp_path, CROP)
    proc = run_script("run", str(params), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout
    error_line(proc.stderr, str(bad), "truncated")
    assert_no_complete_output(tmp_path)


@pytest.mark.parametrize("device", [[], ["--device", "cpu"]], ids=["host", "device-pass"])
def test_damaged_compressed_slice(tmp_path, capsys, device):
    """A zlib slice whose header is sound but whose compressed bytes are not: only decoding can tell (validate
    reads headers), so the run names the file when it reaches it."""
    write_stack(tmp_path)
    for path in sorted(tmp_path.glob("s_*.tif")):
        tifffile.imwrite(path, tifffile.imread(path), compression="zlib")
    bad = tmp_path / "s_0003.tif"
    with tifffile.TiffFile(bad) as tif:
        start = tif.pages[0].dataoffsets[0]
    data = bytearray(bad.read_bytes())
    data[start + 10:start + 60] = bytes(range(50))
    bad.write_bytes(bytes(data))
    params = write_params(tmp_path, CROP)
    code, _, err = cli(capsys, "run", str(params), "-q", *device)
    assert code == 2
    error_line(err, str(bad), "damaged")
    assert_no_complete_output(tmp_path)


@pytest.mark.parametrize("steps", [CROP, 'process_steps = ["bkg_removal"]\n'], ids=["host", "device-pass"])
def test_results_folder_that_cannot_be_written(tmp_path, capsys, steps):
    """output_dir where a file is (the same message as read-only raw data, which a root test user cannot make)."""
    write_stack(tmp_path)
    before = digest(tmp_path)
    (tmp_path / "taken").write_text("a file, not a folder")
    params = write_params(tmp_path, 'output_dir = "taken"\n' + steps)
    code, _, err = cli(capsys, "run", str(params), "-q")
    assert code == 2
    error_line(err, str(tmp_path / "taken" / "process"), "cannot write", "--output-dir")
    after = digest(tmp_path)
    assert after.pop("taken") and after.pop("params.toml") and after == before


@pytest.mark.parametrize("keep", [8, 100])
def test_tiff_cut_inside_its_header(tmp_path, keep):
    write_stack(tmp_path)
    bad = tmp_path / "s_0003.tif"
    bad.write_bytes(bad.read_bytes()[:keep])
    params = write_params(tmp_path, CROP)
    proc = run_script("validate", str(params), cwd=tmp_path)
    assert proc.returncode == 2
    error_line(proc.stderr, str(bad), "truncated")


@pytest.mark.parametrize("command", ["run", "validate"])
def test_slices_of_different_shapes(tmp_path, capsys, command):
    write_stack(tmp_path)
    odd = tmp_path / "s_0003.tif"
    tifffile.imwrite(odd, np.zeros((HEIGHT, WIDTH + 1), np.uint16))
    params = write_params(tmp_path, CROP)
    code, _, err = cli(capsys, command, str(params))
    assert code == 2
    error_line(err, str(odd), f"{WIDTH + 1}x{HEIGHT}", f"{WIDTH}x{HEIGHT}")
    assert_no_complete_output(tmp_path)


# ---------------------------------------------------------------------------------------------------- params.toml

def test_unknown_step_suggests_cropping(tmp_path, capsys):
    write_stack(tmp_path)
    params = write_params(tmp_path, 'process_steps = ["croping"]\n')
    code, _, err = cli(capsys, "run", str(params))
    assert code == 2
    error_line(err, str(params), "process_steps", "'croping'", "did you mean 'cropping'")
    assert_no_complete_output(tmp_path)


def test_misspelled_key_in_step_table(tmp_path, capsys):
    write_stack(tmp_path)
    params = write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\naera = [0, 20, 0, 16]\n')
    code, _, err = cli(capsys, "run", str(params))
    assert code == 2
    error_line(err, str(params), "[cropping]", "aera", "did you mean 'area'")
    assert_no_complete_output(tmp_path)


def test_misspelled_key_console_script(tmp_path):
    write_stack(tmp_path)
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\naera = [0, 20, 0, 16]\n')
    proc = run_script("run", "params.toml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout
    error_line(proc.stderr, "params.toml", "[cropping]", "aera", "'area'")
    assert_no_complete_output(tmp_path)


@pytest.mark.parametrize("area", [[0, WIDTH + 1, 0, 16], [0, 20, 0, HEIGHT + 1], [0, 999, 0, 16]])
def test_area_out_of_bounds(tmp_path, capsys, area):
    write_stack(tmp_path)
    params = write_params(tmp_path, f'process_steps = ["cropping"]\n[cropping]\narea = {area}\n')
    code, _, err = cli(capsys, "run", str(params))
    assert code == 2
    error_line(err, str(params), "[cropping]", "area", f"{WIDTH}x{HEIGHT}")
    assert_no_complete_output(tmp_path)


@pytest.mark.parametrize("edge", [9999, 99999])
def test_area_edge_sentinel_keeps_the_whole_image(tmp_path, capsys, edge):
    data = write_stack(tmp_path)
    params = write_params(tmp_path, f'process_steps = ["cropping"]\n[cropping]\narea = [0, {edge}, 0, {edge}]\n')
    code, _, err = cli(capsys, "run", "-q", "--device", "cpu", str(params))
    assert code == 0, err
    assert "error" not in err
    out = tmp_path / "process" / "cropping"
    names = sorted(p.name for p in out.glob("*.tif"))
    assert names == [f"s_{i:04d}.tif" for i in range(N_SLICES)]
    for i, name in enumerate(names):
        np.testing.assert_array_equal(tifffile.imread(out / name), data[i])
    assert not list((tmp_path / "process").glob(".partial-*"))


@pytest.mark.parametrize("channel", ["../..", "ABSOLUTE", "a/b", "..", "~"])
def test_channel_outside_the_project_is_rejected_before_reading(tmp_path, capsys, monkeypatch, channel):
    project = tmp_path / "project"
    write_stack(project)
    write_stack(project / "a" / "b")  # a naive join would find slices there, or at the absolute path
    if channel == "ABSOLUTE":
        channel = str(project / "a" / "b")
    # Nothing may be listed or read: any slice access fails the test.
    import gpustack.io.tiff as tiff
    import gpustack.pipeline.runner as runner

    def forbidden(*args, **kwargs):
        raise AssertionError("slices were accessed before the channels were checked")

    for module, name in ((tiff, "inspect_file"), (tiff, "list_slice_files"), (runner, "open_channel")):
        monkeypatch.setattr(module, name, forbidden)
    params = write_params(project, f"channels = ['{channel}']\n" + CROP)
    code, _, err = cli(capsys, "run", str(params))
    assert code == 2
    error_line(err, str(params), "channels", repr(channel))
    assert_no_complete_output(project)


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is available here, so --device cuda is valid")
def test_device_cuda_without_gpu(tmp_path, capsys):
    write_stack(tmp_path)
    params = write_params(tmp_path, CROP)
    code, _, err = cli(capsys, "run", "--device", "cuda", str(params))
    assert code == 2
    line = error_line(err, "--device cuda", "--device cpu")
    assert "no CUDA support" in line or "no CUDA device" in line or "CUDA driver" in line, line
    assert_no_complete_output(tmp_path)


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is available here, so --device cuda is valid")
def test_device_cuda_without_gpu_console_script(tmp_path):
    write_stack(tmp_path)
    params = write_params(tmp_path, CROP)
    proc = run_script("run", "--device", "cuda", str(params), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout
    error_line(proc.stderr, "--device cuda", "cpu")
    assert_no_complete_output(tmp_path)


def test_params_not_valid_toml(tmp_path, capsys):
    write_stack(tmp_path)
    params = write_params(tmp_path, 'process_steps = ["cropping"\n')
    code, _, err = cli(capsys, "run", str(params))
    assert code == 2
    error_line(err, str(params), "not valid TOML")
    assert_no_complete_output(tmp_path)


def test_params_file_does_not_exist(tmp_path, capsys):
    write_stack(tmp_path)
    missing = tmp_path / "parms.toml"
    code, _, err = cli(capsys, "run", str(missing))
    assert code == 2
    error_line(err, str(missing), "no such file")
    assert_no_complete_output(tmp_path)


def test_params_file_does_not_exist_console_script(tmp_path):
    proc = run_script("validate", "parms.toml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout
    error_line(proc.stderr, "parms.toml", "no such file")


def test_wrong_type(tmp_path, capsys):
    write_stack(tmp_path)
    params = write_params(tmp_path, 'ind_min = "a"\n' + CROP)
    code, _, err = cli(capsys, "run", str(params))
    assert code == 2
    error_line(err, str(params), "ind_min", "integer", "'a'")
    assert_no_complete_output(tmp_path)


def test_file_truncated_after_validate_is_caught_by_run(tmp_path, capsys):
    write_stack(tmp_path)
    params = write_params(tmp_path, CROP)
    code, _, err = cli(capsys, "validate", str(params))
    assert code == 0, err
    assert "valid" in err
    bad = tmp_path / "s_0001.tif"
    truncate_half(bad)
    code, _, err = cli(capsys, "run", "-q", "--device", "cpu", str(params))
    assert code == 2
    error_line(err, str(bad), "truncated")
    assert not (tmp_path / "process" / "cropping").exists()
    assert_no_complete_output(tmp_path)


def _shrink_after_validation(monkeypatch, victim: Path) -> None:
    """`run` validates, then chooses the device (none for a crop): truncate `victim` at that moment, so the read
    itself fails."""
    import gpustack.device as device

    real_resolve, real_host = device.resolve_device, device.host_choice

    def resolve_then_truncate(spec="auto"):
        truncate_half(victim)
        return real_resolve("cpu")

    def host_then_truncate(spec="auto"):
        truncate_half(victim)
        return real_host(spec)

    monkeypatch.setattr(device, "resolve_device", resolve_then_truncate)
    monkeypatch.setattr(device, "host_choice", host_then_truncate)


def test_file_truncated_during_the_run(tmp_path, capsys, monkeypatch):
    write_stack(tmp_path)
    params = write_params(tmp_path, CROP)
    bad = tmp_path / "s_0003.tif"
    before = digest(tmp_path)
    _shrink_after_validation(monkeypatch, bad)
    code, _, err = cli(capsys, "run", "-q", str(params))
    assert code == 2
    error_line(err, str(bad), "truncated")
    assert not (tmp_path / "process" / "cropping").exists()
    assert_no_complete_output(tmp_path)
    after = digest(tmp_path)  # only the file the test itself cut has changed
    assert after.pop(bad.name) != before.pop(bad.name)
    assert after == before


def test_failed_rerun_leaves_no_stale_step_and_next_run_recovers(tmp_path, capsys, monkeypatch):
    data = write_stack(tmp_path)
    params = write_params(tmp_path, CROP)
    code, _, err = cli(capsys, "run", "-q", "--device", "cpu", str(params))
    assert code == 0, err
    write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 30, 0, 16]\n')
    bad = tmp_path / "s_0003.tif"
    with monkeypatch.context() as patch:
        _shrink_after_validation(patch, bad)
        code, _, err = cli(capsys, "run", "-q", str(params))
    assert code == 2
    error_line(err, str(bad), "truncated")
    tifffile.imwrite(bad, data[3])  # the user restores the slice and runs again
    code, _, err = cli(capsys, "run", "-q", "--device", "cpu", str(params))
    assert code == 0, err
    # Either way, the output of the old parameters must not pass for the output of the new ones.
    assert tifffile.imread(tmp_path / "process" / "cropping" / "s_0000.tif").shape == (16, 30)


# ---------------------------------------------------------------------------------------------------- raw input

def test_input_and_params_never_written(tmp_path, capsys):
    write_stack(tmp_path)
    text = "# my notes: do not lose this comment\n" + CROP + "# trailing comment\n"
    params = write_params(tmp_path, text)
    raw_params = params.read_bytes()

    # A failing run that reads every header (one slice has another shape).
    odd = tmp_path / "s_0004.tif"
    tifffile.imwrite(odd, np.zeros((HEIGHT + 1, WIDTH), np.uint16))
    before_fail = digest(tmp_path)
    code, _, err = cli(capsys, "run", "-q", "--device", "cpu", str(params))
    assert code == 2
    error_line(err, str(odd))
    assert digest(tmp_path) == before_fail
    assert params.read_bytes() == raw_params
    assert_no_complete_output(tmp_path)

    # A successful run (the odd slice replaced by a good one).
    odd.unlink()
    write_stack(tmp_path)
    before = digest(tmp_path)
    code, _, err = cli(capsys, "run", "-q", "--device", "cpu", str(params))
    assert code == 0, err
    assert len(list((tmp_path / "process" / "cropping").glob("*.tif"))) == N_SLICES
    assert digest(tmp_path) == before
    assert params.read_bytes() == raw_params

    # Running again (everything up to date) and validating change nothing either.
    assert cli(capsys, "run", "-q", "--device", "cpu", str(params))[0] == 0
    assert cli(capsys, "validate", str(params))[0] == 0
    assert digest(tmp_path) == before
    assert params.read_bytes() == raw_params


def test_folder_of_multi_page_files_says_only_page_0_is_used(tmp_path):
    """Each file of a slice folder is one slice: extra full-resolution pages are named, not dropped silently;
    a reduced-resolution page (a thumbnail) is not worth a note."""
    from gpustack.io.tiff import open_channel

    for i in range(3):
        with tifffile.TiffWriter(tmp_path / f"s_{i}.tif") as tif:
            tif.write(np.full((16, 20), i, np.uint16))
            if i == 1:
                tif.write(np.full((16, 20), 99, np.uint16))
            else:
                tif.write(np.full((8, 10), 7, np.uint16), subfiletype=1)  # a reduced-resolution copy
    source, notes = open_channel(tmp_path, ".")
    assert len(source.slices) == 3 and source.shape == (16, 20)
    assert [n for n in notes if "more than one image" in n] == [
        f"{tmp_path}: 1 file(s) hold more than one image (s_1.tif); only the first page of each is used as its "
        "slice (a multi-page stack is read page by page when project_dir or the channel names the file itself)"]


def test_empty_process_steps_is_a_mistake(tmp_path, capsys):
    write_stack(tmp_path)
    params = write_params(tmp_path, "process_steps = []\n")
    code, _, err = cli(capsys, "run", str(params), "-q")
    assert code == 2
    error_line(err, str(params), "process_steps", "empty")


def test_params_with_a_byte_order_mark_are_read(tmp_path, capsys):
    """Windows Notepad saves UTF-8 with a BOM: not TOML, but plainly what the user meant."""
    write_stack(tmp_path)
    params = tmp_path / "params.toml"
    params.write_bytes(b"\xef\xbb\xbf" + CROP.encode())
    code, _, err = cli(capsys, "run", str(params), "-q")
    assert code == 0, err
    assert len(list((tmp_path / "process" / "cropping").glob("*.tif"))) == N_SLICES
    assert params.read_bytes().startswith(b"\xef\xbb\xbf")  # never rewritten


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is available here, so device = cuda is valid")
def test_device_cuda_in_params_without_gpu_names_the_file(tmp_path, capsys):
    write_stack(tmp_path)
    params = write_params(tmp_path, 'device = "cuda"\nprocess_steps = ["bkg_removal"]\n[bkg_removal]\n'
                                    'orders = [1, 1]\nskip_factors = [2, 2]\n')
    code, _, err = cli(capsys, "run", str(params), "-q")
    assert code == 2
    line = error_line(err, str(params), "device = 'cuda'", "--device cpu")
    assert "--device cuda" not in line


@pytest.mark.parametrize("steps", ['process_steps = ["cropping"]\n[cropping]\narea = [0, 8, 0, 8]\n',
                                   'process_steps = ["bkg_removal"]\n[bkg_removal]\ndim = 2\norders = [1, 1]\n'
                                   'skip_factors = [2, 2]\n'], ids=["host", "device-pass"])
def test_many_compressed_slices_under_a_low_open_file_limit(tmp_path, steps):
    """Each compressed slice is opened, decoded and closed: a folder of more slices than the process may hold
    open files (ulimit -n, often 1024) ran out of them before (Errno 24, 'Too many open files')."""
    resource = pytest.importorskip("resource")
    for i in range(300):
        tifffile.imwrite(tmp_path / f"s_{i:04d}.tif", np.full((16, 16), i, np.uint16), compression="zlib")
    params = write_params(tmp_path, steps)

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc = subprocess.run([console_script(), "run", str(params), "-q"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, preexec_fn=limit_files)
    assert proc.returncode == 0, proc.stderr[-2000:]
    step = steps.split('"')[1]
    assert len(list((tmp_path / "process" / step).glob("*.tif"))) == 300
