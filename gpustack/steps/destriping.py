"""`destriping`: remove curtains with VSNR (the default) or the wavelet-FFT filter, PEERS §1.7.

VSNR runs batched on the device (`kernels/vsnr.py`): the filters' spectra are built once per stack, each slice
stops when it has converged, and a batch can start from the previous batch's solution (`warm_start`). `engine =
"pyvsnr"` runs pyvsnr itself, one call per slice as PyStack3D does, for parity. A `wavelet_decomposition` table
replaces VSNR by the wavelet-FFT filter (Münch et al. 2009), which gpustack also runs on the device, for any
stripe orientation (`angle`), keeping the slice's shape.

Differences from PyStack3D, on by default: each slice is measured for stripes first (`kernels/stripes.py`, the
power on the stripes' spectral ridge relative to the slice's isotropic spectrum) and gets its correction in
proportion (`stripe_gate_range`): slices without curtains are left exactly as they are, instead of losing real
vertical structure. `stripe_gate = false` corrects every slice fully, as PyStack3D does (and measures nothing).
The measured ratio, the weight and the iterations of every slice are saved (`outputs/stripes.csv`) and plotted
(`outputs/stripes.png`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpustack.kernels.vsnr import NoiseFilter
from gpustack.schema import Invalid, boolean, choice, integer, number, number_pair, optional, param
from gpustack.steps.base import Batch, ParamError, Report, Step

if TYPE_CHECKING:
    import torch

FILTER_KEYS = {"Dirac": {"name", "noise_level"}, "Gabor": {"name", "noise_level", "sigma", "theta"}}
WAVELET_KEYS = {"wavelet", "level", "sigma", "angle"}


def _filter(i: int, table: Any) -> NoiseFilter:
    where = f"filters[{i}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table like {{ name = \"Gabor\", noise_level = 20, sigma = [0.5, 200], "
                         f"theta = 0 }}, got {table!r}")
    name = table.get("name")
    if name not in FILTER_KEYS:
        raise ValueError(f"{where}.name: {name!r} is not a filter; use \"Dirac\" or \"Gabor\"")
    unknown = sorted(set(table) - FILTER_KEYS[name])
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} for a {name} filter; known: "
                         f"{', '.join(sorted(FILTER_KEYS[name]))}")
    if "noise_level" not in table:
        raise ValueError(f"{where}.noise_level: missing (how much of this pattern to remove, > 0)")
    try:
        level = number(0)(table["noise_level"])
    except ValueError as exc:
        raise ValueError(f"{where}.noise_level: {exc}") from None
    if level <= 0:
        raise ValueError(f"{where}.noise_level: must be > 0 (a filter with no noise removes nothing)")
    if name == "Dirac":
        return NoiseFilter("Dirac", level)
    sigma = table.get("sigma")
    if not isinstance(sigma, (list, tuple)) or len(sigma) != 2:
        raise ValueError(f"{where}.sigma: expected [across, along] in pixels, e.g. [0.5, 200], got {sigma!r}")
    try:
        sx, sy = (number()(s) for s in sigma)
        theta = number()(table.get("theta", 0.0))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not (sx > 0 and sy > 0):
        raise ValueError(f"{where}.sigma: both widths must be > 0, got {list(sigma)}")
    return NoiseFilter("Gabor", level, (sx, sy), theta)


def noise_filters(value: Any) -> tuple[NoiseFilter, ...]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of filter tables, got {value!r}")
    if not value:
        raise ValueError("no filters: give at least one, e.g. [{ name = \"Gabor\", noise_level = 20, "
                         "sigma = [0.5, 200], theta = 0 }]")
    return tuple(_filter(i, t) for i, t in enumerate(value))


@dataclass(frozen=True)
class WaveletSettings:
    wavelet: str = "coif3"
    level: int = 4
    sigma: float = 4.0
    angle: float = 0.0


def wavelet_settings(value: Any) -> WaveletSettings:
    if isinstance(value, str):
        raise ValueError("expected a table: write { wavelet = \"coif3\", level = 4, sigma = 4 } (PyStack3D's "
                         "documented {'wavelet': ...} form is not valid TOML)")
    if not isinstance(value, dict):
        raise ValueError(f"expected a table {{ wavelet, level, sigma[, angle] }}, got {value!r}")
    unknown = sorted(set(value) - WAVELET_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; known: {', '.join(sorted(WAVELET_KEYS))}")
    defaults = WaveletSettings()
    name = value.get("wavelet", defaults.wavelet)
    import pywt

    if not isinstance(name, str) or name not in pywt.wavelist(kind="discrete"):
        raise ValueError(f"wavelet: unknown wavelet {name!r}; e.g. haar, db4, sym4, coif3 (pywt.wavelist())")
    try:
        level = integer(1)(value.get("level", defaults.level))
        sigma = number()(value.get("sigma", defaults.sigma))
        angle = number()(value.get("angle", defaults.angle))
    except ValueError as exc:
        raise ValueError(f"level/sigma/angle: {exc}") from None
    if not sigma > 0:
        raise ValueError(f"sigma: must be > 0 (the width of the damping in frequency bins), got {sigma}")
    return WaveletSettings(name, level, sigma, angle)


@dataclass(frozen=True)
class DestripingConfig:
    filters: tuple[NoiseFilter, ...] | None = param(None, optional(noise_filters),
                                                   "VSNR noise patterns: tables { name = \"Gabor\", noise_level, "
                                                   "sigma = [across, along], theta } or { name = \"Dirac\", "
                                                   "noise_level }")
    maxit: int = param(100, integer(1), "maximum VSNR iterations")
    cvg_threshold: float = param(0.0, number(0), "stop a slice when its relative change falls to this (0: run maxit)")
    wavelet_decomposition: WaveletSettings | None = param(
        None, optional(wavelet_settings), "{ wavelet = \"coif3\", level = 4, sigma = 4, angle = 0 }: the "
        "wavelet-FFT filter instead of VSNR (angle: gpustack, stripe orientation in degrees from vertical)")
    engine: str = param("gpustack", choice("gpustack", "pyvsnr", "auto"),
                        "VSNR on the device (gpustack), or pyvsnr itself on a CPU process pool (auto: gpustack)")
    beta: float = param(10.0, number(0), "gpustack: ADMM penalty (pyvsnr's beta)")
    fast_fft: bool = param(True, boolean, "gpustack: solve VSNR on slices mirrored out to the next FFT size made "
                                          "of 2, 3 and 5 (e.g. 451 -> 480: FFTs 4.5x faster; false: on the "
                                          "slice's own size, as pyvsnr)")
    warm_start: bool = param(False, boolean, "gpustack: start each batch from the previous batch's solution (pays "
                                             "only when neighbouring slices are nearly identical)")
    stripe_gate: bool = param(True, boolean, "gpustack: correct each slice in proportion to its measured stripes "
                                             "(false: every slice fully, as PyStack3D)")
    stripe_gate_range: tuple[float, float] = param((1.4, 2.0), number_pair,
                                                   "gpustack: stripe ratios [no correction, full correction] "
                                                   "(a slice without stripes measures about 1)")

    def __post_init__(self) -> None:
        if self.filters is None and self.wavelet_decomposition is None:
            raise Invalid("filters", "no filters: give VSNR `filters`, or a `wavelet_decomposition` table")
        if self.beta <= 0:
            raise Invalid("beta", "must be > 0")
        if self.stripe_gate_range[0] <= 0:
            raise Invalid("stripe_gate_range", "ratios are positive (about 1 without stripes)")

    @property
    def uses_wavelets(self) -> bool:
        return self.wavelet_decomposition is not None

    @property
    def uses_pyvsnr(self) -> bool:
        return not self.uses_wavelets and self.engine == "pyvsnr"

    def stripes_filter(self) -> NoiseFilter | None:
        """The filter whose orientation the stripe meter measures: the most elongated Gabor, or for wavelets a
        thin vertical line turned by `angle`."""
        from gpustack.kernels.stripes import dominant_filter

        if self.uses_wavelets:
            return NoiseFilter("Gabor", 1.0, (0.5, 1e6), float(self.wavelet_decomposition.angle))
        return dominant_filter(list(self.filters))


class Destriping(Step):
    name = "destriping"
    Config = DestripingConfig
    # VSNR: gradients, dual, their spectra, gains (18 slices' worth), on slices up to 1.23x larger with fast_fft
    # (the next 2^a 3^b 5^c size is within 11 % of any side from 100 px up)
    work_buffers = 22

    def __init__(self, config: DestripingConfig):
        super().__init__(config)
        self._cache: dict[tuple, Any] = {}
        self._warm = None
        self._next_start = 0

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        cfg = self.config
        if cfg.uses_wavelets:
            from gpustack.kernels.wavelet import wavelet_level_max

            deepest = wavelet_level_max(shape, cfg.wavelet_decomposition.wavelet)
            if cfg.wavelet_decomposition.level > deepest:
                raise ParamError("wavelet_decomposition", f"level {cfg.wavelet_decomposition.level} is too deep "
                                 f"for {shape[1]}x{shape[0]} slices with {cfg.wavelet_decomposition.wavelet} "
                                 f"(at most {deepest})")
        elif cfg.uses_pyvsnr:
            import importlib.util

            if importlib.util.find_spec("pyvsnr") is None:
                raise ParamError("engine", "pyvsnr is not installed: pip install pyvsnr, or use engine = "
                                           "\"gpustack\"")
        return shape

    def _cached(self, key: tuple, make) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def apply_recorded(self, batch: Batch, state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch

        from gpustack.kernels.stripes import StripeMeter, gate

        cfg = self.config
        x = batch.data.to(torch.float32)
        n, shape, dev = x.shape[0], tuple(x.shape[1:]), x.device
        # NaN (a 'constant' registration fill) or inf would spread over the whole slice through the FFTs: the
        # filters see the slice's mean of finite pixels there, and those pixels are put back afterwards.
        holes = not bool(torch.isfinite(x.sum()))  # sync: once per batch; NaN or inf if any pixel is, no mask
        missing = ~torch.isfinite(x) if holes else None
        original = x
        if holes:
            mean = torch.where(missing, float("nan"), x).nanmean(dim=(1, 2), keepdim=True)
            x = torch.where(missing, torch.nan_to_num(mean), x)
        if batch.start != self._next_start:  # a new stream (next channel, or a resumed run): no warm state
            self._warm = None
        self._next_start = batch.start + n

        # Stripes are measured only for the gate (without it, every slice is corrected as PyStack3D does).
        oriented = cfg.stripes_filter() if cfg.stripe_gate else None

        def make_meter() -> StripeMeter | None:
            try:
                return StripeMeter(shape, oriented, dev)
            except ValueError:  # slices too small to tell stripes from content: corrected fully, unmeasured
                return None

        meter = self._cached(("meter", shape, dev), make_meter) if oriented else None
        if meter is not None:
            ratio = meter(x)
            weight = gate(ratio, *cfg.stripe_gate_range)
        else:
            ratio = torch.full((n,), math.nan, device=dev)
            weight = torch.ones(n, device=dev)
        iterations = torch.zeros(n, dtype=torch.int64, device=dev)
        removed = torch.zeros(n, device=dev)
        chosen = (weight > 0).nonzero().squeeze(1)  # sync: once per batch, to skip the slices without stripes
        every = chosen.numel() == n
        out = x
        if chosen.numel():
            sub = x if every else x[chosen]
            if cfg.uses_wavelets:
                from gpustack.kernels.wavelet import wavelet_stripes

                w = cfg.wavelet_decomposition
                stripes = wavelet_stripes(sub, w.wavelet, w.level, w.sigma, w.angle)
            elif cfg.uses_pyvsnr:
                stripes = sub - _pyvsnr(sub, cfg)
                iterations[chosen] = -1  # pyvsnr does not say how many it ran
            else:
                stripes, iterations[chosen] = self._vsnr(sub, shape, dev, batch.n_total)
            if meter is not None:  # out = x - weight * stripes: partly where the stripes are faint
                stripes = stripes * weight[chosen][:, None, None]
            fixed = sub - stripes
            if every:
                out = fixed
            else:
                out = x.clone()
                out[chosen] = fixed
            if holes:  # what was removed is reported where there was something to remove from
                stripes = torch.where(missing if every else missing[chosen], 0.0, stripes)
            # RMS of the change over the whole slice
            removed[chosen] = torch.linalg.vector_norm(stripes, dim=(1, 2)) / math.sqrt(shape[0] * shape[1])
        if holes:
            out = torch.where(missing, original, out)
        return out, {"stripe_ratio": ratio, "weight": weight, "iterations": iterations, "removed_rms": removed}

    def _vsnr(self, x: torch.Tensor, shape: tuple[int, int], dev: torch.device,
              n_total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stripe fields, iterations) of the slices x."""
        from gpustack.kernels.vsnr import VsnrOperator, fuse_for_stack, solve

        cfg = self.config
        op = self._cached(("vsnr", shape, dev), lambda: VsnrOperator(
            shape, list(cfg.filters), dev, beta=cfg.beta, fused=fuse_for_stack(shape, n_total),
            fast_fft=cfg.fast_fft))
        result = solve(op, x, maxit=cfg.maxit, cvg_threshold=cfg.cvg_threshold,
                       warm=self._warm if cfg.warm_start else None)
        if cfg.warm_start:
            self._warm = result.warm
        return result.stripes, result.iterations

    def write_report(self, report: Report) -> None:
        from gpustack.report.destriping import write_destriping_report

        write_destriping_report(report, self.config)


