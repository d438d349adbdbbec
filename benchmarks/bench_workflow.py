"""The whole workflow against PyStack3D, on a synthetic stack with ground truth and all of PyStack3D's defects.

One run: the same input, the same params.toml (cropping, bkg_removal, intensity_rescaling, registration,
destriping, resampling, cropping_final), run by gpustack (`gpustack run`) and by PyStack3D (`Stack3d.eval`, one
step at a time, nproc = --nproc), once with VSNR destriping and once with the wavelet filter. Reported per step
and end to end: seconds, slices/s, the ratio, peak memory, and each step's output against the ground truth
(RMSE, PSNR, mean SSIM, on the same region and at each plane's own z). Then the paper's timings beside a
projection of gpustack's for the paper's workload from the per-pixel costs measured here, and a figure.

    python benchmarks/bench_workflow.py                     # quick: 100 slices of 512^2
    python benchmarks/bench_workflow.py --slices 300 --size 2048
    gpustack bench [same options]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cached_stack, evict, machine, python, timed, update_results
from gpustack.area import Area
from gpustack.synthetic import SyntheticSpec, SyntheticStack, parse_name

MAX_OFFSET = 20  # px: how far a tool's final crop may sit from where it should be (see _placed)
STEPS = ["cropping", "bkg_removal", "intensity_rescaling", "registration_calculation",
         "registration_transformation", "destriping", "resampling", "cropping_final"]
FILTERS = ('[{ name = "Gabor", noise_level = 30, sigma = [0.5, 80], theta = 0 }, '
           '{ name = "Gabor", noise_level = 80, sigma = [0.5, 200], theta = 0 }]')
PAPER = {  # PyStack3D's paper (JOSS 2024): 2000 slices, 4224^2 cropped to 2000^2, 32 CPUs; seconds
    "cropping": (750, 30), "bkg_removal": (250, 70), "destriping": (22400, 700),
    "registration": (5400, 25), "intensity_rescaling": (None, 25), "resampling": (None, 10),
}
PYSTACK3D = """
import json, sys, time
from pystack3d import Stack3d
project, steps, nproc, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
stack = Stack3d(project)
times = {}
for step in steps:
    start = time.perf_counter()
    stack.eval(process_steps=[step], nproc=nproc, show_pbar=False)
    times[step] = time.perf_counter() - start
