"""The runner end to end on small stacks: layout, data, tags, statistics, resume, safety, and the step contract
(statistics passes and halos) with test-only steps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from gpustack import steps as step_registry
from gpustack.config import load_workflow
from gpustack.device import resolve_device
from gpustack.errors import InputError
from gpustack.pipeline.runner import prepare, run
from gpustack.steps.base import Batch, Step
from tests.conftest import write_params, write_stack

CPU = resolve_device("cpu")


def run_params(path: Path, **kwargs):
    kwargs.setdefault("log", lambda m: None)
    return run(prepare(load_workflow(path)), device_choice=CPU, show_progress=False, **kwargs)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cropping_layout_data_tags_and_stats(tmp_path):
    data = write_stack(tmp_path, n=7, shape=(30, 40))
    params = write_params(tmp_path, 'process_steps = ["cropping", "cropping_final"]\n'
                          "[cropping]\narea = [5, 35, 2, 27]\n[cropping_final]\narea = [0, 10, 0, 99999]\n")
    before = tree_digest(tmp_path)
    run_params(params)
    step1, step2 = tmp_path / "process" / "cropping", tmp_path / "process" / "cropping_final"
    names = sorted(p.name for p in step1.glob("*.tif"))
    assert names == [f"slice_{i:04d}.tif" for i in range(7)]
    for i in range(7):
        first = tifffile.imread(step1 / names[i])
        np.testing.assert_array_equal(first, data[i][30 - 27:30 - 2, 5:35])
        np.testing.assert_array_equal(tifffile.imread(step2 / names[i]), first[:, 0:10])
        with tifffile.TiffFile(step2 / names[i]) as tif:
            assert tif.pages[0].tags[51023].value == f"<FibicsImage><ZPos>{i * 0.01:.4f}</ZPos></FibicsImage>"
            assert tif.pages[0].dtype == np.uint16
    stats = np.load(step1 / "outputs" / "stats.npy")
    assert stats.shape == (7, 3, 3)  # PyStack3D's layout: slice, {input, output, written}, {min, max, mean}
    kept = data[:, 3:28, 5:35].reshape(7, -1)
    assert np.isnan(stats[:, 0]).all()  # only the kept rows of the raw slices were read: no input statistics
    np.testing.assert_allclose(stats[:, 2], np.stack([kept.min(1), kept.max(1), kept.mean(1)], 1), rtol=1e-5)
    np.testing.assert_allclose(stats[:, 1], stats[:, 2])
    final = np.load(step2 / "outputs" / "stats.npy")  # a later crop has its input on the device: full stats
    np.testing.assert_allclose(final[:, 0], stats[:, 1])
    assert (step1 / "outputs" / "stats.png").stat().st_size > 1000
    assert "index,name,input_min" in (step1 / "outputs" / "stats.csv").read_text()
    assert "New shape: (7, 25, 30)" in (step1 / "outputs" / "log.txt").read_text()
    # The input is untouched and the parameter file byte-identical.
    after = {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("process/")}
    assert after == before


def test_channels_and_float32(tmp_path):
    a = write_stack(tmp_path / "SE2", n=4, dtype="float32", seed=1)
    b = write_stack(tmp_path / "ESB", n=4, dtype="float32", seed=2)
    params = write_params(tmp_path, 'channels = ["SE2", "ESB"]\nprocess_steps = ["cropping"]\n'
                          "[cropping]\narea = [1, 11, 0, 30]\n")
    run_params(params)
    for name, data in (("SE2", a), ("ESB", b)):
        out = tmp_path / "process" / "cropping" / name
        assert (out / "outputs" / "stats.csv").exists()
        got = np.stack([tifffile.imread(p) for p in sorted(out.glob("*.tif"))])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, data[:, :, 1:11])


def test_multipage_input(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (5, 12, 16), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", data)
    params = write_params(tmp_path, 'channels = ["stack.tif"]\nprocess_steps = ["cropping"]\n'
                          "[cropping]\narea = [0, 8, 0, 12]\n")
    run_params(params)
    out = sorted((tmp_path / "process" / "cropping" / "stack.tif").glob("*.tif"))
    assert [p.name for p in out] == [f"stack_{i:04d}.tif" for i in range(5)]
    np.testing.assert_array_equal(np.stack([tifffile.imread(p) for p in out]), data[:, :, :8])


def test_multipage_input_through_a_chain_of_steps_equals_the_same_slices_as_files(tmp_path):
    """Steps chain on a multi-page TIFF (PyStack3D runs only the first step on one): every step's output is the
    one the same slices give as a folder of files."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:40, 0:48]
    data = np.stack([2000 + 800 * np.sin((xx - k) / 5.0) * np.cos(yy / 7.0) + 30 * k * xx / 48
                     + rng.normal(0, 20, (40, 48)) for k in range(7)]).astype(np.uint16)
    steps = ["cropping", "bkg_removal", "intensity_rescaling", "registration_calculation",
             "registration_transformation", "cropping_final"]
    tables = ("[cropping]\narea = [2, 46, 2, 38]\n[bkg_removal]\norders = [1, 1]\n"
              "[registration_calculation]\ntransformation = \"TRANSLATION\"\n[cropping_final]\narea = [4, 40, 4, 32]\n")
    multi, files = tmp_path / "multi", tmp_path / "files" / "slices"
    multi.mkdir()
    tifffile.imwrite(multi / "stack.tif", data)
    files.mkdir(parents=True)
    for k, img in enumerate(data):
        tifffile.imwrite(files / f"stack_{k:04d}.tif", img)
    for root, channel in ((multi, "stack.tif"), (files.parent, "slices")):
        run_params(write_params(root, f"channels = [\"{channel}\"]\nprocess_steps = {steps!r}\n".replace("'", '"')
                                + tables))
    for step in steps:
        if step == "registration_calculation":  # a result step: its matrices, not slices
            np.testing.assert_array_equal(
                np.load(multi / "process" / step / "tmats.npy"), np.load(files.parent / "process" / step / "tmats.npy"))
            continue
        a = sorted((multi / "process" / step / "stack.tif").glob("*.tif"))
        b = sorted((files.parent / "process" / step / "slices").glob("*.tif"))
        assert [p.name for p in a] == [p.name for p in b] == [f"stack_{k:04d}.tif" for k in range(7)], step
        np.testing.assert_array_equal(np.stack([tifffile.imread(p) for p in a]),
                                      np.stack([tifffile.imread(p) for p in b]), err_msg=step)
    assert tifffile.imread(a[0]).shape == (28, 36)  # the final crop's rows and columns


