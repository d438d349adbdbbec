"""Resampling and export against PyStack3D and a bare tifffile write, in one run.

A synthetic stack of N slices of S x S uint16 with non-uniform z (every other slice deleted over the last third,
z in the file names). Timed, each from a cold page cache:
  - PyStack3D's resampling step (nproc = --nproc), `Stack3d.eval(["resampling"])`;
  - gpustack's resampling (`gpustack run` with process_steps = ["resampling"]);
  - both tools' cropping-only runs (whole image), to separate each tool's fixed costs from the step's;
  - export: `gpustack export` of the resampled stack to one BigTIFF, against `tifffile.imwrite` of the same
    planes (already in memory) to one BigTIFF.
Accuracy: gpustack's planes against PyStack3D's on the planes both write (PyStack3D truncates, gpustack rounds).

    python benchmarks/bench_resampling_export.py [--slices 200] [--size 1024] [--nproc 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cached_stack, evict, machine, python, summary, timed, update_results
from gpustack.synthetic import SyntheticSpec

PYSTACK3D = """
import sys
from pystack3d import Stack3d
Stack3d(sys.argv[1]).eval(process_steps=sys.argv[2].split(","), nproc=int(sys.argv[3]), show_pbar=False)
"""
TABLES = '[cropping]\narea = [0, 99999, 0, 99999]\n[resampling]\npolicy = "slice_{slice_nb}_z={z_coord}um.tif"\n' \
         'dz = 0.01\n'


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def project(folder: Path, files: list[Path], steps: list[str], nproc: int, gpustack_root: Path | None) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    head = f'channels = ["."]\nnproc = {nproc}\nind_min = 0\nind_max = 99999\nprocess_steps = {steps!r}\n' \
           'history = []\n'.replace("'", '"')
    if gpustack_root is None:
        for src in files:
            (folder / src.name).symlink_to(src)
    else:
        head = f"project_dir = {str(gpustack_root)!r}\noutput_dir = {str(folder)!r}\n" + head
    (folder / "params.toml").write_text(head + TABLES)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root", type=Path, default=Path("/tmp/gpustack-bench-resampling"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    spec = SyntheticSpec(n_slices=args.slices, height=args.size, width=args.size, dtype="uint16",
                         seed=11).without_defects(noise_sigma=0.01, delete_from=0.66)
    stack = cached_stack(args.root / f"stack_{args.size}_{args.slices}", spec)
    files = stack.files()
    # interleaved: each repeat runs all four, so that the step's cost is the difference of two runs made side by
    # side (the host drifts over minutes; the step costs a tenth of a run)
    times: dict[str, list[tuple[float, float]]] = {}
    folders: dict[str, Path] = {}
    for _ in range(args.repeats):
        for tool in ("pystack3d", "gpustack"):
            for steps in (["cropping"], ["resampling"]):
                name = f"{tool} {steps[-1]}"
                folder = folders.setdefault(name, args.root / "runs" / name.replace(" ", "_"))
                project(folder, files, steps, args.nproc, None if tool == "pystack3d" else stack.root)
                evict(files)
                cmd = [python(), "-c", PYSTACK3D, str(folder), ",".join(steps), str(args.nproc)] \
                    if tool == "pystack3d" else [python(), "-m", "gpustack", "run", str(folder / "params.toml"),
                                                 "-q", "--device", "cpu"]
                times.setdefault(name, []).append(timed(cmd))
    runs = {name: (summary([t for t, _ in v]), max(m for _, m in v), folders[name]) for name, v in times.items()}
    ours = sorted((runs["gpustack resampling"][2] / "process" / "resampling").glob("*.tif"))
    theirs = {p.name: p for p in (runs["pystack3d resampling"][2] / "process" / "resampling").glob("*.tif")}
    common = [p for p in ours if p.name in theirs]
    diffs = [np.abs(tifffile.imread(p).astype(np.int64) - tifffile.imread(theirs[p.name])).max() for p in common]

    # export against a bare tifffile write of the same planes, both flushed to disk (fsync), each into a new file
    # after the disk has settled: otherwise the page cache and the previous write's writeback decide the numbers
    from gpustack.io.export import export_stack
    from gpustack.io.tiff import open_channel

    planes = np.stack([tifffile.imread(p) for p in ours])
    source, _ = open_channel(runs["gpustack resampling"][2] / "process" / "resampling", ".")
    bare, exp = [], []
    for _ in range(max(5, args.repeats)):
        for old in ("bare.tif", "export.tif"):  # freeing the previous file's blocks is not part of either write
            (args.root / old).unlink(missing_ok=True)
        os.sync()
        out = args.root / "bare.tif"
        start = time.perf_counter()
        tifffile.imwrite(out, planes, bigtiff=True)
        fsync(out)
        bare.append(time.perf_counter() - start)
        out = args.root / "export.tif"
        start = time.perf_counter()
        export_stack(source, out, pixel_size=0.01, z_spacing=0.01)
        fsync(out)
        exp.append(time.perf_counter() - start)
    params = runs["gpustack resampling"][2] / "params.toml"
    command = timed([python(), "-m", "gpustack", "export", str(params), "--overwrite", "--pixel-size", "0.01"])[0]
    n_out = len(ours)

    def step_times(tool: str) -> list[float]:
        """The resampling run minus the cropping run made just before it, per repeat."""
        return [r - c for (r, _), (c, _) in zip(times[f"{tool} resampling"], times[f"{tool} cropping"])]

    lines = [f"Machine: {machine()}.",
             f"Command: `python benchmarks/bench_resampling_export.py --slices {args.slices} --size {args.size} "
             f"--nproc {args.nproc} --repeats {args.repeats}` (median of {args.repeats} interleaved runs, cold page "
             "cache).",
             f"Stack: {len(files)} slices of {args.size}x{args.size} uint16 with z from {stack.z[0]:g} to "
             f"{stack.z[-1]:g} um (every other slice deleted over the last third) -> {n_out} planes at dz = 0.01.",
             "", "| run | seconds | peak MiB |", "|---|---:|---:|"]
    for name, (sec, peak, _folder) in runs.items():
        lines.append(f"| {name.replace('pystack3d', f'PyStack3D (nproc={args.nproc})')} | {sec:.2f} | {peak:.0f} |")
    gs, ps = step_times("gpustack"), step_times("pystack3d")
    g, p = summary(gs), summary(ps)
    lines += ["", f"Resampling step alone (each resampling run minus the same tool's cropping-only run made just "
                  f"before it; median, and range over the {args.repeats} pairs): gpustack {g:.2f} s ({min(gs):.2f}-"
                  f"{max(gs):.2f}), PyStack3D {p:.2f} s ({min(ps):.2f}-{max(ps):.2f}): **{p / g:.1f}x**. Whole runs: "
                  f"{runs['pystack3d resampling'][0] / runs['gpustack resampling'][0]:.1f}x.",
              f"Planes both tools write: {len(common)} of gpustack's {n_out} (PyStack3D drops the last plane); "
              f"largest difference {max(diffs) if diffs else 0} grey level(s) (PyStack3D truncates, gpustack "
              "rounds).",
              f"Export of the {n_out} planes to one BigTIFF, flushed to disk (median of {len(exp)}, alternating): "
              f"gpustack's streaming export (read each plane, write it as a page with its tags and the ImageJ "
              f"calibration) {summary(exp):.2f} s, a bare `tifffile.imwrite` of the same planes from memory "
              f"{summary(bare):.2f} s: **{summary(exp) / summary(bare):.2f}x** the bare write. The whole "
              f"`gpustack export` command (start-up included, not flushed): {command:.2f} s."]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        update_results("resampling_export", "## Resampling and export (issue #6)\n\n" + text)


if __name__ == "__main__":
    main()
