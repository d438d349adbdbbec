"""The step registry: PyStack3D's step names mapped to gpustack's implementations."""

from __future__ import annotations

from gpustack.steps.background import BkgRemoval
from gpustack.steps.base import Batch, Step
from gpustack.steps.cropping import Cropping, CroppingFinal
from gpustack.steps.destriping import Destriping
from gpustack.steps.intensity import IntensityRescaling, IntensityRescalingArea
from gpustack.steps.registration import RegistrationCalculation, RegistrationTransformation
from gpustack.steps.resampling import Resampling

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

REGISTRY: dict[str, type[Step]] = {
    cls.name: cls
    for cls in (Cropping, BkgRemoval, IntensityRescaling, IntensityRescalingArea, RegistrationCalculation,
                RegistrationTransformation, Destriping, Resampling,
                CroppingFinal)
}

__all__ = ["PYSTACK3D_STEPS", "REGISTRY", "Batch", "Step"]
