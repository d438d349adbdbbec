"""Background removal (2D robust) and intensity rescaling: gpustack vs PyStack3D (nproc=2), speed and accuracy.

One synthetic uint16 stack (default 200 slices of 1024x1024, one channel) with PyStack3D's x*y*z background and
a contrast drop on slices 25-33 %, low noise, no shifts, curtains or deleted slices; generated once into
`--work/<params>/data` with its ground truth. Two workloads, each a params.toml that both tools run unchanged:

    A  process_steps = ["cropping", "bkg_removal"]          orders [1, 1], cross terms, skip [10, 10], HuberT (2D)
    B  process_steps = ["cropping", "intensity_rescaling"]  nbins 256, filter_size -1 (PyStack3D's template);
       gpustack twice: its defaults (linear mapping, median reference, jumps only) and mapping "histogram" + reference "mean"

plus a cropping-only run of each tool, so that a step's marginal time (workload - cropping only) can be shown.
Every contender also runs (warm) on the first `--short` slices of the same stack: the difference of the two
runs, per slice, is its cost per slice without start-up (imports, plots' fixed part), as the cropping benchmark
measures it between 200 and 50 slices.
Every contender is a fresh process (start-up included), timed with /usr/bin/time (wall, peak RSS), with the
inputs dropped from the page cache (cold) and then without (warm); `--repeats` interleaved runs, median shown.
PyStack3D's 2D bkg_removal raises in its final plot (`plot_stats_xy` wants 3 skip factors) after every slice is
written: its driver catches exactly that error, records it, and the table says so; its time runs to the crash.

Accuracy against `SyntheticStack.truth(z)` (clean content, already cropped to the area): RMSE, stack PSNR (from
the MSE over the whole stack) and mean SSIM over slices, data_range = spec.scale. Also after removing each
slice's mean offset (output - truth), since a background correction keeps a constant level.

    python benchmarks/bench_background_intensity.py              # 200 x 1024², writes RESULTS.md
    python benchmarks/bench_background_intensity.py --quick      # 40 x 256², test of the script, no RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cached_stack, evict, machine, python, summary, timed, update_results
from gpustack.synthetic import SyntheticSpec, SyntheticStack, parse_name

SEED = 7

# PyStack3D, as its users run it. A crash in plot_stats_xy (2D bkg_removal, after all slices are written) is
# recorded in a status file and the process ends normally; any other error propagates (non-zero exit).
PYSTACK3D = """
import json, sys, traceback
from pystack3d import Stack3d
project, steps, nproc, status_file = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
status = {"crashed": None}
try:
    Stack3d(project).eval(process_steps=steps, nproc=nproc, show_pbar=False)
except Exception as exc:
    frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
    if "plot_stats_xy" not in frames:
        raise
    status = {"crashed": f"{type(exc).__name__}: {exc}", "frames": frames[-4:]}
with open(status_file, "w") as fh:
    json.dump(status, fh)