# -- pyvsnr engine --------------------------------------------------------------------------------------------

def _pyvsnr_slice(args: tuple) -> Any:
    import numpy as np
    from pyvsnr import vsnr2d

    img, filters, maxit, cvg_threshold, beta = args
    if not img.max() > 0:  # pyvsnr divides by the maximum: such a slice has nothing it can correct
        return img
    out = vsnr2d(img, filters, maxit=maxit, algo="numpy", beta=beta, norm=False, cvg_threshold=cvg_threshold)
    return np.asarray(out, dtype=np.float32)


def _pyvsnr(x: torch.Tensor, cfg: DestripingConfig) -> torch.Tensor:
    """pyvsnr, one call per slice (PyStack3D's use, without its process-wide NumPy FFT patch in our process):
    its CuPy path on a CUDA device when CuPy is installed, else a CPU process pool."""
    import importlib.util

    import numpy as np
    import torch

    filters = [f.as_table() for f in cfg.filters]
    host = x.detach().cpu().numpy()  # sync: pyvsnr works on host arrays
    if x.device.type == "cuda" and importlib.util.find_spec("cupy") is not None:
        from pyvsnr import vsnr2d

        outs = [vsnr2d(img, filters, maxit=cfg.maxit, algo="cupy", beta=cfg.beta, norm=False,
                       cvg_threshold=cfg.cvg_threshold) if img.max() > 0 else img for img in host]
    else:
        from gpustack.pools import process_pool

        jobs = [(img, filters, cfg.maxit, cfg.cvg_threshold, cfg.beta) for img in host]
        outs = list(process_pool().map(_pyvsnr_slice, jobs))
    return torch.from_numpy(np.stack(outs).astype(np.float32)).to(x.device)