def test_ind_min_ind_max_and_compression_kept(tmp_path):
    data = write_stack(tmp_path, n=8, compression="zlib")
    params = write_params(tmp_path, 'ind_min = 2\nind_max = 4\nprocess_steps = ["cropping"]\n[cropping]\n')
    run_params(params)
    out = sorted((tmp_path / "process" / "cropping").glob("*.tif"))
    assert [p.name for p in out] == ["slice_0002.tif", "slice_0003.tif", "slice_0004.tif"]
    with tifffile.TiffFile(out[0]) as tif:
        assert tif.pages[0].compression == 8  # zlib/deflate, as the input
    np.testing.assert_array_equal(tifffile.imread(out[0]), data[2])


def test_resume_skips_unchanged_and_recomputes_from_the_changed_step(tmp_path):
    write_stack(tmp_path, n=5)
    text = 'process_steps = ["cropping", "cropping_final"]\n[cropping]\narea = [0, 30, 0, 20]\n[cropping_final]\narea = [0, 10, 0, 10]\n'
    params = write_params(tmp_path, text)
    first = run_params(params)
    assert first.ran == ["cropping", "cropping_final"]
    again = run_params(params)
    assert again.ran == [] and again.skipped == ["cropping", "cropping_final"]
    stamp = (tmp_path / "process" / "cropping" / "slice_0000.tif").stat().st_mtime_ns
    write_params(tmp_path, text.replace("[0, 10, 0, 10]", "[0, 12, 0, 10]"))
    changed = run_params(params)
    assert changed.ran == ["cropping_final"]
    assert (tmp_path / "process" / "cropping" / "slice_0000.tif").stat().st_mtime_ns == stamp
    assert tifffile.imread(tmp_path / "process" / "cropping_final" / "slice_0000.tif").shape == (10, 12)
    write_params(tmp_path, text.replace("[0, 30, 0, 20]", "[0, 25, 0, 20]"))
    assert run_params(params).ran == ["cropping", "cropping_final"]  # a change invalidates later steps too
    manifest = json.loads((tmp_path / "process" / "gpustack.json").read_text())
    assert manifest["steps"]["cropping"]["params"] == {"area": [0, 25, 0, 20]}
    assert manifest["runs"][-1]["versions"]["torch"] == torch.__version__
    assert run_params(params, overwrite=True).ran == ["cropping", "cropping_final"]