"""

COMMON = 'channels = ["."]\nnproc = {nproc}\nind_min = 0\nind_max = 99999\nprocess_steps = {steps}\nhistory = []\n' \
         '\n[cropping]\narea = {area}\n'
TABLES = {
    "bkg_removal": '\n[bkg_removal]\norders = [1, 1]\ncross_terms = true\nskip_factors = [10, 10]\n'
                   'weight_func = "HuberT"\n',
    "intensity_rescaling": "\n[intensity_rescaling]\nnbins = 256\nfilter_size = -1\n",
}
GPUSTACK_HISTOGRAM = 'mapping = "histogram"\nreference = "mean"\n'  # gpustack-only keys, in its own file only

# name -> (workload, tool, last step, gpustack-only extra lines for the last step's table)
CONTENDERS = {
    "gpustack crop": ("crop", "gpustack", "cropping", ""),
    "pystack3d crop": ("crop", "pystack3d", "cropping", ""),
    "gpustack bkg": ("A", "gpustack", "bkg_removal", ""),
    "pystack3d bkg": ("A", "pystack3d", "bkg_removal", ""),
    "gpustack int": ("B", "gpustack", "intensity_rescaling", ""),
    "gpustack int-hist": ("B", "gpustack", "intensity_rescaling", GPUSTACK_HISTOGRAM),
    "pystack3d int": ("B", "pystack3d", "intensity_rescaling", ""),
}
LABELS = {
    "gpustack crop": "gpustack, cropping only", "pystack3d crop": "PyStack3D (nproc={nproc}), cropping only",
    "gpustack bkg": "gpustack", "pystack3d bkg": "PyStack3D (nproc={nproc})",
    "gpustack int": "gpustack (linear, median, jumps: defaults)",
    "gpustack int-hist": 'gpustack (mapping "histogram", reference "mean")',
    "pystack3d int": "PyStack3D (nproc={nproc})",
}


def make_spec(slices: int, size: int) -> SyntheticSpec:
    return SyntheticSpec(n_slices=slices, height=size, width=size, dtype="uint16", seed=SEED).without_defects(
        noise_sigma=0.005, background_amplitude=0.15, contrast_range=(0.25, 0.33))


def dataset(root: Path, spec: SyntheticSpec) -> SyntheticStack:
    return cached_stack(root, spec)


class Prefix:
    """The first slices of a stack, linked into a folder of their own: the same data, fewer slices."""

    def __init__(self, folder: Path, files: list[Path]):
        folder.mkdir(parents=True, exist_ok=True)
        for src in files:
            link = folder / src.name
            if not link.is_symlink():
                link.symlink_to(src)
        self.root = folder
        self._files = [folder / src.name for src in files]

    def files(self) -> list[Path]:
        return self._files


class Contender:
    def __init__(self, name: str, folder: Path, data: SyntheticStack | Prefix, area: list[int],
                 args: argparse.Namespace):
        self.name, self.folder, self.data, self.args = name, folder, data, args
        self.workload, self.tool, self.step, extra = CONTENDERS[name]
        steps = ["cropping"] + ([self.step] if self.step != "cropping" else [])
        text = COMMON.format(nproc=args.nproc, steps=json.dumps(steps), area=list(area))
        if self.step in TABLES:
            text += TABLES[self.step]
        self.toml = text + extra  # PyStack3D's file: `text`; gpustack's: the same plus its own keys if any
        self.status_file = folder / "status.json"
        folder.mkdir(parents=True, exist_ok=True)
        if self.tool == "gpustack":
            self.toml = f"project_dir = {str(data.root)!r}\noutput_dir = {str(folder)!r}\n" + self.toml
            self.cmd = [python(), "-m", "gpustack", "run", str(folder / "params.toml"), "--overwrite", "-q",
                        "--device", args.device]
        else:
            for src in data.files():  # PyStack3D wants the slices inside its project folder: links, not copies
                link = folder / src.name
                if not link.is_symlink():
                    link.symlink_to(src)
            self.cmd = [python(), "-c", PYSTACK3D, str(folder), ",".join(steps), str(args.nproc),
                        str(self.status_file)]

    @property
    def out_dir(self) -> Path:
        return self.folder / "process" / self.step

    def reset(self) -> None:
        shutil.rmtree(self.folder / "process", ignore_errors=True)
        self.status_file.unlink(missing_ok=True)
        (self.folder / "params.toml").write_text(self.toml)  # PyStack3D rewrites it (history): start afresh

    def check(self) -> str | None:
        """After a run: every slice written (same names); the PyStack3D crash message, if any."""
        names = sorted(p.name for p in self.out_dir.glob("*.tif"))
        expected = sorted(p.name for p in self.data.files())
        if names != expected:
            raise RuntimeError(f"{self.name}: {len(names)} slices in {self.out_dir}, expected {len(expected)}")
        if self.tool == "pystack3d":
            return json.loads(self.status_file.read_text())["crashed"]
        return None


# ---- accuracy -------------------------------------------------------------------------------------------------
def _ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """gpustack.metrics.ssim's definition (documented there as skimage's with these arguments), via skimage:
    about 12x faster on 2 CPU cores; the two are compared on a few slices in accuracy()."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(x, y, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


_STACKS: dict[str, SyntheticStack] = {}  # per worker process
PAIRS = (("gpustack bkg", "pystack3d bkg"), ("gpustack int-hist", "pystack3d int"))  # same method, both tools


