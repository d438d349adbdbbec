"""Zeiss Atlas 3D / Fibics acquisition metadata: the setup file of a run (`Atlas3D.a3d-setup`) and the XML every
slice carries in TIFF tag 51023. Read into plain dictionaries, so that a params.toml can be written from them
instead of typed by hand (PEERS.md §2.7 describes both layouts).

XML from files is parsed defensively: a document type declaration or entity is refused (no entity expansion, no
external entities), sizes are bounded, and anything malformed is an InputError naming the file, never a traceback.
The text is decoded first (BOM, else the declared encoding) and the scan and the parse see the same decoded text,
so a DTD cannot slip past the scan in an encoding the scan does not read.
"""

from __future__ import annotations

import codecs
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from gpustack.errors import ConfigError, InputError

FIBICS_TAG = 51023
SETUP_NAME = "Atlas3D.a3d-setup"
FIRST_SLICE_XML = "first_slice_metadata.xml"
MAX_SETUP_BYTES = 16 * 2**20
MAX_TAG_BYTES = 4 * 2**20

# Setup-file values: (path in the new layout, path in the old one). The old layout is the one whose root element
# has no attributes (PyStack3D's test); each value is looked up in the detected layout first, then in the other.
SETUP_PATHS: dict[str, tuple[str, str]] = {
    "pixel_size_um": ("Settings/Imaging/DefaultAcquisition/PixelSize", "Settings/Imaging/FibicsRasterInfo/PixelSizeX"),
    "fov_um": ("Settings/Imaging/DefaultAcquisition/FOV", "Settings/Imaging/FOV"),
    "slice_interval_um": ("Settings/Imaging/DefaultAcquisition/Interval/Distance/Interval",
                          "Settings/Imaging/Interval"),
}
DETECTOR_PATHS = ("Settings/Imaging/Detector", "Settings/Imaging/DetectorB")  # the same in both layouts
SLICE_PATHS: dict[str, str] = {
    "width": "Image/Width", "height": "Image/Height",
    "bbox_left": "Image/BoundingBox.Left", "bbox_right": "Image/BoundingBox.Right",
    "bbox_top": "Image/BoundingBox.Top", "bbox_bottom": "Image/BoundingBox.Bottom",
    "z_pos": "ATLAS3D/Slice/ZPos", "z_index": "ATLAS3D/Slice/ZIndex",
}
BEAM_CURRENT_PATH = "BeamInfo/item[@name='Ext I']"
AMPERES = {"fA": 1e-15, "pA": 1e-12, "nA": 1e-9, "uA": 1e-6, "µA": 1e-6, "mA": 1e-3, "A": 1.0}

