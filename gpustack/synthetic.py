"""Synthetic FIB-SEM-like stacks with a known ground truth and PyStack3D-like defects.

NumPy only (no torch, no scipy), deterministic from `SyntheticSpec.seed`, streamed slice by slice: the stack is
never held in memory, and any slice (or the clean truth at any z) can be rendered on its own.

Forward model for original slice `k` (relative units, then times `scale`, see below), in this order:

1. content: spheres over a flat matrix level, rendered exactly from their cross-section at `k` with a 1-px
   anti-aliased edge, painted in a fixed order (alpha blending, later spheres on top), plus a mild separable
   cosine texture. Channel 0 and 1 share the geometry; channel 1 has inverted blob intensities (1.3 - I) and
   inverted texture, channels >= 2 draw their own intensities.
2. shift: the content is rendered with its centres moved by `shifts[k] = (dx, dy)` px, `dx` to the right
   (columns), `dy` DOWN (array rows): observed[i, j] = truth[i - dy, j - dx]. Exact, no interpolation. A
   constant offset on the slices of `shift_range`, plus an optional random walk (`drift_sigma`).
3. curtains: on `curtain_slices`, an additive column pattern (per-column normal amplitudes smoothed over ~1.5 px,
   unit std times `curtain_amplitude`), fading down from the top row (`curtain_fade`).
4. contrast: on `contrast_range`, (content + curtains) is scaled by `contrast_factor` around the mean of the
   clean (shifted) content over the real region: v = m + f * (v - m).
5. background: `background_amplitude * (c_xyz*x*y*z + c_xy*x*y + c_x*x + c_y*y + c_z*z)` with coefficients >= 0
   summing to 1, x = col / (W-1), y = row / (H-1) (rows, y down), z = k / (N-1). Not shifted.
6. border band: outside the real region every pixel is set to `BAND` (flat). The band is `pad` px wide at the left
   and bottom and `pad // 2` at the right and top (asymmetric on purpose: a y-flip in the area convention shows).
7. noise: additive Gaussian, `noise_sigma`, own stream per slice and channel.
8. scaling: data = clip(rint(v * scale), 0, max) for uint8/uint16 with scale = 0.75 * max of the dtype;
   float32: data = v (scale 1, no rounding or clipping).

`SyntheticStack.truth(z)` is step 1 (no shift unless asked) times `scale`, in float32: the same units as the data.
Relative levels: matrix 0.15 (channel 1: 0.2), blobs 0.3..1, band 0.05.
Odd slices from `delete_from * n_slices` on are not written; names are `slice_{k:04d}_z={z:.4f}um.tif` with the
original index `k` and z = k * z_step. Each file has the private ASCII tag 51023 (a small Fibics-like XML).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tifffile

from gpustack.errors import ConfigError, InputError

__all__ = ["SyntheticSpec", "SyntheticStack", "generate", "slice_name", "parse_name", "BAND", "FIBICS_TAG",
           "TRUTH_FILE"]

FORMAT_VERSION = 1
TRUTH_FILE = "truth.json"
FIBICS_TAG = 51023
BAND = 0.05  # relative value of the border band
MATRIX = (0.15, 0.2)  # relative matrix level of channel 0, 1 (and >= 2: channel 0's)
BLOB_RANGE = (0.3, 1.0)
Z_PX = 2.0  # sphere geometry: one slice step is Z_PX pixels in z
TEXTURE_AMPLITUDE = 0.012  # relative amplitude of each of the texture's 3 terms
VOLUME_FRACTION = 0.3  # default number of blobs: this fraction of the box is inside spheres
CURTAIN_SMOOTH = 1.5  # px, Gaussian smoothing of the curtain column amplitudes
_DTYPES = ("uint8", "uint16", "float32")
_COMPRESSIONS = (None, "zlib")
_NAME_RE = re.compile(r"^slice_(\d+)_z=(-?[0-9.]+)um\.tif$")
_BKG_TERMS = ("xyz", "xy", "x", "y", "z")
# independent random streams, one per purpose (and per slice / channel where it applies)
_S_GEOMETRY, _S_SHIFT, _S_DRIFT, _S_BKG, _S_CURTAIN, _S_NOISE = range(6)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Amplitudes and sigmas are relative to the blob range (0..1); the defaults are small."""

    n_slices: int = 60
    height: int = 256
    width: int = 256
    dtype: str = "uint16"
    channels: tuple[str, ...] = (".",)
    seed: int = 0
    z_step: float = 0.01  # um per original slice; a multiple of 1e-4 so that names carry z exactly
    pad: int | None = None  # border band width; None: round(0.08 * min(height, width))
    noise_sigma: float = 0.02
    shift_range: tuple[float, float] | None = (0.07, 0.23)  # fractions: f0 * n <= k < f1 * n
    max_shift: float = 5.0  # px; each of dx, dy is +-U(0.3, 1) * max_shift
    curtain_slices: tuple[float, ...] = (0.0, 0.28)  # fractions: k = int(f * (n - 1))
    curtain_amplitude: float = 0.08
    curtain_fade: float | None = 0.6  # e-folding length along y as a fraction of the height; None: no fading
    contrast_range: tuple[float, float] | None = (0.25, 0.33)  # fractions: f0 * n <= k < f1 * n
    contrast_factor: float = 0.6
    background_amplitude: float = 0.15
    delete_from: float | None = 0.66  # delete odd k >= delete_from * n; None: keep all
    drift_sigma: float = 0.0  # px per slice, random walk added to all shifts
    compression: str | None = None
    n_blobs: int | None = None  # None: fill ~30 % of the volume

    def without_defects(self, **changes) -> "SyntheticSpec":
        """This spec with every defect and the noise off (the border band stays), then `changes`."""
        clean = dict(noise_sigma=0.0, shift_range=None, max_shift=0.0, curtain_slices=(), contrast_range=None,
                     background_amplitude=0.0, delete_from=None, drift_sigma=0.0)
        return replace(self, **{**clean, **changes})

    @property
    def pad_px(self) -> int:
        return round(0.08 * min(self.height, self.width)) if self.pad is None else int(self.pad)

    @property
    def scale(self) -> float:
        """Data units per relative unit."""
        return 1.0 if self.dtype == "float32" else 0.75 * float(np.iinfo(self.dtype).max)

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) on any inconsistent value."""
        def bad(msg: str):
            raise ConfigError(f"synthetic spec: {msg}")

        if self.dtype not in _DTYPES:
            bad(f"dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            bad(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("n_slices", "height", "width"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.n_slices > 99999:
            bad(f"n_slices {self.n_slices} is more than 99999")
        pad = self.pad_px
        if pad < 0:
            bad(f"pad must be >= 0, got {pad}")
        rw, rh = self.width - pad - pad // 2, self.height - pad - pad // 2
        if rw < 16 or rh < 16:
            bad(f"a {self.width}x{self.height} image with pad {pad} leaves a {rw}x{rh} real region; "
                f"it must be at least 16x16 (make the image larger or the pad smaller)")
        if not self.channels or len(set(self.channels)) != len(self.channels):
            bad(f"channels must be non-empty and distinct, got {self.channels!r}")
        if "." in self.channels and len(self.channels) > 1:
            bad("channel '.' (slices at the root of out_dir) cannot be combined with named channels")
        for ch in self.channels:
            if ch != "." and (not isinstance(ch, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", ch)):
                bad(f"channel name {ch!r} must be '.' or letters, digits, '_' and '-'")
        if not (self.z_step > 0 and math.isfinite(self.z_step)):
            bad(f"z_step must be > 0, got {self.z_step}")
        if abs(self.z_step * 1e4 - round(self.z_step * 1e4)) > 1e-6 * max(1.0, self.z_step * 1e4):
            bad(f"z_step {self.z_step} must be a multiple of 0.0001 um (names carry z with 4 decimals)")
        for name in ("noise_sigma", "max_shift", "curtain_amplitude", "background_amplitude", "drift_sigma"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                bad(f"{name} must be >= 0, got {v}")
        if not (self.contrast_factor > 0 and math.isfinite(self.contrast_factor)):
            bad(f"contrast_factor must be > 0, got {self.contrast_factor}")
        if self.curtain_fade is not None and not self.curtain_fade > 0:
            bad(f"curtain_fade must be > 0 or None, got {self.curtain_fade}")
        for name in ("shift_range", "contrast_range"):
            r = getattr(self, name)
            if r is not None and (len(r) != 2 or not 0 <= r[0] <= r[1] <= 1):
                bad(f"{name} must be None or (f0, f1) with 0 <= f0 <= f1 <= 1, got {r!r}")
        for f in self.curtain_slices:
            if not 0 <= f <= 1:
                bad(f"curtain_slices are fractions in [0, 1], got {f!r}")
        if self.delete_from is not None and not 0 <= self.delete_from <= 1:
            bad(f"delete_from must be None or a fraction in [0, 1], got {self.delete_from!r}")
        if self.compression not in _COMPRESSIONS:
            bad(f"compression {self.compression!r} is not one of {_COMPRESSIONS}")
        if self.n_blobs is not None and (self.n_blobs < 0 or self.n_blobs > 200000):
            bad(f"n_blobs must be None or in 0..200000, got {self.n_blobs}")

    def to_json(self) -> dict:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "SyntheticSpec":
        names = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)


def _range_mask(n: int, r: tuple[float, float] | None) -> np.ndarray:
    k = np.arange(n)
    if r is None:
        return np.zeros(n, bool)
    return (k >= r[0] * n - 1e-9) & (k < r[1] * n - 1e-9)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *stream])


def slice_name(k: int, z: float, n_slices: int) -> str:
    """`slice_{k:04d}_z={z:.4f}um.tif`, the index padded to sort lexicographically in stacks over 10000 slices."""
    return f"slice_{k:0{max(4, len(str(n_slices - 1)))}d}_z={z:.4f}um.tif"


def parse_name(name: str) -> tuple[int, float]:
    """(original index, z in um) from a slice file name."""
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a synthetic slice name")
    return int(m.group(1)), float(m.group(2))


class _Model:
    """Everything needed to render any slice; built from the spec or from truth.json."""

    def __init__(self, spec: SyntheticSpec, d: dict | None = None):
        self.spec = spec
        n, H, W = spec.n_slices, spec.height, spec.width
        self.n, self.H, self.W, self.C = n, H, W, len(spec.channels)
        self.scale = spec.scale
        p = spec.pad_px
        self.pads = {"left": p, "right": p // 2, "top": p // 2, "bottom": p}
        # real region: rows top..H-bottom, cols left..W-right; area in PyStack3D's bottom-left convention
        self.rows = slice(self.pads["top"], H - self.pads["bottom"])
        self.cols = slice(self.pads["left"], W - self.pads["right"])
        self.area = [self.pads["left"], W - self.pads["right"], self.pads["bottom"], H - self.pads["top"]]
        if d is None:
            self._draw()
        else:
            self.spheres = np.asarray(d["spheres"], np.float64).reshape(-1, 4)
            self.intensity = np.asarray(d["intensity"], np.float64).reshape(len(self.spheres), self.C)
            self.texture = np.asarray(d["texture"], np.float64).reshape(-1, 7)
            self.shifts = np.asarray(d["shifts"], np.float64).reshape(n, 2)
            self.contrast = np.asarray(d["contrast"], np.float64).reshape(n)
            self.curtain_mask = np.asarray(d["curtain_mask"], bool).reshape(n)
            self.bkg = {t: float(d["background_coefficients"][t]) for t in _BKG_TERMS}
            self.kept = np.asarray(d["kept"], np.int64)
        self.z = np.round(self.kept * spec.z_step, 10)
        self._xn = (np.arange(W) / max(W - 1, 1)).astype(np.float32)
        self._yn = (np.arange(H) / max(H - 1, 1)).astype(np.float32)

    # ---- random draws (only at generation; load() reads them back) ----
    def _draw(self) -> None:
        s, n, C = self.spec, self.n, self.C
        rng = _rng(s.seed, _S_GEOMETRY)
        x0, x1 = self.cols.start, self.cols.stop
        y0, y1 = self.rows.start, self.rows.stop
        L = min(x1 - x0, y1 - y0)
        rmin, rmax = max(2.5, 0.02 * L), max(5.0, 0.07 * L)
        zlo, zhi = -rmax, (n - 1) * Z_PX + rmax
        if s.n_blobs is None:
            vol = (x1 - x0 + rmax) * (y1 - y0 + rmax) * (zhi - zlo)
            er3 = (rmax ** 4 - rmin ** 4) / (4 * (rmax - rmin))
            nb = int(np.clip(round(VOLUME_FRACTION * vol / (4 / 3 * math.pi * er3)), 4, 50000))
        else:
            nb = int(s.n_blobs)
        xc = rng.uniform(x0 - rmax / 2, x1 + rmax / 2, nb)
        yc = rng.uniform(y0 - rmax / 2, y1 + rmax / 2, nb)
        kc = rng.uniform(zlo, zhi, nb) / Z_PX
        r = rng.uniform(rmin, rmax, nb)
        self.spheres = np.stack([xc, yc, kc, r], axis=1)
        base = rng.uniform(*BLOB_RANGE, nb)
        inten = [base, BLOB_RANGE[0] + BLOB_RANGE[1] - base]
        inten += [rng.uniform(*BLOB_RANGE, nb) for _ in range(2, C)]
        self.intensity = np.stack(inten[:C], axis=1)
        # texture: 3 separable terms (amplitude, fx, phase_x, fy, phase_y, fz, phase_z), frequencies in cycles/px
        t = 3
        self.texture = np.stack([
            np.full(t, TEXTURE_AMPLITUDE),
            1 / rng.uniform(6, 24, t), rng.uniform(0, 2 * np.pi, t),
            1 / rng.uniform(6, 24, t), rng.uniform(0, 2 * np.pi, t),
            1 / rng.uniform(8, 40, t), rng.uniform(0, 2 * np.pi, t)], axis=1)
        # shifts: constant block offset + optional random walk
        shifts = np.zeros((n, 2))
        block = _range_mask(n, s.shift_range)
        if s.max_shift > 0 and block.any():
            r2 = _rng(s.seed, _S_SHIFT)
            off = r2.uniform(0.3, 1.0, 2) * s.max_shift * r2.choice([-1.0, 1.0], 2)
            shifts[block] = off
        if s.drift_sigma > 0:
            steps = _rng(s.seed, _S_DRIFT).normal(0, s.drift_sigma, (n, 2))
            steps[0] = 0
            shifts += np.cumsum(steps, axis=0)
        self.shifts = shifts
        self.contrast = np.where(_range_mask(n, s.contrast_range), s.contrast_factor, 1.0)
        mask = np.zeros(n, bool)
        for f in s.curtain_slices:
            mask[min(n - 1, int(f * (n - 1) + 1e-9))] = True
        self.curtain_mask = mask
        c = _rng(s.seed, _S_BKG).uniform(0, 1, len(_BKG_TERMS))
        c[0] = 0.3 + 0.3 * c[0]  # keep the x*y*z term visible
        c[1:] *= (1 - c[0]) / c[1:].sum()
        self.bkg = {t: float(v) for t, v in zip(_BKG_TERMS, c)}
        k = np.arange(n)
        deleted = np.zeros(n, bool) if s.delete_from is None else (k % 2 == 1) & (k >= s.delete_from * n - 1e-9)
        self.kept = k[~deleted]

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "generator": "gpustack.synthetic",
            "spec": self.spec.to_json(),
            "scale": self.scale,
            "levels": {"band": BAND, "matrix": [self._matrix(c) for c in range(self.C)],
                       "blob_range": list(BLOB_RANGE)},
            "z_px": Z_PX,
            "pads": self.pads,
            "area": self.area,
            "kept": self.kept.tolist(),
            "z": [round(float(z), 6) for z in self.z],
            "names": [slice_name(int(k), float(z), self.n) for k, z in zip(self.kept, self.z)],
            "shifts": self.shifts.tolist(),
            "contrast": self.contrast.tolist(),
            "curtain_mask": self.curtain_mask.tolist(),
            "curtain_slices": np.flatnonzero(self.curtain_mask).tolist(),
            "background_coefficients": self.bkg,
            "spheres_columns": ["xc_px", "yc_px", "k_center", "radius_px"],
            "spheres": self.spheres.tolist(),
            "intensity": self.intensity.tolist(),
            "texture_columns": ["amplitude", "fx", "phase_x", "fy", "phase_y", "fz", "phase_z"],
            "texture": self.texture.tolist(),
        }

    def _matrix(self, c: int) -> float:
        return MATRIX[c] if c < len(MATRIX) else MATRIX[0]

    # ---- rendering ----
    def content(self, k: float, shift: Sequence[float], chans: Sequence[int]) -> list[np.ndarray]:
        """Clean slice(s) at (fractional) index k, content moved by shift = (dx, dy), in data units, float32."""
        H, W, S = self.H, self.W, self.scale
        dx, dy = float(shift[0]), float(shift[1])
        imgs = [np.full((H, W), self._matrix(c) * S, np.float32) for c in chans]
        vals = self.intensity[:, list(chans)] * S
        sp = self.spheres
        h2 = sp[:, 3] ** 2 - ((k - sp[:, 2]) * Z_PX) ** 2
        for i in np.flatnonzero(h2 > 0):
            self._disc(imgs, vals[i], sp[i, 0] + dx, sp[i, 1] + dy, math.sqrt(h2[i]))
        # texture (added on top of everything, sign alternates per channel)
        tx = self.texture
        zf = np.cos(2 * np.pi * tx[:, 5] * k * Z_PX + tx[:, 6]) * tx[:, 0] * S
        tmp = np.empty((H, W), np.float32)
        tex = np.zeros((H, W), np.float32)
        xs, ys = np.arange(W) - dx, np.arange(H) - dy
        for t in range(len(tx)):
            cx = np.cos(2 * np.pi * tx[t, 1] * xs + tx[t, 2]).astype(np.float32)
            cy = (np.cos(2 * np.pi * tx[t, 3] * ys + tx[t, 4]) * zf[t]).astype(np.float32)
            np.multiply.outer(cy, cx, out=tmp)
            tex += tmp
        for img, c in zip(imgs, chans):
            if c % 2:
                img -= tex
            else:
                img += tex
        return imgs

    def _disc(self, imgs, vals, xc: float, yc: float, rd: float) -> None:
        H, W = self.H, self.W
        c0, c1 = max(0, math.floor(xc - rd - 1)), min(W, math.ceil(xc + rd + 2))
        r0, r1 = max(0, math.floor(yc - rd - 1)), min(H, math.ceil(yc + rd + 2))
        if c0 >= c1 or r0 >= r1:
            return
        ddx = ((np.arange(c0, c1) - xc) ** 2).astype(np.float32)
        ddy = ((np.arange(r0, r1) - yc) ** 2).astype(np.float32)
        a = np.add.outer(ddy, ddx)
        np.sqrt(a, out=a)
        np.subtract(np.float32(rd + 0.5), a, out=a)
        np.clip(a, 0, 1, out=a)
        if rd < 0.5:  # vanishing cap: fade out continuously
            a *= np.float32(2 * rd)
        t = np.empty_like(a)
        for img, v in zip(imgs, vals):
            view = img[r0:r1, c0:c1]
            np.subtract(np.float32(v), view, out=t)
            t *= a
            view += t

    def background(self, k: int) -> np.ndarray:
        """Additive background of slice k in data units (whole image, float32)."""
        s = self.spec
        amp = s.background_amplitude * self.scale
        z = k / (self.n - 1) if self.n > 1 else 0.0
        b = self.bkg
        x, y = self._xn, self._yn
        u = ((b["xyz"] * z + b["xy"]) * amp) * x + np.float32(b["y"] * amp)  # times y
        v = (b["x"] * amp) * x + np.float32(b["z"] * amp * z)
        out = np.multiply.outer(y, u.astype(np.float32))
        out += v.astype(np.float32)
        return out

    def curtain(self, k: int) -> np.ndarray | None:
        """Additive curtain pattern of slice k in data units, None if slice k has none."""
        s = self.spec
        if not self.curtain_mask[k] or s.curtain_amplitude == 0:
            return None
        rng = _rng(s.seed, _S_CURTAIN, int(k))
        m = int(math.ceil(4 * CURTAIN_SMOOTH))
        kern = np.exp(-0.5 * (np.arange(-m, m + 1) / CURTAIN_SMOOTH) ** 2)
        col = np.convolve(rng.standard_normal(self.W + 2 * m), kern / kern.sum(), mode="valid")
        col = (col - col.mean()) / (col.std() + 1e-12) * (s.curtain_amplitude * self.scale)
        if s.curtain_fade is None:
            prof = np.ones(self.H)
        else:
            prof = np.exp(-self._yn.astype(np.float64) / s.curtain_fade)
        return np.multiply.outer(prof.astype(np.float32), col.astype(np.float32))

    def render(self, k: int) -> list[np.ndarray]:
        """Slice k of every channel, as written (dtype of the spec)."""
        s, S = self.spec, self.scale
        chans = list(range(self.C))
        imgs = self.content(k, self.shifts[k], chans)
        cur = self.curtain(k)
        f = float(self.contrast[k])
        bkg = self.background(k) if s.background_amplitude > 0 else None
        out = []
        noise = np.empty((self.H, self.W), np.float32) if s.noise_sigma > 0 else None
        for c, img in zip(chans, imgs):
            if f != 1.0:
                m = np.float32(img[self.rows, self.cols].mean(dtype=np.float64))
            if cur is not None:
                img += cur
            if f != 1.0:
                img -= m
                img *= np.float32(f)
                img += m
            if bkg is not None:
                img += bkg
            band = np.float32(BAND * S)
            img[: self.rows.start] = band
            img[self.rows.stop:] = band
            img[:, : self.cols.start] = band
            img[:, self.cols.stop:] = band
            if noise is not None:
                _rng(s.seed, _S_NOISE, int(k), c).standard_normal(dtype=np.float32, out=noise)
                noise *= np.float32(s.noise_sigma * S)
                img += noise
            out.append(_quantise(img, s.dtype))
        return out


def _quantise(img: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return img
    np.rint(img, out=img)
    np.clip(img, 0, np.iinfo(dtype).max, out=img)
    return img.astype(dtype)


def _fibics_xml(k: int, z: float, channel: str, spec: SyntheticSpec) -> str:
    return ('<?xml version="1.0" encoding="iso-8859-1"?>\n'
            f"<FibicsImage><Generator>gpustack.synthetic</Generator><Slice>{k}</Slice>"
            f"<Channel>{channel}</Channel><Image><Width>{spec.width}</Width><Height>{spec.height}</Height>"
            f"</Image><Stage><ZPos>{z:.4f}</ZPos></Stage></FibicsImage>")


def _write_tiff(path: Path, arr: np.ndarray, xml: str, compression: str | None) -> None:
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as fh:
            tifffile.imwrite(fh, arr, photometric="minisblack", metadata=None, compression=compression,
                             extratags=[(FIBICS_TAG, "s", 0, xml, True)])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _channel_dir(root: Path, channel: str) -> Path:
    return root if channel == "." else root / channel


class SyntheticStack:
    """A generated stack and its ground truth. `shifts[k] = (dx, dy)`: content moved right by dx, DOWN by dy px."""

    def __init__(self, root: Path, model: _Model):
        self._m = model
        self.spec: SyntheticSpec = model.spec
        self.root = Path(root)
        self.kept: np.ndarray = model.kept.copy()
        self.z: np.ndarray = model.z.copy()
        self.shifts: np.ndarray = model.shifts.copy()
        self.contrast: np.ndarray = model.contrast.copy()
        self.curtain_mask: np.ndarray = model.curtain_mask.copy()
        self.area: list[int] = list(model.area)
        self.scale: float = model.scale
        self.background_coefficients: dict[str, float] = dict(model.bkg)

    def __repr__(self) -> str:
        s = self.spec
        return (f"SyntheticStack({str(self.root)!r}, {len(self.kept)}/{s.n_slices} slices, "
                f"{s.height}x{s.width} {s.dtype}, channels={s.channels})")

    @classmethod
    def load(cls, out_dir: str | Path) -> "SyntheticStack":
        """Read `truth.json` written by generate()."""
        root = Path(out_dir)
        path = root / TRUTH_FILE
        if not path.is_file():
            raise InputError(f"{path} not found: not a folder written by gpustack.synthetic.generate")
        d = json.loads(path.read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        spec = SyntheticSpec.from_json(d["spec"])
        return cls(root, _Model(spec, d))

    def _chan(self, channel: str) -> int:
        try:
            return self.spec.channels.index(channel)
        except ValueError:
            raise ValueError(f"no channel {channel!r}; channels are {self.spec.channels}") from None

    def channel_dir(self, channel: str = ".") -> Path:
        self._chan(channel)
        return _channel_dir(self.root, channel)

    def files(self, channel: str = ".") -> list[Path]:
        """The written slice files of a channel, in order (lexicographic = original index)."""
        d = self.channel_dir(channel)
        return [d / slice_name(int(k), float(z), self.spec.n_slices) for k, z in zip(self.kept, self.z)]

    def index(self, z: float) -> float:
        """Original (fractional) slice index at height z um (snapped to an integer within 1e-9)."""
        k = float(z) / self.spec.z_step
        return float(round(k)) if abs(k - round(k)) < 1e-9 else k

    def truth(self, z: float, channel: str = ".", cropped: bool = True, *,
              shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """Clean content at height z (um), data units, float32; moved by shift = (dx, dy) px; cropped to `area`."""
        c = self._chan(channel)
        img = self._m.content(self.index(z), shift, [c])[0]
        return img[self._m.rows, self._m.cols].copy() if cropped else img

    def background(self, k: int) -> np.ndarray:
        """Additive background of original slice k, whole image, data units (the band overwrites its border)."""
        if self.spec.background_amplitude == 0:
            return np.zeros((self.spec.height, self.spec.width), np.float32)
        return self._m.background(int(k))

    def curtain(self, k: int) -> np.ndarray:
        """Additive curtain pattern of original slice k, whole image, data units (before the contrast factor)."""
        cur = self._m.curtain(int(k))
        return np.zeros((self.spec.height, self.spec.width), np.float32) if cur is None else cur

    def crop(self, img: np.ndarray) -> np.ndarray:
        """The real region of a full image (rows H-ymax:H-ymin, cols xmin:xmax)."""
        return img[..., self._m.rows, self._m.cols]

    def render(self, k: int) -> list[np.ndarray]:
        """Original slice k of every channel exactly as generate() writes it (also for deleted slices)."""
        return self._m.render(int(k))


def generate(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec(), *,
             progress: Callable[[int, int], None] | None = None) -> SyntheticStack:
    """Write the stack (one TIFF per kept slice and channel) and truth.json into out_dir; slice by slice."""
    if not isinstance(spec, SyntheticSpec):
        raise TypeError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    spec.validate()
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} exists and is not a folder")
    for d in dict.fromkeys([root, *(_channel_dir(root, ch) for ch in spec.channels)]):
        if d.is_dir() and any(p.suffix.lower() in (".tif", ".tiff") for p in d.iterdir()):
            raise InputError(f"{d} already holds .tif files; give a new or empty folder")
    if (root / TRUTH_FILE).exists():
        raise InputError(f"{root / TRUTH_FILE} already exists; give a new or empty folder")
    model = _Model(spec)
    dirs = [_channel_dir(root, ch) for ch in spec.channels]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    total = len(model.kept)
    for i, (k, z) in enumerate(zip(model.kept, model.z)):
        k = int(k)
        name = slice_name(k, float(z), spec.n_slices)
        for ch, d, arr in zip(spec.channels, dirs, model.render(k)):
            _write_tiff(d / name, arr, _fibics_xml(k, float(z), ch, spec), spec.compression)
        if progress is not None:
            progress(i + 1, total)
    tmp = root / f".{TRUTH_FILE}.part"
    tmp.write_text(json.dumps(model.to_json(), indent=1))
    os.replace(tmp, root / TRUTH_FILE)
    return SyntheticStack(root, model)