def _slice_metrics(task: tuple) -> dict:
    """Per-slice squared-error sums and SSIMs of every output (and of the input) for one slice."""
    root, name, outputs, with_bkg = task
    if root not in _STACKS:
        _STACKS[root] = SyntheticStack.load(root)
    stack = _STACKS[root]
    k, z = parse_name(name)
    truth = stack.truth(z).astype(np.float64)
    bkg = stack.crop(stack.background(k)).astype(np.float64)
    rng = stack.spec.scale
    images = {"input": stack.crop(tifffile.imread(stack.root / name)).astype(np.float64)}
    images.update({key: tifffile.imread(Path(folder) / name).astype(np.float64) for key, folder in outputs.items()})
    res = {}
    for key, img in images.items():
        diff = img - truth
        off = img - diff.mean()
        res[key] = {"sse": float(np.square(diff).sum()), "sse_off": float(np.square(diff - diff.mean()).sum()),
                    "ssim": _ssim(img, truth, rng), "ssim_off": _ssim(off, truth, rng), "n": diff.size}
        if key in with_bkg:  # intensity rescaling alone cannot remove the background: also against truth + bkg
            d2 = img - (truth + bkg)
            res[key].update(sse_b=float(np.square(d2).sum()), ssim_b=_ssim(img, truth + bkg, rng))
    pairs = {f"{a} | {b}": (float(np.abs(images[a] - images[b]).max()), float(np.abs(images[a] - images[b]).sum()))
             for a, b in PAIRS if a in images and b in images}
    return {"k": k, "metrics": res, "pairs": pairs}