def test_a_slice_missing_from_a_finished_step_recomputes_that_step(tmp_path):
    """A slice deleted (or moved) from a step folder by hand: the step is no longer done, whichever step reads it."""
    write_stack(tmp_path, n=5)
    text = ('process_steps = ["cropping", "cropping_final"]\n[cropping]\narea = [0, 30, 0, 20]\n'
            '[cropping_final]\narea = [0, 10, 0, 10]\n')
    params = write_params(tmp_path, text)
    run_params(params)
    (tmp_path / "process" / "cropping" / "slice_0003.tif").unlink()
    write_params(tmp_path, text.replace("[0, 10, 0, 10]", "[0, 12, 0, 10]"))
    logs: list[str] = []
    summary = run_params(params, log=logs.append)
    assert summary.ran == ["cropping", "cropping_final"]
    assert any("cropping: 1 of its slices are missing" in line and "slice_0003.tif" in line for line in logs)
    for step in ("cropping", "cropping_final"):
        assert len(list((tmp_path / "process" / step).glob("*.tif"))) == 5
    (tmp_path / "process" / "cropping_final" / "slice_0000.tif").unlink()  # the last step: not "up to date"
    assert run_params(params).ran == ["cropping_final"]
    assert (tmp_path / "process" / "cropping_final" / "slice_0000.tif").is_file()


def test_channels_with_their_own_file_names_resume_and_recompute(tmp_path):
    """Each channel's folder holds that channel's own names (SE2_0000.tif, ESB_0000.tif)."""
    for channel in ("SE2", "ESB"):
        write_stack(tmp_path / channel, n=4, prefix=f"{channel}_")
    text = ('channels = ["SE2", "ESB"]\nprocess_steps = ["cropping", "cropping_final"]\n[cropping]\n'
            'area = [0, 30, 0, 20]\n[cropping_final]\narea = [0, 10, 0, 10]\n')
    params = write_params(tmp_path, text)
    assert run_params(params).ran == ["cropping", "cropping_final"]
    assert run_params(params).ran == []  # nothing missing: every channel under its own names
    (tmp_path / "process" / "cropping" / "ESB" / "ESB_0002.tif").unlink()
    logs: list[str] = []
    assert run_params(params, log=logs.append).ran == ["cropping", "cropping_final"]
    assert any("missing" in line and "ESB/ESB_0002.tif" in line for line in logs)
    assert (tmp_path / "process" / "cropping" / "ESB" / "ESB_0002.tif").is_file()


def test_a_second_run_in_the_same_results_folder_is_refused(tmp_path):
    """Two runs at once would rename and remove each other's partial folders (seen: a FileNotFoundError
    traceback in the second one); the second is told, in one line, before it touches anything."""
    from gpustack.pipeline.runner import LOCK_NAME, _exclusive

    write_stack(tmp_path, n=3)
    params = write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\n')
    with _exclusive(tmp_path / "process"):  # another run holding the folder (a lock of another open file)
        assert (tmp_path / "process" / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(InputError, match=f"another gpustack run \\(pid {os.getpid()}\\) is working in"):
            run_params(params)
        assert not (tmp_path / "process" / "cropping").exists()
    assert run_params(params).ran == ["cropping"]
    assert not (tmp_path / "process" / LOCK_NAME).exists()  # removed after each run


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch):
    """flock fails with ENOLCK on some network file systems: that is no other run, and no reason to refuse."""
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    write_stack(tmp_path, n=3)
    params = write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\n')
    assert run_params(params).ran == ["cropping"]


