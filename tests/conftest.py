"""Shared fixtures. Kernel tests take the `device` fixture: one run per available device, CUDA skipped with a
reason when absent (never a 'GPU test' that silently runs on the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not _cuda_available(), reason="no CUDA device here")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    import torch

    return torch.device(request.param)


def write_stack(folder: Path, n: int = 6, shape: tuple[int, int] = (30, 40), dtype: str = "uint16", *,
                seed: int = 0, prefix: str = "slice_", compression: str | None = None, tags: bool = True) -> np.ndarray:
    """A small stack of random slices with a per-slice private Fibics tag; returns the data."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if np.dtype(dtype).kind == "f":
        data = rng.normal(100, 20, size=(n, *shape)).astype(dtype)
    else:
        data = rng.integers(0, np.iinfo(dtype).max, size=(n, *shape), endpoint=True).astype(dtype)
    for i, img in enumerate(data):
        extratags = [(51023, "s", 0, f"<FibicsImage><ZPos>{i * 0.01:.4f}</ZPos></FibicsImage>", True)] if tags else []
        tifffile.imwrite(folder / f"{prefix}{i:04d}.tif", img, extratags=extratags, compression=compression)
    return data


def write_params(folder: Path, text: str) -> Path:
    path = folder / "params.toml"
    path.write_text(text)
    return path