def accuracy(data: SyntheticStack, outputs: dict[str, Path], with_bkg: set[str], workers: int) -> dict:
    """Stack metrics per output: RMSE, PSNR (from the stack's MSE), mean SSIM; plain, offset removed, vs truth+bkg."""
    names = [p.name for p in data.files()]
    tasks = [(str(data.root), n, {k: str(v) for k, v in outputs.items()}, with_bkg) for n in names]
    with ProcessPoolExecutor(workers) as pool:
        per_slice = list(pool.map(_slice_metrics, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
    contrast_drop = {int(k) for k in np.flatnonzero(data.contrast != 1.0)}
    rng = data.spec.scale
    out = {}
    for key in ["input", *outputs]:
        rows = [(s["k"], s["metrics"][key]) for s in per_slice]
        n = sum(m["n"] for _, m in rows)
        res = {}
        for sfx in ("", "_off", "_b"):
            if "sse" + sfx not in rows[0][1]:
                continue
            mse = sum(m["sse" + sfx] for _, m in rows) / n
            res["rmse" + sfx] = math.sqrt(mse)
            res["psnr" + sfx] = 10 * math.log10(rng ** 2 / mse) if mse > 0 else math.inf
            res["ssim" + sfx] = float(np.mean([m["ssim" + sfx] for _, m in rows]))
            for part, ks in (("drop", contrast_drop), ("rest", None)):
                sel = [m for k, m in rows if (k in contrast_drop) == (ks is not None)]
                if sel:
                    msep = sum(m["sse" + sfx] for m in sel) / sum(m["n"] for m in sel)
                    res[f"psnr{sfx}_{part}"] = 10 * math.log10(rng ** 2 / msep) if msep > 0 else math.inf
        out[key] = res
    for pair in per_slice[0]["pairs"]:
        n = sum(s["metrics"]["input"]["n"] for s in per_slice)
        out[pair] = {"max_abs": max(s["pairs"][pair][0] for s in per_slice),
                     "mean_abs": sum(s["pairs"][pair][1] for s in per_slice) / n}
    # cross-check against gpustack.metrics on the first, middle and last slice
    from gpustack import metrics

    for name in (names[0], names[len(names) // 2], names[-1]):
        _, z = parse_name(name)
        truth = data.truth(z)
        for key, folder in outputs.items():
            img = tifffile.imread(folder / name).astype(np.float32)
            mine = next(s for s in per_slice if s["k"] == parse_name(name)[0])["metrics"][key]
            assert abs(metrics.rmse(img, truth) - math.sqrt(mine["sse"] / mine["n"])) < 1e-6 * rng
            assert abs(metrics.ssim(img, truth, rng) - mine["ssim"]) < 1e-6, (key, name)
    return out


# ---- profile (optional) ---------------------------------------------------------------------------------------
PROFILE_GROUPS = (("gpustack/report/", "reports and plots"), ("gpustack/io/", "TIFF reading and writing"),
                  ("gpustack/kernels/", "step computation"), ("gpustack/steps/", "step computation"),
                  ("gpustack/pipeline/", "pipeline (batching, statistics)"))


def profile_groups(all_labels: dict[str, float]) -> dict[str, float]:
    groups: Counter = Counter()
    for label, share in all_labels.items():
        if label.startswith("import "):
            groups["imports"] += share
        else:
            groups[next((g for pat, g in PROFILE_GROUPS if pat in label), "other")] += share
    return dict(groups)


def profile(cmd: list[str], out: Path) -> dict[str, float]:
    """py-spy record of one run: share of the (non-idle) samples of all threads, by innermost gpustack function."""
    spy = Path(python()).with_name("py-spy")
    if not spy.exists():
        return {}
    raw = out.with_suffix(".txt")
    proc = subprocess.run([str(spy), "record", "--format", "raw", "--rate", "100", "--nonblocking", "-o", str(raw),
                           "--", *cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not raw.exists():
        print(f"py-spy failed ({proc.returncode}): {proc.stderr[-500:]}", flush=True)
        return {}
    leaf, total = Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if any("_find_and_load" in f for f in frames):  # imports, by the first non-gpustack package imported
            mods = [m.group(1) for f in frames if (m := re.match(r"<module> \((?!gpustack/)([^/.:]+)", f))]
            label = f"import {mods[0]}" if mods else "import (other)"
        else:  # the innermost gpustack function (file, no line), else the innermost frame
            ours = [f for f in frames if "gpustack/" in f]
            label = re.sub(r":\d+\)$", ")", ours[-1] if ours else frames[-1]) or "(no frame)"
        leaf[label] += int(count)
        total += int(count)
    return {label: 100 * c / total for label, c in leaf.most_common()} if total else {}


# ---- report ---------------------------------------------------------------------------------------------------
def analysis(med: dict, acc: dict, profiles: dict, results: dict, names: list[str], n_sl: int, data: SyntheticStack,
             load_before: tuple, load_after: tuple) -> list[str]:
    """Plain sentences from the numbers above: what was measured, no more."""
    out = []
    warm, cold = med.get("warm", {}), med.get("cold", {})

    def marg(cache: dict, name: str) -> float:
        return cache[name] - cache[f"{CONTENDERS[name][1]} crop"]

    n_drop = int((data.contrast != 1).sum())
    if warm and "pystack3d bkg" in warm:
        g, p = "gpustack bkg", "pystack3d bkg"
        out.append(f"A, time: warm, gpustack's whole run took {warm[g]:.1f} s and PyStack3D's {warm[p]:.1f} s "
                   f"(cold: {cold.get(g, math.nan):.1f} and {cold.get(p, math.nan):.1f} s); the background step "
                   f"alone (minus each tool's cropping-only run) {marg(warm, g):.1f} s against {marg(warm, p):.1f} s: "
                   f"PyStack3D / gpustack = {warm[p] / warm[g]:.2f} for the run, {marg(warm, p) / marg(warm, g):.2f} "
                   "for the step.")
    if "pystack3d bkg" in acc:
        i, g, p = acc["input"], acc["gpustack bkg"], acc["pystack3d bkg"]
        out.append(f"A, accuracy: PSNR {g['psnr']:.2f} dB (gpustack) and {p['psnr']:.2f} dB (PyStack3D) against "
                   f"{i['psnr']:.2f} dB for the input; offset removed {g['psnr_off']:.2f}, {p['psnr_off']:.2f} and "
                   f"{i['psnr_off']:.2f} dB; offset removed, on the {n_sl - n_drop} slices without the contrast drop "
                   f"(which this step does not touch) {g['psnr_off_rest']:.2f}, {p['psnr_off_rest']:.2f} and "
                   f"{i['psnr_off_rest']:.2f} dB.")
        d = acc.get("gpustack bkg | pystack3d bkg")
        if d:
            out[-1] += (f" The two outputs differ by at most {d['max_abs']:.0f} grey level(s), "
                        f"{d['mean_abs']:.2f} on average.")
    if warm and "pystack3d int" in warm:
        p = "pystack3d int"
        parts = [f"{LABELS[g].split(' (')[0]} {CONTENDERS[g][3] and '(histogram, mean)' or '(linear, median, jumps)'} "
                 f"{warm[g]:.1f} s, step {marg(warm, g):.1f} s (PyStack3D / it: {warm[p] / warm[g]:.2f} run, "
                 f"{marg(warm, p) / marg(warm, g):.2f} step)" for g in ("gpustack int", "gpustack int-hist")]
        out.append(f"B, time (warm): PyStack3D {warm[p]:.1f} s, step {marg(warm, p):.1f} s; " + "; ".join(parts) + ".")
    if "pystack3d int" in acc:
        i, gl, gh, p = (acc[k] for k in ("input", "gpustack int", "gpustack int-hist", "pystack3d int"))
        out.append(f"B, accuracy against truth + background: on the {n_drop} contrast-drop slices PSNR goes from "
                   f"{i['psnr_b_drop']:.2f} dB (input) to {gl['psnr_b_drop']:.2f} (gpustack's default), "
                   f"{gh['psnr_b_drop']:.2f} (gpustack histogram) and {p['psnr_b_drop']:.2f} dB (PyStack3D); on the "
                   f"other slices from {i['psnr_b_rest']:.2f} dB to {gl['psnr_b_rest']:.2f}, {gh['psnr_b_rest']:.2f} "
                   f"and {p['psnr_b_rest']:.2f} dB; mean SSIM {i['ssim_b']:.4f} -> {gl['ssim_b']:.4f}, "
                   f"{gh['ssim_b']:.4f}, {p['ssim_b']:.4f}.")
        d = acc.get("gpustack int-hist | pystack3d int")
        if d:
            out[-1] += (f" gpustack's histogram mode and PyStack3D differ by at most {d['max_abs']:.0f} grey levels, "
                        f"{d['mean_abs']:.1f} on average.")
    for name, prof in profiles.items():
        if prof:
            groups = profile_groups(prof)
            torch_share = prof.get("import torch", 0.0)
            out.append(f"gpustack, workload {CONTENDERS[name][0]}, warm (py-spy): " + ", ".join(
                f"{v:.0f} % {k}" + (f" ({torch_share:.0f} % torch)" if k == "imports" else "")
                for k, v in sorted(groups.items(), key=lambda kv: -kv[1])) + " of the non-idle samples.")
    spreads = [(max(s for s, _ in v) - min(s for s, _ in v), n, c) for c, r in results.items() for n, v in r.items()
               if len(v) > 1]
    note = f"1-min load average {load_before[0]:.2f} before and {load_after[0]:.2f} after the timed runs (2 cores)"
    if spreads:
        d, n, c = max(spreads)
        note += f"; largest spread between repeats {d:.2f} s ({n}, {c})"
    out.append(note + ".")
    return out



def fmt(v: float, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="40 slices of 256x256, no RESULTS.md: tests the script")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per contender and cache (median shown)")
    parser.add_argument("--nproc", type=int, default=2, help="PyStack3D processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("bench-data/bkg-intensity"))
    parser.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    parser.add_argument("--short", type=int, default=50,
                        help="also time every contender (warm) on this many first slices: per-slice costs; 0: no")
    parser.add_argument("--no-pystack3d", action="store_true")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of gpustack's runs")
    parser.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.slices, args.size, args.no_results, args.short = 40, 256, True, min(args.short, 10)
    command = "python benchmarks/bench_background_intensity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    work = (args.work / f"n{args.slices}_s{args.size}").resolve()
    spec = make_spec(args.slices, args.size)
    data = dataset(work / "data", spec)
    area = list(data.area)
    inputs = data.files()
    names = [n for n in CONTENDERS if not (args.no_pystack3d and CONTENDERS[n][1] == "pystack3d")]
    runs = {n: Contender(n, work / "runs" / n.replace(" ", "_"), data, area, args) for n in names}
    n_short = args.short if 0 < args.short < len(inputs) else 0
    if n_short:
        prefix = Prefix(work / f"first{n_short}", inputs[:n_short])
        shorts = {n: Contender(n, work / f"runs_first{n_short}" / n.replace(" ", "_"), prefix, area, args)
                  for n in names}

    print("untimed cropping-only run of each tool (imports into the page cache) ...", flush=True)
    crashes: dict[str, str | None] = {}
    for name, c in runs.items():
        if c.workload == "crop":
            c.reset()
            timed(c.cmd)
            c.check()
    load_before = os.getloadavg()
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    results: dict = {}
    for cache in caches:
        for rep in range(args.repeats):
            for name, c in runs.items():
                c.reset()
                if cache == "cold" and not evict(inputs):
                    raise SystemExit("this OS cannot drop files from the page cache; use --cache warm")
                seconds, peak = timed(c.cmd)
                crashes[name] = c.check()
                results.setdefault(cache, {}).setdefault(name, []).append((seconds, peak))
                print(f"{cache:4} {rep + 1}/{args.repeats} {name:18} {seconds:7.2f} s {peak:7.0f} MiB"
                      + (f"  (crashed after writing all slices: {crashes[name]})" if crashes[name] else ""), flush=True)
                if cache == "warm" and n_short:
                    short = shorts[name]
                    short.reset()
                    seconds, _ = timed(short.cmd)
                    short.check()
                    results.setdefault("short", {}).setdefault(name, []).append((seconds, 0.0))
                    print(f"warm {rep + 1}/{args.repeats} {name:18} {seconds:7.2f} s  (first {n_short} slices)",
                          flush=True)

    load_after = os.getloadavg()
    profiles: dict[str, dict[str, float]] = {}
    if not args.no_profile and not Path(python()).with_name("py-spy").exists():
        print("py-spy is not installed beside this python: no profile (pip install py-spy)", flush=True)
    elif not args.no_profile:
        for name in ("gpustack bkg", "gpustack int"):
            print(f"py-spy profile of {name} (warm) ...", flush=True)
            c = runs[name]
            c.reset()
            profiles[name] = profile(c.cmd, work / f"profile_{name.replace(' ', '_')}")
            c.check()  # the profiled run rewrote this output: same parameters, same result

    print("accuracy against the ground truth ...", flush=True)
    start = time.perf_counter()
    final = {n: c.out_dir for n, c in runs.items() if c.workload != "crop"}
    with_bkg = {n for n in final if runs[n].workload == "B"} | {"input"}
    acc = accuracy(data, final, with_bkg, workers=max(1, min(2, os.cpu_count() or 1)))
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)

    med = {cache: {n: summary([s for s, _ in v]) for n, v in r.items()} for cache, r in results.items()}
    peak = {n: max(p for cache in results for _, p in results[cache][n]) for n in names}
    n_sl = len(inputs)
    nproc = args.nproc
    h, w = area[3] - area[2], area[1] - area[0]

    def crop_of(name: str) -> str:
        return f"{CONTENDERS[name][1]} crop"

    def cell_t(cache: str, name: str) -> float | None:
        return med.get(cache, {}).get(name)

    def marginal(cache: str, name: str) -> float | None:
        t, t0 = cell_t(cache, name), cell_t(cache, crop_of(name))
        return None if t is None or t0 is None else t - t0

    def per_slice(name: str) -> float | None:
        """ms per slice from the warm runs on all slices and on the first n_short."""
        t, t0 = cell_t("warm", name), med.get("short", {}).get(name)
        return None if t is None or t0 is None else 1e3 * (t - t0) / (n_sl - n_short)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b <= 0 else a / b

    header = ("| contender | cold s | warm s | marginal s, cold / warm | slices/s, warm marginal | "
              "PyStack3D / this: cold, warm, warm marginal | peak RSS MiB | RMSE | PSNR dB | SSIM | "
              "offset removed: RMSE | PSNR dB | SSIM |")
    sep = "|" + "---|" * 13
    lines = [f"Machine: {machine()}.", "",
             f"`{command}` (seed {SEED}, {args.repeats} timed run(s) per contender and cache, median): "
             f"{n_sl} slices of {spec.width}x{spec.height} uint16, one channel "
             f"({n_sl * spec.width * spec.height * 2 / 2**20:.0f} MiB, uncompressed), `SyntheticSpec(...)"
             f".without_defects(noise_sigma=0.005, background_amplitude=0.15, contrast_range=(0.25, 0.33))`: "
             f"x*y*z background of 0.15 (relative to the blob range; coefficients "
             + ", ".join(f"{k} {v:.2f}" for k, v in data.background_coefficients.items())
             + f"), contrast x{spec.contrast_factor} on {int((data.contrast != 1).sum())} slices, noise 0.005, "
             f"no shifts, curtains or deleted slices. Both tools crop to the real region `area = {area}` "
             f"({w}x{h}) first. Each contender is a fresh process (start-up included), run by "
             "`/usr/bin/time`; cold: the input slices dropped from the page cache (posix_fadvise) before the run. "
             "Marginal = workload - the same tool's cropping-only run (same cache). Peak RSS is `/usr/bin/time`'s "
             "maximum resident set: for PyStack3D (a parent and a Pool of workers) the largest single process, "
             "not their sum.", "",
             ("Accuracy against the ground truth `truth(z)` (clean content, no background, no contrast drop), over "
              f"all {n_sl} slices of the last warm run's output: RMSE in grey levels, PSNR from the stack's MSE and "
              f"mean SSIM (gpustack.metrics' definition), data_range = spec.scale = {spec.scale:.0f}. "
              "*Offset removed*: each slice's mean of (output - truth) subtracted first, since a background "
              "correction keeps a constant level. *input*: the cropped, uncorrected slices.")]

    def tables(workload: str, title: str, steps: str) -> None:
        lines.extend(["", f"### {title}", "", steps, "", header, sep])
        a = acc["input"]
        lines.append(f"| input (cropped, uncorrected) | — | — | — | — | — | — | {fmt(a['rmse'], '.0f')} | "
                     f"{fmt(a['psnr'], '.2f')} | {fmt(a['ssim'], '.4f')} | {fmt(a['rmse_off'], '.0f')} | "
                     f"{fmt(a['psnr_off'], '.2f')} | {fmt(a['ssim_off'], '.4f')} |")
        theirs = next((n for n in names if CONTENDERS[n][:2] == (workload, "pystack3d")), None)
        rows = [n for n in names if CONTENDERS[n][0] == workload] + [n for n in names if CONTENDERS[n][0] == "crop"]
        for name in rows:
            label = LABELS[name].format(nproc=nproc)
            if crashes.get(name):
                label += " ‡"
            cold, warm = cell_t("cold", name), cell_t("warm", name)
            if CONTENDERS[name][0] == "crop":
                ref = "pystack3d crop"
                speed = ", ".join(fmt(ratio(cell_t(c, ref), t), ".2f") for c, t in (("cold", cold), ("warm", warm)))
                speed += ", —"
                lines.append(f"| {label} | {fmt(cold, '.2f')} | {fmt(warm, '.2f')} | — | — | {speed} | "
                             f"{peak[name]:.0f} | | | | | | |")
                continue
            mc, mw = marginal("cold", name), marginal("warm", name)
            speed = ", ".join(fmt(ratio(cell_t(c, theirs) if theirs else None, t), ".2f") for c, t in
                              (("cold", cold), ("warm", warm))) + ", " + \
                fmt(ratio(marginal("warm", theirs) if theirs else None, mw), ".2f")
            a = acc[name]
            lines.append(f"| {label} | {fmt(cold, '.2f')} | {fmt(warm, '.2f')} | {fmt(mc, '.2f')} / {fmt(mw, '.2f')} "
                         f"| {fmt(n_sl / mw if mw and mw > 0 else None, '.0f')} | {speed} | {peak[name]:.0f} | "
                         f"{fmt(a['rmse'], '.0f')} | {fmt(a['psnr'], '.2f')} | {fmt(a['ssim'], '.4f')} | "
                         f"{fmt(a['rmse_off'], '.0f')} | {fmt(a['psnr_off'], '.2f')} | {fmt(a['ssim_off'], '.4f')} |")
        crashed = [n for n in rows if crashes.get(n)]
        for n in crashed:
            lines.extend(["", (f"‡ {LABELS[n].format(nproc=nproc)} ended with `{crashes[n]}` in "
                               "`stack3d.plot_stats_xy` (its 2D bkg_removal plot wants 3 skip factors; PEERS §1.2), "
                               f"after writing all {n_sl} output slices (checked: same names as the input). Its times "
                               "run to that error (the driver catches it); the plots that would follow "
                               "(`stats_X/Y.png`, `coefs.png`) are not made and `history` is not written. Its "
                               "`stats.png` and the per-slice `bkgs/*.png` are.")])

    tables("A", "A. 2D robust background removal",
           '`process_steps = ["cropping", "bkg_removal"]`, `[bkg_removal] orders = [1, 1], cross_terms = true, '
           'skip_factors = [10, 10], weight_func = "HuberT"` (one fit per slice; gpustack: maxiter 50, '
           "its default).")
    tables("B", "B. Intensity rescaling",
           '`process_steps = ["cropping", "intensity_rescaling"]`, `[intensity_rescaling] nbins = 256, '
           "filter_size = -1` (PyStack3D's template), on the same input (background still in). gpustack's second "
           'row adds `mapping = "histogram", reference = "mean"` (PyStack3D\'s method) to its own copy of the file.')
    if n_short and "short" in med:
        lines += ["", f"### Per-slice costs without start-up (warm, {n_sl} against the first {n_short} slices)", "",
                  (f"Each contender's warm run on the first {n_short} slices of the same stack (linked, same files), "
                   f"against its run on all {n_sl}: (t({n_sl}) - t({n_short})) / {n_sl - n_short} is its cost per "
                   "slice without start-up (imports, the plots' fixed part), which a stack of thousands of slices "
                   "is made of. A step's cost per slice: its workload's minus the same tool's cropping-only run's."),
                  "", f"| contender | workload | warm s, {n_sl} slices | warm s, {n_short} slices | ms per slice | "
                  "step ms per slice | PyStack3D / this, step per slice |", "|---|---|---|---|---|---|---|"]
        per = {n: per_slice(n) for n in names}
        for name in names:
            workload = CONTENDERS[name][0]
            step = None if workload == "crop" or per[name] is None or per[crop_of(name)] is None \
                else per[name] - per[crop_of(name)]
            theirs = next((n for n in names if CONTENDERS[n][:2] == (workload, "pystack3d")), None)
            their_step = None if theirs is None or workload == "crop" or per[theirs] is None \
                else per[theirs] - per[crop_of(theirs)]
            lines.append(f"| {LABELS[name].format(nproc=nproc)} | {workload} | {fmt(cell_t('warm', name), '.2f')} | "
                         f"{fmt(med['short'].get(name), '.2f')} | {fmt(per[name], '.2f')} | {fmt(step, '.2f')} | "
                         f"{fmt(ratio(their_step, step), '.2f') if step is not None else '—'} |")
    lines += ["", ("The ground truth has no background, which intensity rescaling does not remove; against "
                   "truth + background (the target of a contrast correction alone), with PSNR split between the "
                   f"{int((data.contrast != 1).sum())} contrast-drop slices and the others:"), "",
              "| contender | RMSE | PSNR dB | SSIM | PSNR dB, contrast-drop slices | PSNR dB, other slices |",
              "|---|---|---|---|---|---|"]
    for key in ["input"] + [n for n in names if CONTENDERS[n][0] == "B"]:
        a = acc[key]
        label = "input (cropped, uncorrected)" if key == "input" else LABELS[key].format(nproc=nproc)
        lines.append(f"| {label} | {fmt(a['rmse_b'], '.0f')} | {fmt(a['psnr_b'], '.2f')} | {fmt(a['ssim_b'], '.4f')} "
                     f"| {fmt(a.get('psnr_b_drop'), '.2f')} | {fmt(a.get('psnr_b_rest'), '.2f')} |")
    for name, prof in profiles.items():
        if prof:
            lines += ["", (f"Where one warm gpustack run of workload {CONTENDERS[name][0]} ({LABELS[name]}) spends "
                           "its samples (`py-spy record --rate 100 --nonblocking`; non-idle samples of all threads, by "
                           "innermost gpustack function, imports by package; top 10):"), ""]
            lines += [f"- {share:.1f} % `{label}`" for label, share in list(prof.items())[:10]]
    lines += ["", "Measured, in short:", ""]
    lines += [f"- {x}" for x in analysis(med, acc, profiles, results, names, n_sl, data, load_before, load_after)]
    text = "\n".join(lines)
    print("\n" + text)
    out = {"machine": machine(), "command": command, "args": {k: str(v) for k, v in vars(args).items()},
           "area": area, "runs": {c: {n: v for n, v in r.items()} for c, r in results.items()},
           "crashes": crashes, "accuracy": acc, "profiles": profiles}
    (work / "results.json").write_text(json.dumps(out, indent=2, default=str))
    if not args.no_results:
        update_results("background-intensity", "## Background removal and intensity rescaling (steps issue)\n\n"
                       + text)


if __name__ == "__main__":
    main()
