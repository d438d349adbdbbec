"""Plan a workflow into passes and run them, with resume, atomic step folders and the manifest.

A pass reads one materialised stack (the raw input or an earlier step's output), applies a run of consecutive
steps to each batch while it is on the device, and feeds the result to the statistics (`fit`) of the next step
that needs one. That step starts the next pass, which reads the output of the last written step. So each
step's `apply` runs once, and the stack is read once per statistics step, not once per step (PyStack3D).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpustack.config import Workflow
from gpustack.errors import ConfigError, InputError
from gpustack.io.tiff import StackSource, open_channel
from gpustack.steps import REGISTRY, Step
from gpustack.steps.base import ParamError, Report

if TYPE_CHECKING:
    from gpustack.pipeline.spec import StepRun


@dataclass
class Prepared:
    """A workflow checked against its input, before any slice is read."""

    workflow: Workflow
    sources: dict[str, StackSource]  # per channel: the stack the first step reads
    input_label: str  # "input" or the process/<step> folder a PyStack3D history points to
    steps: list[Step]
    shapes: list[tuple[int, int]]  # slice shape before each step, then after the last
    notes: list[str] = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)  # slice names before each step, then after the last
    plans: dict[int, Any] = field(default_factory=dict)  # step index -> plan of a step that reindexes


def _history_input(workflow: Workflow) -> str | None:
    """PyStack3D's rule: after a history, read the last step's folder (the one before registration_calculation)."""
    done = [s for s in workflow.history if s != "registration_calculation"]
    return done[-1] if done else None


def prepare(workflow: Workflow) -> Prepared:
    notes = list(workflow.warnings)
    after = _history_input(workflow)
    if after:
        base, label, lo, hi = workflow.process_dir / after, f"process/{after}", 0, None
        if not base.is_dir():
            raise InputError(f"{after!r} comes before this run's steps (history, or --steps), but its output "
                             f"folder {base} does not exist: run {after!r} first")
        from gpustack.pipeline.manifest import Manifest

        entry = Manifest.load(workflow.process_dir).step(after)
        if entry is not None and entry.get("slices_written") is False:
            raise InputError(f"{after!r} comes before this run's steps (history, or --steps), but its slices were "
                             f"not kept (save_intermediate = false): run {after!r} and the steps after it "
                             "together")
    else:
        base, label, lo, hi = workflow.project_dir, "input", workflow.ind_min, workflow.ind_max
        if not base.exists():
            raise InputError(f"project folder not found: {base}")
    threads = max(2, min(16, (workflow.nproc or os.cpu_count() or 2) * 2))
    sources = {}
    for channel in workflow.channels:
        sources[channel], channel_notes = open_channel(base, channel, lo, hi, threads=threads)
        notes += channel_notes
    first_channel, first = next(iter(sources.items()))
    for channel, src in sources.items():
        if len(src) != len(first) or src.shape != first.shape:
            raise InputError(f"channel {channel!r} has {len(src)} slices of {src.shape[1]}x{src.shape[0]}, channel "
                             f"{first_channel!r} has {len(first)} of {first.shape[1]}x{first.shape[0]}: channels "
                             "must have the same number and size of slices")
    steps = [REGISTRY[spec.name](spec.config) for spec in workflow.steps]
    shapes = [first.shape]
    for step in steps:
        try:
            shapes.append(step.output_shape(shapes[-1]))
        except ParamError as exc:
            raise ConfigError(str(exc), file=str(workflow.params_file) if workflow.params_file else None,
                              table=step.name, key=exc.key) from None
    slice_names, plans = _plan_reindexing(workflow, steps, list(first.slices))
    names = [s.name for s in steps]
    for j, step in enumerate(steps):  # a step that needs another's result: earlier in this run, or saved before
        dep = step.depends_on
        if dep in names[:j]:
            try:
                step.check_dependency(steps[names.index(dep)])
            except ParamError as exc:
                raise ConfigError(str(exc), file=str(workflow.params_file) if workflow.params_file else None,
                                  table=step.name, key=exc.key) from None
        if dep and dep not in names[:j] and not REGISTRY[dep].has_saved_state(workflow.process_dir / dep):
            raise InputError(f"{step.name} needs the result of {dep}, which is neither earlier in process_steps "
                             f"nor saved in {workflow.process_dir / dep}: run {dep} first (or put it before "
                             f"{step.name} in process_steps)")
    for plan in plans.values():
        notes += plan.notes
    return Prepared(workflow, sources, label, steps, shapes, notes, slice_names, plans)


def _plan_reindexing(workflow: Workflow, steps: list[Step], slices: list) -> tuple[list[list[str]], dict[int, Any]]:
    """Slice names before each step and after the last, and the plans of the steps that change the slices
    (resampling), made from the first channel's names and tags before anything is read."""
    import dataclasses

    names, plans = [[s.name for s in slices]], {}
    for i, step in enumerate(steps):
        if step.reindexes:
            try:
                plan = step.plan(slices)
            except ParamError as exc:
                raise ConfigError(str(exc), file=str(workflow.params_file) if workflow.params_file else None,
                                  table=step.name, key=exc.key) from None
            plans[i] = plan
            slices = [dataclasses.replace(slices[int(k)], name=name) for k, name in zip(plan.upper, plan.names)]
        names.append([s.name for s in slices])
    return names, plans


