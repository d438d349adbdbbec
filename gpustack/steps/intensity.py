"""`intensity_rescaling` (histogram specification) and `intensity_rescaling_area` (gain from a reference area),
PEERS §1.3-1.4. Both measure the stack in a statistics pass, then correct each slice.

Differences from PyStack3D: the rescaling map is continuous (no quantisation to `nbins` levels), each slice's own
distribution is measured finely (FINE_BINS over its range, `nbins` is the resolution of the references), and the
stack is read once for the statistics instead of twice. By default (`mapping = "linear"`, `reference = "median"`)
a slice gets only a gain and an offset, towards the quantile-wise median of the slices: matching whole
histograms forces one slice's content (its proportions of phases) onto another and damages structure (mean SSIM
against ground truth drops on a synthetic stack), while detector drifts are gains and offsets. And by default
(`correct = "jumps"`, `kernels/jumps.py`) only the abrupt changes of those gains and offsets along z are undone:
the smooth ones come from the content, and undoing them cost slices without any defect 14 dB. `mapping =
"histogram"` with `reference = "mean"` is PyStack3D's method. Slices that cannot be measured (constant, all NaN, an
empty area, or a 2-98 % quantile range under 1 % of most slices': a blank frame with a few pixels left)
are left as they are and named in a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpustack.area import Area
from gpustack.schema import (
    Invalid,
    area,
    choice,
    integer,
    number,
    number_pair,
    optional,
    param,
)
from gpustack.steps.base import Batch, ParamError, Report, Step

if TYPE_CHECKING:
    import torch


LINEAR_QUANTILES = (0.02, 0.98)  # the 'linear' mapping ignores the tails (saturated or empty pixels)
# slices whose 2-98 % quantile range is below this fraction of the stack's 90th percentile one are left alone
DEGENERATE_SPREAD = 0.01


@dataclass(frozen=True)
class IntensityRescalingConfig:
    nbins: int = param(256, integer(1), "histogram bins of the reference distributions (over the stack's range)")
    filter_size: int = param(-1, integer(-1), "reference of each slice: -1 all slices, n > 0 the n slices "
                                              "around it")
    mapping: str = param("linear", choice("linear", "histogram"),
                         "gpustack: linear fits a gain and an offset (the least-squares line through the slice's "
                         "quantiles against the reference's); histogram matches the whole distribution (PyStack3D, "
                         "but continuous)")
    reference: str = param("median", choice("median", "mean"),
                           "gpustack: median of the slices' quantiles (robust to a few odd slices), or mean of "
                           "their histograms (PyStack3D)")
    correct: str | None = param(None, optional(choice("jumps", "all")),
                                "gpustack: jumps corrects only abrupt changes between consecutive slices (a detector "
                                "or beam change) and keeps the smooth ones, which come from the content; all maps "
                                "every slice to its reference (PyStack3D). Default: jumps with the linear mapping "
                                "over the whole stack (filter_size -1), all otherwise")

    def __post_init__(self) -> None:
        if self.filter_size == 0:
            raise Invalid("filter_size", "0 slices is no reference: use -1 (all slices) or a window of n > 0 slices")
        if self.mapping == "linear":  # its gain and offset: a line through the bins' inner quantiles
            lo, hi = LINEAR_QUANTILES
            inner = sum(1 for k in range(self.nbins + 1) if lo <= k / self.nbins <= hi)
            if inner < 2:
                raise Invalid("nbins", f"{self.nbins} bin(s) leave {inner} quantile(s) between {lo:.0%} and {hi:.0%} "
                                       "for the linear mapping's gain and offset: use 3 or more, or mapping = "
                                       '"histogram"')
        if self.correct == "jumps" and (self.mapping != "linear" or self.filter_size != -1):
            raise Invalid("correct", 'correct = "jumps" measures gains against the whole stack with the linear '
                                     'mapping: it needs mapping = "linear" and filter_size = -1')

    @property
    def corrects_jumps(self) -> bool:
        return (self.correct or ("jumps" if self.mapping == "linear" and self.filter_size == -1 else "all")) == "jumps"


class IntensityRescaling(Step):
    name = "intensity_rescaling"
    Config = IntensityRescalingConfig
    version = 2  # 2: nearly constant slices are left as they are; statistics of the slices as written
    work_buffers = 7  # input, index (int64), two gathered tables, output
    takes_integers = True  # integer slices are mapped through one table per slice (apply_maps_to_integers)

    def fit_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        from gpustack.kernels.histogram import slice_cdfs

        return slice_cdfs(batch.data[batch.core])  # integer batches: from their level counts

    def fit_level_counts(self, counts: torch.Tensor, lowest: int) -> dict[str, torch.Tensor]:
        from gpustack.kernels.histogram import cdfs_from_level_counts

        return cdfs_from_level_counts(counts, lowest)

    def fit_reduce(self, partials: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        import torch

        from gpustack.kernels.histogram import (
            cdf_at,
            interp,
            running_mean,
            running_median,
        )

        parts = {k: torch.cat([p[k] for p in partials]) for k in partials[0]}
        lo, hi, count, cdf = parts["lo"].double(), parts["hi"].double(), parts["count"], parts["cdf"]
        n, fine = cdf.shape[0], cdf.shape[1] - 1
        active = (count > 0) & (hi > lo)
        fine_edges = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, fine + 1, dtype=torch.float64,
                                                                        device=cdf.device)
        # A slice whose inner quantiles barely differ (a blank frame with a few pixels left, a slice a 3D
        # background took below 0, mostly clipped) has nothing to match: a gain or a map measured on it would
        # stretch its few distinct pixels over the whole range.
        inner = torch.tensor(LINEAR_QUANTILES, dtype=torch.float64, device=cdf.device).expand(n, -1)
        q = interp(inner, cdf, fine_edges)
        spread = torch.where(active, q[:, 1] - q[:, 0], float("nan"))
        # against the 90th percentile, not the median: the blank frames may be most of the stack (before the
        # sample enters the field of view)
        active = active & (spread > DEGENERATE_SPREAD * torch.nanquantile(spread, 0.9))
        state: dict[str, Any] = {"active": active, "lo": parts["lo"], "hi": parts["hi"]}
        if not bool(active.any()):  # sync: once per stack
            state["lut"] = torch.zeros(n, fine + 1, dtype=torch.float32, device=cdf.device)
            return state
        gmin = torch.where(active, lo, float("inf")).min()  # no boolean indexing: it would synchronise
        gmax = torch.where(active, hi, float("-inf")).max()
        edges = torch.linspace(0.0, 1.0, self.config.nbins + 1, dtype=torch.float64, device=cdf.device)
        edges = gmin + (gmax - gmin) * edges
        orig = cdf_at(edges, lo, hi, cdf)  # (n, nbins + 1) each slice's CDF on the common bins
        levels = torch.linspace(0, 1, self.config.nbins + 1, dtype=torch.float64, device=cdf.device)  # quantiles
        size = self.config.filter_size
        if self.config.reference == "mean":  # the mixture of the slices' distributions, as PyStack3D
            if size == -1:
                w = active.to(torch.float64)
                ref = ((orig * w[:, None]).sum(dim=0) / w.sum()).expand(n, -1)
            else:
                ref, weight = running_mean(orig, active, size)
                ref = torch.where((weight > 0)[:, None], ref, orig)
        else:  # quantile by quantile, the median slice: odd slices do not pull the reference
            quantiles = interp(levels.expand(n, -1), cdf, fine_edges)  # (n, nbins + 1)
            quantiles = torch.where(active[:, None], quantiles, float("nan"))
            ref_q = running_median(quantiles, size)
            ref_q = torch.where(torch.isfinite(ref_q), ref_q, quantiles)
            ref = interp(edges.expand(n, -1), ref_q, levels.expand(n, -1), side="right")
        # Each slice's map at its own fine bin edges: level v with CDF p goes to the reference's quantile p.
        lut = interp(cdf, ref, edges.expand(n, -1))
        if self.config.mapping == "linear":  # gain and offset: the least-squares line through the Q-Q plot
            inner = (levels >= LINEAR_QUANTILES[0]) & (levels <= LINEAR_QUANTILES[1])
            own = interp(levels[inner].expand(n, -1), cdf, fine_edges)
            if self.config.reference == "median":  # the reference's quantiles as they are, no round trip
                target = ref_q[:, inner]
            else:
                target = interp(levels[inner].expand(n, -1), ref, edges.expand(n, -1))
            own_c = own - own.mean(dim=1, keepdim=True)
            gain = (own_c * target).sum(dim=1) / (own_c ** 2).sum(dim=1).clamp_min(1e-30)
            offset = target.mean(dim=1) - gain * own.mean(dim=1)
            if self.config.corrects_jumps:
                from gpustack.kernels.jumps import MIN_SLICES, jump_corrections

                if int(active.sum()) >= MIN_SLICES:  # sync: once per stack
                    # the measured series stay in the state for the report: what was corrected, and why
                    state.update(measured_gain=gain.clone(), measured_level=own.mean(dim=1))
                    gain, offset = jump_corrections(gain, own.mean(dim=1), own[:, -1] - own[:, 0], active)
            lut = gain[:, None] * fine_edges + offset[:, None]
            state.update(gain=torch.where(active, gain, 1.0).to(torch.float32),
                         offset=torch.where(active, offset, 0.0).to(torch.float32))
        lut = torch.where(active[:, None], lut, fine_edges)
        final = interp(edges.expand(n, -1), lut, cdf, side="right")  # the output's CDF on the common bins
        # Output levels beyond the stack's input range (a gain > 1 on the darkest or brightest slice) are
        # counted in the end bins, so that every row holds all of the slice's pixels.
        final[:, 0], final[:, -1] = 0.0, 1.0
        counts = count.to(torch.float64)[:, None]
        state.update(lut=lut.to(torch.float32), edges=edges, histo_orig=orig.diff(dim=1) * counts,
                     histo_ref=ref.diff(dim=1) * counts, histo_final=final.diff(dim=1) * counts)
        return state

    def apply(self, batch: Batch, state: dict[str, Any]) -> torch.Tensor:
        import torch

        from gpustack.kernels.histogram import apply_maps, apply_maps_to_integers

        rows = slice(batch.start, batch.start + batch.data.shape[0])
        x = batch.data
        if "gain" in state:  # a line: no table lookup needed
            # one fused pass (multiply and add would each allocate and fill a batch)
            return torch.addcmul(state["offset"][rows, None, None], x if x.is_floating_point() else x.float(),
                                 state["gain"][rows, None, None])
        maps = apply_maps if x.is_floating_point() else apply_maps_to_integers
        return maps(x, state["lo"][rows], state["hi"][rows], state["lut"][rows], state["active"][rows])

    def write_report(self, report: Report) -> None:
        from gpustack.report.intensity import write_rescaling_report

        write_rescaling_report(report)


@dataclass(frozen=True)
class IntensityRescalingAreaConfig:
    area: Area | None = param(None, optional(area), "reference area [xmin, xmax, ymin, ymax] (px, origin "
                                                    "bottom-left); unset: whole image")
    threshold_min: float | None = param(None, optional(number()), "area pixels below are left out of the mean")
    threshold_max: float | None = param(None, optional(number()), "area pixels above are left out of the mean")
    factors_range: tuple[float, float] = param((0.8, 1.2), number_pair, "[low, high] limits of the gain factors")

    def __post_init__(self) -> None:
        lo, hi = self.threshold_min, self.threshold_max
        if lo is not None and hi is not None and not lo < hi:
            raise Invalid("threshold_max", f"threshold_min ({lo:g}) must be less than threshold_max ({hi:g})")
        if self.factors_range[0] <= 0:
            raise Invalid("factors_range", f"{list(self.factors_range)}: factors must be positive")


class IntensityRescalingArea(Step):
    name = "intensity_rescaling_area"
    Config = IntensityRescalingAreaConfig
    version = 2  # 2: statistics of the slices as written (rounded, clipped)
    work_buffers = 2

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        if self.config.area is not None:
            try:
                self.config.area.shape(*shape)
            except ValueError as exc:
                raise ParamError("area", str(exc)) from None
        return shape

    def fit_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.data[batch.core]
        if self.config.area is not None:
            rows, cols = self.config.area.rows_cols(*x.shape[1:])
            x = x[:, rows, cols]
        from gpustack.kernels.background import fit_mask

        valid = fit_mask(x, self.config.threshold_min, self.config.threshold_max)
        count = valid.sum(dim=(1, 2))
        total = x.double().where(valid, 0.0).sum(dim=(1, 2))
        return {"mean": total / count.clamp_min(1), "count": count}

    def fit_reduce(self, partials: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        import torch

        means = torch.cat([p["mean"] for p in partials])
        measured = torch.cat([p["count"] for p in partials]) > 0
        lo, hi = self.config.factors_range
        if bool(measured.any()):  # sync: once per stack
            # numpy's median (mean of the middle two) of the measured slices
            reference = torch.nanquantile(torch.where(measured, means, float("nan")), 0.5)
            factors = (reference / means).clamp(lo, hi)
        else:
            reference = torch.tensor(float("nan"), dtype=torch.float64)
            factors = torch.ones_like(means)
        factors = torch.where(measured & (means != 0), factors, 1.0)
        return {"means": torch.where(measured, means, float("nan")), "factors": factors, "measured": measured,
                "reference": reference}

    def apply(self, batch: Batch, state: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = slice(batch.start, batch.start + batch.data.shape[0])
        return batch.data * state["factors"][rows].to(batch.data.dtype)[:, None, None]

    def write_report(self, report: Report) -> None:
        from gpustack.report.intensity import write_area_report

        write_area_report(report, self.config)
