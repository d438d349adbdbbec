"""Cropping workflow: gpustack vs PyStack3D (nproc=2) vs a bare tifffile read+write loop, same data, one run.

The paper's case is large slices cropped to a much smaller region; by default 200 slices of 2048x2048 uint16
in two channels, cropped to the central 1024x1024. Each contender runs as its own process (start-up counts),
`--repeats` times, interleaved; the median is reported. `--cold` drops the input files from the page cache
before every run (posix_fadvise), as when a stack is read from disk for the first time.

    python benchmarks/bench_cropping.py                # warm and cold cache, writes RESULTS.md
    python benchmarks/bench_cropping.py --slices 50 --size 1024 --no-results
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cached_stack, evict, machine, python, summary, timed, update_results  # noqa: E402
from gpustack.synthetic import SyntheticSpec, SyntheticStack  # noqa: E402

CHANNELS = ("SE2", "ESB")

BARE_LOOP = """
import sys, os, glob, tifffile
src, dst, count, r0, r1, c0, c1 = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
for ch in sys.argv[8:]:
    os.makedirs(os.path.join(dst, ch), exist_ok=True)
    for f in sorted(glob.glob(os.path.join(src, ch, '*.tif')))[:count]:
        tifffile.imwrite(os.path.join(dst, ch, os.path.basename(f)), tifffile.imread(f)[r0:r1, c0:c1])
