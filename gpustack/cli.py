"""`gpustack run | validate | init | export | bench | info | demo`.

Startup stays light: `--help`, `validate` and `init` never import torch. User mistakes end with one message on
stderr and a non-zero exit status; a traceback means a bug in gpustack.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gpustack import __version__
from gpustack.errors import ConfigError, GpustackError
from gpustack.schema import Invalid


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _steps_arg(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


def _load(args: argparse.Namespace):
    from gpustack.config import load_workflow, parse_memory

    overrides = {}
    if getattr(args, "batch_size", None):
        overrides["batch_size"] = args.batch_size
    if getattr(args, "memory_budget", None):
        try:
            parse_memory(args.memory_budget)
        except ValueError as exc:
            raise ConfigError(str(exc), key="--memory-budget") from None
        overrides["memory_budget"] = args.memory_budget
    if getattr(args, "output_dir", None):
        overrides["output_dir"] = str(Path(args.output_dir).resolve())
    return load_workflow(args.params, steps=_steps_arg(getattr(args, "steps", None)),
                         device=getattr(args, "device", None), overrides=overrides)


def _describe(prepared) -> None:
    wf = prepared.workflow
    first = next(iter(prepared.sources.values()))
    _log(f"project: {wf.project_dir}")
    _log(f"input: {prepared.input_label}, {len(wf.channels)} channel(s) {list(wf.channels)}, {len(first)} slices of "
         f"{first.shape[1]}x{first.shape[0]} {first.dtype}")
    for k, (step, shape_in, shape_out) in enumerate(zip(prepared.steps, prepared.shapes, prepared.shapes[1:])):
        n_in, n_out = len(prepared.names[k]), len(prepared.names[k + 1])
        count = f" ({n_in} slices -> {n_out} planes)" if n_in != n_out or step.reindexes else ""
        _log(f"  {step.name}: {shape_in[1]}x{shape_in[0]} -> {shape_out[1]}x{shape_out[0]}{count}")
    if wf.history:
        _log(f"history (done, skipped): {', '.join(wf.history)}")
    for note in prepared.notes:
        _log(f"note: {note}")


def cmd_validate(args: argparse.Namespace) -> int:
    from gpustack.pipeline.runner import prepare

    prepared = prepare(_load(args))
    _describe(prepared)
    _log(f"{args.params}: valid")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gpustack.pipeline.runner import prepare, run

    workflow = _load(args)
    prepared = prepare(workflow)  # everything checked before the device or any slice is touched
    from gpustack.device import host_choice, resolve_device
    from gpustack.pipeline.runner import selects_only

    # a workflow that only crops needs no device, nor torch (about a second of start-up)
    origin = None if args.device else f"{workflow.params_file}: device = {workflow.device!r}"
    choice = ((host_choice(workflow.device) if selects_only(prepared) else None)
              or resolve_device(workflow.device, origin))
    if not args.quiet:
        _describe(prepared)
        _log(f"device: {choice.description} ({choice.reason})")
    summary = run(prepared, device_choice=choice, overwrite=args.overwrite, show_progress=not args.quiet,
                  log=_log if not args.quiet else (lambda m: None))
    if summary.ran and not args.quiet:
        rate = summary.slices * summary.channels / summary.seconds if summary.seconds else 0
        _log(f"done: {', '.join(summary.ran)} on {summary.slices} slices x {summary.channels} channel(s) in "
             f"{summary.seconds:.2f} s ({rate:.1f} slices/s) -> {summary.process_dir}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from gpustack.template import render_template

    folder = Path(args.dir)
    if not folder.is_dir():
        raise ConfigError(f"no such folder: {folder}")
    if args.from_atlas:
        from gpustack.io.metadata import init_from_atlas

        target = init_from_atlas(folder, force=args.force)
        _log(f"wrote {target} from the Atlas 3D metadata; check it, then: gpustack validate {target}")
        return 0
    target = folder / "params.toml"
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    channels = args.channels.split(",") if args.channels else None
    tmp = target.with_name(".params.toml.tmp")
    tmp.write_text(render_template(channels=channels))
    tmp.replace(target)
    _log(f"wrote {target}; edit it, then: gpustack validate {target}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gpustack.io.export import export_step

    wf = _load(args)
    names = list(wf.step_names)
    step = args.step or next((s for s in reversed(names) if s != "registration_calculation"), None)
    if step == "input":
        step = None
    elif step not in names and not (wf.process_dir / step).is_dir():
        raise ConfigError(f"{step!r} is not a step of this workflow ({', '.join(names)}) nor in {wf.process_dir}",
                          key="--step")
    z_spacing = args.z_spacing
    if z_spacing is None and step is not None and "resampling" in names and step in names \
            and names.index(step) >= names.index("resampling"):
        z_spacing = next(s.config.dz for s in wf.steps if s.name == "resampling")
    pixel_size = args.pixel_size
    if pixel_size is None and (wf.project_dir / "Atlas3D.a3d-setup").exists():
        from gpustack.io.metadata import read_atlas_setup

        pixel_size = read_atlas_setup(wf.project_dir / "Atlas3D.a3d-setup")["pixel_size_um"]
    if args.z_spacing is not None and not pixel_size:  # ImageJ's spacing is in the pixels' unit: none here
        raise ConfigError("needs --pixel-size as well (the z spacing is in the unit of the pixel size, um)",
                          key="--z-spacing")
    out_dir = Path(args.out) if args.out else wf.process_dir / "export"
    written = export_step(wf.project_dir, step, out_dir, list(wf.channels), process_dir=wf.process_dir,
                          pixel_size=pixel_size, z_spacing=z_spacing, overwrite=args.overwrite,
                          compression=args.compression)
    for path in written:
        if pixel_size:
            calibration = f"pixel {pixel_size:g} um, z spacing " + (f"{z_spacing:g} um" if z_spacing else "unknown")
        else:
            calibration = "uncalibrated: give --pixel-size (and --z-spacing) for Fiji to show microns"
        _log(f"wrote {path} ({calibration})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_workflow.py"
    if not script.exists():
        raise ConfigError("gpustack bench runs benchmarks/bench_workflow.py of a source checkout "
                          "(git clone, then pip install -e \".[bench]\"); this installation has none")
    if importlib.util.find_spec("pystack3d") is None and "--no-pystack3d" not in args.options:
        raise ConfigError("the benchmark compares against PyStack3D: pip install pystack3d (or pass --no-pystack3d)")
    spec = importlib.util.spec_from_file_location("gpustack_bench_workflow", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args.options)


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import numpy
    import tifffile
    import torch

    from gpustack.device import resolve_device
    from gpustack.steps import PYSTACK3D_STEPS, REGISTRY

    print(f"gpustack {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"numpy {numpy.__version__}  tifffile {tifffile.__version__}")
    print(f"torch CUDA build: {torch.version.cuda or 'none'}; CPU threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}")
    choice = resolve_device("auto")
    print(f"auto device: {choice.description} ({choice.reason})")
    print("steps: " + ", ".join(s for s in PYSTACK3D_STEPS if s in REGISTRY))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gpustack.demo import run_demo

    return run_demo(Path(args.dir), device=args.device, slices=args.slices, size=args.size, quiet=args.quiet,
                    log=_log)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpustack", description="GPU-first cleaning of 3D image stacks "
                                     "(FIB-SEM) before segmentation; runs PyStack3D's params.toml unchanged.")
    parser.add_argument("--version", action="version", version=f"gpustack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the workflow of a params.toml")
    p.add_argument("params", help="PyStack3D/gpustack params.toml")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--steps", help="comma-separated consecutive steps of process_steps to run (default: all)")
    p.add_argument("--overwrite", action="store_true", help="recompute every step, replacing existing outputs")
    p.add_argument("--batch-size", type=int, help="slices per batch (default: from the memory budget)")
    p.add_argument("--memory-budget", help="memory for one batch on the device, e.g. 4GiB")
    p.add_argument("--output-dir", help="where process/ is written (default: the project folder)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a params.toml against its input without processing")
    p.add_argument("params")
    p.add_argument("--steps", help=argparse.SUPPRESS)
    p.add_argument("--output-dir", help="where process/ would be written (as for run)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("init", help="write a commented params.toml into a folder (a template, or from metadata)")
    p.add_argument("dir")
    p.add_argument("--channels", help="comma-separated channel folders, e.g. SE2,ESB")
    p.add_argument("--force", action="store_true", help="replace an existing params.toml")
    p.add_argument("--from-atlas", action="store_true",
                   help="read channels, cropping area and slice interval from a Zeiss Atlas 3D run folder "
                        "(Atlas3D.a3d-setup and the slices' Fibics metadata)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("export", help="a step's output (or the input) as one BigTIFF per channel for Fiji/napari")
    p.add_argument("params", help="the workflow's params.toml")
    p.add_argument("--step", help="step to export, or 'input' (default: the last step of process_steps)")
    p.add_argument("--out", help="folder for the BigTIFFs (default: process/export)")
    p.add_argument("--output-dir", help="where the run wrote process/ (its --output-dir; default: as in params.toml)")
    p.add_argument("--pixel-size", type=float, help="um per pixel (default: from Atlas3D.a3d-setup if present)")
    p.add_argument("--z-spacing", type=float, help="um between planes (default: resampling's dz after it)")
    p.add_argument("--compression", choices=["zlib"], help="deflate the pages (default: none, fastest to open)")
    p.add_argument("--overwrite", action="store_true", help="replace existing exports")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="the whole workflow against PyStack3D on a synthetic stack (benchmarks/)",
                       add_help=False)
    p.add_argument("options", nargs=argparse.REMAINDER, help="bench_workflow.py's options (--help for them)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="versions and devices")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="make a synthetic stack with known defects and run the workflow on it")
    p.add_argument("dir", help="folder to create (must be new or empty)")
    p.add_argument("--device", default="auto")
    p.add_argument("--slices", type=int, default=60)
    p.add_argument("--size", type=int, default=256, help="slice width and height in pixels")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every option after `bench` belongs to the benchmark script
        args = argparse.Namespace(options=argv[1:], func=cmd_bench)
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GpustackError as exc:
        _log(f"gpustack: error: {exc}")
        return exc.exit_code
    except Invalid as exc:  # a parameter that turned out not to fit the data mid-run: still one line, exit 2
        _log(f"gpustack: error: [{exc.key}] {exc}")
        return 2
    except KeyboardInterrupt:
        _log("gpustack: interrupted; finished steps are kept, the step in progress left nothing behind")
        return 130


def entry() -> None:
    """Console entry point. Everything is written and closed when `main` returns, so the process ends at once
    instead of spending half a second tearing torch down."""
    from gpustack.malloc_tuning import tune

    tune()  # before torch allocates anything
    code = main()
    from gpustack import pools

    pools.shutdown()  # os._exit would leave the reference engines' workers running
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
