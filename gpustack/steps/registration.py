"""`registration_calculation` and `registration_transformation` (PEERS §1.5-1.6).

The calculation runs as a statistics pass on the first channel: each slice is registered to the `references`
slices before it (for translations 3 by default; on the device: by default `kernels/translation.py`'s
correlation then Newton iterations moved by the median of tiles, robust to structures that change; or
pystackreg), and the slices' positions are solved in least squares from all those measurements, weighted by
their quality; with `references = 1` this is PyStack3D's pairwise chaining, whose error accumulates along the
stack. The result is saved as PyStack3D's `tmats.npy`
(pairwise matrices, (n, blocks, 3, 3)), so PyStack3D's own transformation step can read it, and the
transformation step of a later run too.

The transformation accumulates the matrices, removes a constant drift or a running average if asked, and warps
every channel in batches on the device. Matrices follow skimage's `warp` convention (output pixel -> input pixel,
[x, y, 1] with x the column), as pystackreg's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpustack.area import Area
from gpustack.schema import Invalid, area, boolean, choice, int_list, integer, number, optional, param
from gpustack.steps.base import Batch, ParamError, Report, Step

if TYPE_CHECKING:
    import torch

TRANSFORMATIONS = ("TRANSLATION", "RIGID_BODY", "SCALED_ROTATION", "AFFINE")
LOW_QUALITY = 0.1  # normalised correlation below which a pair is treated as no measurement


@dataclass(frozen=True)
class RegistrationCalculationConfig:
    area: Area | None = param(None, optional(area), "sub-image used to register [xmin, xmax, ymin, ymax] (px, "
                                                    "origin bottom-left); unset: whole image")
    threshold: float | None = param(None, optional(number()), "binarise before registering (pixels <= threshold)")
    nb_blocks: tuple[int, ...] = param((1, 1), int_list(2, lo=1), "[rows, cols] of blocks, one transform per block")
    transformation: str = param("TRANSLATION", choice(*TRANSFORMATIONS), "model: " + ", ".join(TRANSFORMATIONS))
    engine: str = param("gpustack", choice("gpustack", "pystackreg", "auto"),
                        "gpustack: cross-correlation, then Gauss-Newton on an image pyramid for the richer models, "
                        "on the device; pystackreg: PyStack3D's library on the CPU (auto: gpustack)")
    references: int = param(0, integer(0, 16), "gpustack, TRANSLATION: register each slice to this many slices "
                                              "before it and solve positions in robust least squares (1: "
                                              "PyStack3D's pairwise chaining; 0: automatic, 3 with estimator "
                                              "tiles, 1 with correlation)")
    estimator: str = param("tiles", choice("tiles", "correlation"),
                           "gpustack, translations: tiles: correlation on a binned copy, then Newton on the "
                           "intensities moved by the median of the tiles' updates (robust to structures that "
                           "change between slices); correlation: the cross-correlation peak (1/upsample px), then "
                           "`refine` whole-slice Gauss-Newton iterations")
    tiles: int = param(0, integer(0, 64), "gpustack, estimator tiles: tiles per side (0: about 48 px each at the "
                                          "binned size; 1: one least-squares fit over the whole slice)")
    binning: int = param(0, integer(0, 16), "gpustack, estimator tiles: pixels averaged per side before the "
                                            "Newton iterations (0: the slice's smaller side // 400)")
    iterations: int = param(3, integer(0, 50), "gpustack, estimator tiles: Newton iterations (0: the "
                                               "correlation peak of the binned copy only)")
    symmetric: bool = param(True, boolean, "gpustack, estimator tiles: measure each pair of neighbouring slices "
                                           "both ways and take the half difference (inverse consistent: less "
                                           "drift where structures change, for twice their Newton work); "
                                           "false: one way")
    upsample: int = param(20, integer(1, 1000), "gpustack, estimator correlation: sub-pixel precision of the "
                                                "correlation peak, 1/upsample px")
    refine: int = param(0, integer(0, 20), "gpustack, estimator correlation: Gauss-Newton (Lucas-Kanade) iterations "
                                          "on the intensities after the correlation peak (0: the peak only)")

    @property
    def uses_pystackreg(self) -> bool:
        return self.engine == "pystackreg"

    @property
    def slices_referenced(self) -> int:
        """`references`, with 0 resolved: several references only for gpustack's translations (positions
        solved jointly; other models and pystackreg chain pairs)."""
        if self.uses_pystackreg or self.transformation != "TRANSLATION":
            return 1
        return self.references or default_references(self.estimator)


def default_references(estimator: str) -> int:
    """What `references = 0` means. Tiles: 3, which bounds the drift that chaining accumulates where structures
    stay alike over a few slices (RESULTS.md: the registration and workflow benchmarks; about twice the chain's
    time). The correlation peak of slices two or three apart is too loose on the fast-changing stacks that
    estimator is for (measured on tests/test_registration.py's 99² drifting stack, `register_stack`: 1.9 px
    off after 100 slices with 1 reference, 2.9 px with 3)."""
    return 3 if estimator == "tiles" else 1


class RegistrationCalculation(Step):
    name = "registration_calculation"
    Config = RegistrationCalculationConfig
    version = 2  # 2: pairs stop iterating once converged; statistics of the slices as written
    writes_slices = False
    fit_on_first_channel = True
    work_buffers = 4  # windowed copies and their spectra

    def __init__(self, config: RegistrationCalculationConfig):
        super().__init__(config)
        self.fit_halo = (config.slices_referenced, 0)  # type: ignore[misc]

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        rows, cols = shape
        if self.config.area is not None:
            try:
                rows, cols = self.config.area.shape(*shape)
            except ValueError as exc:
                raise ParamError("area", str(exc)) from None
        if self.config.uses_pystackreg:  # checked before any slice is read, not in the middle of the pass
            import importlib.util

            if importlib.util.find_spec("pystackreg") is None:
                raise ParamError("engine", "pystackreg is not installed: pip install pystackreg, or use engine = "
                                           "\"gpustack\"")
        p, q = self.config.nb_blocks
        if rows // p < 16 or cols // q < 16:
            raise ParamError("nb_blocks", f"{p}x{q} blocks of a {cols}x{rows} px image are smaller than 16 px")
        return shape

    def _prepare(self, x: "torch.Tensor") -> "torch.Tensor":
        """Area, binarisation and blocks: (n, H, W) -> (n, blocks, h, w)."""
        import torch

        if self.config.area is not None:
            rows, cols = self.config.area.rows_cols(*x.shape[1:])
            x = x[:, rows, cols]
        if self.config.threshold is not None:
            x = (x <= self.config.threshold).to(torch.float32)
        # NaN (a fill of an earlier step) would spread through every FFT: zeros instead. The copy is only made
        # where there is one (the sum is the cheapest full read that sees NaN and inf)
        if x.is_floating_point() and not bool(torch.isfinite(x.sum())):  # sync: once per batch
            x = torch.nan_to_num(x)
        p, q = self.config.nb_blocks
        h, w = x.shape[1] // p, x.shape[2] // q
        x = x[:, : p * h, : q * w].reshape(x.shape[0], p, h, q, w).permute(0, 1, 3, 2, 4)
        return x.reshape(x.shape[0], p * q, h, w)

    def fit_batch(self, batch: Batch) -> dict[str, Any]:
        """Measurements (slice k, reference k - d, block): translation of k relative to k - d and its quality."""
        import torch

        x = self._prepare(batch.data)
        first = batch.core.start
        # distance by distance: runs of neighbouring pairs, which the CPU's Newton stage reads as views, in cache
        # (interleaved, every far pair was a copy of its own: 3.3x the fine stage's time with 3 references)
        pairs = [(r, r - d) for d in range(1, self.fit_halo[0] + 1) for r in range(first, batch.core.stop)
                 if batch.start + r - d >= 0 and r - d >= 0]
        if not pairs:
            return {"k": [], "d": [], "mats": None, "quality": None, "blocks": x.shape[1], "n_total": batch.n_total,
                    "shape": tuple(batch.data.shape[1:])}
        blocks = x.shape[1]
        if self.config.uses_pystackreg:
            mov = torch.stack([x[r] for r, _ in pairs])  # (pairs, blocks, h, w)
            ref = torch.stack([x[j] for _, j in pairs])
            mats, quality = _pystackreg_pairs(ref, mov, self.config.transformation)
        else:
            flat = x.flatten(0, 1)  # (slices * blocks, h, w)
            mov_i, ref_i = _pair_indices(pairs, blocks, flat.device)
            consecutive = torch.tensor([r - j == 1 for r, j in pairs]).repeat_interleave(blocks)
            shift, quality = self._measure(flat, mov_i, ref_i, consecutive)
            if self.config.transformation != "TRANSLATION":
                ref, mov = flat[ref_i], flat[mov_i]
                from gpustack.kernels.affine_lk import estimate_affine

                mats = estimate_affine(ref, mov, shift, model=self.config.transformation)
                quality = torch.where(quality >= LOW_QUALITY, _aligned_correlation(ref, mov, mats), quality)
                mats = mats.reshape(len(pairs), blocks, 3, 3)
            else:
                mats = _translation(shift.reshape(len(pairs), blocks, 2))
            quality = quality.reshape(len(pairs), blocks)
        return {"k": [batch.start + r for r, _ in pairs], "d": [r - j for r, j in pairs], "mats": mats,
                "quality": quality, "blocks": blocks, "n_total": batch.n_total, "shape": tuple(batch.data.shape[1:])}

    def _measure(self, flat: "torch.Tensor", mov_i: "torch.Tensor", ref_i: "torch.Tensor",
                 consecutive: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Translations (pairs, 2) and qualities of the pairs (flat[mov_i], flat[ref_i]); `consecutive` (host,
        bool per pair): the pairs of neighbouring slices, which `symmetric` measures both ways."""
        cfg = self.config
        if cfg.estimator == "correlation":
            refine = cfg.refine if cfg.transformation == "TRANSLATION" else 0
            return measure_translations(flat[ref_i], flat[mov_i], upsample=cfg.upsample, refine=refine)
        from gpustack.kernels import translation

        # each slice's binned copies, spectrum and gradients once, whatever the number of pairs it is in
        prep = translation.prepare(flat, lk_bin=cfg.binning or None)
        return translation.measure(prep, mov_i, ref_i, iterations=cfg.iterations, tiles=cfg.tiles or None,
                                   symmetric=consecutive & cfg.symmetric)

    def fit_reduce(self, partials: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ks = [k for p in partials for k in p["k"]]
        ds = [d for p in partials for d in p["d"]]
        n = partials[0]["n_total"]
        blocks = partials[0]["blocks"]
        geometry = self._geometry(partials[0]["shape"])
        mats = [p["mats"] for p in partials if p["k"]]
        if not mats:  # one slice: nothing to register
            eye = np.tile(np.eye(3), (n, blocks, 1, 1))
            return {"tmats": eye, "quality": np.ones((n, blocks)), "pairs": np.zeros((0, 5)), **geometry}
        mats = torch.cat(mats).double().cpu().numpy()  # sync: once per stack, (pairs, blocks, 3, 3)
        mats = _to_full_frame(mats, np.asarray(geometry["origins"]))
        quality = torch.cat([p["quality"] for p in partials if p["k"]]).double().cpu().numpy()  # sync: once
        ks_a, ds_a = np.asarray(ks), np.asarray(ds)
        if self.config.transformation == "TRANSLATION" and self.fit_halo[0] > 1:
            tmats = _solve_translations(ks_a, ds_a, mats, quality, n)
        else:  # pairwise chaining, PyStack3D's way; a low-quality pair becomes the identity
            tmats = np.tile(np.eye(3), (n, blocks, 1, 1))
            first = ds_a == 1
            good = quality[first] >= LOW_QUALITY
            tmats[ks_a[first]] = np.where(good[..., None, None], mats[first], np.eye(3))
        pair_quality = np.ones((n, blocks))
        first = ds_a == 1
        pair_quality[ks_a[first]] = quality[first]
        table = np.column_stack([ks_a, ks_a - ds_a, quality.min(axis=1), mats[:, 0, 0, 2], mats[:, 0, 1, 2]])
        table = table[np.lexsort((ds_a, ks_a))]  # slice by slice, nearest reference first
        return {"tmats": tmats, "quality": pair_quality, "pairs": table, **geometry}

    def _geometry(self, shape: tuple[int, int]) -> dict[str, Any]:
        """Where the blocks are in the slice: their origins (x, y) and centres, in pixels of the whole slice."""
        row0, col0, rows, cols = 0, 0, shape[0], shape[1]
        if self.config.area is not None:
            r, c = self.config.area.rows_cols(*shape)
            row0, col0, rows, cols = r.start, c.start, r.stop - r.start, c.stop - c.start
        p, q = self.config.nb_blocks
        bh, bw = rows // p, cols // q
        return {"grid": [p, q], "origins": [[col0 + j * bw, row0 + i * bh] for i in range(p) for j in range(q)],
                "centres_y": [row0 + (i + 0.5) * bh - 0.5 for i in range(p)],
                "centres_x": [col0 + (j + 0.5) * bw - 0.5 for j in range(q)]}

    def apply(self, batch: Batch, state: Any) -> "torch.Tensor":
        return batch.data  # a result, not a correction: the slices pass on unchanged

    def write_report(self, report: Report) -> None:
        from gpustack.report.registration import write_calculation_report

        write_calculation_report(self, report)

    @classmethod
    def has_saved_state(cls, folder: Path) -> bool:
        return (folder / "tmats.npy").is_file()

    @classmethod
    def load_state(cls, folder: Path) -> dict[str, Any]:
        import json

        tmats = np.load(folder / "tmats.npy")
        if tmats.ndim == 3:  # (n, 3, 3): one block
            tmats = tmats[:, None]
        state = {"tmats": tmats, "quality": np.ones(tmats.shape[:2]), "pairs": np.zeros((0, 5))}
        geometry = folder / "outputs" / "blocks.json"
        if geometry.is_file():
            state.update(json.loads(geometry.read_text()))
        return state


def _to_full_frame(mats: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """Block-local matrices (pairs, blocks, 3, 3) -> whole-slice coordinates: T(o) M T(-o), o the block's origin
    (a translation is unchanged; a rotation then turns about the right point)."""
    shift = np.tile(np.eye(3), (len(origins), 1, 1))
    shift[:, :2, 2] = origins
    back = shift.copy()
    back[:, :2, 2] = -origins
    return shift[None] @ mats @ back[None]


def measure_translations(ref: "torch.Tensor", mov: "torch.Tensor", *, upsample: int = 20,
                         refine: int = 0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(dx, dy) of mov relative to ref for pairs (b, H, W), and their quality: `estimator = "correlation"`.
    Plain (not whitened, not windowed) cross-correlation: on slices whose structures change from one to the next
    it is as accurate as pystackreg, where phase correlation is thrown off (measured); `refine` Lucas-Kanade
    iterations follow if asked."""
    from gpustack.kernels.phase_correlation import estimate_shifts

    shift, quality = estimate_shifts(_padded(ref), _padded(mov), upsample=upsample, window=False, normalise=False)
    if refine:
        from gpustack.kernels.lucas_kanade import refine_translations

        shift = refine_translations(ref, mov, shift, iterations=refine)
    return shift, quality


def _pair_indices(pairs: list[tuple[int, int]], blocks: int, device: "torch.device"
                  ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Rows of (slices * blocks) for the movs and refs of the pairs, block by block."""
    import torch

    mov = [r * blocks + b for r, _ in pairs for b in range(blocks)]
    ref = [j * blocks + b for _, j in pairs for b in range(blocks)]
    return torch.tensor(mov, device=device), torch.tensor(ref, device=device)


def _aligned_correlation(ref: "torch.Tensor", mov: "torch.Tensor", mats: "torch.Tensor") -> "torch.Tensor":
    """Normalised correlation of ref and mov warped by mats, away from the border: the pair's quality."""
    import torch

    from gpustack.kernels.warp import warp_affine

    warped = warp_affine(mov.to(torch.float32), mats, mode="edge")
    m = max(2, min(ref.shape[1:]) // 16)
    a = ref[:, m:-m, m:-m].to(torch.float32)
    b = warped[:, m:-m, m:-m]
    a = a - a.mean(dim=(1, 2), keepdim=True)
    b = b - b.mean(dim=(1, 2), keepdim=True)
    den = (a.square().sum((1, 2)) * b.square().sum((1, 2))).sqrt()
    return torch.where(den > 0, (a * b).sum((1, 2)) / den.clamp_min(1e-30), 0.0).clamp(0, 1)


def _padded(x: "torch.Tensor") -> "torch.Tensor":
    """Mean removed, then zero-padded to fast FFT sizes: faster, and the correlation is linear rather than
    circular for small shifts (measured: 0.198 px RMS per pair instead of 0.211 on 901² slices). Not divided by
    the overlap: that removes the pull towards small shifts, but measured worse (cumulative error 1.82 against
    1.31 px RMS on the workflow benchmark's stack)."""
    import torch.nn.functional as F

    from gpustack.kernels.fft_sizes import fast_size

    x = x - x.mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    return F.pad(x, (0, fast_size(w) - w, 0, fast_size(h) - h))


def _translation(shift: "torch.Tensor") -> "torch.Tensor":
    import torch

    mats = torch.eye(3, dtype=torch.float64, device=shift.device).expand(*shift.shape[:-1], 3, 3).clone()
    mats[..., 0, 2] = shift[..., 0].to(torch.float64)
    mats[..., 1, 2] = shift[..., 1].to(torch.float64)
    return mats


def _solve_translations(ks: np.ndarray, ds: np.ndarray, mats: np.ndarray, quality: np.ndarray,
                        n: int) -> np.ndarray:
    """Positions p_k (p_0 = 0) from measured p_k - p_(k-d), robust weighted least squares per block; pairwise
    tmats back.

    Weights are quality² (q² / (1 - q²) and an inverse variance from the spread of the tiles were tried on the
    registration benchmark's stack, 8 references, an earlier version of this solve: 0.58 and 0.61 px off at most
    after 200 slices, quality² 0.45 px). The
    first solution is the chain of consecutive pairs. A measurement between slices further apart must agree with
    it within 4 robust standard deviations of the nearest such pairs, grown like the chain's random walk: a false
    peak (tens of px off where structures no longer correlate) does not, and is dropped. Then, over a few rounds,
    far measurements are down-weighted by Tukey's biweight of their residual; consecutive pairs keep their weight.
    A faint tie between consecutive slices keeps a slice with no usable measurement where its neighbour is
    (identity) instead of leaving the system singular.
    """
    blocks = mats.shape[1]
    tmats = np.tile(np.eye(3), (n, blocks, 1, 1))
    if n < 2:
        return tmats
    tie = 1e-9
    k_all = np.concatenate([ks, np.arange(1, n)])
    j_all = np.concatenate([ks - ds, np.arange(n - 1)])
    dist = np.concatenate([ds, np.ones(n - 1, int)])
    measured = np.arange(len(k_all)) < len(ks)
    for b in range(blocks):
        m_all = np.concatenate([mats[:, b, :2, 2], np.zeros((n - 1, 2))])
        weight = np.where(quality[:, b] >= LOW_QUALITY, quality[:, b] ** 2, 0.0)
        base = np.concatenate([weight, np.full(n - 1, tie * max(weight.max(initial=0.0), 1e-12))])
        far = (base > 0) & (dist > 1)
        # Far pairs across a broken link of the chain (a blank slice) are all that places the slices after it:
        # they join the start, and the gate below, which measures far pairs against the chain, spares them.
        linked = np.zeros(n, bool)
        linked[k_all[measured & (dist == 1) & (base > 0)]] = True
        broken = np.cumsum(~linked[1:])  # broken[i - 1]: broken links among 1..i
        broken = np.concatenate([[0], broken])
        bridging = far & (broken[k_all] > broken[j_all])
        w = np.where(far & ~bridging, 0.0, base)  # the chain first: a false peak far away cannot pull the start
        positions = _solve_graph(k_all, j_all, w, m_all, n)
        if (far & ~bridging).any():
            resid = np.linalg.norm(positions[k_all] - positions[j_all] - m_all, axis=1)
            checked = far & ~bridging
            nearest = checked & (dist == dist[checked].min())
            spread = 1.4826 * np.median(resid[nearest] / np.sqrt(dist[nearest]))
            # px: a floor where the pairs agree exactly
            far &= bridging | (resid <= 4 * spread * np.sqrt(dist) + 0.05)
        for _ in range(6 if far.any() else 0):
            resid = np.linalg.norm(positions[k_all] - positions[j_all] - m_all, axis=1)
            scale = max(1.4826 * np.median(resid[far]), 1e-6)
            u = resid / (3 * scale)
            w = np.where(far, base * np.clip(1 - u ** 2, 0, None) ** 2, np.where(dist > 1, 0.0, base))
            positions = _solve_graph(k_all, j_all, w, m_all, n)
        steps = np.diff(positions, axis=0)
        tmats[1:, b, 0, 2] = steps[:, 0]
        tmats[1:, b, 1, 2] = steps[:, 1]
    return tmats


def _solve_graph(k: np.ndarray, j: np.ndarray, w: np.ndarray, m: np.ndarray, n: int) -> np.ndarray:
    """Weighted least squares for positions (n, 2), p_0 = 0, from p_k - p_j ≈ m: a banded normal system, solved
    by a banded Cholesky factorisation (O(n * band²), no dense n x n matrix)."""
    band = int(np.max(k - j)) if len(k) else 1
    diag = np.zeros((band + 1, n))  # diag[d, i] = A[i, i - d]
    rhs = np.zeros((n, 2))
    np.add.at(diag[0], k, w)
    np.add.at(diag[0], j, w)
    np.add.at(diag, (k - j, k), -w)
    np.add.at(rhs, k, w[:, None] * m)
    np.add.at(rhs, j, -w[:, None] * m)
    # p_0 is fixed at 0: drop row and column 0
    a, r = diag[:, 1:], rhs[1:]
    size = n - 1
    lower = np.zeros_like(a)  # lower[d, i] = L[i, i - d]
    for i in range(size):
        for d in range(min(band, i), 0, -1):
            jj = i - d
            acc = a[d, i] - sum(lower[d + e, i] * lower[e, jj] for e in range(1, band - d + 1) if e <= jj)
            lower[d, i] = acc / lower[0, jj]
        lower[0, i] = np.sqrt(max(a[0, i] - sum(lower[d, i] ** 2 for d in range(1, min(band, i) + 1)), 1e-300))
    y = np.zeros_like(r)
    for i in range(size):
        y[i] = (r[i] - sum(lower[d, i] * y[i - d] for d in range(1, min(band, i) + 1))) / lower[0, i]
    x = np.zeros_like(r)
    for i in range(size - 1, -1, -1):
        x[i] = (y[i] - sum(lower[d, i + d] * x[i + d] for d in range(1, min(band, size - 1 - i) + 1))) / lower[0, i]
    return np.vstack([np.zeros((1, 2)), x])


def _pystackreg_pair(args: tuple[np.ndarray, np.ndarray, str]) -> np.ndarray:
    from pystackreg import StackReg

    ref, mov, name = args
    return StackReg(getattr(StackReg, name)).register(ref, mov)


def _pystackreg_pairs(ref: "torch.Tensor", mov: "torch.Tensor", name: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """pystackreg on a process pool, pair by pair and block by block (PyStack3D's engine, for exact parity)."""
    import torch

    try:
        import pystackreg  # noqa: F401
    except ImportError:
        raise ParamError("engine", "pystackreg is not installed: pip install pystackreg, or use engine = "
                                   "\"gpustack\" (TRANSLATION)") from None
    from gpustack.pools import process_pool

    r = ref.double().cpu().numpy()  # sync: the CPU engine works on host arrays
    m = mov.double().cpu().numpy()  # sync: the CPU engine works on host arrays
    jobs = [(r[i, b], m[i, b], name) for i in range(r.shape[0]) for b in range(r.shape[1])]
    mats = np.stack(list(process_pool().map(_pystackreg_pair, jobs, chunksize=4))).reshape(r.shape[0], r.shape[1], 3, 3)
    quality = np.ones(r.shape[:2])  # pystackreg gives no score
    return torch.from_numpy(mats), torch.from_numpy(quality)


@dataclass(frozen=True)
class RegistrationTransformationConfig:
    nb_blocks: tuple[int, ...] | None = param(None, optional(int_list(2, lo=1)),
                                              "blocks of the calculation to use; unset: the calculation's")
    constant_drift: tuple[float, ...] | None = param(None, optional(lambda v: tuple(number()(x) for x in _pair(v))),
                                                     "[dx, dy] px per slice removed from the cumulative shifts")
    box_size_averaging: int | None = param(None, optional(integer(0)),
                                           "remove the running average over this many slices (keeps jitter "
                                           "correction, leaves slow drift)")
    subpixel: bool = param(True, boolean, "false: shift by whole pixels (cumulative translations rounded)")
    mode: str = param("constant", choice("constant", "edge", "symmetric", "reflect", "wrap"),
                      "what fills the pixels a warp brings in from outside ('constant': NaN, written as 0)")
    cropping: bool = param(False, boolean, "crop to the largest rectangle no slice fills from outside")
    order: int = param(1, integer(0, 3), "gpustack: interpolation, 0 nearest, 1 bilinear, 3 bicubic")

    def __post_init__(self) -> None:
        if self.order == 2:
            raise Invalid("order", "2 is not available: use 0 (nearest), 1 (bilinear) or 3 (bicubic)")


def _pair(value: Any) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"expected [dx, dy], got {value!r}")
    return list(value)


class RegistrationTransformation(Step):
    name = "registration_transformation"
    Config = RegistrationTransformationConfig
    depends_on = "registration_calculation"
    work_buffers = 4  # input, sampling grid (2 floats), output
    report_needs_pass = False  # the cumulative transforms and the crop are known before the first slice

    def __init__(self, config: RegistrationTransformationConfig):
        super().__init__(config)
        self._cumulative: np.ndarray | None = None
        self._crop: tuple[slice, slice] | None = None

    @property
    def may_make_nan(self) -> bool:  # type: ignore[override]
        return self.config.mode == "constant" and not self.config.cropping

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The input shape, or with `cropping` once the transforms are known, the rectangle every slice covers."""
        if not self.config.cropping or self._cumulative is None:
            return shape
        if self._crop is None:
            import torch

            from gpustack.kernels.warp import valid_region

            self._crop = valid_region(torch.from_numpy(self._cumulative), shape)
        rows, cols = self._crop
        if rows.stop <= rows.start or cols.stop <= cols.start:
            raise ParamError("cropping", "the slices move so far that no pixel is covered by all of them; "
                                         "use cropping = false")
        return rows.stop - rows.start, cols.stop - cols.start

    def check_dependency(self, upstream: Step) -> None:
        p, q = upstream.config.nb_blocks
        wanted = self.config.nb_blocks
        if wanted is not None and wanted[0] * wanted[1] != p * q:
            raise ParamError("nb_blocks", f"{list(wanted)} does not match registration_calculation's nb_blocks "
                                          f"{[p, q]}: leave it unset to use the calculation's")
        if p * q > 1 and self.config.cropping:
            raise ParamError("cropping", "cropping to the common area is not available with several blocks "
                                         f"(registration_calculation's nb_blocks {[p, q]})")

    def derive_state(self, upstream: dict[str, Any], n_slices: int) -> dict[str, Any]:
        tmats = np.asarray(upstream["tmats"], dtype=np.float64)
        if tmats.shape[0] != n_slices:
            raise ParamError("nb_blocks", f"the registration has {tmats.shape[0]} slices, this stack {n_slices}: "
                                          "run registration_calculation again on this stack")
        blocks = tmats.shape[1]
        wanted = self.config.nb_blocks
        if wanted is not None and wanted[0] * wanted[1] != blocks:
            raise ParamError("nb_blocks", f"{list(wanted)} does not match the calculation's {blocks} block(s)")
        pystack3d_blocks = blocks > 1 and "centres_y" not in upstream  # PyStack3D's tmats.npy: no blocks.json
        if pystack3d_blocks and wanted is None:
            raise ParamError("nb_blocks", f"the saved tmats.npy has {blocks} blocks and no outputs/blocks.json (as "
                                          "PyStack3D writes it): give their grid here, nb_blocks = [rows, columns], "
                                          "as in the registration_calculation that made it")
        if blocks > 1 and self.config.cropping:
            raise ParamError("cropping", "cropping to the common area is not available with several blocks")
        cumulative = np.empty_like(tmats)
        acc = np.tile(np.eye(3), (blocks, 1, 1))
        for k in range(n_slices):
            acc = tmats[k] @ acc  # pairwise t_k aligns k onto k-1: T_k = t_k T_(k-1) (pystackreg's register_stack)
            cumulative[k] = acc
        pairwise = tmats[:, 0].copy()
        if self.config.constant_drift is not None:
            dx, dy = self.config.constant_drift
            cumulative[:, :, 0, 2] -= np.arange(n_slices)[:, None] * dx
            cumulative[:, :, 1, 2] -= np.arange(n_slices)[:, None] * dy
        box = self.config.box_size_averaging
        if box is not None and box > 1:  # remove the running average: slow drift stays, jitter goes
            import torch

            from gpustack.kernels.histogram import running_mean

            flat = torch.from_numpy(cumulative.reshape(n_slices, blocks * 9))
            average, _ = running_mean(flat, torch.ones(n_slices, dtype=torch.float64), box)
            cumulative = cumulative + np.eye(3) - average.numpy().reshape(n_slices, blocks, 3, 3)
        if not self.config.subpixel:
            cumulative[..., :2, 2] = np.round(cumulative[..., :2, 2])
        self._cumulative = cumulative[:, 0]
        self._crop = None
        translation = (blocks == 1 and bool(np.all(cumulative[:, 0, :2, :2] == np.eye(2)))
                       and self.config.order in (0, 1))
        linear = cumulative[:, 0, :2, :2]
        axis_aligned = bool(np.all(np.abs(linear[:, 0, 1]) < 1e-12) and np.all(np.abs(linear[:, 1, 0]) < 1e-12))
        state = {"cumulative": cumulative[:, 0], "pairwise": pairwise, "translation": translation,
                 "axis_aligned": axis_aligned}
        if pystack3d_blocks:  # its matrices, applied as PyStack3D applies them: at its block centres (`apply`)
            state.update(blocks=cumulative, grid=tuple(wanted), centres_y=None, centres_x=None)
        elif blocks > 1:
            state.update(blocks=cumulative, grid=tuple(upstream["grid"]), centres_y=upstream["centres_y"],
                         centres_x=upstream["centres_x"])
        return state

    def apply(self, batch: Batch, state: dict[str, Any]) -> "torch.Tensor":
        import torch

        from gpustack.kernels.warp import shift_images, warp_affine

        mats = state.get("_device_mats")
        if mats is None or mats.device != batch.data.device:
            mats = state["_device_mats"] = torch.from_numpy(state["cumulative"]).to(batch.data.device)
        mats = mats[batch.start:batch.start + batch.data.shape[0]]
        if "blocks" in state:  # one matrix per block, blended between the block centres
            from gpustack.kernels.warp import warp_blocks

            grid = state.get("_device_blocks")
            if grid is None or grid.device != batch.data.device:
                grid = state["_device_blocks"] = torch.from_numpy(state["blocks"]).to(batch.data.device)
            p, q = state["grid"]
            grid = grid[batch.start:batch.start + batch.data.shape[0]].reshape(-1, p, q, 3, 3)
            if state["centres_y"] is None:  # PyStack3D's centres: (i + 1/2) block sizes of the whole slice
                height, width = batch.data.shape[1:]
                state["centres_y"] = [(height // p) * (i + 0.5) for i in range(p)]
                state["centres_x"] = [(width // q) * (j + 0.5) for j in range(q)]
            centres = [torch.tensor(state[k], dtype=torch.float64, device=batch.data.device)
                       for k in ("centres_y", "centres_x")]
            return warp_blocks(batch.data, grid, *centres, mode=self.config.mode, order=self.config.order)
        if state.get("translation"):  # shifts only: padded windows and blends, no sampling grid
            out = shift_images(batch.data, mats[:, :2, 2], mode=self.config.mode, order=self.config.order)
        else:
            # rotated or scaled slices never land on pixel centres: skip warp_affine's exactness pass for them
            out = warp_affine(batch.data, mats, mode=self.config.mode, order=self.config.order,
                              snap=state.get("axis_aligned", True))
        if self.config.cropping and self._crop is not None:
            out = out[:, self._crop[0], self._crop[1]]
        return out

    def write_report(self, report: Report) -> None:
        from gpustack.report.registration import write_transformation_report

        write_transformation_report(self, report)