def _reshape(prepared: Prepared, first: int) -> None:
    """Slice shapes from step `first` on, again: a step whose shape depends on a result (a registration crop)
    knows it once that result is in. Areas of later steps are checked against the new shapes."""
    wf = prepared.workflow
    for k in range(first, len(prepared.steps)):
        step = prepared.steps[k]
        try:
            prepared.shapes[k + 1] = step.output_shape(prepared.shapes[k])
        except ParamError as exc:
            raise ConfigError(str(exc), file=str(wf.params_file) if wf.params_file else None, table=step.name,
                              key=exc.key) from None


@dataclass
class _Pass:
    first: int  # index of the first step applied
    stop: int  # one past the last step applied
    fit: int | None  # index of the step fitted on this pass's output
    source_step: int | None  # index of the step whose written output this pass reads; None: the prepared input
    reindex: bool = False  # the pass of one step that changes the slices (resampling)


@dataclass
class RunSummary:
    ran: list[str]
    skipped: list[str]
    seconds: float
    slices: int
    channels: int
    device: str
    process_dir: Path


def _plan(steps: list[Step], start: int, source_step: int | None) -> list[_Pass]:
    """Cut the steps into passes: a step with a statistics pass closes the pass before it and opens the next."""
    passes, first = [], start
    for i in range(start, len(steps)):
        if steps[i].reindexes:  # a pass of its own: before it, the steps so far; after it, the rest
            if first < i:
                passes.append(_Pass(first, i, None, source_step))
                source_step = next((j for j in range(i - 1, first - 1, -1) if steps[j].writes_slices), source_step)
            passes.append(_Pass(i, i + 1, None, source_step, reindex=True))
            source_step, first = i, i + 1
            continue
        if steps[i].has_fit:
            passes.append(_Pass(first, i, i, source_step))
            # The next pass reads what this one wrote last (or this one's own input if it wrote nothing).
            source_step = next((j for j in range(i - 1, first - 1, -1) if steps[j].writes_slices), source_step)
            first = i
    if first < len(steps):
        passes.append(_Pass(first, len(steps), None, source_step))
    return passes