"""

PYSTACK3D = """
import sys
from pystack3d import Stack3d
Stack3d(sys.argv[1]).eval(process_steps=["cropping"], nproc=int(sys.argv[2]), show_pbar=False)
"""


def dataset(root: Path, slices: int, size: int) -> SyntheticStack:
    spec = SyntheticSpec(n_slices=slices, height=size, width=size, channels=CHANNELS, delete_from=None, seed=7)
    return cached_stack(root, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--crop", type=int, default=1024, help="side of the central square kept")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--also", type=int, default=50,
                        help="also run on the first N slices only (ind_max), to separate start-up from per-slice cost; 0: off")
    parser.add_argument("--nproc", type=int, default=2, help="PyStack3D processes")
    parser.add_argument("--device", default="auto", help="gpustack's --device (auto: a crop runs on the host, "
                        "without torch)")
    parser.add_argument("--work", type=Path, default=Path("bench-data/cropping"))
    parser.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    parser.add_argument("--no-pystack3d", action="store_true")
    parser.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()

    work = args.work.resolve()
    data = dataset(work / "data", args.slices, args.size)
    lo = (args.size - args.crop) // 2
    area = [lo, lo + args.crop, lo, lo + args.crop]  # bottom-left origin; rows = size - ymax : size - ymin
    r0, r1, c0, c1 = args.size - area[3], args.size - area[2], area[0], area[1]
    inputs = [p for ch in CHANNELS for p in data.files(ch)]
    params = ("channels = [\"SE2\", \"ESB\"]\nnproc = {nproc}\nind_min = 0\nind_max = {ind_max}\n"
              "process_steps = [\"cropping\"]\nhistory = []\n[cropping]\narea = {area}\n")

    ours, theirs, bare = work / "gpustack", work / "pystack3d", work / "bare"
    ours.mkdir(parents=True, exist_ok=True)
    theirs.mkdir(parents=True, exist_ok=True)
    for ch in CHANNELS:  # PyStack3D wants the channels inside its project folder: links, not copies
        link = theirs / ch
        if not link.exists():
            link.symlink_to(data.channel_dir(ch), target_is_directory=True)

    def check_same_pixels() -> None:
        """The three contenders wrote the same pixels."""
        for k in (0, args.slices // 2, args.slices - 1):
            name = data.files("ESB")[k].name
            a = tifffile.imread(ours / "process" / "cropping" / "ESB" / name)
            np.testing.assert_array_equal(a, tifffile.imread(bare / "ESB" / name))
            if not args.no_pystack3d:
                np.testing.assert_array_equal(a, tifffile.imread(theirs / "process" / "cropping" / "ESB" / name))

    def contenders(count: int) -> dict:
        """name -> (reset before each run, command), all on the first `count` slices."""
        text = params.format(nproc=args.nproc, area=area, ind_max=count - 1)

        def reset_ours() -> None:
            shutil.rmtree(ours / "process", ignore_errors=True)  # as for the others: deleting is not timed
            (ours / "params.toml").write_text(f"project_dir = {str(data.root)!r}\noutput_dir = {str(ours)!r}\n" + text)

        def reset_theirs() -> None:
            shutil.rmtree(theirs / "process", ignore_errors=True)
            (theirs / "params.toml").write_text(text)  # PyStack3D rewrites it (history): start afresh

        found = {
            "bare tifffile loop": (lambda: shutil.rmtree(bare, ignore_errors=True),
                                   [python(), "-c", BARE_LOOP, str(data.root), str(bare), str(count),
                                    *map(str, (r0, r1, c0, c1)), *CHANNELS]),
            "gpustack": (reset_ours, [python(), "-m", "gpustack", "run", str(ours / "params.toml"), "--overwrite",
                                      "-q", "--device", args.device]),
        }
        if not args.no_pystack3d:
            found[f"PyStack3D (nproc={args.nproc})"] = (reset_theirs, [python(), "-c", PYSTACK3D, str(theirs),
                                                                      str(args.nproc)])
        return found

    caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
    counts = [args.slices] + ([args.also] if 0 < args.also < args.slices else [])
    results: dict = {}
    for cache in caches:
        for count in counts:
            runs = contenders(count)
            for reset, cmd in runs.values():  # one untimed run: warm the cache and the imports
                reset()
                timed(cmd)
            for rep in range(args.repeats):
                for name, (reset, cmd) in runs.items():
                    reset()
                    if cache == "cold" and not evict(inputs):
                        raise SystemExit("this OS cannot drop files from the page cache; use --cache warm")
                    seconds, peak = timed(cmd)
                    results.setdefault((cache, count), {}).setdefault(name, []).append((seconds, peak))
                    print(f"{cache:4} {count:4} slices {rep + 1}/{args.repeats} {name:24} {seconds:7.2f} s  "
                          f"{peak:7.0f} MiB", flush=True)
            if count == args.slices:
                check_same_pixels()

    startup = {}
    for label, cmd in {"gpustack --help": [python(), "-m", "gpustack", "--help"],
                       "gpustack validate": [python(), "-m", "gpustack", "validate", str(ours / "params.toml")]}.items():
        startup[label] = summary([timed(cmd)[0] for _ in range(3)])

    lines = [f"Machine: {machine()}.", "",
             f"`python benchmarks/bench_cropping.py --slices {args.slices} --size {args.size} --crop {args.crop} "
             f"--repeats {args.repeats} --device {args.device}`: {len(CHANNELS)} channels of {args.size}x{args.size} "
             f"uint16 slices (synthetic, uncompressed, {args.slices * len(CHANNELS) * args.size**2 * 2 / 2**30:.1f} "
             f"GiB at {args.slices} slices), cropped to {args.crop}x{args.crop}. Each contender is a fresh process "
             f"(start-up included); median of {args.repeats} interleaved runs. Cold: the inputs dropped from the page "
             "cache before each run.", "",
             "| cache | slices x channels | contender | seconds | slices/s | peak RSS MiB | time / bare loop | "
             "time / gpustack |", "|---|---|---|---|---|---|---|---|"]
    out = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "results": [], "startup": startup}
    median = {key: {name: summary([s for s, _ in v]) for name, v in runs.items()} for key, runs in results.items()}
    for (cache, count), runs in results.items():
        bare_s, ours_s = median[(cache, count)]["bare tifffile loop"], median[(cache, count)]["gpustack"]
        for name, values in runs.items():
            secs, peak = median[(cache, count)][name], max(p for _, p in values)
            lines.append(f"| {cache} | {count} x {len(CHANNELS)} | {name} | {secs:.2f} | {count * len(CHANNELS) / secs:.0f} "
                         f"| {peak:.0f} | {secs / bare_s:.2f} | {secs / ours_s:.2f} |")
            out["results"].append({"cache": cache, "slices": count, "contender": name,
                                   "seconds": [s for s, _ in values], "peak_mib": peak})
    if len(counts) == 2:
        lines += ["", f"Marginal cost per slice (both channels), from the difference between {counts[0]} and "
                  f"{counts[1]} slices, i.e. without start-up:", "",
                  "| cache | contender | ms per slice | vs gpustack |", "|---|---|---|---|"]
        for cache in caches:
            marginal = {name: 1000 * (median[(cache, counts[0])][name] - median[(cache, counts[1])][name])
                        / (counts[0] - counts[1]) for name in median[(cache, counts[0])]}
            for name, ms in marginal.items():
                lines.append(f"| {cache} | {name} | {ms:.2f} | {ms / marginal['gpustack']:.2f} |")
    lines += ["", "Start-up (median of 3): " + ", ".join(f"`{k}` {v:.2f} s" for k, v in startup.items())
              + " (neither imports torch)."]
    text = "\n".join(lines)
    print("\n" + text)
    (work / "cropping.json").write_text(json.dumps(out, indent=2))
    if not args.no_results:
        update_results("cropping", "## Cropping workflow (engine issue)\n\n" + text)


if __name__ == "__main__":
    main()