def test_refuses_to_replace_outputs_it_did_not_write(tmp_path):
    write_stack(tmp_path, n=3)
    params = write_params(tmp_path, 'process_steps = ["cropping"]\n[cropping]\n')
    (tmp_path / "process" / "cropping").mkdir(parents=True)
    (tmp_path / "process" / "cropping" / "mine.tif").write_bytes(b"precious")
    with pytest.raises(InputError, match="no record of it"):
        run_params(params)
    assert (tmp_path / "process" / "cropping" / "mine.tif").read_bytes() == b"precious"
    run_params(params, overwrite=True)
    assert not (tmp_path / "process" / "cropping" / "mine.tif").exists()


def test_failure_mid_run_leaves_no_step_folder(tmp_path, monkeypatch):
    write_stack(tmp_path, n=6)
    params = write_params(tmp_path, 'process_steps = ["cropping"]\nbatch_size = 2\n[cropping]\n')
    prepared = prepare(load_workflow(params))
    from gpustack.pipeline import stream

    real = stream.read_slice

    def failing(info, out, rows=None):
        if info.name == "slice_0004.tif":
            raise InputError(f"{info.path}: cannot read the slice (disk error)")
        real(info, out, rows)

    monkeypatch.setattr(stream, "read_slice", failing)
    with pytest.raises(InputError, match="slice_0004"):
        run(prepared, device_choice=CPU, show_progress=False, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "process").iterdir()) == ["gpustack.json"]


def test_a_pass_reads_the_previous_step_before_its_reports_and_commit(tmp_path, monkeypatch):
    """Pass 2 (intensity_rescaling) reads cropping's slices from its partial folder instead of waiting for its
    plots and commit; cropping is committed after pass 2, so a failure there leaves no step folder."""
    write_stack(tmp_path, n=6)
    params = write_params(tmp_path, 'process_steps = ["cropping", "intensity_rescaling"]\nbatch_size = 2\n'
                          "[cropping]\narea = [0, 30, 0, 20]\n")
    from gpustack.pipeline import stream

    real, folders = stream.read_slice, set()

    def recording(info, out, rows=None):
        folders.add(info.path.parent.name)
        real(info, out, rows)

    monkeypatch.setattr(stream, "read_slice", recording)
    assert run_params(params).ran == ["cropping", "intensity_rescaling"]
    assert ".partial-cropping" in folders and "cropping" not in folders
    process = tmp_path / "process"
    assert sorted(p.name for p in process.iterdir()) == ["cropping", "gpustack.json", "intensity_rescaling"]
    assert (process / "cropping" / "outputs" / "stats.png").exists()
    manifest = json.loads((process / "gpustack.json").read_text())
    assert manifest["steps"]["cropping"]["status"] == "complete"

    def failing(info, out, rows=None):
        if info.path.parent.name == ".partial-cropping" and info.name == "slice_0004.tif":
            raise InputError(f"{info.path}: cannot read the slice (disk error)")
        real(info, out, rows)

    monkeypatch.setattr(stream, "read_slice", failing)
    shutil.rmtree(process)
    with pytest.raises(InputError, match="slice_0004"):
        run_params(params)
    assert sorted(p.name for p in process.iterdir()) == ["gpustack.json"]


