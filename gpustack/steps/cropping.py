"""`cropping` and `cropping_final`: keep a rectangle of every slice (PyStack3D §1.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpustack.area import Area
from gpustack.schema import area, optional, param
from gpustack.steps.base import Batch, ParamError, Report, Step

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CroppingConfig:
    area: Area | None = param(
        None, optional(area), "region kept, [xmin, xmax, ymin, ymax] in px, origin bottom-left; unset: whole image"
    )


class Cropping(Step):
    name = "cropping"
    Config = CroppingConfig
    work_buffers = 1  # a view of the input

    def output_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        if self.config.area is None:
            return shape
        try:
            return self.config.area.shape(*shape)
        except ValueError as exc:
            raise ParamError("area", str(exc)) from None

    def region(self, shape: tuple[int, int]) -> tuple[slice, slice]:
        if self.config.area is None:
            return slice(0, shape[0]), slice(0, shape[1])
        return self.config.area.rows_cols(*shape)

    def apply(self, batch: Batch, state: Any) -> "torch.Tensor":
        return batch.data  # the runner has already cut `region` (or read only it)

    def write_report(self, report: Report) -> None:
        (height, width), n = report.in_shape, len(report.names)
        area = self.config.area.clamped(height, width) if self.config.area else None
        (report.outputs_dir / "log.txt").write_text(
            f"Original shape: ({n}, {height}, {width})\n"
            f"New shape: ({n}, {report.out_shape[0]}, {report.out_shape[1]})\n"
            f"Area [xmin, xmax, ymin, ymax] (origin bottom-left): {list(area) if area else 'whole image'}\n"
        )


class CroppingFinal(Cropping):
    name = "cropping_final"
