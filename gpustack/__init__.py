"""gpustack: GPU-first cleaning of 3D image stacks before segmentation.

The array functions accept NumPy, torch or CuPy arrays and return the same kind. They are imported lazily so
that `import gpustack` (and the CLI's `--help` and `validate`) stay fast and never load torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "crop": "gpustack.api",
    "slice_statistics": "gpustack.api",
    "remove_background": "gpustack.api",
    "background_terms": "gpustack.api",
    "rescale_intensity": "gpustack.api",
    "rescale_intensity_area": "gpustack.api",
    "register_stack": "gpustack.api",
    "warp_stack": "gpustack.api",
    "destripe_vsnr": "gpustack.api",
    "destripe_wavelet": "gpustack.api",
    "resample_z": "gpustack.api",
    "read_atlas_metadata": "gpustack.api",
    "slice_metadata": "gpustack.api",
    "resolve_device": "gpustack.device",
    "GpustackError": "gpustack.errors",
    "ConfigError": "gpustack.errors",
    "InputError": "gpustack.errors",
    "DeviceError": "gpustack.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpustack' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