json.dump(times, open(out, "w"))
"""


def make_spec(slices: int, size: int) -> SyntheticSpec:
    # every defect PyStack3D corrects; curtains on a third of the slices (they come and go)
    return SyntheticSpec(n_slices=slices, height=size, width=size, dtype="uint16", seed=21,
                         curtain_slices=tuple(np.linspace(0.05, 0.95, max(2, slices // 3))))


def params(stack: SyntheticStack, destriping: str, nproc: int) -> str:
    spec = stack.spec
    inner = Area(*stack.area)
    inner_h, inner_w = inner.shape(spec.height, spec.width)
    margin = math.ceil(spec.max_shift) + 1
    final = [margin, inner_w - margin, margin, inner_h - margin]
    table = (f"[destriping]\nmaxit = 50\ncvg_threshold = 1e-2\nfilters = {FILTERS}\n" if destriping == "vsnr" else
             '[destriping]\nwavelet_decomposition = { wavelet = "coif3", level = 3, sigma = 4 }\n')
    return (f'channels = ["."]\nnproc = {nproc}\nind_min = 0\nind_max = 99999\n'
            f'process_steps = {json.dumps(STEPS)}\nhistory = []\n\n'
            f"[cropping]\narea = {list(stack.area)}\n\n"
            "[bkg_removal]\ndim = 3\norders = [1, 1, 1]\ncross_terms = true\nskip_factors = [5, 5, 5]\n"
            "preserve_avg = true\n\n"
            "[intensity_rescaling]\nnbins = 256\nfilter_size = -1\n\n"
            '[registration_calculation]\ntransformation = "TRANSLATION"\nnb_blocks = [1, 1]\n\n'
            '[registration_transformation]\nmode = "edge"\nsubpixel = true\ncropping = false\n\n'
            f"{table}\n"
            '[resampling]\npolicy = "slice_{slice_nb}_z={z_coord}um.tif"\ndz = ' + f"{spec.z_step}\n\n"
            f"[cropping_final]\narea = {final}\n")


# ---- accuracy --------------------------------------------------------------------------------------------------

def _placed(img: np.ndarray, full: np.ndarray, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray, int]:
    """img (a crop of the real region at rows, cols) and the truth under it. If the tool moved the crop (PyStack3D's
    wavelet output grows odd-sized slices, and cropping_final measures rows from the bottom of the grown
    slice), the row offset that fits best within +-MAX_OFFSET is found and used; returned as the third value."""
    h, w = img.shape
    best = (math.inf, 0)
    for dy in range(-MAX_OFFSET, MAX_OFFSET + 1):
        r0 = rows.start + dy
        if r0 < 0 or r0 + h > full.shape[0]:
            continue
        err = float(np.mean((img - full[r0:r0 + h, cols.start:cols.start + w]) ** 2))
        best = min(best, (err, dy))
    dy = best[1]
    return img, full[rows.start + dy:rows.start + dy + h, cols.start:cols.start + w], dy


def accuracy(stack: SyntheticStack, folder: Path, final_area: list[int], sample: int) -> dict[str, float]:
    """RMSE, PSNR and mean SSIM of up to `sample` slices of a folder against the truth at each slice's z, on the
    region the folder holds (the real region, then cropping_final's)."""
    from gpustack.metrics import psnr, rmse, ssim

    files = sorted(folder.glob("*.tif"))
    if not files:
        return {}
    picks = files[:: max(1, len(files) // sample)][:sample]
    got, truth, offsets = [], [], []
    spec = stack.spec
    inner_h, inner_w = Area(*stack.area).shape(spec.height, spec.width)
    final_rows, final_cols = Area(*final_area).rows_cols(inner_h, inner_w)
    for path in picks:
        img = tifffile.imread(path).astype(np.float32)
        full = stack.truth(parse_name(path.name)[1])
        if img.shape == (spec.height, spec.width):  # not cropped yet: compare the real region
            img, t = stack.crop(img), full
        elif img.shape == full.shape:
            t = full
        elif img.shape[0] >= inner_h and img.shape[1] >= inner_w:  # grown by the tool: its top-left is the slice
            img, t = img[:inner_h, :inner_w], full
        else:  # cropping_final's region
            img, t, dy = _placed(img, full, final_rows, final_cols)
            offsets.append(dy)
        got.append(img)
        truth.append(t)
    g, t = np.stack(got), np.stack(truth)
    peak = float(t.max())
    out = {"rmse": float(np.mean(rmse(g, t))), "psnr": float(np.mean(psnr(g, t, peak))),
           "ssim": float(np.mean(ssim(g, t, peak))), "slices": len(files)}
    if offsets:
        out["row_offset"] = int(np.median(offsets))
    return out


# ---- runs ------------------------------------------------------------------------------------------------------

def run_pystack3d(stack: SyntheticStack, folder: Path, text: str, nproc: int) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for src in stack.files():
        (folder / src.name).symlink_to(src)
    (folder / "params.toml").write_text(text)
    evict(stack.files())
    out = folder / "times.json"
    seconds, peak = timed([python(), "-c", PYSTACK3D, str(folder), ",".join(STEPS), str(nproc), str(out)])
    return {"seconds": seconds, "peak_mib": peak, "steps": json.loads(out.read_text()), "process": folder / "process"}


def run_gpustack(stack: SyntheticStack, folder: Path, text: str, device: str) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "params.toml").write_text(f"project_dir = {str(stack.root)!r}\noutput_dir = {str(folder)!r}\n" + text)
    evict(stack.files())
    seconds, peak = timed([python(), "-m", "gpustack", "run", str(folder / "params.toml"), "-q", "--device", device])
    manifest = json.loads((folder / "process" / "gpustack.json").read_text())
    passes: dict[int, dict] = {}
    for name, entry in manifest["steps"].items():
        p = passes.setdefault(entry["pass_number"], {"steps": [], "seconds": entry["pass_seconds"]})
        p["steps"].append(name)
    return {"seconds": seconds, "peak_mib": peak, "passes": [passes[k] for k in sorted(passes)],
            "device": manifest["runs"][-1]["device"] if "runs" in manifest else device,
            "process": folder / "process"}


# ---- report ----------------------------------------------------------------------------------------------------

def figure(path: Path, stack: SyntheticStack, results: dict, final_area: list[int]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8), layout="constrained")  # the benchmark's figure: matplotlib (bench extra)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(grid[0, :])
    labels = ["cropping", "bkg_removal", "intensity_rescaling", "registration", "destriping", "resampling",
              "cropping_final"]
    x = np.arange(len(labels))
    for k, (mode, res) in enumerate(results.items()):
        if "pystack3d" in res:
            steps = res["pystack3d"]["steps"]
            vals = [steps.get(s, 0) + (steps.get("registration_transformation", 0) if s == "registration_calculation"
                                       else 0) for s in ["cropping", "bkg_removal", "intensity_rescaling",
                                                         "registration_calculation", "destriping", "resampling",
                                                         "cropping_final"]]
            ax.bar(x + (k - 0.5) * 0.4 - 0.1, vals, 0.2, label=f"PyStack3D ({mode})")
        total = res["gpustack"]["seconds"]
        ax.axhline(total, ls="--", lw=0.8, color=f"C{k + 2}", label=f"gpustack whole run ({mode}): {total:.1f} s")
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("PyStack3D per step (bars) against gpustack's whole fused run (lines)")
    # x-z cut planes through the middle row: raw, PyStack3D, gpustack, truth
    mode = next(iter(results))
    cuts = {}
    raw = [stack.crop(tifffile.imread(p)) for p in stack.files()]
    mid = raw[0].shape[0] // 2
    cuts["input"] = np.stack([r[mid] for r in raw])
    for tool in ("pystack3d", "gpustack"):
        if tool in results[mode]:
            files = sorted((results[mode][tool]["process"] / "cropping_final").glob("*.tif"))
            planes = [tifffile.imread(p) for p in files]
            cuts[f"{tool} ({mode})"] = np.stack([pl[pl.shape[0] // 2] for pl in planes])
    files = sorted((results[mode]["gpustack"]["process"] / "cropping_final").glob("*.tif"))
    truth = [stack.truth(parse_name(p.name)[1]) for p in files]
    rows, cols = Area(*final_area).rows_cols(*truth[0].shape)
    cuts["truth"] = np.stack([t[rows, cols][(rows.stop - rows.start) // 2] for t in truth])
    lo, hi = np.percentile(cuts["truth"], [1, 99])
    for k, (name, img) in enumerate(cuts.items()):
        a = fig.add_subplot(grid[1, k % 4])
        a.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        a.set_title(f"x-z cut: {name}", fontsize=9)
        a.set_xlabel("x")
        a.set_ylabel("slice / plane")
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpustack bench", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=os.cpu_count() or 1, help="PyStack3D's processes")
    parser.add_argument("--device", default="auto", help="gpustack's device (auto, cpu, cuda)")
    parser.add_argument("--destriping", choices=["vsnr", "wavelet", "both"], default="both")
    parser.add_argument("--sample", type=int, default=24, help="slices per folder measured against the truth")
    parser.add_argument("--no-pystack3d", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("/tmp/gpustack-bench-workflow"))
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md and the figure")
    parser.add_argument("--references", type=int, default=None,
                        help="gpustack only: [registration_calculation] references = N (slices each one is "
                             "registered to; default: gpustack's, 3); implies --no-record")
    args = parser.parse_args(argv)
    if args.references is not None:
        args.no_record = True  # RESULTS.md holds runs of the same params.toml for both tools

    from gpustack.device import resolve_device

    choice = resolve_device(args.device)
    spec = make_spec(args.slices, args.size)
    stack = cached_stack(args.root / f"stack_{args.size}_{args.slices}", spec)
    modes = ["vsnr", "wavelet"] if args.destriping == "both" else [args.destriping]
    inner_h, inner_w = Area(*stack.area).shape(spec.height, spec.width)
    margin = math.ceil(spec.max_shift) + 1
    final_area = [margin, inner_w - margin, margin, inner_h - margin]
    results: dict[str, dict] = {}
    for mode in modes:
        text = params(stack, mode, args.nproc)
        res = results[mode] = {}
        print(f"[{mode}] gpustack on {choice.description} ...", flush=True)
        gpustack_text = text if args.references is None else text.replace(
            "[registration_calculation]\n", f"[registration_calculation]\nreferences = {args.references}\n")
        res["gpustack"] = run_gpustack(stack, args.root / f"gpustack_{mode}", gpustack_text, str(choice.device))
        if not args.no_pystack3d:
            print(f"[{mode}] PyStack3D, nproc={args.nproc} ...", flush=True)
            res["pystack3d"] = run_pystack3d(stack, args.root / f"pystack3d_{mode}", text, args.nproc)
        for tool in ("gpustack", "pystack3d"):
            if tool in res:
                res[tool]["accuracy"] = {s: accuracy(stack, res[tool]["process"] / s, final_area, args.sample)
                                         for s in STEPS if s != "registration_calculation"}

    # ---- tables
    n_in = len(stack.files())
    lines = [f"Machine: {machine()}; gpustack device: {choice.description}"
             + (" (a CPU-only machine: the suite ran on the CPU)" if choice.device.type == "cpu" else "") + ".",
             f"Command: `gpustack bench --slices {args.slices} --size {args.size} --nproc {args.nproc}` "
             f"(= `python benchmarks/bench_workflow.py ...`). Stack: {n_in} slices of {args.size}x{args.size} "
             "uint16 (synthetic: border band, shifted slices, curtains on a third of the slices, a contrast drop, "
             "an x*y*z background, noise, deleted slices with z in the names); cold page cache for every run.", ""]
    acc_in = accuracy_input(stack, args.sample)
    for mode, res in results.items():
        g = res["gpustack"]
        lines += [f"### {'VSNR' if mode == 'vsnr' else 'wavelet'} destriping", ""]
        lines += ["| | gpustack | PyStack3D | ratio |", "|---|---:|---:|---:|"]
        p = res.get("pystack3d")
        lines.append(f"| end to end, seconds | {g['seconds']:.1f} | {p['seconds']:.1f} | "
                     f"**{p['seconds'] / g['seconds']:.1f}x** |" if p else f"| end to end, seconds | "
                     f"{g['seconds']:.1f} | | |")
        lines.append(f"| slices/s (input slices) | {n_in / g['seconds']:.2f} | "
                     f"{n_in / p['seconds']:.2f} | |" if p else f"| slices/s | {n_in / g['seconds']:.2f} | | |")
        lines.append(f"| peak memory, MiB (largest process) | {g['peak_mib']:.0f} | "
                     f"{p['peak_mib']:.0f} | |" if p else f"| peak memory, MiB | {g['peak_mib']:.0f} | | |")
        fin_g = g["accuracy"]["cropping_final"]
        if p:
            fin_p = p["accuracy"]["cropping_final"]
            lines.append(f"| final PSNR / SSIM against truth (input {acc_in['psnr']:.2f} dB / {acc_in['ssim']:.3f}) "
                         f"| {fin_g['psnr']:.2f} dB / {fin_g['ssim']:.3f} | {fin_p['psnr']:.2f} dB / "
                         f"{fin_p['ssim']:.3f} | {fin_g['psnr'] - fin_p['psnr']:+.2f} dB |")
            lines.append(f"| final crop's row offset found (0: where it should be) | {fin_g.get('row_offset', 0)} | "
                         f"{fin_p.get('row_offset', 0)} | |")
        lines += ["", "gpustack's passes (steps fused in one pass share its time):", ""]
        lines += ["| pass | steps | seconds | slices/s |", "|---:|---|---:|---:|"]
        for k, ps in enumerate(g["passes"], 1):
            lines.append(f"| {k} | {', '.join(ps['steps'])} | {ps['seconds']:.2f} | {n_in / ps['seconds']:.1f} |")
        lines += ["", "Per step, each tool's output against the ground truth (RMSE / PSNR / mean SSIM)"
                  + (f"; PyStack3D's seconds per step (nproc={args.nproc}):" if p else ":"), ""]
        lines += ["| step | PyStack3D s | PyStack3D RMSE / PSNR / SSIM | gpustack RMSE / PSNR / SSIM |",
                  "|---|---:|---|---|"]
        for s in STEPS:
            sec = f"{p['steps'][s]:.2f}" if p else ""
            cells = []
            for tool in ("pystack3d", "gpustack"):
                a = res.get(tool, {}).get("accuracy", {}).get(s)
                cells.append(f"{a['rmse']:.0f} / {a['psnr']:.2f} / {a['ssim']:.3f}" if a else "")
            lines.append(f"| {s} | {sec} | {cells[0]} | {cells[1]} |")
        lines.append("")

    # ---- projection for the paper's workload
    mode = "vsnr" if "vsnr" in results else modes[0]
    g = results[mode]["gpustack"]
    per_pixel = g["seconds"] / (n_in * args.size * args.size)
    projected = per_pixel * 2000 * 2000 * 2000
    lines += ["### The paper's workload", "",
              "PyStack3D's paper: 2000 slices of 4224^2 cropped to 2000^2, 32 CPUs (seconds):", "",
              "| step | Fiji | PyStack3D |", "|---|---:|---:|"]
    for s, (fiji, pys) in PAPER.items():
        lines.append(f"| {s} | {fiji if fiji is not None else ''} | {pys} |")
    lines += ["", f"**Projection, not a measurement:** gpustack's whole run here cost {per_pixel * 1e9:.2f} ns per "
              f"input pixel on {choice.description} ({'VSNR' if mode == 'vsnr' else 'wavelet'} destriping); at that "
              f"rate 2000 slices of 2000^2 would take about {projected / 60:.0f} min on this machine. (It ignores the "
              "crop from 4224^2, which gpustack does while reading, and assumes cost linear in pixels; VSNR's FFTs "
              "grow slightly faster.)"]
    text = "\n".join(lines)
    print(text)
    summary = {m: {t: {k: v for k, v in r.items() if k != "process"} for t, r in res.items()}
               for m, res in results.items()}
    (args.root / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    if not args.no_record:
        figure(Path(__file__).with_name("results.png"), stack, results, final_area)
        update_results("workflow", "## The whole workflow against PyStack3D (issue #7)\n\n" + text +
                       "\n\n![per-step times and x-z cut planes](results.png)")
    return 0


def accuracy_input(stack: SyntheticStack, sample: int) -> dict[str, float]:
    from gpustack.metrics import psnr, ssim

    files = stack.files()
    picks = files[:: max(1, len(files) // sample)][:sample]
    g = np.stack([stack.crop(tifffile.imread(p)).astype(np.float32) for p in picks])
    t = np.stack([stack.truth(parse_name(p.name)[1]) for p in picks])
    peak = float(t.max())
    return {"psnr": float(np.mean(psnr(g, t, peak))), "ssim": float(np.mean(ssim(g, t, peak)))}


if __name__ == "__main__":
    sys.exit(main())
