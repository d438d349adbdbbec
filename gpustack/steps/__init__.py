"""The step registry: PyStack3D's step names mapped to gpustack's implementations."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping

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
# import registration's or destriping's modules: about 25 ms of its start-up)
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


class _Registry(MutableMapping):
    """The step classes by name, each imported on first access (and replaceable, as a dict: tests do)."""

    def __init__(self, where: dict[str, str]):
        self._entries: dict[str, str | type[Step]] = dict(where)  # "module:class" until imported

    def __getitem__(self, name: str) -> type[Step]:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, cls = entry.split(":")
            entry = self._entries[name] = getattr(importlib.import_module(f"gpustack.steps.{module}"), cls)
        return entry

    def __setitem__(self, name: str, cls: type[Step]) -> None:
        self._entries[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


REGISTRY: MutableMapping[str, type[Step]] = _Registry(STEP_CLASSES)

__all__ = ["PYSTACK3D_STEPS", "REGISTRY", "Batch", "Step"]
