"""A commented params.toml, generated from the step registry so it never drifts from what gpustack accepts."""

from __future__ import annotations

from typing import Any

from gpustack.area import Area
from gpustack.kernels.vsnr import NoiseFilter
from gpustack.schema import describe
from gpustack.steps import PYSTACK3D_STEPS, REGISTRY

# Values the template shows where the step's default is "unset" or differs from PyStack3D's own template:
# destriping with PyStack3D's FIB-SEM filter set (assets/toml/params_real_perf_stack.toml).
EXAMPLES: dict[str, dict[str, Any]] = {
    "destriping": {
        "filters": (NoiseFilter("Gabor", 30, (0.5, 80), 0), NoiseFilter("Gabor", 80, (0.5, 200), 0)),
        "cvg_threshold": 1e-2,
    },
    "resampling": {"dz": 0.01},
}
COMMENTED_EXAMPLES = {("destriping", "wavelet_decomposition"): '{ wavelet = "coif3", level = 4, sigma = 4 }'}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (Area, tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, NoiseFilter):
        extra = f", sigma = {toml_value(value.sigma)}, theta = {value.theta:g}" if value.name == "Gabor" else ""
        return f'{{ name = "{value.name}", noise_level = {value.noise_level:g}{extra} }}'
    return repr(value)


def render_template(*, channels: list[str] | None = None, steps: dict[str, dict[str, Any]] | None = None,
                    process_steps: list[str] | None = None, header: str = "") -> str:
    """The template; `steps` overrides defaults per table (e.g. a cropping area read from metadata)."""
    steps = steps or {}
    process_steps = process_steps or list(PYSTACK3D_STEPS)
    lines = [
        "# gpustack / PyStack3D parameters. PyStack3D reads this file unchanged; gpustack never rewrites it",
        "# (its run state goes to process/gpustack.json).",
        *(f"# {line}" for line in header.splitlines()),
        "",
        "# Folder holding the slices (or the channel folders), relative to this file. Default: this file's folder.",
        '# project_dir = "."',
        "# Detector channels: sub-folders (or multi-page TIFFs) of project_dir; [\".\"] = slices in project_dir.",
        f"channels = {toml_value(channels or ['.'])}",
        "# First and last slice index to process (inclusive), in file-name order.",
        "ind_min = 0",
        "ind_max = 99999",
        "# PyStack3D's number of processes; gpustack uses it only to size its IO thread pools.",
        "nproc = 2",
        f"process_steps = {toml_value(process_steps)}",
        "# Steps already done (PyStack3D's resume list); gpustack resumes from process/gpustack.json instead.",
        "history = []",
        "",
        "# gpustack-only keys (PyStack3D ignores top-level keys it does not know):",
        '# device = "auto"          # auto | cpu | cuda | cuda:N',
        '# memory_budget = "4GiB"   # device memory for one batch; sets the batch size',
        "# batch_size = 16          # slices per batch (overrides memory_budget)",
        "# save_intermediate = true # false: write only the last step (and steps a later pass reads)",
        '# output_dtype = "input"   # input | float32: dtype of the written slices',
        '# output_dir = "."         # where process/ goes (default: project_dir)',
    ]
    for name in PYSTACK3D_STEPS:
        lines.append("")
        cls = REGISTRY[name]
        lines.append(f"[{name}]")
        for key, default, doc in describe(cls.Config):
            value = steps.get(name, {}).get(key, EXAMPLES.get(name, {}).get(key, default))
            lines.append(f"# {doc}")
            example = COMMENTED_EXAMPLES.get((name, key), "")
            lines.append(f"{key} = {toml_value(value)}" if value is not None else f"# {key} = {example}")
    return "\n".join(lines) + "\n"
