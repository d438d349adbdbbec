"""`gpustack bench`: the workflow benchmark runs end to end on a tiny stack and reports both tools."""

from __future__ import annotations

import json

import pytest

from gpustack.cli import main


def test_bench_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--slices" in capsys.readouterr().out


@pytest.mark.reference
def test_bench_runs_both_tools_on_a_tiny_stack(tmp_path, capsys):
    pytest.importorskip("pystack3d")
    assert main(["bench", "--slices", "12", "--size", "96", "--nproc", "1", "--destriping", "vsnr",
                 "--device", "cpu", "--sample", "4", "--root", str(tmp_path), "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "end to end, seconds" in out and "Projection, not a measurement" in out
    results = json.loads((tmp_path / "results.json").read_text())["vsnr"]
    finals = {tool: results[tool]["accuracy"]["cropping_final"] for tool in ("gpustack", "pystack3d")}
    # slices 9 and 11 are deleted: z runs 0 .. 0.10, every 0.01
    assert finals["gpustack"]["slices"] == 11  # the last plane kept
    assert finals["pystack3d"]["slices"] == 10  # PyStack3D's arange drops it
    assert all(10 < f["psnr"] < 60 for f in finals.values())
    assert set(results["pystack3d"]["steps"]) >= {"cropping", "destriping", "resampling", "cropping_final"}
