"""Registration against PyStack3D: estimation and warp (TRANSLATION, or --transformation), time and accuracy.

A synthetic uint16 stack whose slices drift by a random walk (known shifts) is cropped, registered and warped by
gpustack and by PyStack3D (nproc = 2) from the same params.toml. Each tool runs three times as a fresh process,
warm cache: cropping only, cropping + registration_calculation, then registration_transformation alone on that
result, so that the estimation and the warp are timed against the cropping-only run. gpustack's runs, a few
seconds each, are repeated in rounds of the three (--repeats): each marginal is the median over the rounds of
the difference within a round, since single runs varied by +-0.5 s on a shared 2-core machine. The estimator's
variants (one way, more references) are medians of --repeats runs less the median cropping run.
Accuracy: the cumulative displacement of every slice (from each tool's tmats.npy, the same file format) against
the known shifts.

    python benchmarks/bench_registration.py              # 200 slices of 1024², about 6 min
    python benchmarks/bench_registration.py --quick      # 40 slices of 256², no RESULTS.md
    python benchmarks/bench_registration.py --transformation RIGID_BODY   # about 3 min more
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_background_intensity import PYSTACK3D  # the PyStack3D driver  # noqa: E402
from benchmarks.common import cached_stack, machine, python, timed, update_results  # noqa: E402
from gpustack.synthetic import SyntheticSpec, SyntheticStack  # noqa: E402

SEED = 11
STEPS = {"crop": ["cropping"], "calc": ["cropping", "registration_calculation"],
         "warp": ["registration_transformation"]}  # "warp" runs in the "calc" folder, after it (history)
TABLES = ('\n[cropping]\narea = {area}\n\n[registration_calculation]\nnb_blocks = [1, 1]\ntransformation = "{model}"\n'
          '\n[registration_transformation]\nmode = "edge"\n')


MODEL = "TRANSLATION"
CHAINING = "references = 1\n"  # PyStack3D's pairwise chaining (gpustack's default registers to 3 slices)


def _label(setting: str) -> str:
    return ", ".join(line for line in setting.splitlines() if line) or "defaults: references = 3"


def run_tool(tool: str, stage: str, folder: Path, data: SyntheticStack, nproc: int, extra: str = "",
             repeats: int = 1) -> float:
    """Median seconds of `repeats` fresh runs of one stage."""
    return float(np.median([_run_once(tool, stage, folder, data, nproc, extra) for _ in range(repeats)]))


def _run_once(tool: str, stage: str, folder: Path, data: SyntheticStack, nproc: int, extra: str) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    history = ["cropping", "registration_calculation"] if stage == "warp" else []
    if stage != "warp":
        shutil.rmtree(folder / "process", ignore_errors=True)
    text = (f'channels = ["."]\nnproc = {nproc}\nind_min = 0\nind_max = 99999\nprocess_steps = '
            f"{json.dumps(STEPS[stage])}\nhistory = {json.dumps(history)}\n"
            + TABLES.format(area=list(data.area), model=MODEL))
    if tool == "gpustack":
        text = f"project_dir = {str(data.root)!r}\noutput_dir = {str(folder)!r}\n" + text
        text = text.replace(f'transformation = "{MODEL}"\n', f'transformation = "{MODEL}"\n' + extra)
        cmd = [python(), "-m", "gpustack", "run", str(folder / "params.toml"), "--overwrite", "-q", "--device",
               "cpu"]
    else:
        for src in data.files():
            link = folder / src.name
            if not link.is_symlink():
                link.symlink_to(src)
        cmd = [python(), "-c", PYSTACK3D, str(folder), ",".join(STEPS[stage]), str(nproc),
               str(folder / "status.json")]
    if tool == "gpustack" or stage != "warp":  # PyStack3D keeps its own history in its params.toml
        (folder / "params.toml").write_text(text)
    seconds, _ = timed(cmd)
    return seconds


def cumulative_error(tmats_file: Path, data: SyntheticStack) -> tuple[float, float, float]:
    tmats = np.load(tmats_file)
    t = tmats[:, 0] if tmats.ndim == 4 else tmats
    est = np.cumsum(t[:, :2, 2], axis=0)
    truth = data.shifts[data.kept] - data.shifts[data.kept[0]]
    err = np.linalg.norm(est - truth, axis=1)
    step = np.linalg.norm(np.diff(est, axis=0) - np.diff(truth, axis=0), axis=1)
    return float(err.max()), float(np.sqrt(np.mean(err ** 2))), float(np.sqrt(np.mean(step ** 2)))


def centre_error(tmats_file: Path, data: SyntheticStack) -> tuple[float, float, float]:
    """cumulative_error for any model: the displacement of the cropped slice's centre (rotations turn about it)."""
    from gpustack.area import Area

    tmats = np.load(tmats_file)
    t = tmats[:, 0] if tmats.ndim == 4 else tmats
    h, w = Area(*data.area).shape(data.spec.height, data.spec.width)
    centre = np.array([(w - 1) / 2, (h - 1) / 2, 1.0])
    acc, est = np.eye(3), []
    for m in t:
        acc = m @ acc
        est.append((acc @ centre)[:2] - centre[:2])
    est = np.asarray(est)
    truth = data.shifts[data.kept] - data.shifts[data.kept[0]]
    err = np.linalg.norm(est - truth, axis=1)
    step = np.linalg.norm(np.diff(est, axis=0) - np.diff(truth, axis=0), axis=1)
    return float(err.max()), float(np.sqrt(np.mean(err ** 2))), float(np.sqrt(np.mean(step ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of gpustack's three runs (medians)")
    parser.add_argument("--transformation", default="TRANSLATION", choices=["TRANSLATION", "RIGID_BODY",
                                                                            "SCALED_ROTATION", "AFFINE"])
    args = parser.parse_args()
    global MODEL
    MODEL = args.transformation
    if args.quick:
        args.slices, args.size = 40, 256
    base = Path(__file__).resolve().parents[1] / "bench-data" / "registration" / f"n{args.slices}_s{args.size}"
    spec = SyntheticSpec(n_slices=args.slices, height=args.size, width=args.size, dtype="uint16",
                         seed=SEED).without_defects(noise_sigma=0.005, drift_sigma=0.5)
    data = cached_stack(base / "data", spec)
    times: dict[tuple[str, str], float] = {}
    marginal: dict[tuple[str, str], float] = {}  # estimation and warp: median of the rounds' differences
    for tool in ("gpustack", "pystack3d"):
        run_tool(tool, "crop", base / f"{tool}-warmup", data, args.nproc)  # page cache and imports warm
        # rounds of (crop, calc, warp): a stage's marginal is taken within a round, against the cropping run
        # just before it, so that a host slowing down or speeding up between rounds cancels out
        per: dict[str, list[float]] = {stage: [] for stage in STEPS}
        for _ in range(args.repeats if tool == "gpustack" else 1):
            for stage in STEPS:
                folder = base / f"{tool}-{'calc' if stage == 'warp' else stage}"
                # gpustack's main row chains pairs as PyStack3D does (its default registers to 3 slices)
                extra = CHAINING if tool == "gpustack" and MODEL == "TRANSLATION" else ""
                per[stage].append(run_tool(tool, stage, folder, data, args.nproc, extra))
                print(f"{tool:10s} {stage:5s} {per[stage][-1]:7.2f} s", flush=True)
        for stage in STEPS:
            times[tool, stage] = float(np.median(per[stage]))
        for stage in ("calc", "warp"):
            marginal[tool, stage] = float(np.median(np.subtract(per[stage], per["crop"])))
    # variants of the translation estimator: neighbours measured one way (half the Newton work), more references
    variants = [("gpustack-oneway", CHAINING + "symmetric = false"), ("gpustack-default", ""),
                ("gpustack-8ref", "references = 8")] if MODEL == "TRANSLATION" else []
    for key, setting in variants:
        times[key, "calc"] = run_tool("gpustack", "calc", base / key, data, args.nproc, setting + "\n",
                                      args.repeats)
        print(f"gpustack {_label(setting)} calc {times[key, 'calc']:.2f} s", flush=True)

    rows = []
    for tool, label in (("gpustack", "gpustack (references = 1: pairwise chaining, symmetric)"),
                        ("pystack3d", f"PyStack3D (nproc={args.nproc})")):
        calc, warp = marginal[tool, "calc"], marginal[tool, "warp"]
        measure = cumulative_error if MODEL == "TRANSLATION" else centre_error
        err = measure(base / f"{tool}-calc" / "process" / "registration_calculation" / "tmats.npy", data)
        written = len(list((base / f"{tool}-calc" / "process" / "registration_transformation").glob("*.tif")))
        if written != len(data.kept):
            raise RuntimeError(f"{tool}: {written} warped slices, expected {len(data.kept)}")
        rows.append((label, times[tool, "crop"], times[tool, "calc"], times[tool, "warp"], calc, warp, *err))

    g, p = rows
    lines = [
        f"## Registration ({MODEL}): estimation and warp",
        "",
        f"Machine: {machine()}.",
        "",
        f"`python benchmarks/bench_registration.py{' --quick' if args.quick else ''}` (seed {SEED}): "
        f"{args.slices} slices of {args.size}x{args.size} uint16, `SyntheticSpec(...).without_defects("
        f"noise_sigma=0.005, drift_sigma=0.5)`: every slice moved by a random walk of 0.5 px per slice and axis; "
        f"the structures change from slice to slice. Both tools crop to `area = {list(data.area)}` and run "
        f"`transformation = \"{MODEL}\"`, `mode = \"edge\"`. Each number is a warm run of a fresh process "
        f"(imports, plots and the writing of every step's slices included; gpustack: {args.repeats} rounds of the "
        "three runs, medians shown). The transformation runs alone after the "
        "calculation (`history = [\"cropping\", \"registration_calculation\"]`: it reads the cropped slices "
        "and `tmats.npy`); estimation = (cropping + calculation) - cropping, warp = transformation - cropping "
        "(both runs read and write the same number of slices), each the median over the rounds of the "
        "difference within a round.",
        "",
        "| contender | cropping s | cropping + calculation s | transformation alone s | estimation s | warp s | "
        "max cumulative error px | RMS cumulative error px | RMS error per step px |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, crop, calc_t, warp_t, calc, warp, emax, erms, estep in rows:
        lines.append(f"| {label} | {crop:.2f} | {calc_t:.2f} | {warp_t:.2f} | {calc:.2f} | {warp:.2f} | {emax:.2f} | "
                     f"{erms:.2f} | {estep:.3f} |")
    ratios = []
    for key, setting in variants:
        err_r = cumulative_error(base / key / "process" / "registration_calculation" / "tmats.npy", data)
        calc_r = times[key, "calc"] - times["gpustack", "crop"]
        ratios.append(f"{p[4] / calc_r:.1f}x with {_label(setting)}")
        lines.append(f"| gpustack ({_label(setting)}) | | {times[key, 'calc']:.2f} | | {calc_r:.2f} | | "
                     f"{err_r[0]:.2f} | {err_r[1]:.2f} | {err_r[2]:.3f} |")
    lines += ["", f"PyStack3D / gpustack: estimation {p[4] / g[4]:.1f}x"
                  + "".join(f", {r}" for r in ratios)
                  + f"; warp {p[5] / g[5]:.1f}x, whole run {p[3] / g[3]:.1f}x for the transformation run."]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        update_results("registration" if MODEL == "TRANSLATION" else f"registration-{MODEL.lower()}", body)


if __name__ == "__main__":
    main()
