"""The step contract. A step is pure: it never reads or writes slices, shows progress or starts processes.

The runner gives it batches of slices already on the device and owns everything else (see DESIGN.md §3):

- `Config`: a frozen dataclass of `schema.param`s built from the step's TOML table;
- `output_shape(shape)`: the slice shape it produces; checks the parameters that depend on the image size;
- `fit_batch(batch)` / `fit_reduce(partials)`: optional statistics pass, a map over batches then a small
  reduction (so that a pass can later be sharded over workers); the runner schedules it before `apply`.
  `batch.data[batch.core]` are the slices to account for; the rest is halo;
- `apply(batch, state)`: the correction, torch in, torch out, same number of slices; never in place;
- `apply_recorded(batch, state)`: the same, plus per-slice records (e.g. fitted coefficients) that the runner
  gathers into (n, ...) arrays for `write_report`: steps that record override this one instead of `apply`;
- `region(shape)`: for steps that only select pixels (cropping): the rows and columns kept;
- `sample_grid()` / `fit_samples(values, shape)`: optional, for a per-slice fit on a strided grid of the input
  (2D bkg_removal): the runner may fit many slices ahead from the files (`pipeline/prefit.py`);
- `halo`: the neighbouring slices (before, after) `apply` needs around each slice;
- `write_report(report)`: step-specific files and plots, written after the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gpustack.schema import Invalid

if TYPE_CHECKING:
    import numpy as np
    import torch


class ParamError(Invalid):
    """A parameter that does not fit the data (e.g. an area outside the image); the runner names file and table."""


@dataclass
class Batch:
    """Consecutive slices on the device: `data[core]` are this batch's own slices, the rest is halo context."""

    data: torch.Tensor  # (n, H, W) float32 on the run's device
    start: int  # stack index of data[0]
    core: slice  # rows of `data` that belong to this batch
    names: list[str]  # file name of each row of `data`
    n_total: int  # slices in the whole stack (halo steps treat its ends as edges)

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.data.shape[0])


@dataclass
class Report:
    """What a step may use to write its own outputs after a pass, or during it (`report_needs_pass`), per channel."""

    outputs_dir: Path
    state: Any
    stats: np.ndarray | None  # (n, 9): input, output and written min/max/mean per slice; None during a pass
    names: list[str]
    in_shape: tuple[int, int]
    out_shape: tuple[int, int]
    records: dict[str, np.ndarray] = field(default_factory=dict)  # from `apply_recorded`, (n, ...) each
    warn: Callable[[str], None] = print  # one line to the user (prefixed with the step and channel)


class Step:
    name: ClassVar[str]
    Config: ClassVar[type]
    version: ClassVar[int] = 1  # bump when the same parameters give different output (invalidates resumes)
    halo: ClassVar[tuple[int, int]] = (0, 0)
    fit_halo: ClassVar[tuple[int, int]] = (0, 0)  # context `fit_batch` needs (registration: the previous slice)
    takes_integers: ClassVar[bool] = False  # `apply` takes integer batches as they are (else as float32)
    fit_on_first_channel: ClassVar[bool] = False  # fit on channels[0], apply that state to every channel
    work_buffers: ClassVar[int] = 2  # float32 slice-sized buffers per slice at peak, for the batch-size budget
    writes_slices: ClassVar[bool] = True  # False for steps that only compute a state (registration_calculation)
    may_make_nan: ClassVar[bool] = False  # True if outputs can hold NaN (e.g. 'constant' warps): NaN-aware stats
    depends_on: ClassVar[str | None] = None  # a step whose result `apply` needs (registration_transformation)
    reindexes: ClassVar[bool] = False  # changes the number of slices (resampling): `plan(slices)`, a pass of its own
    # False: `write_report` needs only the state (no statistics or records), so it renders while the pass runs
    report_needs_pass: ClassVar[bool] = True

    def __init__(self, config: Any):
        self.config = config

    @property
    def has_fit(self) -> bool:
        return type(self).fit_batch is not Step.fit_batch

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return shape

    def region(self, shape: tuple[int, int]) -> tuple[slice, slice] | None:
        """(rows, cols) of its input that a step which only selects pixels keeps, else None.

        For such a step the runner cuts the region before `apply` (or reads only those rows), so `apply`
        receives the region, in whatever dtype the data has, and must only pass it on.
        """
        return None

    def fit_batch(self, batch: Batch) -> Any:  # pragma: no cover - contract
        raise NotImplementedError

    def fit_reduce(self, partials: list[Any]) -> Any:
        return partials

    @property
    def fits_level_counts(self) -> bool:
        """Whether the fit needs only each slice's count of every grey level (a histogram of integers): then
        `fit_batch` takes integer batches as they are (views of the pass's reused buffers: it must not keep
        them), and a pass that only crops may count on the host."""
        return type(self).fit_level_counts is not Step.fit_level_counts

    def fit_level_counts(self, counts: torch.Tensor, lowest: int) -> Any:
        """`fit_batch`'s partial result for integer slices, from their level counts (b, levels) int64 on the
        device: column k counts the pixels of value lowest + k."""
        raise NotImplementedError

    def sample_grid(self) -> tuple[int, int] | None:
        """(row, column) steps of the only input pixels `apply`'s per-slice fit uses (pixels [::sy, ::sx]), or None.
        With a grid, the runner may read those pixels ahead and call `fit_samples` on many slices at once."""
        return None

    def fit_samples(self, values: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The per-slice fits of `values` (b, hs, ws) float32, the `sample_grid` of (b) input slices of `shape`;
        `apply` finds them in its state as {"prefit": (n, ...) tensors}, row k for stack slice k."""
        raise NotImplementedError

    def apply(self, batch: Batch, state: Any) -> torch.Tensor:  # pragma: no cover - contract
        raise NotImplementedError

    def apply_recorded(self, batch: Batch, state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`apply`, and per-slice records: tensors with one row per row of `batch.data` (the runner keeps core)."""
        return self.apply(batch, state), {}

    def write_report(self, report: Report) -> None:
        """Step-specific outputs beside the standard statistics; nothing by default."""

    # -- results shared between steps (`depends_on`) ----------------------------------------------------------
    def check_dependency(self, upstream: "Step") -> None:
        """Before any slice is read: raise ParamError where this step's parameters cannot go with those of the
        step it depends on, when both are in the same run (what `derive_state` would refuse after its pass)."""

    def derive_state(self, upstream: Any, n_slices: int) -> Any:
        """This step's state from the result of the step it depends on; may fix `output_shape` (a crop)."""
        return upstream

    @classmethod
    def has_saved_state(cls, folder: Path) -> bool:
        """Whether a previous run left this step's result in its folder (for steps others depend on)."""
        return False

    @classmethod
    def load_state(cls, folder: Path) -> Any:  # pragma: no cover - contract
        raise NotImplementedError
