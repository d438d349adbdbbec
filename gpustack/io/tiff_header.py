"""A fast reader of the one page of a plain classic TIFF, for the header check of thousands of slices.

tifffile decodes every tag of a page in Python: about 1 ms per file on a 2-core machine, most of a cropping
run's fixed cost at a few hundred slices. Slices from an acquisition are plain (one page, one sample, strips), so
this reads what the header check needs straight from the IFD, and gives up (None) on anything else (BigTIFF,
several pages, tiles, several samples, colour, JPEG, STK, LSM, odd or repeated tags, a damaged IFD), which then
goes to tifffile.
Its result must equal what tifffile reports for the same file (tests/test_tiff_header.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import tifffile

# bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED, SSHORT, SLONG,
# SRATIONAL, FLOAT, DOUBLE, IFD, LONG8, SLONG8, IFD8)
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
UNSIGNED = {1: "B", 3: "H", 4: "I"}  # the types of the structural tags read here
DTYPES = {(8, 1): np.dtype("uint8"), (16, 1): np.dtype("uint16"), (32, 3): np.dtype("float32")}
# tags after which tifffile shapes or reads the page differently: tiles, SubIFDs, extra samples, image depth,
# MetaMorph STK (UIC1-4), Zeiss LSM
GIVE_UP_TAGS = frozenset({322, 323, 324, 325, 330, 338, 32997, 32998, 33628, 33629, 33630, 33631, 34412}
                         | set(tifffile.TIFF.TAG_READERS))  # and tags tifffile reads its own way (CZ_SEM...)
# lossless codecs whose pages tifffile shapes (length, width) like uncompressed ones (not JPEG's, nor JPEG 2000's)
PLAIN_CODECS = frozenset({1, 5, 8, 32773, 32946, 34925, 50000})
PLAIN_PHOTOMETRIC = frozenset({0, 1, 3})  # min-is-white, min-is-black, palette: one sample, shape (length, width)
PRIVATE_TAG_MIN = 32768
MAX_TAGS = 4096


@dataclass(frozen=True)
class PlainPage:
    shape: tuple[int, int]
    dtype: np.dtype
    compression: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    final: bool  # stored as the pixels are (no predictor, fill order 1, contiguous strips): read with one readinto
    byteorder: str  # "<" or ">"
    private_tags: tuple  # (code, type, count, raw value bytes, True) as tifffile's TiffTag.astuple()


def read_plain_page(fh: BinaryIO, size: int) -> PlainPage | None:
    """The page of a one-page classic TIFF open in `fh` (`size` bytes), or None to let tifffile decide."""
    head = fh.read(8)
    if len(head) != 8 or head[:4] not in (b"II*\0", b"MM\0*"):
        return None
    order = "<" if head[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", head[4:])
    if ifd < 8 or ifd + 2 > size:
        return None
    fh.seek(ifd)
    raw = fh.read(2)
    (n,) = struct.unpack(order + "H", raw)
    if not 0 < n <= MAX_TAGS or ifd + 2 + 12 * n + 4 > size:
        return None
    body = fh.read(12 * n + 4)
    if struct.unpack(order + "I", body[-4:])[0] != 0:  # more pages: tifffile counts the full-resolution ones
        return None
    values: dict[int, tuple[int, ...]] = {}
    private = []
    seen = set()
    for k in range(n):
        code, kind, count = struct.unpack(order + "HHI", body[12 * k:12 * k + 8])
        field = body[12 * k + 8:12 * k + 12]
        if kind not in TYPE_SIZES or code in GIVE_UP_TAGS or code in seen:  # tifffile keeps a repeated tag's first
            return None
        seen.add(code)
        nbytes = count * TYPE_SIZES[kind]
        if nbytes > 4:
            (where,) = struct.unpack(order + "I", field)
            if where + nbytes > size:
                return None
            fh.seek(where)
            data = fh.read(nbytes)
        else:
            data = field[:nbytes]
        if code > PRIVATE_TAG_MIN:
            if kind == 2:
                data = _ascii_as_tifffile(data, count)
                if data is None:
                    return None
            private.append((code, kind, count, data, True))
        elif kind in UNSIGNED and count:
            values[code] = struct.unpack(f"{order}{count}{UNSIGNED[kind]}", data)
    return _page(values, order, tuple(private))


# the unit whose bytes a value of each numeric field type holds in the file's byte order (a RATIONAL is two LONGs)
SWAP_UNITS = {3: 2, 4: 4, 5: 4, 8: 2, 9: 4, 10: 4, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}


def native_value(kind: int, raw: bytes) -> bytes:
    """A tag value's raw bytes from a file of the other byte order, in this machine's: numbers swapped unit by
    unit, text and bytes as they are (tifffile's `astuple()` gives them in the file's order)."""
    unit = SWAP_UNITS.get(kind)
    if unit is None or not isinstance(raw, bytes) or len(raw) % unit:
        return raw
    return np.frombuffer(raw, f"u{unit}").byteswap().tobytes()


def _ascii_as_tifffile(raw: bytes, count: int) -> bytes | None:
    """An ASCII tag's value as tifffile's `TiffTag.astuple()` gives it: tifffile decodes the text (UTF-8, else
    cp1252), strips it and encodes it back to `count` bytes, NUL-padded; text that is not 7-bit ASCII it gives
    as read. None where tifffile would keep undecodable bytes (rare: its own fallback, not reproduced here)."""
    text = raw.rstrip(b"\0")
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        try:
            decoded = text.decode("cp1252")
        except UnicodeDecodeError:
            return None
    try:
        return struct.pack(f"{count}s", decoded.strip().encode("ascii"))
    except UnicodeEncodeError:
        return raw


def _page(values: dict[int, tuple[int, ...]], order: str, private: tuple) -> PlainPage | None:
    def one(code: int, default: int | None = None) -> int | None:
        v = values.get(code)
        if v is None:
            return default
        return v[0] if len(set(v)) == 1 else None  # per-sample values that differ: not plain

    width, length = one(256), one(257)
    spp, bits, fmt = one(277, 1), one(258, 1), one(339, 1)
    offsets, counts = values.get(273), values.get(279)
    photometric = one(262, 1)
    if (None in (width, length, spp, bits, fmt) or spp != 1 or offsets is None or counts is None
            or len(offsets) != len(counts) or photometric not in PLAIN_PHOTOMETRIC):
        return None
    dtype = DTYPES.get((bits, fmt))
    if dtype is None or not width or not length:
        return None
    compression, predictor, fillorder = one(259, 1), one(317, 1), one(266, 1)
    if None in (compression, predictor, fillorder) or compression not in PLAIN_CODECS:
        return None
    rows_per_strip = min(one(278, length) or length, length)
    if len(offsets) != -(-length // rows_per_strip):  # tifffile trims extra strips and rejects missing ones
        return None
    nbytes = width * length * dtype.itemsize
    contiguous = compression == 1 and (len(offsets) == 1 or (
        sum(counts) == nbytes and all(counts[i] != 0 and offsets[i] + counts[i] == offsets[i + 1]
                                      for i in range(len(offsets) - 1))))
    final = contiguous and fillorder == 1 and predictor == 1 and offsets[0] % dtype.itemsize == 0
    return PlainPage((length, width), dtype, compression, tuple(offsets), tuple(counts), final, order, private)