_NUMBER = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(.*?)\s*$", re.DOTALL)
_DECLARATION = re.compile(r"\s*<\?xml\b.*?\?>", re.DOTALL)
_DECLARED_ENCODING = re.compile(rb"""^\s*<\?xml\b[^>]*?\bencoding\s*=\s*["']([A-Za-z0-9._:-]{1,40})["']""")
_DTD = re.compile(r"<!(?:DOCTYPE|ENTITY)", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


# --- safe XML ------------------------------------------------------------------------------------------------------

def decode_xml(raw: bytes, where: str) -> str:
    """Bytes of an XML document as text: a BOM wins, then the declared encoding (Atlas writes iso-8859-1), else
    UTF-8 as XML says. Undecodable bytes become U+FFFD: a stray byte in a comment must not lose a run's metadata."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return raw.decode(codec, errors="replace")
    m = _DECLARED_ENCODING.match(raw)
    codec = m.group(1).decode("ascii") if m else "utf-8"
    try:
        return raw.decode(codecs.lookup(codec).name, errors="replace")
    except (LookupError, UnicodeError):  # not a codec, or not a text codec (rot13, base64, idna...)
        raise InputError(f"{where}: the XML declares an encoding that cannot be read: {codec!r}") from None


def parse_xml(text: str | bytes, where: str) -> ET.Element:
    """The root element of an XML document read from a file. DTDs and entity declarations are refused (entity
    expansion can blow up memory, external entities read other files), malformed XML is an InputError."""
    if isinstance(text, bytes):
        text = decode_xml(text, where)
    text = text.lstrip("\ufeff").rstrip("\x00 \t\r\n")  # TIFF ASCII tags end with NUL
    if _DTD.search(text):
        raise InputError(f"{where}: refusing XML with a DTD/entities (<!DOCTYPE or <!ENTITY); Atlas 3D never "
                         "writes them")
    text = _DECLARATION.sub("", text, count=1) if text.lstrip().startswith("<?xml") else text  # already decoded
    try:
        return ET.fromstring(text)
    except (ET.ParseError, ValueError) as exc:
        raise InputError(f"{where}: malformed XML ({exc})") from None


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """A whole small file, refusing more than `limit` bytes without reading them (a FIFO or a huge file)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: not found ({what})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected {what}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise InputError(f"{path}: more than {limit // 2**20} MiB, far more than {what} holds; refusing it")
    return raw


def _text(root: ET.Element, path: str) -> str | None:
    node = root.find(path)
    return node.text.strip() if node is not None and node.text is not None and node.text.strip() else None


def split_number(text: str | None) -> tuple[float | None, str | None]:
    """(value, unit) of a text such as "0.01" or "1.5 nA"; (None, None) if it holds no finite number."""
    m = _NUMBER.fullmatch(text) if text is not None else None
    if not m:
        return None, None
    value = float(m.group(1))
    return (value, m.group(2) or None) if math.isfinite(value) else (None, None)


def _integral(value: float | None) -> int | float | None:
    """Pixel counts and coordinates as int when they are whole numbers, so they print and compare as such."""
    return int(value) if value is not None and float(value).is_integer() else value


# --- Atlas3D.a3d-setup ------------------------------------------------------------------------------------------

def read_atlas_setup(path: str | Path) -> dict[str, Any]:
    """Detectors, pixel size, field of view and slice interval of an Atlas 3D run, from its setup file (or from
    the folder holding it). Keys: channels, pixel_size_um, fov_um, fov_px, slice_interval_um, format ('old'/'new',
    PyStack3D's test: the old root element has no attributes), fallbacks (values found only in the other layout's
    place), source."""
    path = Path(path)
    if path.is_dir():
        path = path / SETUP_NAME
    root = parse_xml(_read_bounded(path, MAX_SETUP_BYTES, f"an Atlas 3D setup file ({SETUP_NAME})"), str(path))
    layout = "new" if root.attrib else "old"
    values: dict[str, float] = {}
    fallbacks = []
    for key, (new, old) in SETUP_PATHS.items():
        first, second = (new, old) if layout == "new" else (old, new)
        value, _ = split_number(_text(root, first))
        if value is None:
            value, _ = split_number(_text(root, second))
            if value is not None:
                fallbacks.append(key)
        if value is None or value <= 0:
            raise InputError(f"{path}: no positive number at {first} or {second} ({key}); is this an Atlas 3D "
                             "setup file?")
        values[key] = value
    if values["fov_um"] / values["pixel_size_um"] > 1e7:
        raise InputError(f"{path}: field of view {values['fov_um']:g} um / pixel size {values['pixel_size_um']:g} um "
                         "is not a plausible image width")
    channels = [name for name in (_text(root, p) for p in DETECTOR_PATHS) if name]
    if not channels:
        raise InputError(f"{path}: no detector name at {' or '.join(DETECTOR_PATHS)}")
    return {"channels": channels, **values, "fov_px": fov_pixels(values["fov_um"], values["pixel_size_um"]),
            "format": layout, "fallbacks": fallbacks, "source": str(path)}


def fov_pixels(fov_um: float, pixel_um: float) -> int:
    """Field of view in pixels, rounded. PyStack3D truncates, and Atlas stores float32 values: FOV 42.2399940490723
    / pixel 0.00999999888918612 = 4223.99987, which truncation makes 4223 for a 4224 px image."""
    return round(fov_um / pixel_um)


# --- Fibics XML of a slice (TIFF tag 51023) -----------------------------------------------------------------------

def fibics_xml_bytes(tif_path: str | Path) -> bytes | None:
    """The raw bytes of tag 51023 of a TIFF's first page, as stored (None if the page has no such tag). Read from
    the file, not through tifffile's text decoding, so that the declared encoding can be honoured."""
    from gpustack.io.tiff import _open_tiff, _quiet_tifffile

    tif_path = Path(tif_path)
    with _quiet_tifffile(), _open_tiff(tif_path) as tif:
        tag = tif.pages[0].tags.get(FIBICS_TAG)
        if tag is None:
            return None
        if tag.valuebytecount > MAX_TAG_BYTES:
            raise InputError(f"{tif_path}: tag {FIBICS_TAG} holds {tag.valuebytecount} bytes, more than "
                             f"{MAX_TAG_BYTES // 2**20} MiB of metadata; refusing it")
        fh = tif.filehandle
        fh.seek(tag.valueoffset)
        raw = fh.read(tag.valuebytecount)
    if len(raw) != tag.valuebytecount:
        raise InputError(f"{tif_path}: tag {FIBICS_TAG} is cut short (the file is truncated)")
    return raw.rstrip(b"\x00")


def fibics_xml(tif_path: str | Path) -> str:
    """The Fibics XML text of a TIFF's first page; InputError naming the file when it has none."""
    raw = fibics_xml_bytes(tif_path)
    if raw is None:
        raise InputError(f"{tif_path}: no Fibics metadata (TIFF tag {FIBICS_TAG}); not an Atlas 3D slice?")
    return decode_xml(raw, str(tif_path))


def parse_fibics(xml: str | bytes, where: str) -> dict[str, Any]:
    """Values of a slice's Fibics XML, None where absent: width, height, bbox_left/right/top/bottom (px, origin
    top-left), z_pos (um), z_index, pixel_size_um, beam_current and beam_current_unit ('Ext I', e.g. 1.5, 'nA')."""
    if len(xml) > MAX_TAG_BYTES:
        raise InputError(f"{where}: {len(xml)} bytes of Fibics metadata, more than {MAX_TAG_BYTES // 2**20} MiB; "
                         "refusing it")
    root = parse_xml(xml, where)
    out: dict[str, Any] = {key: _integral(split_number(_text(root, path))[0]) for key, path in SLICE_PATHS.items()}
    if out["z_pos"] is None:  # Atlas writes ATLAS3D/Slice/ZPos; other writers (and older files) put it elsewhere
        out["z_pos"] = _integral(split_number(_text(root, ".//ZPos"))[0])
    out["pixel_size_um"] = _pixel_size(root, out["width"])
    out["beam_current"], out["beam_current_unit"] = split_number(_text(root, BEAM_CURRENT_PATH))
    return out


def _pixel_size(root: ET.Element, width: float | None) -> float | None:
    """Pixel size from the scan vectors (Scan/Ux, Scan/Uy: um per pixel along a row), else Scan/FOV_X / width."""
    ux, _ = split_number(_text(root, "Scan/Ux"))
    uy, _ = split_number(_text(root, "Scan/Uy"))
    if ux is not None:
        return math.hypot(ux, uy or 0.0) or None
    node = root.find("Scan/FOV_X")
    fov, _ = split_number(_text(root, "Scan/FOV_X"))
    if fov is not None and width and node is not None and node.get("units", "um") in ("um", "µm"):
        return fov / width
    return None


def read_fibics_tag(tif_path: str | Path) -> dict[str, Any]:
    """The Fibics values of one slice (see `parse_fibics`), plus `source`. InputError if the tag is missing."""
    return {**parse_fibics(fibics_xml(tif_path), str(tif_path)), "source": str(tif_path)}


def slice_metadata(tif_paths: Iterable[str | Path]) -> dict[str, Any]:
    """Per-slice `z_pos` and `beam_current` arrays (NaN where a slice has no tag, no such field, or unreadable
    metadata: the values are optional), reading only each file's tags, one file at a time. A file that is not a
    readable TIFF, or whose tag is oversized, is an InputError. Currents in different units are converted to the
    most common one, given as `beam_current_unit` (None when no slice has a unit)."""
    z, currents = [], []
    for path in tif_paths:
        raw = fibics_xml_bytes(path)
        try:
            meta = parse_fibics(raw, str(path)) if raw is not None else {}
        except InputError:
            meta = {}
        z.append(meta.get("z_pos"))
        currents.append((meta.get("beam_current"), meta.get("beam_current_unit"), str(path)))
    values, unit = _common_unit(currents)
    return {"z_pos": np.array([math.nan if v is None else v for v in z], float), "beam_current": values,
            "beam_current_unit": unit}


def _common_unit(currents: list[tuple[float | None, str | None, str]], *, strict: bool = True
                 ) -> tuple[np.ndarray, str | None]:
    """Values in one unit: the most common, others converted when both are known current units (a value that
    cannot be converted is an error, or NaN when not `strict`)."""
    units = Counter(u for v, u, _ in currents if v is not None)
    unit = units.most_common(1)[0][0] if units else None
    out = np.full(len(currents), np.nan)
    for i, (value, u, where) in enumerate(currents):
        if value is None:
            continue
        if u != unit:
            if u not in AMPERES or unit not in AMPERES:
                if not strict:
                    continue
                raise InputError(f"{where}: beam current in {u or 'no unit'!s}, other slices in {unit or 'no unit'}; "
                                 "cannot put them on one scale")
            value = value * AMPERES[u] / AMPERES[unit]
        out[i] = value
    return out, unit


def beam_currents(slices: list) -> np.ndarray:
    """Per-slice beam current from the Fibics tag each `SliceInfo` keeps, no file read: in the slices' most common
    unit, others converted (1510 pA beside 1.5 nA is 1.51); NaN where absent, unreadable or in a unit that
    cannot be converted (the statistics are not the place to stop a run)."""
    currents: list[tuple[float | None, str | None, str]] = []
    for info in slices:
        value = next((t[3] for t in info.private_tags if t[0] == FIBICS_TAG), None)
        meta = {}
        if isinstance(value, (str, bytes)):  # else absent, or stored as numbers
            try:
                meta = parse_fibics(value, info.name)
            except InputError:
                pass
        currents.append((meta.get("beam_current"), meta.get("beam_current_unit"), info.name))
    return _common_unit(currents, strict=False)[0]


# --- both together: what a params.toml needs ----------------------------------------------------------------------

def params_from_atlas(stack_dir: str | Path, margin: int = 20) -> dict[str, Any]:
    """What a params.toml needs from an Atlas 3D run folder: its setup file and the first slice of the first
    detector (`stack_dir/<channel>/`, PyStack3D's order). Adds to `read_atlas_setup`'s keys: dz (the slice
    interval), area (`[xmin, xmax, ymin, ymax]`: the acquisition's bounding box plus `margin` px, origin
    bottom-left as PyStack3D's cropping reads it, clamped to the image; None without a usable box),
    bounding_box, margin, image_px, first_slice, first_slice_xml (text), setup_file and notes."""
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ConfigError(f"the cropping margin must be a whole number of pixels >= 0, got {margin!r}")
    stack_dir = Path(stack_dir)
    if not stack_dir.is_dir():
        raise InputError(f"{stack_dir}: not a folder (expected an Atlas 3D run folder)")
    setup = read_atlas_setup(stack_dir / SETUP_NAME)
    channels, notes = _present_channels(stack_dir, setup["channels"])
    first = _first_slice(stack_dir / channels[0])
    xml = fibics_xml(first)
    meta = parse_fibics(xml, str(first))
    size = _check_image_size(meta, setup, first)
    box = {k: meta[f"bbox_{k}"] for k in ("left", "right", "top", "bottom")}
    area, why = crop_area(box, size, margin)
    if why:
        notes.append(f"no cropping area: {why}")
    if setup["fallbacks"]:
        notes.append(f"{', '.join(setup['fallbacks'])} read from the {'old' if setup['format'] == 'new' else 'new'}"
                     f" layout's place although the root element says {setup['format']}")
    truncated = int(setup["fov_um"] / setup["pixel_size_um"])
    if truncated != setup["fov_px"]:
        notes.append(f"PyStack3D truncates FOV / pixel size to {truncated} px; rounded here to {setup['fov_px']}")
    return {**setup, "channels": channels, "dz": setup["slice_interval_um"], "area": area, "bounding_box": box,
            "margin": margin, "image_px": size, "first_slice": str(first), "first_slice_xml": xml,
            "setup_file": setup["source"], "notes": notes}


def _present_channels(stack_dir: Path, detectors: list[str]) -> tuple[list[str], list[str]]:
    """The detectors with a folder of slices. The first one must have it (its first slice is read); a second one
    without a folder is dropped with a note, rather than written into a params.toml that cannot run."""
    for name in detectors:
        if name in (".", "..") or re.search(r'[/\\"\x00-\x1f]', name):
            raise InputError(f"{stack_dir / SETUP_NAME}: detector name {name!r} cannot be a channel folder name")
    if not (stack_dir / detectors[0]).is_dir():
        found = sorted(p.name for p in stack_dir.iterdir() if p.is_dir())
        raise InputError(f"{stack_dir / detectors[0]}: missing; the setup's first detector is {detectors[0]!r}, "
                         f"folders here: {', '.join(found) or 'none'}")
    notes = [f"detector {name!r} has no folder {stack_dir / name}; left out of channels"
             for name in detectors[1:] if not (stack_dir / name).is_dir()]
    return [name for name in detectors if (stack_dir / name).is_dir()], notes


def _first_slice(folder: Path) -> Path:
    from gpustack.io.tiff import list_slice_files

    files, _ = list_slice_files(folder)
    if not files:
        raise InputError(f"{folder}: no .tif slices")
    return files[0]


def _check_image_size(meta: dict[str, Any], setup: dict[str, Any], where: Path) -> int:
    """The slice's width, after PyStack3D's checks: square, and as wide as the field of view (or 1 px more)."""
    width, height, fov_px = meta["width"], meta["height"], setup["fov_px"]
    if width is None or height is None:
        raise InputError(f"{where}: its Fibics metadata has no Image/Width and Image/Height")
    if width != height:
        raise InputError(f"{where}: the slice is {width}x{height} px (width x height); an Atlas 3D slice is square")
    if width not in (fov_px, fov_px + 1):
        raise InputError(f"{where}: the slice is {width} px wide but the setup's field of view is {fov_px} px "
                         f"({setup['fov_um']:g} um / {setup['pixel_size_um']:g} um); expected {fov_px} or "
                         f"{fov_px + 1}")
    return int(width)


def crop_area(box: dict[str, Any], size: int, margin: int) -> tuple[list[int] | None, str]:
    """`[xmin, xmax, ymin, ymax]` (origin bottom-left) of a top-left-origin bounding box grown by `margin` px and
    clamped to the `size` x `size` image; (None, why) when the box is missing or not inside the image.

    The y flip uses the image height, which is what PyStack3D's cropping subtracts from (rows `H - ymax : H -
    ymin`); PyStack3D flips with its truncated FOV, one pixel less when the image is FOV + 1 px wide."""
    if any(box[k] is None for k in ("left", "right", "top", "bottom")):
        return None, "the first slice's metadata has no complete Image/BoundingBox.*"
    left, right, top, bottom = (box[k] for k in ("left", "right", "top", "bottom"))
    if not (0 <= left < right <= size and 0 <= top < bottom <= size):
        return None, (f"the bounding box (left {left}, right {right}, top {top}, bottom {bottom}) is not inside the "
                      f"{size}x{size} image")
    return [max(0, math.floor(left) - margin), min(size, math.ceil(right) + margin),
            max(0, size - math.ceil(bottom) - margin), min(size, size - math.floor(top) + margin)], ""


def init_from_atlas(stack_dir: str | Path, force: bool = False, margin: int = 20) -> Path:
    """`gpustack.atlas_init.init_from_atlas`, kept here for callers of the first version."""
    from gpustack.atlas_init import init_from_atlas as init

    return init(stack_dir, force=force, margin=margin)
