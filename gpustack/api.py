"""Public functions on arrays: NumPy, torch or CuPy in, the same kind out (see gpustack.arrays)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpustack.area import Area


def crop(stack: Any, area: Sequence[int]) -> Any:
    """Keep `area = [xmin, xmax, ymin, ymax]` (px, origin bottom-left, PyStack3D's convention) of a slice (H, W)
    or a stack (N, H, W). Returns a view of the same kind of array; 9999/99999 as a max bound mean 'to the edge'.
    """
    if getattr(stack, "ndim", 0) not in (2, 3):
        raise ValueError(f"expected a slice (H, W) or a stack (N, H, W), got shape {getattr(stack, 'shape', None)}")
    rows, cols = Area(*(int(v) for v in area)).rows_cols(*stack.shape[-2:])
    return stack[..., rows, cols]


def slice_statistics(stack: Any, *, device: str | None = None) -> Any:
    """(N, 3) min, max, mean of each slice of a stack (N, H, W), NaN ignored; same kind of array as the input."""
    import torch

    from gpustack.arrays import to_torch
    from gpustack.kernels.stats import slice_stats

    t, back = to_torch(stack, device)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"expected a stack (N, H, W), got shape {tuple(t.shape)}")
    _not_empty(t)
    return back(slice_stats(t.to(torch.float32), nan_aware=True))


def _not_empty(t: Any) -> None:
    if t.shape[0] == 0 or t[0].numel() == 0:
        raise ValueError(f"the stack is empty: shape {tuple(t.shape)}")


def _run_step(step: Any, stack: Any, device: str | None, batch_size: int) -> tuple[Any, Any, dict, Any]:
    """A step over an in-memory stack, batch by batch, exactly as the runner drives it (statistics pass first)."""
    import torch

    from gpustack.arrays import to_torch
    from gpustack.steps.base import Batch

    t, back = to_torch(stack, device)
    single = t.ndim == 2
    if single:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"expected a slice (H, W) or a stack (N, H, W), got shape {tuple(t.shape)}")
    _not_empty(t)
    t = t.to(torch.float32)
    n = t.shape[0]
    step.output_shape(tuple(t.shape[1:]))
    names = [str(k) for k in range(n)]
    batches = [Batch(t[s:s + batch_size], s, slice(0, min(batch_size, n - s)), names[s:s + batch_size], n)
               for s in range(0, n, batch_size)]
    state = step.fit_reduce([step.fit_batch(b) for b in batches]) if step.has_fit else None
    outs, records = [], {}
    for b in batches:
        out, rec = step.apply_recorded(b, state)
        outs.append(out)
        for key, value in rec.items():
            records.setdefault(key, []).append(value)
    out = torch.cat(outs)
    records = {k: torch.cat(v) for k, v in records.items()}
    return back(out[0] if single else out), state, records, back


def _config(cls: type, name: str, **params: Any) -> Any:
    from gpustack.schema import build

    return build(cls, {k: v for k, v in params.items() if v is not None}, file=None, name=name)


def remove_background(stack: Any, *, orders: Sequence[int] | None = (1, 1), cross_terms: bool = True,
                      poly_basis: str | None = None, skip_factors: Sequence[int] | None = None,
                      skip_averaging: bool = False, threshold_min: float | None = None,
                      threshold_max: float | None = None, weight: str = "HuberT", preserve_avg: bool = False,
                      correct_masked: bool = True, device: str | None = None, batch_size: int = 16) -> tuple[Any, Any]:
    """Remove a polynomial background from a slice (H, W) or a stack (N, H, W); float32 result.

    2 orders [x, y] (or a basis in x, y) fit each slice; 3 orders [x, y, z] (or a basis using z) fit one
    polynomial over the stack. Returns (corrected, coefficients): coefficients (N, q) per slice in 2D, (q,) in
    3D, in the order of `background_terms(...)`, as the same kind of array as the input.
    """
    from gpustack.steps.background import BkgRemoval, BkgRemovalConfig

    config = _config(BkgRemovalConfig, "remove_background", orders=list(orders) if orders else None,
                     cross_terms=cross_terms, poly_basis=poly_basis,
                     skip_factors=list(skip_factors) if skip_factors else None, skip_averaging=skip_averaging,
                     threshold_min=threshold_min, threshold_max=threshold_max, weight_func=weight,
                     preserve_avg=preserve_avg, correct_masked=correct_masked)
    step = BkgRemoval(config)
    out, state, records, back = _run_step(step, stack, device, batch_size)
    coefs = state["coefs"] if step.dim == 3 else records["coefs"]
    unfitted = int((~coefs.isfinite()).reshape(-1, coefs.shape[-1]).any(dim=1).sum())  # sync: once, the result
    if unfitted:  # as the step's report says it: such slices are returned as they are
        import warnings

        warnings.warn(f"remove_background: the background could not be fitted "
                      f"{'over the stack' if step.dim == 3 else f'on {unfitted} slice(s)'}, returned unchanged: "
                      f"{step.unfitted_reason}", RuntimeWarning, stacklevel=2)
    if getattr(stack, "ndim", 3) == 2 and step.dim == 2:
        coefs = coefs[0]
    return out, back(coefs)


def background_terms(*, orders: Sequence[int] | None = (1, 1), cross_terms: bool = True,
                     poly_basis: str | None = None) -> list[str]:
    """The terms of a basis, in the order of the coefficients `remove_background` returns."""
    from gpustack.kernels.polynomial import term_name
    from gpustack.steps.background import BkgRemovalConfig, basis_powers

    config = _config(BkgRemovalConfig, "background_terms", orders=list(orders) if orders else None,
                     cross_terms=cross_terms, poly_basis=poly_basis)
    return [term_name(p) for p in basis_powers(config)]


def rescale_intensity(stack: Any, *, nbins: int = 256, filter_size: int = -1, mapping: str = "linear",
                      reference: str = "median", correct: str | None = None, device: str | None = None,
                      batch_size: int = 16) -> Any:
    """Bring each slice's grey levels to a reference distribution (see intensity_rescaling); float32 result.
    `correct`: "jumps" (default with the linear mapping over the whole stack) or "all"."""
    from gpustack.steps.intensity import IntensityRescaling, IntensityRescalingConfig

    config = _config(IntensityRescalingConfig, "rescale_intensity", nbins=nbins, filter_size=filter_size,
                     mapping=mapping, reference=reference, correct=correct)
    return _run_step(IntensityRescaling(config), stack, device, batch_size)[0]


def rescale_intensity_area(stack: Any, *, area: Sequence[int] | None = None, threshold_min: float | None = None,
                           threshold_max: float | None = None, factors_range: Sequence[float] = (0.8, 1.2),
                           device: str | None = None, batch_size: int = 16) -> tuple[Any, Any]:
    """Scale each slice so that the mean of `area` matches the median over slices; returns (scaled, factors)."""
    from gpustack.steps.intensity import (
        IntensityRescalingArea,
        IntensityRescalingAreaConfig,
    )

    config = _config(IntensityRescalingAreaConfig, "rescale_intensity_area",
                     area=list(area) if area is not None else None, threshold_min=threshold_min,
                     threshold_max=threshold_max, factors_range=list(factors_range))
    out, state, _records, back = _run_step(IntensityRescalingArea(config), stack, device, batch_size)
    return out, back(state["factors"])


def register_stack(stack: Any, *, references: int = 0, estimator: str = "tiles", tiles: int = 0, binning: int = 0,
                   iterations: int = 3, symmetric: bool = True, upsample: int = 20, refine: int = 0,
                   area: Sequence[int] | None = None, device: str | None = None, batch_size: int = 16) -> Any:
    """Translations that align every slice of a stack (N, H, W) onto slice 0, as (N, 3, 3) cumulative matrices
    in skimage's `warp` convention (output pixel -> input pixel), the same kind of array as the input.

    Each slice is matched to the `references` slices before it, and the positions are solved in robust least
    squares (references = 1: pairwise chaining, as PyStack3D; 0: 3 with the tiles estimator, 1 with
    correlation). `estimator = "tiles"` (default): correlation on a binned copy, then `iterations` Newton
    iterations on the intensities moved by the median of `tiles` x `tiles` tiles' updates (0: automatic), robust
    to structures that change between slices; pairs of
    neighbouring slices are measured both ways unless `symmetric` is False (one way on slices under 128 px
    after binning);
    `"correlation"`: the cross-correlation peak (1/upsample px) and `refine` whole-slice Gauss-Newton iterations.
    The parameters are registration_calculation's (README).
    """
    import numpy as np
    import torch

    from gpustack.arrays import to_torch
    from gpustack.kernels import translation
    from gpustack.steps.registration import _solve_translations, default_references, measure_translations

    if estimator not in ("tiles", "correlation"):
        raise ValueError(f"estimator must be 'tiles' or 'correlation', got {estimator!r}")
    if references < 0:
        raise ValueError(f"references must be 0 (automatic) or more, got {references}")
    references = references or default_references(estimator)

    t, back = to_torch(stack, device)
    if t.ndim != 3:
        raise ValueError(f"expected a stack (N, H, W), got shape {tuple(t.shape)}")
    if area is not None:
        rows, cols = Area(*(int(v) for v in area)).rows_cols(*t.shape[1:])
        t = t[:, rows, cols]
    t = torch.nan_to_num(t.to(torch.float32))
    n = t.shape[0]
    ks, ds, shifts, quality = [], [], [], []
    for s in range(1, n, batch_size):
        first = max(0, s - references)  # the batch and the slices its pairs reach back to, prepared once
        prep = None
        if estimator == "tiles":
            prep = translation.prepare(t[first:min(n, s + batch_size)], lk_bin=binning or None)
        for d in range(1, references + 1):
            k = torch.arange(max(s, d), min(n, s + batch_size), device=t.device)
            if len(k) == 0:
                continue
            if prep is None:
                shift, q = measure_translations(t[k - d], t[k], upsample=upsample, refine=refine)
            else:
                shift, q = translation.measure(prep, k - first, k - d - first, iterations=iterations,
                                               tiles=tiles or None, symmetric=symmetric and d == 1)
            ks.append(k.cpu().numpy())  # sync: small index and result arrays
            ds.append(np.full(len(k), d))
            shifts.append(shift.double().cpu().numpy())
            quality.append(q.double().cpu().numpy())
    if n < 2:
        cumulative = np.tile(np.eye(3), (n, 1, 1))
    else:
        ks_a, ds_a = np.concatenate(ks), np.concatenate(ds)
        mats = np.tile(np.eye(3), (len(ks_a), 1, 1, 1))
        mats[:, 0, :2, 2] = np.concatenate(shifts)
        pairwise = _solve_translations(ks_a, ds_a, mats, np.concatenate(quality)[:, None], n)[:, 0]
        cumulative = np.tile(np.eye(3), (n, 1, 1))
        cumulative[:, :2, 2] = np.cumsum(pairwise[:, :2, 2], axis=0)
    return back(torch.from_numpy(cumulative))


def warp_stack(stack: Any, matrices: Any, *, mode: str = "constant", order: int = 1,
               device: str | None = None, batch_size: int = 16) -> Any:
    """Warp each slice of a stack (N, H, W) with its (N, 3, 3) matrix (skimage's `warp` convention: output
    pixel -> input pixel); `mode` as numpy.pad ('constant' fills NaN); float32 result of the same kind."""
    import torch

    from gpustack.arrays import to_torch
    from gpustack.kernels.warp import warp_affine

    t, back = to_torch(stack, device)
    m, _ = to_torch(matrices, t.device)
    if t.ndim != 3 or m.shape != (t.shape[0], 3, 3):
        raise ValueError(f"expected a stack (N, H, W) and (N, 3, 3) matrices, got {tuple(t.shape)} and "
                         f"{tuple(m.shape)}")
    _not_empty(t)
    t, m = t.to(torch.float32), m.to(torch.float64)
    out = torch.cat([warp_affine(t[s:s + batch_size], m[s:s + batch_size], mode=mode, order=order)
                     for s in range(0, t.shape[0], batch_size)])
    return back(out)


def _filters_table(filters: Sequence[Any]) -> list[dict]:
    from gpustack.kernels.vsnr import NoiseFilter

    return [f.as_table() if isinstance(f, NoiseFilter) else dict(f) for f in filters]


def destripe_vsnr(stack: Any, filters: Sequence[Any], *, maxit: int = 100, cvg_threshold: float = 0.0,
                  beta: float = 10.0, stripe_gate: bool = True, stripe_gate_range: Sequence[float] = (1.4, 2.0),
                  warm_start: bool = False, fast_fft: bool = True, engine: str = "gpustack",
                  device: str | None = None, batch_size: int = 8) -> tuple[Any, dict[str, Any]]:
    """Remove curtains from a slice (H, W) or a stack (N, H, W) with VSNR; float32 result of the same kind.

    `filters`: PyStack3D's tables, e.g. [{"name": "Gabor", "noise_level": 20, "sigma": [0.5, 200], "theta": 0}]
    (or `NoiseFilter`s). Returns (destriped, info) with per-slice `stripe_ratio`, `weight` (the correction each
    slice got; all ones with `stripe_gate=False`, which is pyvsnr's and PyStack3D's behaviour) and `iterations`.
    `fast_fft`: slices whose sides are slow FFT sizes are mirrored out to the next fast one (False: solved on
    their own size, as pyvsnr).
    """
    from gpustack.steps.destriping import Destriping, DestripingConfig

    config = _config(DestripingConfig, "destripe_vsnr", filters=_filters_table(filters), maxit=maxit,
                     cvg_threshold=cvg_threshold, beta=beta, stripe_gate=stripe_gate,
                     stripe_gate_range=list(stripe_gate_range), warm_start=warm_start, fast_fft=fast_fft,
                     engine=engine)
    out, _state, records, back = _run_step(Destriping(config), stack, device, batch_size)
    return out, {k: back(v) for k, v in records.items() if k != "removed_rms"}


def destripe_wavelet(stack: Any, *, wavelet: str = "coif3", level: int = 4, sigma: float = 4.0,
                     angle: float = 0.0, stripe_gate: bool = True, stripe_gate_range: Sequence[float] = (1.4, 2.0),
                     device: str | None = None, batch_size: int = 16) -> tuple[Any, dict[str, Any]]:
    """Remove stripes at `angle` degrees from vertical from a slice or a stack with the wavelet-FFT filter
    (Münch et al. 2009); the shape is kept exactly. Returns (destriped, info) as `destripe_vsnr`."""
    from gpustack.steps.destriping import Destriping, DestripingConfig

    config = _config(DestripingConfig, "destripe_wavelet",
                     wavelet_decomposition={"wavelet": wavelet, "level": level, "sigma": sigma, "angle": angle},
                     stripe_gate=stripe_gate, stripe_gate_range=list(stripe_gate_range))
    out, _state, records, back = _run_step(Destriping(config), stack, device, batch_size)
    return out, {k: back(v) for k, v in records.items() if k not in ("removed_rms", "iterations")}


def resample_z(stack: Any, z_in: Sequence[float], z_out: Sequence[float] | None = None, *,
               dz: float | None = None, device: str | None = None) -> tuple[Any, Any]:
    """Planes of a stack (N, H, W) at `z_out` (or every `dz` from the first z to the last, the last included)
    by linear interpolation between the slices at `z_in` (strictly increasing). Returns (planes, z_out); planes
    are float32, of the same kind of array as the input. Output z outside [z_in[0], z_in[-1]] are a ValueError
    naming them (no extrapolation)."""
    import numpy as np
    import torch

    from gpustack.arrays import to_torch
    from gpustack.io.tiff import SliceInfo
    from gpustack.steps.resampling import Resampling, ResamplingConfig

    t, back = to_torch(stack, device)
    if t.ndim != 3 or len(z_in) != t.shape[0]:
        raise ValueError(f"expected a stack (N, H, W) and N input z, got shape {tuple(t.shape)} and {len(z_in)} z")
    config = _config(ResamplingConfig, "resample_z", dz=dz, zpos_out=list(z_out) if z_out is not None else None,
                     zpos_in=[float(z) for z in z_in], z_source="list")
    fake = [SliceInfo(None, 0, f"{k}.tif", None, False, 1, (), 0, 0, tuple(t.shape[1:]), np.dtype("float32"))
            for k in range(t.shape[0])]
    plan = Resampling(config).plan(fake)
    t = t.to(torch.float32)
    w = torch.as_tensor(plan.weight, dtype=torch.float32, device=t.device)[:, None, None]
    lower = torch.as_tensor(plan.lower, device=t.device)
    upper = torch.as_tensor(plan.upper, device=t.device)
    planes = torch.lerp(t[lower], t[upper], w)
    return back(planes), back(torch.as_tensor(plan.z_out))


def read_atlas_metadata(stack_dir: Any, *, margin: int = 20) -> dict[str, Any]:
    """A Zeiss Atlas 3D run's metadata as a plain dictionary: channels, pixel size, field of view, slice
    interval (from `Atlas3D.a3d-setup`), the first slice's image size and Fibics XML, and the cropping area
    (bounding box + `margin` px, origin bottom-left). See also `gpustack init DIR --from-atlas`."""
    from gpustack.io.metadata import params_from_atlas

    return params_from_atlas(stack_dir, margin=margin)


def slice_metadata(paths: Sequence[Any]) -> dict[str, Any]:
    """Per-slice Fibics values of TIFF files: {'z_pos': (n,), 'beam_current': (n,)} NumPy arrays, NaN where a
    slice has none."""
    from pathlib import Path

    from gpustack.io.metadata import slice_metadata as read

    return read([Path(p) for p in paths])
