"""Zeiss Atlas 3D / Fibics acquisition metadata: the setup file of a run (`Atlas3D.a3d-setup`) and the XML every
slice carries in TIFF tag 51023. Read into plain dictionaries, so that a params.toml can be written from them
instead of typed by hand (PEERS.md §2.7 describes both layouts).

XML from files is parsed defensively: a document type declaration or entity is refused (no entity expansion, no
external entities), sizes are bounded, and anything malformed is an InputError naming the file.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from gpustack.errors import InputError

FIBICS_TAG = 51023
MAX_SETUP_BYTES = 16 * 2**20
MAX_TAG_BYTES = 4 * 2**20
SETUP_NAME = "Atlas3D.a3d-setup"

# Where each value lives: the current layout first, then the older one (whose root element has no attributes).
SETUP_PATHS = {
    "detector_a": ("Settings/Imaging/Detector",),
    "detector_b": ("Settings/Imaging/DetectorB",),
    "pixel_size_um": ("Settings/Imaging/DefaultAcquisition/PixelSize", "Settings/Imaging/FibicsRasterInfo/PixelSizeX"),
    "fov_um": ("Settings/Imaging/DefaultAcquisition/FOV", "Settings/Imaging/FOV"),
    "slice_interval_um": ("Settings/Imaging/DefaultAcquisition/Interval/Distance/Interval",
                          "Settings/Imaging/Interval"),
}
SLICE_PATHS = {
    "width": "Image/Width", "height": "Image/Height",
    "bbox_left": "Image/BoundingBox.Left", "bbox_right": "Image/BoundingBox.Right",
    "bbox_top": "Image/BoundingBox.Top", "bbox_bottom": "Image/BoundingBox.Bottom",
    "z_pos": "ATLAS3D/Slice/ZPos", "z_index": "ATLAS3D/Slice/ZIndex",
}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(.*)$")


def parse_xml(text: str | bytes, where: str) -> ET.Element:
    """The root of an XML document from a file, refusing entities and DTDs (billion laughs, external files)."""
    raw = text.encode("latin-1", "replace") if isinstance(text, str) else text
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise InputError(f"{where}: refusing XML with a document type declaration or entities")
    raw = raw.strip().rstrip(b"\x00")
    try:
        return ET.fromstring(raw)
    except ET.ParseError as exc:
        raise InputError(f"{where}: not readable XML ({exc})") from None


def _text(root: ET.Element, paths: tuple[str, ...] | str) -> str | None:
    for path in (paths,) if isinstance(paths, str) else paths:
        node = root.find(path)
        if node is not None and node.text is not None and node.text.strip():
            return node.text.strip()
    return None


def _number(text: str | None) -> tuple[float | None, str]:
    """(value, unit) of a text such as "0.01" or "1.5 nA"; (None, '') if it holds no number."""
    if text is None:
        return None, ""
    m = _NUMBER.match(text)
    return (float(m.group(1)), m.group(2).strip()) if m else (None, "")


def read_atlas_setup(path: str | Path) -> dict[str, Any]:
    """Channels, pixel size, field of view and slice interval of an Atlas 3D run, from its setup file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise InputError(f"{path}: no Atlas 3D setup file here (expected {SETUP_NAME} in the stack folder)") from None
    if size > MAX_SETUP_BYTES:
        raise InputError(f"{path}: {size} bytes, more than a setup file holds ({MAX_SETUP_BYTES}); refusing it")
    root = parse_xml(path.read_bytes(), str(path))
    values = {key: _text(root, paths) for key, paths in SETUP_PATHS.items()}
    pixel, _ = _number(values["pixel_size_um"])
    fov, _ = _number(values["fov_um"])
    interval, _ = _number(values["slice_interval_um"])
    missing = [k for k, v in (("pixel size", pixel), ("field of view", fov), ("slice interval", interval)) if not v]
    if missing:
        raise InputError(f"{path}: no {', '.join(missing)} found in either known layout of the setup file")
    channels = [c for c in (values["detector_a"], values["detector_b"]) if c]
    if not channels:
        raise InputError(f"{path}: no detector names (Settings/Imaging/Detector, DetectorB)")
    return {"channels": channels, "pixel_size_um": pixel, "fov_um": fov,
            "fov_px": int(math.floor(fov / pixel + 1e-6)),  # 42.24 / 0.01 = 4223.9999...: 4224
            "slice_interval_um": interval, "format": "old" if not root.attrib else "new", "source": str(path)}


def fibics_xml(tif_path: str | Path) -> str:
    """The Fibics XML text of tag 51023 of a TIFF's first page."""
    import tifffile

    tif_path = Path(tif_path)
    try:
        with tifffile.TiffFile(tif_path) as tif:
            tag = tif.pages[0].tags.get(FIBICS_TAG)
            value = None if tag is None else tag.value
    except (OSError, tifffile.TiffFileError, ValueError) as exc:
        raise InputError(f"{tif_path}: cannot be read as a TIFF ({exc})") from None
    if value is None:
        raise InputError(f"{tif_path}: no Fibics metadata (TIFF tag {FIBICS_TAG})")
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    if len(text) > MAX_TAG_BYTES:
        raise InputError(f"{tif_path}: tag {FIBICS_TAG} holds {len(text)} bytes; refusing it")
    return text