def test_history_starts_from_the_last_done_step(tmp_path):
    data = write_stack(tmp_path, n=4)
    params = write_params(tmp_path, 'process_steps = ["cropping", "cropping_final"]\n'
                          "[cropping]\narea = [0, 20, 0, 30]\n[cropping_final]\narea = [0, 10, 0, 30]\n")
    run_params(params)
    # A PyStack3D user who ran cropping elsewhere lists it in history: gpustack reads process/cropping.
    params.write_text('history = ["cropping"]\n' + params.read_text())
    summary = run_params(params, overwrite=True)
    assert summary.ran == ["cropping_final"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "process" / "cropping_final" / "slice_0001.tif"),
                                  data[1][:, :10])


# --- the step contract: statistics passes and halos, with steps that exist only in this test ---------------------

@dataclass(frozen=True)
class _NoConfig:
    pass


class ZMean3(Step):
    """out[k] = mean of slices k-1, k, k+1 (edges repeated): needs one slice of halo on each side."""

    name = "destriping"
    Config = _NoConfig
    halo = (1, 1)

    def apply(self, batch: Batch, state):
        x = batch.data
        lo = torch.cat([x[:1], x[:-1]])  # window edges repeat; the runner trims them away
        hi = torch.cat([x[1:], x[-1:]])
        return (lo + x + hi) / 3


class SubtractGlobalMean(Step):
    """A statistics pass: the mean over the whole stack (map: per-batch sums; reduce: total), then subtracted."""

    name = "bkg_removal"
    Config = _NoConfig

    def fit_batch(self, batch: Batch):
        core = batch.data[batch.core]
        return core.sum(dtype=torch.float64), core.numel()

    def fit_reduce(self, partials):
        return float(sum(p[0] for p in partials) / sum(p[1] for p in partials))

    def apply(self, batch: Batch, state):
        return batch.data - state + 1000.0


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_fit_and_halo_steps_give_the_same_answer_for_any_batch_size(tmp_path, monkeypatch, batch_size):
    monkeypatch.setitem(step_registry.REGISTRY, "destriping", ZMean3)
    monkeypatch.setitem(step_registry.REGISTRY, "bkg_removal", SubtractGlobalMean)
    data = write_stack(tmp_path, n=7, shape=(6, 5), dtype="float32")
    params = write_params(tmp_path, f'batch_size = {batch_size}\nsave_intermediate = false\n'
                          'process_steps = ["cropping", "bkg_removal", "destriping", "cropping_final"]\n'
                          "[cropping]\narea = [1, 5, 0, 6]\n")
    summary = run_params(params)
    assert summary.ran == ["cropping", "bkg_removal", "destriping", "cropping_final"]
    x = data[:, :, 1:5].astype(np.float64)
    x = x - x.mean() + 1000.0
    padded = np.concatenate([x[:1], x, x[-1:]])
    want = (padded[:-2] + padded[1:-1] + padded[2:]) / 3
    got = np.stack([tifffile.imread(p) for p in sorted((tmp_path / "process" / "cropping_final").glob("*.tif"))])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # save_intermediate = false: only the step a later pass reads (cropping) and the last one keep their slices
    with_slices = sorted(p.name for p in (tmp_path / "process").iterdir() if any(p.glob("*.tif")))
    assert with_slices == ["cropping", "cropping_final"]
    manifest = json.loads((tmp_path / "process" / "gpustack.json").read_text())
    assert manifest["steps"]["bkg_removal"]["pass_number"] == 2  # its statistics pass ran on cropping's output


class Darken(Step):
    """Takes 40000 grey levels off: much of a uint16 stack goes below 0, which is written (and read back) as 0.
    With `holes`, a few pixels become NaN (as a warp's 'constant' fill does), written as 0."""

    name = "bkg_removal"
    Config = _NoConfig
    holes = False

    @property
    def may_make_nan(self):
        return self.holes

    def apply(self, batch: Batch, state):
        out = batch.data - 39999.7
        if self.holes:
            out[:, :2, :3] = float("nan")
        return out


