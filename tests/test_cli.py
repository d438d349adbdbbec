import subprocess
import sys

import numpy as np

from gpustack.cli import main
from tests.conftest import write_params, write_stack


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_help_and_validate_do_not_import_torch(tmp_path):
    assert "torch" not in _modules_after("from gpustack.cli import build_parser; build_parser().format_help()")
    write_stack(tmp_path, n=3)
    params = write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 20, 0, 10]\n')
    mods = _modules_after(f"from gpustack.cli import main; assert main(['validate', {str(params)!r}]) == 0")
    assert "torch" not in mods and "matplotlib" not in mods


def test_validate_reports_shapes(tmp_path, capsys):
    write_stack(tmp_path, n=3, shape=(30, 40))
    params = write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\narea = [0, 20, 0, 10]\n')
    assert main(["validate", str(params)]) == 0
    err = capsys.readouterr().err
    assert "3 slices of 40x30 uint16" in err and "cropping: 40x30 -> 20x10" in err and "valid" in err


def test_run_quiet_prints_nothing_and_init_writes_a_runnable_template(tmp_path, capsys):
    write_stack(tmp_path, n=2)
    assert main(["init", str(tmp_path)]) == 0
    assert main(["init", str(tmp_path)]) == 2  # never overwritten without --force
    capsys.readouterr()
    assert main(["run", str(tmp_path / "params.toml"), "--device", "cpu", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert len(list((tmp_path / "process" / "cropping").glob("*.tif"))) == 2


def test_output_dir_keeps_the_project_folder_untouched(tmp_path):
    data = write_stack(tmp_path / "raw", n=2)
    params = write_params(tmp_path / "raw", 'process_steps = ["cropping"]\n[cropping]\n')
    assert main(["run", str(params), "--device", "cpu", "-q", "--output-dir", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "raw" / "process").exists()
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "process" / "cropping" / "slice_0001.tif"),
                                  data[1])


def test_info_runs(capsys):
    assert main(["info"]) == 0
    assert "auto device:" in capsys.readouterr().out


def test_malloc_tuning_applies_on_glibc_and_leaves_user_settings(monkeypatch):
    import os
    import platform

    import pytest

    from gpustack import malloc_tuning

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert malloc_tuning.tune() is False  # the user's MALLOC_* settings win
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", "from gpustack import malloc_tuning; print(malloc_tuning.tune())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_steps_option_reads_the_previous_steps_output(tmp_path, capsys):
    """`--steps bkg_removal` after a full run recomputes the background of the cropped slices (PyStack3D's
    history rule), not of the raw input; before any run it says which step to run first."""
    import tifffile

    write_stack(tmp_path, n=3, shape=(30, 40))
    params = write_params(tmp_path, 'process_steps = ["cropping", "bkg_removal"]\n[cropping]\n'
                                    'area = [0, 20, 0, 10]\n[bkg_removal]\norders = [1, 1]\nskip_factors = [2, 2]\n')
    assert main(["run", str(params), "--steps", "bkg_removal", "-q"]) == 2
    err = capsys.readouterr().err
    assert "'cropping' comes before" in err and "run 'cropping' first" in err
    assert main(["run", str(params), "-q"]) == 0
    first = tifffile.imread(tmp_path / "process" / "bkg_removal" / "slice_0000.tif")
    assert main(["run", str(params), "--steps", "bkg_removal", "--overwrite", "-q"]) == 0
    again = tifffile.imread(tmp_path / "process" / "bkg_removal" / "slice_0000.tif")
    assert again.shape == (10, 20) and np.array_equal(again, first)


def test_steps_after_a_step_whose_slices_were_not_kept(tmp_path, capsys):
    write_stack(tmp_path, n=3, shape=(30, 40))
    params = write_params(tmp_path, 'save_intermediate = false\nprocess_steps = ["cropping", "cropping_final"]\n'
                                    '[cropping]\narea = [0, 20, 0, 10]\n[cropping_final]\narea = [0, 10, 0, 10]\n')
    assert main(["run", str(params), "-q"]) == 0
    capsys.readouterr()
    assert main(["run", str(params), "--steps", "cropping_final", "-q"]) == 2
    err = capsys.readouterr().err
    assert "'cropping'" in err and "save_intermediate = false" in err and "Traceback" not in err
