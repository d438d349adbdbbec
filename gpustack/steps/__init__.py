"""The step registry: PyStack3D's step names mapped to gpustack's implementations."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from gpustack.steps.base import Batch, Step

# PyStack3D's nine steps, in its canonical order (PEERS.md §1.0).
PYSTACK3D_STEPS = (
    "cropping",
    "bkg_removal",
    "intensity_rescaling",
    "intensity_rescaling_area",
    "registration_calculation",
    "registration_transformation",
    "destriping",
    "resampling",
    "cropping_final",
)

# step name -> "module:class"; a module is imported when its step is first used (a cropping-only run does not
# import registration's or destriping's modules: 30 ms of its start-up)
STEP_CLASSES = {
    "cropping": "cropping:Cropping",
    "bkg_removal": "background:BkgRemoval",
    "intensity_rescaling": "intensity:IntensityRescaling",
    "intensity_rescaling_area": "intensity:IntensityRescalingArea",
    "registration_calculation": "registration:RegistrationCalculation",
    "registration_transformation": "registration:RegistrationTransformation",
    "destriping": "destriping:Destriping",
    "resampling": "resampling:Resampling",
    "cropping_final": "cropping:CroppingFinal",
}


class _Registry(Mapping):
    """The step classes by name, each imported on first access."""

    def __getitem__(self, name: str) -> type[Step]:
        module, cls = STEP_CLASSES[name].split(":")
        return getattr(importlib.import_module(f"gpustack.steps.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(STEP_CLASSES)

    def __len__(self) -> int:
        return len(STEP_CLASSES)


REGISTRY: Mapping[str, type[Step]] = _Registry()

__all__ = ["PYSTACK3D_STEPS", "REGISTRY", "Batch", "Step"]