def _commit(partial: Path, final: Path) -> None:
    """Swap a finished step folder in: the final name only ever holds a complete step."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _written_stats(known: dict[tuple[int, str], tuple[list[str], np.ndarray]], step: int, channel: str,
                   source: Any, folder: Path) -> np.ndarray | None:
    """(n, 3) statistics of the slices a pass reads, as the step that wrote them measured them (in this run, or
    in its outputs/stats.npy from an earlier one), if they are those slices; None: measure them again."""
    names = [s.name for s in source.slices]
    if (step, channel) in known:
        written_names, stats = known[(step, channel)]
        return stats if written_names == names else None
    outputs = (folder if channel == "." else folder / channel) / "outputs"
    try:
        table = np.load(outputs / "stats.npy")
        with (outputs / "stats.csv").open(newline="") as fh:
            written_names = [row["name"] for row in csv.DictReader(fh)]
    except (OSError, ValueError, KeyError):
        return None
    if written_names != names or table.shape != (len(names), 3, 3):
        return None
    return table[:, 2, :].astype(np.float32)


def selects_only(prepared: Prepared) -> bool:
    """Whether every step only keeps a region of its input (cropping): such a workflow runs on the host, without
    torch or a device (`host_pass`)."""
    return all(step.region(shape) is not None and not step.has_fit and not step.reindexes
               for step, shape in zip(prepared.steps, prepared.shapes))


def _prewarm_plotting() -> None:
    """Import the plotting (Pillow, its font) on the reporter thread while the first pass runs."""
    import gpustack.report.plotting  # noqa: F401


def _saved_dependency(process: Path, step: Step, earlier: list[str]) -> list | None:
    """What identifies the saved result a step loads from an earlier run (registration_transformation's
    tmats.npy when registration_calculation is not in this run): a new calculation then makes the step stale."""
    dep = step.depends_on
    if not dep or dep in earlier:
        return None
    folder = process / dep
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.npy")) \
        if folder.is_dir() else None


def _output_names(prepared: Prepared, channel: str, i: int) -> list[str]:
    """The files step i writes for `channel`: the channel's own slice names, or those of the last step before
    it that renames the slices (resampling's plan, the same for every channel)."""
    renamed = [j for j in prepared.plans if j <= i]
    if renamed:
        return list(prepared.plans[max(renamed)].names)
    return [s.name for s in prepared.sources[channel].slices]


def _missing_slices(prepared: Prepared, folder: Path, i: int) -> list[str]:
    """The slice files (channel/name) the folder of step i should hold and does not."""
    missing = []
    for channel in prepared.sources:
        where = folder if channel == "." else folder / channel
        try:
            present = set(os.listdir(where))
        except OSError:
            present = set()
        missing += [name if channel == "." else f"{channel}/{name}" for name in _output_names(prepared, channel, i)
                    if name not in present]
    return missing


def _check_writable(process: Path) -> None:
    """Before any slice is read: the results folder can be made and written (read-only raw data, a file where
    the folder should be), so that the user hears it in one line and not from a traceback after the first step."""
    try:
        process.mkdir(parents=True, exist_ok=True)
        probe = process / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write the results to {process} ({exc.strerror or exc}): write them elsewhere "
                         "with --output-dir DIR (or output_dir = \"DIR\" in params.toml)") from None


LOCK_NAME = ".gpustack.lock"