class SumOfItsInput(Step):
    """A statistics pass that records what it is given, batch by batch (halo rows included), and a copy of its
    input as output."""

    name = "intensity_rescaling"
    Config = _NoConfig
    seen: list = []

    def fit_batch(self, batch: Batch):
        x = batch.data
        return batch.start, x.shape[0], x.nansum(dtype=torch.float64), x.isnan().sum(), x.nan_to_num(1e9).amin()

    def fit_reduce(self, partials):
        self.seen.extend(partials)
        return None

    def apply(self, batch: Batch, state):
        return batch.data


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("fit_halo", [(0, 0), (1, 0)])  # (1, 0): registration's, the fit gets the slice before
@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_statistics_pass_sees_the_slices_its_step_will_read(tmp_path, monkeypatch, batch_size, fit_halo, holes):
    """The fitted step reads the previous step's written slices (rounded, clipped to uint16): its statistics are
    taken on exactly those, halo rows included, not on the float values before they were written (a slice taken
    below 0 by a background would be measured as a ramp and read back as 0s). NaN pixels stay NaN for the
    statistics, which leave them out, rather than the 0 they are written as."""
    monkeypatch.setitem(step_registry.REGISTRY, "bkg_removal", Darken)
    monkeypatch.setitem(step_registry.REGISTRY, "intensity_rescaling", SumOfItsInput)
    monkeypatch.setattr(Darken, "holes", holes)
    monkeypatch.setattr(SumOfItsInput, "seen", [])
    monkeypatch.setattr(SumOfItsInput, "fit_halo", fit_halo)
    write_stack(tmp_path, n=5, shape=(8, 9), dtype="uint16")
    params = write_params(tmp_path, f'batch_size = {batch_size}\n'
                          'process_steps = ["bkg_removal", "intensity_rescaling"]\n')
    run_params(params)
    written = np.stack([tifffile.imread(p) for p in sorted((tmp_path / "process" / "bkg_removal").glob("*.tif"))])
    assert (written == 0).mean() > 0.4  # the case at hand: many pixels clipped
    seen = SumOfItsInput.seen
    assert sum(n for _, n, *_ in seen) > 5 if fit_halo != (0, 0) else sum(n for _, n, *_ in seen) == 5
    for start, n, total, nans, lowest in seen:
        rows = written[start:start + n].astype(np.float64)
        if holes:
            assert int(nans) == 6 * n and (rows[:, :2, :3] == 0).all()
            rows[:, :2, :3] = 0.0  # NaN there: left out of the sum
        else:
            assert int(nans) == 0
        assert float(total) == rows.sum()
        assert float(lowest) == 0.0


def test_statistics_of_written_integers_follow_from_the_output(device):
    """min and max of what is written are derived from the output's (rounding and clipping are monotonic):
    they must equal the statistics computed on the written values, clipping at both ends included."""
    import torch

    from gpustack.kernels.cast import to_storage
    from gpustack.kernels.stats import slice_stats
    from gpustack.pipeline.stream import _stored_stats

    g = torch.Generator().manual_seed(3)
    out = (torch.randn(4, 33, 47, generator=g) * 30000 + 30000).to(device)  # below 0 and above 65535 too
    out[1] = 1234.5  # a constant slice, exactly halfway: rounds to even
    stored = to_storage(out, torch.uint16, nan_possible=False)
    derived = _stored_stats(stored, slice_stats(out, nan_aware=False), torch.uint16, nan_possible=False)
    direct = slice_stats(stored, nan_aware=False)
    assert torch.equal(derived[:, :2], direct[:, :2])
    torch.testing.assert_close(derived[:, 2], direct[:, 2])
    assert derived[1, 0].item() == 1234.0 and derived[0, 0].item() == 0.0 and derived[0, 1].item() == 65535.0


