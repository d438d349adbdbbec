"""`gpustack init DIR --from-atlas`: a params.toml filled from a Zeiss Atlas 3D run's metadata.

The text is the ordinary commented template (`render_template`) with the values the metadata gives: channels,
`[cropping] area` and `[resampling] dz`, and a header saying where each one came from, so that the file can be
checked by hand against the acquisition. It is validated with gpustack's own loader before anything is written.
"""

from __future__ import annotations

import os
import secrets
import textwrap
from pathlib import Path
from typing import Any

from gpustack.config import tomllib
from gpustack.errors import ConfigError, InputError
from gpustack.io.metadata import FIRST_SLICE_XML, SETUP_NAME, SETUP_PATHS, fibics_xml_bytes, params_from_atlas
from gpustack.template import render_template


def render_params_from_atlas(meta: dict[str, Any]) -> str:
    """The commented params.toml for the metadata of `params_from_atlas`: the template's text with channels,
    cropping.area (when the run has a usable bounding box) and resampling.dz set, and their origin in a header."""
    steps: dict[str, dict[str, Any]] = {"resampling": {"dz": float(meta["dz"])}}
    if meta.get("area") is not None:
        steps["cropping"] = {"area": [int(v) for v in meta["area"]]}
    return render_template(channels=list(meta["channels"]), steps=steps, header=_header(meta))


def _setup_path(meta: dict[str, Any], key: str) -> str:
    """The XML path a setup value was read from: its layout's place, or the other one's (a fallback)."""
    new, old = SETUP_PATHS[key]
    used_new = (meta.get("format") == "new") != (key in meta.get("fallbacks", ()))
    return new if used_new else old


def _header(meta: dict[str, Any]) -> str:
    first = Path(meta["first_slice"])
    box = meta.get("bounding_box") or {}
    size = meta["image_px"]
    lines = [
        "Written by `gpustack init --from-atlas` from the Zeiss Atlas 3D metadata of this run:",
        f"  {SETUP_NAME}, {meta['format']} layout:",
        f"    pixel size {meta['pixel_size_um']:g} um ({_setup_path(meta, 'pixel_size_um')})",
        f"    field of view {meta['fov_um']:g} um = {meta['fov_px']} px ({_setup_path(meta, 'fov_um')})",
        f"    slice interval {meta['dz']:g} um ({_setup_path(meta, 'slice_interval_um')})",
        f"  {first.parent.name}/{first.name}, Fibics XML in TIFF tag 51023 (saved as {FIRST_SLICE_XML}):",
        f"    {size}x{size} px, acquisition bounding box "
        + ", ".join(f"{k} {box.get(k)}" for k in ("left", "right", "top", "bottom")) + " (px, origin top-left)",
        "  channels        <- the detectors (Settings/Imaging/Detector, DetectorB) that have a folder here",
    ]
    if meta.get("area") is not None:
        lines += [f"  [cropping] area <- the bounding box + {meta['margin']} px, y flipped to PyStack3D's origin",
                  f"                     (bottom-left: y = {size} - row), clamped to the image"]
    lines.append("  [resampling] dz <- the slice interval")
    for note in meta.get("notes", ()):
        lines += textwrap.wrap(f"Note: {note}", 110, subsequent_indent="  ")
    return "\n".join(lines)


def _check(text: str, target: Path) -> None:
    """Never write a params.toml that gpustack itself would reject (e.g. a detector name that is no folder)."""
    from gpustack.config import workflow_from_dict

    try:
        workflow_from_dict(tomllib.loads(text), file=target)
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise InputError(f"{target.parent}: the metadata gives a params.toml gpustack would reject ({exc}); "
                         "nothing written") from None


def _write_atomic(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write through a temporary file in the same folder, then rename: a reader sees the old file or the whole new
    one. Without `overwrite`, a hard link puts it in place only if nothing is there yet, even a file that appeared
    after the first check."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigError(f"{path} exists; pass --force to replace it") from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise ConfigError(f"{path} exists; pass --force to replace it") from None
            os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def init_from_atlas(stack_dir: str | Path, force: bool = False, margin: int = 20) -> Path:
    """Write `stack_dir/params.toml` from the run's metadata, and the first slice's Fibics XML beside it as
    `first_slice_metadata.xml` (its bytes as stored, as PyStack3D saves it). Refuses to replace an existing
    params.toml without `force` (ConfigError). Returns the params.toml path."""
    stack_dir = Path(stack_dir)
    target = stack_dir / "params.toml"
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    meta = params_from_atlas(stack_dir, margin=margin)
    text = render_params_from_atlas(meta)
    _check(text, target)
    xml = fibics_xml_bytes(meta["first_slice"])
    if xml is None:  # it was there a moment ago
        raise InputError(f"{meta['first_slice']}: its Fibics metadata (TIFF tag 51023) disappeared while reading")
    _write_atomic(stack_dir / FIRST_SLICE_XML, xml, overwrite=True)
    _write_atomic(target, text.encode("utf-8"), overwrite=force)
    return target