@contextlib.contextmanager
def _exclusive(process: Path) -> Iterator[None]:
    """One run at a time per results folder: a second one would rename and remove the first one's partial
    folders under it. An advisory lock (flock) on process/.gpustack.lock, released when the process ends, even
    killed, and the file removed after a run. Where the folder cannot be written (nothing to do, or
    `_check_writable`'s message) there is no lock."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    path = process / LOCK_NAME
    while True:
        try:
            process.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError:
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):  # no locks here (some network
                handle.close()  # file systems): run unlocked, as before there was a lock
                yield
                return
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise InputError(f"another gpustack run (pid {holder}) is working in {process}: wait for it to end, "
                             "or write this run elsewhere with --output-dir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except OSError:
            same = False
        if same:
            break
        handle.close()  # the run before removed the file between our open and our lock: lock the new one
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiting run then locks a file of its own
        handle.close()


def run(prepared: Prepared, **kwargs: Any) -> RunSummary:
    """Run the prepared workflow (see `_run`), alone in its results folder."""
    with _exclusive(prepared.workflow.process_dir):
        return _run(prepared, **kwargs)


def _run(prepared: Prepared, *, device_choice: Any, overwrite: bool = False, show_progress: bool = True,
         log: Callable[[str], None] = print) -> RunSummary:
    from gpustack.pipeline.manifest import Manifest, fingerprint, versions
    from gpustack.pipeline.progress import progress_bar
    from gpustack.pipeline.spec import PassSpec, StepRun
    from gpustack.report.stats import write_stats
    from gpustack.schema import to_jsonable

    wf, steps = prepared.workflow, prepared.steps
    process = wf.process_dir
    started = time.perf_counter()
    manifest = Manifest.load(process)
    channels = list(prepared.sources)
    source_fp = fingerprint(prepared.input_label, {c: s.fingerprint() for c, s in prepared.sources.items()},
                            wf.ind_min, wf.ind_max)
    fps, prev = [], source_fp
    for j, step in enumerate(steps):
        saved = _saved_dependency(process, step, [s.name for s in steps[:j]])
        prev = fingerprint(prev, step.name, step.version, to_jsonable(step.config), wf.output_dtype,
                           *([saved] if saved is not None else []))  # other steps: fingerprints as before
        fps.append(prev)

    for step in steps:  # never clobber results gpustack did not write (PyStack3D's, or another project's)
        folder = process / step.name
        if folder.exists() and manifest.step(step.name) is None and not overwrite:
            raise InputError(f"{folder} exists but process/gpustack.json has no record of it (was it written by "
                             "PyStack3D?): move it away, or run with --overwrite to replace it")

    def written(i: int) -> bool:
        entry = manifest.step(steps[i].name)
        return bool(entry and entry.get("slices_written")) and intact(i)

    @functools.cache
    def intact(i: int) -> bool:
        """The step's folder, and every slice it wrote (a slice deleted or moved by hand means recomputing)."""
        folder = process / steps[i].name
        entry = manifest.step(steps[i].name) or {}
        if not entry.get("slices_written"):
            return folder.is_dir()
        missing = _missing_slices(prepared, folder, i)
        if missing:
            log(f"{steps[i].name}: {len(missing)} of its slices are missing from {folder} (e.g. {missing[0]}): "
                "recomputed")
        return not missing

    done = [not overwrite and manifest.is_done(s.name, fp) and intact(i)
            for i, (s, fp) in enumerate(zip(steps, fps))]
    first_todo = next((i for i, d in enumerate(done) if not d), len(steps))
    if first_todo == len(steps):
        log(f"all {len(steps)} steps are up to date in {process} (--overwrite recomputes them)")
        return RunSummary([], [s.name for s in steps], 0.0, 0, len(channels), device_choice.description, process)
    _check_writable(process)  # work to do: before any slice is read (an up-to-date project may be read-only)
    # Start at the first stale step if the output it reads was written; otherwise recompute from further back.
    start = first_todo
    while True:
        source_step = next((j for j in range(start - 1, -1, -1) if steps[j].writes_slices), None)
        if source_step is None or written(source_step):
            break
        start = source_step
    skipped = [s.name for s in steps[:start]]
    for s in skipped:
        log(f"{s}: up to date, skipped")
    for step in steps[start:]:  # still gpustack's folders, but not valid until recomputed
        manifest.invalidate(step.name)
    manifest.save()

    passes = _plan(steps, start, source_step)
    last_writer = max((i for i, s in enumerate(steps) if s.writes_slices), default=None)
    read_by_later = {p.source_step for p in passes if p.source_step is not None}
    device = device_choice.device
    on_host = device is None  # the steps only crop: NumPy passes, no torch (device.host_choice)
    if on_host and not selects_only(prepared):
        raise ValueError("a run without a device (host_choice) takes only steps that select pixels (cropping)")
    if on_host:
        from gpustack.pipeline.host_pass import host_batch_size
    else:
        from gpustack.device import batch_size_for
        from gpustack.pipeline.stream import TORCH_DTYPES, release_buffers, run_pass
    n = len(next(iter(prepared.sources.values())))
    states: dict[int, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    partials: dict[int, Path] = {}
    # Statistics files, plots and the swap of finished step folders run on a reporter thread while the next
    # pass computes; a pass reads its source step's slices from that step's partial folder if need be. Reports
    # run no torch (OpenMP) or BLAS kernel: that thread's idle workers would then compete with the passes' for as
    # long as it lives (measured: VSNR iterations 2.4x slower; see report/background.py).
    reporter = ThreadPoolExecutor(1, thread_name_prefix="gpustack-report")
    reporter.submit(_prewarm_plotting)
    finishing: dict[int, Future] = {}
    reports: dict[int, list[Future]] = {}

    def derive(j: int, upstream: Any) -> Any:
        try:
            return steps[j].derive_state(upstream, len(prepared.names[j]))
        except ParamError as exc:  # the result does not fit this step's parameters (e.g. its nb_blocks)
            raise ConfigError(str(exc), file=str(wf.params_file) if wf.params_file else None,
                              table=steps[j].name, key=exc.key) from None

    def bind_dependents(i: int, state_by_channel: dict[str, Any]) -> None:
        """Give the steps that use step i's result their derived state, then redo the shapes after step i."""
        for j in range(i + 1, len(steps)):
            if steps[j].depends_on == steps[i].name:
                derived: dict[int, Any] = {}  # channels sharing one upstream state share the derived one
                for s in state_by_channel.values():
                    if id(s) not in derived:
                        derived[id(s)] = derive(j, s)
                states[j] = {c: derived[id(s)] for c, s in state_by_channel.items()}
        _reshape(prepared, i + 1)

    for j in range(start, len(steps)):  # results of steps done before this run, read back from their folders
        dep = steps[j].depends_on
        if dep and dep not in [s.name for s in steps[start:j]]:
            state = derive(j, REGISTRY[dep].load_state(process / dep))
            states[j] = {c: state for c in channels}
            _reshape(prepared, j)

    current_cache: dict[str, np.ndarray] = {}
    written_stats: dict[tuple[int, str], tuple[list[str], np.ndarray]] = {}  # (step, channel): names, min/max/mean
    history_input = _history_input(wf)

    def currents(channel: str, boundary: int) -> np.ndarray:
        """Beam current of each slice at a step boundary: the input's, followed through any resampling."""
        from gpustack.io.metadata import beam_currents

        if channel not in current_cache:
            current_cache[channel] = beam_currents(list(prepared.sources[channel].slices))
        values = current_cache[channel]
        for k, plan in sorted(prepared.plans.items()):
            if k < boundary:
                values = values[plan.upper]
        return values

    def step_report(i: int, channel: str, run_: StepRun) -> None:
        """The step's own outputs of a step whose report needs no statistics: rendered while the pass runs."""
        step = steps[i]
        outputs = (partials[i] if channel == "." else partials[i] / channel) / "outputs"
        outputs.mkdir(parents=True, exist_ok=True)
        prefix = step.name + ("" if channel == "." else f" [{channel}]")
        step.write_report(Report(outputs, run_.state, None, list(prepared.names[i]), prepared.shapes[i],
                                 prepared.shapes[i + 1], {}, lambda message: log(f"{prefix}: {message}")))

    def channel_report(i: int, channel: str, run_: StepRun) -> None:
        step = steps[i]
        names = list(prepared.names[i + 1] if step.reindexes else prepared.names[i])
        if not step.writes_slices:  # a result, no slices: one report at the step's root, no statistics
            if channel == channels[0]:
                outputs = partials[i] / "outputs"
                outputs.mkdir(parents=True, exist_ok=True)
                prefix = step.name
                step.write_report(Report(outputs, run_.state, run_.stats, names, prepared.shapes[i],
                                         prepared.shapes[i + 1], run_.records, lambda m: log(f"{prefix}: {m}")))
            return
        outputs = (partials[i] if channel == "." else partials[i] / channel) / "outputs"
        write_stats(outputs, run_.stats, names, step.name + ("" if channel == "." else f" - {channel}"),
                    beam_current=currents(channel, i + 1 if step.reindexes else i))
        if not step.report_needs_pass:
            return  # written by step_report during the pass
        prefix = step.name + ("" if channel == "." else f" [{channel}]")
        step.write_report(Report(outputs, run_.state, run_.stats, names, prepared.shapes[i], prepared.shapes[i + 1],
                                 run_.records, lambda message: log(f"{prefix}: {message}")))

    def finish_step(i: int, number: int, indices: list[int], writes: set[int], elapsed: float) -> None:
        step = steps[i]
        for report in reports.pop(i):  # done already (the reporter runs tasks in order); raises if one failed
            report.result()
        _commit(partials[i], process / step.name)
        manifest.record_step(step.name, fingerprint=fps[i], params=to_jsonable(step.config), version=step.version,
                             slices=len(prepared.names[i + 1]), channels=channels, pass_number=number,
                             fused_with=[steps[k].name for k in indices], pass_seconds=round(elapsed, 3),
                             slices_written=i in writes, device=str(device or "host"), shape_in=list(prepared.shapes[i]),
                             shape_out=list(prepared.shapes[i + 1]))
        manifest.save()

    # A step's folder is committed (renamed from its partial name, recorded in the manifest) once its reports
    # are written. A later pass reads the step's slices from the partial folder instead of waiting for that, so
    # the step is committed only after the last pass that reads it.
    last_reader = {plan.source_step: number for number, plan in enumerate(passes, 1) if plan.source_step is not None}
    deferred: dict[int, tuple] = {}

    try:
        for number, plan in enumerate(passes, 1):
            pass_start = time.perf_counter()
            indices = list(range(plan.first, plan.stop))
            writes = {i for i in indices if steps[i].writes_slices
                      and (wf.save_intermediate or i == last_writer or i in read_by_later)}
            for i in indices:
                partials[i] = process / f".partial-{steps[i].name}"
                if partials[i].exists():
                    shutil.rmtree(partials[i])
            shape_in = prepared.shapes[plan.first]
            # the steps' own buffers, plus the pass's: the statistics' scratch, the converted input, the output
            work = max([steps[i].work_buffers for i in indices] + [1]) + 3
            halo = sum(sum(steps[i].halo) for i in indices) + (sum(steps[plan.fit].fit_halo)
                                                               if plan.fit is not None else 0)
            # float32 temporaries have the shape the steps compute on: a first step that crops reads only its region
            computed = prepared.shapes[plan.first + 1] if steps[plan.first].region(shape_in) is not None else shape_in
            if on_host:  # raw slices only, in their own dtype
                batch = host_batch_size(prepared.sources[channels[0]].dtype.itemsize * shape_in[0] * shape_in[1],
                                        budget=wf.memory_budget, requested=wf.batch_size)
            else:
                batch = batch_size_for(device, 4 * shape_in[0] * shape_in[1] * work, budget=wf.memory_budget,
                                       requested=wf.batch_size, plane_bytes=4 * computed[0] * computed[1],
                                       halo=halo)
            labels = [steps[i].name for i in indices] + ([f"statistics of {steps[plan.fit].name}"]
                                                        if plan.fit is not None else [])
            fit_partials: dict[str, list] = {}
            runs_by_channel: dict[str, list[StepRun]] = {}
            for c_index, channel in enumerate(channels):
                input_stats = None
                if plan.source_step is None:
                    source = prepared.sources[channel]
                    if history_input:  # the slices of a step done in an earlier run (history)
                        input_stats = _written_stats({}, -1, channel, source, process / history_input)
                else:
                    folder = (partials[plan.source_step] if plan.source_step in deferred
                              else process / steps[plan.source_step].name)
                    source, _ = open_channel(folder, channel)
                    input_stats = _written_stats(written_stats, plan.source_step, channel, source,
                                                 process / steps[plan.source_step].name)
                out_dtype = "float32" if wf.output_dtype == "float32" else str(source.dtype)
                runs = []
                for i in indices:
                    out_dir = None
                    if i in writes:
                        out_dir = partials[i] if channel == "." else partials[i] / channel
                        out_dir.mkdir(parents=True, exist_ok=True)
                    runs.append(StepRun(steps[i], states.get(i, {}).get(channel), out_dir, out_dtype,
                                        steps[i].region(prepared.shapes[i])))
                fit = steps[plan.fit] if plan.fit is not None else None
                if fit is not None and fit.fit_on_first_channel and c_index > 0:
                    fit = None
                spec = PassSpec(source, runs, fit, push_region=bool(runs) and runs[0].region is not None,
                                input_stats=input_stats)
                for j, i in enumerate(indices):  # reports that need no statistics: on the reporter, meanwhile
                    if steps[i].writes_slices and not steps[i].report_needs_pass:
                        reports.setdefault(i, []).append(reporter.submit(step_report, i, channel, runs[j]))
                label = f"[{number}/{len(passes)}] {' + '.join(labels)}" + ("" if channel == "." else f" [{channel}]")
                if plan.reindex:
                    from gpustack.pipeline.reindex import run_reindex_pass

                    r, step_plan = runs[0], prepared.plans[plan.first]
                    r.state = step_plan
                    with progress_bar(label, len(step_plan.names), enabled=show_progress, log=log) as advance:
                        r.stats = run_reindex_pass(source, step_plan, r.out_dir, TORCH_DTYPES[out_dtype],
                                                   device=device, batch_size=batch,
                                                   io_threads=min(8, (wf.nproc or 2) * 2), on_progress=advance)
                elif not writes and fit is None:  # nothing to write or measure (a result step last): no reading
                    for r in runs:
                        r.stats = np.full((len(source), 9), np.nan, dtype=np.float32)
                else:
                    if not on_host:
                        from gpustack.pipeline.prefit import prefit, sampled_run

                        if sampled_run(spec) is not None:
                            with progress_bar(f"{label}: fits", len(source), enabled=show_progress,
                                              log=log) as advance:
                                prefit(spec, device, io_threads=min(8, (wf.nproc or 2) * 2), on_progress=advance)
                    with progress_bar(label, len(source), enabled=show_progress, log=log) as advance:
                        # a crop whose output is only counted (intensity statistics): on the CPU, each slice is
                        # counted as it is copied, and no slice goes through torch (RESULTS.md, intensity)
                        if on_host or (device.type == "cpu" and spec.counts_levels):
                            from gpustack.pipeline.host_pass import run_host_pass

                            run_host_pass(spec, batch_size=batch, io_threads=min(8, (wf.nproc or 2) * 2),
                                          on_progress=advance, fit_device=device)
                        else:
                            run_pass(spec, device=device, batch_size=batch,
                                     io_threads=min(8, (wf.nproc or 2) * 2), on_progress=advance)
                runs_by_channel[channel] = runs
                for j, i in enumerate(indices):
                    if i in writes and runs[j].stats is not None:
                        names = prepared.names[i + 1] if steps[i].reindexes else prepared.names[i]
                        written_stats[(i, channel)] = (list(names), runs[j].stats[:, 6:9].copy())
                for j, i in enumerate(indices):  # this channel's plots render while the next channel streams
                    reports.setdefault(i, []).append(reporter.submit(channel_report, i, channel, runs[j]))
                if fit is not None:
                    fit_partials[channel] = spec.fit_partials
            if plan.fit is not None:
                fit_step = steps[plan.fit]
                reduced = {c: fit_step.fit_reduce(p) for c, p in fit_partials.items()}
                states[plan.fit] = {c: reduced.get(c, reduced.get(channels[0])) for c in channels}
                bind_dependents(plan.fit, states[plan.fit])
            elapsed = time.perf_counter() - pass_start
            if last_reader.get(plan.source_step) == number and plan.source_step in deferred:
                finishing[plan.source_step] = reporter.submit(finish_step, *deferred.pop(plan.source_step))
            for i in indices:
                timings[steps[i].name] = elapsed
                if last_reader.get(i, 0) > number:
                    deferred[i] = (i, number, indices, writes, elapsed)
                else:
                    finishing[i] = reporter.submit(finish_step, i, number, indices, writes, elapsed)
        for future in finishing.values():
            future.result()
    finally:
        reporter.shutdown(wait=True, cancel_futures=True)
        if not on_host:
            release_buffers()
        for partial in partials.values():
            shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - started
    manifest.record_run({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device_choice.description,
                         "device_reason": device_choice.reason, "steps": [s.name for s in steps[start:]],
                         "skipped": skipped, "seconds": round(seconds, 3), "pass_seconds": timings,
                         "params_file": str(wf.params_file) if wf.params_file else None, "versions": versions()})
    manifest.save()
    return RunSummary([s.name for s in steps[start:]], skipped, seconds, n, len(channels),
                      device_choice.description, process)
