"""`resampling`: planes at uniform z (or at given z) by linear interpolation between the slices around them,
PEERS §1.8.

The input z of each slice comes from its file name through `policy` (PyStack3D's way, e.g.
"slice_{slice_nb}_z={z_coord}um.tif"), from the Fibics metadata each slice carries (`ZPos`, tag 51023), or from a
list (`zpos_in`). The plan (which two slices and which weight make each output plane, and its name) is made
before any slice is read, so that a bad name or a z that does not increase is reported at once, naming the
slices, instead of being skipped (PyStack3D skips decreasing pairs silently). Differences from PyStack3D: the last
plane is kept when it falls on the grid (PyStack3D's `arange` drops it), `zpos_out` works from a TOML list, a
plane that falls on an input slice is that slice exactly (PyStack3D truncates the float copy).

The runner gives this step a pass of its own (`reindexes`): it reads each input slice once, keeps the two around
the current planes on the device, and writes `len(zpos_out)` planes named by `policy`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gpustack.schema import Invalid, choice, number, optional, param, string
from gpustack.steps.base import ParamError, Report, Step

if TYPE_CHECKING:
    from gpustack.io.tiff import SliceInfo

EXACT = 1e-9  # um: an output z this close to an input z is that slice
FIELDS = ("slice_nb", "z_coord")


def _float_list(value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a non-empty list of numbers, got {value!r}")
    return tuple(number()(v) for v in value)


def policy_regex(policy: str) -> re.Pattern:
    """The file-name pattern of a `policy` such as "slice_{slice_nb}_z={z_coord}um.tif" as a regex."""
    parts = re.split(r"(\{[^{}]*\})", policy)
    out = []
    for part in parts:
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            if name not in FIELDS:
                raise ValueError(f"unknown field {part} in {policy!r}; use {{slice_nb}} and {{z_coord}}")
            if f"(?P<{name}>" in "".join(out):
                raise ValueError(f"{part} appears twice in {policy!r}")
            out.append(f"(?P<{name}>.+?)")
        else:
            out.append(re.escape(part))
    if "(?P<z_coord>" not in "".join(out):
        raise ValueError(f"{policy!r} has no {{z_coord}}: the z of each slice cannot be read from its name")
    return re.compile("".join(out) + r"\Z")


def _policy(value: Any) -> str:
    text = string(value)
    policy_regex(text)
    return text


FROM_METADATA = "Fibics metadata (ZPos)"  # the z source that names the per-slice metadata


@dataclass(frozen=True)
class ResamplingConfig:
    policy: str = param("slice_{slice_nb}_z={z_coord}um.tif", _policy,
                        "file names: where the input z is read ({z_coord}) and how the planes are named")
    dz: float | None = param(None, optional(number()), "output z step, in the unit of the input z (um)")
    zpos_out: tuple[float, ...] | None = param(None, optional(_float_list), "explicit output z (instead of dz)")
    z_source: str = param("auto", choice("auto", "names", "metadata", "list"),
                          "gpustack: input z from the file names (policy), the Fibics metadata (ZPos), or zpos_in; "
                          "auto: names if they all match the policy, else metadata")
    zpos_in: tuple[float, ...] | None = param(None, optional(_float_list), "gpustack: input z of each slice")

    def __post_init__(self) -> None:
        if (self.dz is None) == (self.zpos_out is None):
            raise Invalid("dz", "give either dz (a uniform step) or zpos_out (a list of output z), not "
                                + ("both" if self.dz is not None else "neither"))
        if self.dz is not None and not self.dz > 0:
            raise Invalid("dz", f"must be > 0, got {self.dz}")
        if self.zpos_out is not None and any(b <= a for a, b in zip(self.zpos_out, self.zpos_out[1:])):
            raise Invalid("zpos_out", "output z must increase strictly")
        if self.z_source == "list" and self.zpos_in is None:
            raise Invalid("zpos_in", "z_source = \"list\" needs zpos_in, one z per slice")


@dataclass(frozen=True)
class ResamplePlan:
    z_in: np.ndarray  # (n_in,)
    z_out: np.ndarray  # (n_out,)
    lower: np.ndarray  # (n_out,) index of the slice at or below each plane
    upper: np.ndarray  # (n_out,) index of the slice above it (== lower for an exact plane)
    weight: np.ndarray  # (n_out,) float: plane = (1 - w) * slice[lower] + w * slice[upper]
    names: list[str]  # output file names
    source: str  # where z_in came from
    notes: list[str]


def zpos_from_tags(info: SliceInfo) -> float | None:
    """ZPos of a slice's Fibics XML (tag 51023, kept with the slice's header), or None."""
    from gpustack.errors import InputError
    from gpustack.io.metadata import FIBICS_TAG, parse_fibics

    value = next((t[3] for t in info.private_tags if t[0] == FIBICS_TAG), None)
    if not isinstance(value, (str, bytes)):
        return None
    try:
        return parse_fibics(value, info.name)["z_pos"]
    except InputError:  # unreadable metadata is no z: the names or zpos_in must give it
        return None


class Resampling(Step):
    name = "resampling"
    Config = ResamplingConfig
    reindexes = True
    report_needs_pass = False  # z positions and increments are known from the plan: plotted while slices stream
    work_buffers = 3

    def _z_in(self, slices: list[SliceInfo]) -> tuple[np.ndarray, str]:
        cfg = self.config
        names = [s.name for s in slices]
        if cfg.zpos_in is not None and cfg.z_source in ("auto", "list"):
            if len(cfg.zpos_in) != len(names):
                raise ParamError("zpos_in", f"{len(cfg.zpos_in)} positions for {len(names)} slices")
            return np.asarray(cfg.zpos_in, float), "zpos_in"
        regex = policy_regex(cfg.policy)
        if cfg.z_source in ("auto", "names"):
            z, bad = [], []
            for name in names:
                m = regex.match(name)
                try:
                    z.append(float(m.group("z_coord")) if m else None)
                except ValueError:
                    z.append(None)
                if z[-1] is None:
                    bad.append(name)
            if not bad:
                return np.asarray(z, float), f"file names ({cfg.policy})"
            if cfg.z_source == "names":
                raise ParamError("policy", f"{len(bad)} file name(s) do not match {cfg.policy!r}, e.g. {bad[0]!r}")
        z = [zpos_from_tags(s) for s in slices]
        missing = [n for n, v in zip(names, z) if v is None]
        if not missing:
            return np.asarray(z, float), FROM_METADATA
        if cfg.z_source == "metadata":
            raise ParamError("z_source", f"{len(missing)} slice(s) carry no Fibics ZPos, e.g. {missing[0]!r}")
        raise ParamError("policy", f"the input z cannot be read: {bad[0]!r} does not match {cfg.policy!r} and "
                                   f"{missing[0]!r} carries no Fibics ZPos; fix the policy, or give zpos_in")

    def plan(self, slices: list[SliceInfo]) -> ResamplePlan:
        """Which slices make each output plane. Raises ParamError naming the slices when z does not increase."""
        cfg = self.config
        z_in, source = self._z_in(slices)
        names = [s.name for s in slices]
        if len(z_in) < 2:
            raise ParamError("dz" if cfg.dz is not None else "zpos_out", "resampling needs at least 2 slices")
        steps = np.diff(z_in)
        wrong = np.flatnonzero(steps <= 0)
        if wrong.size:
            k = int(wrong[0])
            kind = "the same z as" if steps[k] == 0 else "a lower z than"
            raise ParamError("policy", f"z must increase along the stack: {names[k + 1]!r} (z={z_in[k + 1]:g}) has "
                                       f"{kind} {names[k]!r} (z={z_in[k]:g}); {wrong.size} such pair(s) in all (from "
                                       f"{source})")
        notes = []
        if cfg.z_source == "auto" and source == FROM_METADATA:  # names are tried first: they did not match
            notes.append(f"the file names do not match policy {cfg.policy!r}: z from each slice's Fibics ZPos "
                         "(z_source = \"metadata\" says so and silences this)")
        lo, hi = float(z_in[0]), float(z_in[-1])
        if cfg.dz is not None:
            count = int(np.floor((hi - lo) / cfg.dz + 1e-6)) + 1
            z_out = lo + cfg.dz * np.arange(count)
        else:
            z_out = np.asarray(cfg.zpos_out, float)
            outside = z_out[(z_out < lo - EXACT) | (z_out > hi + EXACT)]
            if outside.size:  # no extrapolation; and a plane silently missing would shift every later index
                listed = ", ".join(f"{z:g}" for z in outside[:5]) + (", ..." if outside.size > 5 else "")
                raise ParamError("zpos_out", f"{outside.size} value(s) outside the stack's z range [{lo:g}, {hi:g}] "
                                             f"(z from {source}): {listed}; keep the output z inside it")
        upper = np.clip(np.searchsorted(z_in, z_out - EXACT, side="left"), 0, len(z_in) - 1)
        exact = np.abs(z_in[upper] - z_out) <= EXACT
        lower = np.where(exact, upper, np.maximum(upper - 1, 0))
        span = z_in[upper] - z_in[lower]
        weight = np.where(exact, 0.0, (z_out - z_in[lower]) / np.where(span > 0, span, 1.0))
        upper = np.where(exact, lower, upper)
        width = max(4, len(str(len(z_out) - 1)))
        out_names = [cfg.policy.format(slice_nb=f"{j:0{width}d}", z_coord=f"{z:.4f}") for j, z in enumerate(z_out)]
        if len(set(out_names)) != len(out_names):
            raise ParamError("policy", f"{cfg.policy!r} gives two planes the same file name: add {{slice_nb}}, or "
                                       "a dz of at least 0.0001 (z is written with 4 decimals)")
        gaps = steps / np.median(steps)
        if gaps.max() > 1.5:
            k = int(np.argmax(gaps))
            notes.append(f"largest z gap: {steps[k]:g} between {names[k]!r} and {names[k + 1]!r} "
                         f"({gaps[k]:.1f}x the median step), filled by interpolation")
        return ResamplePlan(z_in, z_out, lower, upper, weight, out_names, source, notes)

    def write_report(self, report: Report) -> None:
        from gpustack.report.resampling import write_resampling_report

        write_resampling_report(report)