def parse_fibics(text: str, where: str) -> dict[str, Any]:
    """Image size, bounding box, z and beam current from a slice's Fibics XML; None where absent."""
    text = re.sub(r"^\s*<\?xml[^>]*\?>", "", text)  # the declaration names an encoding a str cannot have
    root = parse_xml(text, where)
    out: dict[str, Any] = {key: _number(_text(root, path))[0] for key, path in SLICE_PATHS.items()}
    current = next((n.text for n in root.iter("item") if n.get("name") == "Ext I" and n.text), None)
    out["beam_current"], out["beam_current_unit"] = _number(current)
    return out


def read_fibics_tag(tif_path: str | Path) -> dict[str, Any]:
    return parse_fibics(fibics_xml(tif_path), str(tif_path))


def slice_metadata(tif_paths: list[Path]) -> dict[str, np.ndarray]:
    """Per-slice z position and beam current (NaN where a slice has none), reading only the tags."""
    z, current = [], []
    for path in tif_paths:
        try:
            meta = read_fibics_tag(path)
        except InputError:
            meta = {}
        z.append(meta.get("z_pos") if meta.get("z_pos") is not None else math.nan)
        current.append(meta.get("beam_current") if meta.get("beam_current") is not None else math.nan)
    return {"z_pos": np.asarray(z, float), "beam_current": np.asarray(current, float)}


def beam_currents(slices: list) -> np.ndarray:
    """Per-slice beam current from the Fibics tag each `SliceInfo` keeps (NaN where absent), no file read."""
    out = np.full(len(slices), np.nan)
    for i, info in enumerate(slices):
        value = next((t[3] for t in info.private_tags if t[0] == FIBICS_TAG), None)
        if value is None:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        try:
            current = parse_fibics(text, info.name)["beam_current"]
        except InputError:
            continue
        if current is not None:
            out[i] = current
    return out


def params_from_atlas(stack_dir: str | Path, margin: int = 20) -> dict[str, Any]:
    """What a params.toml needs from an Atlas 3D run folder: its setup file and the first slice of the first
    channel (in `stack_dir/<channel>/`). The cropping area is the acquisition's bounding box plus `margin` px,
    in PyStack3D's convention (origin bottom-left), clamped to the image."""
    from gpustack.io.tiff import list_slice_files

    stack_dir = Path(stack_dir)
    setup = read_atlas_setup(stack_dir / SETUP_NAME)
    folder = stack_dir / setup["channels"][0]
    if not folder.is_dir():
        raise InputError(f"{folder}: the first detector's folder ({setup['channels'][0]}) is missing")
    files, _notes = list_slice_files(folder)
    if not files:
        raise InputError(f"{folder}: no .tif slices")
    xml = fibics_xml(files[0])
    first = parse_fibics(xml, str(files[0]))
    width, height, fov = first["width"], first["height"], setup["fov_px"]
    if width is None or height is None:
        raise InputError(f"{files[0]}: its Fibics metadata has no Image/Width and Image/Height")
    if width != height:
        raise InputError(f"{files[0]}: the slice is {width:g}x{height:g}; an Atlas 3D slice is square")
    if width not in (fov, fov + 1):
        raise InputError(f"{files[0]}: the slice is {width:g} px wide but the setup's field of view is {fov} px "
                         f"({setup['fov_um']:g} um / {setup['pixel_size_um']:g} um)")
    box = [first[k] for k in ("bbox_left", "bbox_right", "bbox_top", "bbox_bottom")]
    area = None
    if all(v is not None for v in box):
        left, right, top, bottom = box
        size = int(width)
        area = [max(0, int(left) - margin), min(size, int(right) + margin),
                max(0, fov - int(bottom) - margin), min(size, fov - int(top) + margin)]
    return {**setup, "image_px": int(width), "area": area, "margin": margin, "first_slice": str(files[0]),
            "first_slice_xml": xml}


def init_from_atlas(stack_dir: str | Path, *, force: bool = False) -> Path:
    """Write `stack_dir/params.toml` from the run's metadata (and the first slice's XML beside it, as
    `first_slice_metadata.xml`, as PyStack3D does); atomic; never over an existing file without `force`."""
    from gpustack.errors import ConfigError
    from gpustack.template import render_template

    stack_dir = Path(stack_dir)
    meta = params_from_atlas(stack_dir)
    target = stack_dir / "params.toml"
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    header = (f"Written by `gpustack init --from-atlas` from {SETUP_NAME} ({meta['format']} layout) and the Fibics\n"
              f"metadata of {Path(meta['first_slice']).name}: pixel {meta['pixel_size_um']:g} um, field of view "
              f"{meta['fov_um']:g} um ({meta['fov_px']} px),\nslice interval {meta['slice_interval_um']:g} um -> "
              f"resampling dz; cropping area = acquisition bounding box + {meta['margin']} px.")
    steps: dict[str, dict[str, Any]] = {"resampling": {"dz": meta["slice_interval_um"]}}
    if meta["area"] is not None:
        steps["cropping"] = {"area": meta["area"]}
    text = render_template(channels=meta["channels"], steps=steps, header=header)
    for name, content in (("first_slice_metadata.xml", meta["first_slice_xml"]), ("params.toml", text)):
        tmp = stack_dir / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(stack_dir / name)
    return target