def test_a_pass_takes_its_input_statistics_from_the_step_that_wrote_its_slices(tmp_path):
    """intensity_rescaling needs a statistics pass, so it reads cropping's written slices in a second pass: their
    statistics are the ones cropping measured as it wrote them (in this run, or read back from its stats.npy
    in a later one), not a second pass over the slices; and they are the slices' true statistics."""
    from gpustack.io.tiff import open_channel
    from gpustack.pipeline.runner import _written_stats

    write_stack(tmp_path, n=6, shape=(30, 40))
    text = ('process_steps = ["cropping", "intensity_rescaling"]\n[cropping]\narea = [5, 35, 2, 27]\n'
            "[intensity_rescaling]\nnbins = {}\n")
    run_params(write_params(tmp_path, text.format(64)))
    process = tmp_path / "process"
    written = np.load(process / "cropping" / "outputs" / "stats.npy")[:, 2]
    cropped = np.stack([tifffile.imread(p) for p in sorted((process / "cropping").glob("*.tif"))]).reshape(6, -1)
    truth = np.stack([cropped.min(1), cropped.max(1), cropped.mean(1)], 1)
    np.testing.assert_allclose(written, truth, rtol=1e-6)
    np.testing.assert_array_equal(np.load(process / "intensity_rescaling" / "outputs" / "stats.npy")[:, 0], written)

    run_params(write_params(tmp_path, text.format(32)))  # cropping up to date: its folder is read back
    np.testing.assert_array_equal(np.load(process / "intensity_rescaling" / "outputs" / "stats.npy")[:, 0], written)
    source, _ = open_channel(process / "cropping", ".")
    np.testing.assert_array_equal(_written_stats({}, 0, ".", source, process / "cropping"), written)
    (process / "cropping" / "slice_0005.tif").rename(process / "cropping" / "slice_0009.tif")
    renamed, _ = open_channel(process / "cropping", ".")
    assert _written_stats({}, 0, ".", renamed, process / "cropping") is None  # not those slices: measured again
    (process / "cropping" / "slice_0009.tif").rename(process / "cropping" / "slice_0005.tif")
    history = text.format(16).replace('["cropping", "intensity_rescaling"]', '["intensity_rescaling"]\nhistory = '
                                      '["cropping"]')
    table = np.load(process / "cropping" / "outputs" / "stats.npy")
    table[:, 2] = -1.0  # what cropping's file says is what the next run takes, without reading the slices for it
    np.save(process / "cropping" / "outputs" / "stats.npy", table)
    run_params(write_params(tmp_path, history), overwrite=True)  # PyStack3D's history: the input is cropping's
    assert (np.load(process / "intensity_rescaling" / "outputs" / "stats.npy")[:, 0] == -1.0).all()


def test_reports_run_no_parallel_torch_kernel_on_the_reporter_thread(tmp_path, monkeypatch):
    """A torch kernel large enough to run in parallel, on the reporter thread, left that thread's OpenMP
    workers competing with every later pass for as long as the thread lived (measured: VSNR iterations 2.4x
    slower). Every report of a workflow runs here under a dispatch mode that records such kernels: none."""
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    import gpustack.pipeline.runner as runner_module

    big: list[str] = []

    class RecordBig(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.numel() >= 32768 for t in tree_flatten(out)[0]):
                big.append(str(func))
            return out

    class Watched(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            def watched(*a, **k):
                with RecordBig():
                    return fn(*a, **k)
            return super().submit(watched, *args, **kwargs)

    monkeypatch.setattr(runner_module, "ThreadPoolExecutor", Watched)
    write_stack(tmp_path, n=12, shape=(64, 64))
    params = write_params(tmp_path, (
        'process_steps = ["cropping", "bkg_removal", "intensity_rescaling", "registration_calculation", '
        '"registration_transformation", "destriping"]\n[cropping]\narea = [0, 64, 0, 64]\n'
        "[bkg_removal]\ndim = 3\norders = [1, 1, 1]\nskip_factors = [4, 4, 2]\n"
        "[intensity_rescaling]\nnbins = 64\n[registration_calculation]\ntransformation = \"TRANSLATION\"\n"
        '[destriping]\nmaxit = 3\nfilters = [{ name = "Gabor", noise_level = 20, sigma = [0.5, 30], theta = 0 }]\n'))
    run_params(params)
    assert (tmp_path / "process" / "bkg_removal" / "outputs" / "bkgs" / "slice_0000.png").exists()
    assert big == []
