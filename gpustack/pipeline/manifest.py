"""The run manifest, `process/gpustack.json`: what was computed, from what, with which parameters, where, how fast.

The user's params.toml is never rewritten (PyStack3D rewrites it and loses its comments); this file is where the
run state lives. A step counts as done when its entry's fingerprint matches the one the current parameters and
input give; fingerprints chain, so a changed parameter invalidates its step and every later one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

MANIFEST_NAME = "gpustack.json"


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _torch_version() -> str:
    """torch's version without importing it (a run that only crops never loads torch): from its `version.py`,
    found without running the package (importlib.metadata took 30 ms of a crop run's 0.25 s)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    import importlib.util

    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", (Path(folder) / "version.py").read_text(),
                              re.MULTILINE)
        except OSError:
            found = None
        if found:
            return found.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    import numpy
    import tifffile

    import gpustack

    return {"gpustack": gpustack.__version__, "python": platform.python_version(), "torch": _torch_version(),
            "numpy": numpy.__version__, "tifffile": tifffile.__version__, "platform": platform.platform()}


class Manifest:
    def __init__(self, path: Path, data: dict[str, Any] | None = None):
        self.path = path
        self.data = data or {"format": 1, "steps": {}, "runs": []}

    @classmethod
    def load(cls, process_dir: Path) -> "Manifest":
        path = process_dir / MANIFEST_NAME
        if path.exists():
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict) and isinstance(data.get("steps"), dict):
                    return cls(path, data)
            except (OSError, ValueError):
                pass  # unreadable: treat as absent, everything is recomputed
        return cls(path)

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def step(self, name: str) -> dict[str, Any] | None:
        return self.data["steps"].get(name)

    def is_done(self, name: str, fp: str) -> bool:
        entry = self.step(name)
        return bool(entry and entry.get("fingerprint") == fp and entry.get("status") == "complete")

    def invalidate(self, name: str) -> None:
        """Being recomputed: still gpustack's folder, no longer a valid result until it completes again."""
        entry = self.data["steps"].get(name)
        if entry is not None:
            entry["status"] = "stale"

    def record_step(self, name: str, **entry: Any) -> None:
        self.data["steps"][name] = {"status": "complete", "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    **entry}

    def record_run(self, run: dict[str, Any]) -> None:
        self.data["runs"] = (self.data.get("runs") or [])[-49:] + [run]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, self.path)
