"""What a streaming pass is given: its source, its steps and where their slices go. No torch here, so a
workflow that only selects pixels (cropping) runs without importing it (`host_pass`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpustack.io.tiff import StackSource
from gpustack.steps.base import Step

N_STATS = 9  # input, output, written x (min, max, mean)


@dataclass
class StepRun:
    """A step inside a pass: the step, its fitted state, where its slices go, and its statistics."""

    step: Step
    state: Any = None
    out_dir: Path | None = None  # None: this step's slices are not written in this pass
    out_dtype: str = "float32"  # dtype of the written slices: "uint8", "uint16" or "float32"
    region: tuple[slice, slice] | None = None  # (rows, cols) the step keeps, for steps that only select pixels
    stats: np.ndarray | None = None  # (n, 9), filled by the pass
    records: dict[str, np.ndarray] = field(default_factory=dict)  # per-slice records of `apply_recorded`


@dataclass
class PassSpec:
    source: StackSource
    runs: list[StepRun]
    fit: Step | None = None  # step whose statistics pass runs on this pass's output
    fit_partials: list[Any] = field(default_factory=list)
    # The first step only keeps a region: read just its rows, take its columns before any arithmetic. Its input
    # statistics are then not computed (the rest of the slice is never read).
    push_region: bool = False
    # (n, 3) min, max, mean of the source slices when known already (what the step that wrote them measured as
    # it wrote them): taken as the first step's input statistics instead of a pass over every slice
    input_stats: np.ndarray | None = None

    @property
    def regions_only(self) -> bool:
        """Every step only keeps a region of its input."""
        return all(r.region is not None for r in self.runs)

    @property
    def selects_only(self) -> bool:
        """Every step only keeps a region and nothing is fitted: the pass is a copy, no arithmetic."""
        return self.fit is None and self.regions_only

    @property
    def counts_levels(self) -> bool:
        """Every step only keeps a region, and the fit on what they keep needs only the level counts of integer
        slices (`Step.fits_level_counts`): a copy, and a bincount per slice."""
        return (self.fit is not None and self.fit.fits_level_counts and self.regions_only
                and self.source.dtype.kind in "ui" and self.source.dtype.itemsize <= 2)
