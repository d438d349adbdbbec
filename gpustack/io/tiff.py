"""Reading and writing TIFF slices.

Inputs are inspected once, header only, before anything runs: every file must be a readable single-sample 2-D
TIFF of one shape and dtype, with all its data inside the file (a truncated copy is caught here, not an hour
later). The inspection keeps where each uncompressed slice lies in its file, so that reading becomes one
`readinto` with no TIFF parsing, the fast path for the common case of uncompressed FIB-SEM slices.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import sys
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from gpustack.errors import InputError
from gpustack.io.tiff_header import native_value, read_plain_page
from gpustack.io.tiff_writer import write_plain_tiff

SUPPORTED_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32"))
PRIVATE_TAG_MIN = 32768  # PyStack3D copies tags above this (e.g. Fibics XML 51023) and the compression
TIFF_SUFFIXES = (".tif", ".tiff")
SKIPPED_NAMES = ("big.tif",)  # PyStack3D's concatenated output, never a slice


@dataclass(frozen=True)
class SliceInfo:
    path: Path
    page: int  # page index inside `path`
    name: str  # output file name
    offset: int | None  # byte offset of the slice's contiguous uncompressed data, None if it must be decoded
    byteswap: bool  # the file's byte order differs from this machine's
    compression: int  # TIFF compression code (1: none)
    private_tags: tuple  # tifffile `extratags`: (code, dtype, count, value, writeonce)
    size: int  # file size and mtime: for the fingerprint
    mtime_ns: int
    shape: tuple[int, int]
    dtype: np.dtype


@dataclass(frozen=True)
class StackSource:
    """The slices of one channel, in processing order."""

    channel: str
    root: Path  # a folder of slices or a multi-page TIFF
    slices: tuple[SliceInfo, ...]
    shape: tuple[int, int]
    dtype: np.dtype

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slices]

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.shape}{self.dtype}".encode())
        for s in self.slices:
            h.update(f"{s.path.name}\0{s.page}\0{s.size}\0{s.mtime_ns}\n".encode())
        return h.hexdigest()


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_slice_files(folder: Path) -> tuple[list[Path], list[str]]:
    """`*.tif` in PyStack3D's order (plain lexicographic), or `*.tiff` if there is no `.tif`; plus notes."""
    notes = []
    files = sorted(p for p in folder.iterdir() if p.suffix == ".tif" and p.name not in SKIPPED_NAMES)
    if not files:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES
                       and p.name not in SKIPPED_NAMES)
    names = [p.name for p in files]
    if names != sorted(names, key=_natural_key):
        first = next(i for i, (a, b) in enumerate(zip(names, sorted(names, key=_natural_key))) if a != b)
        notes.append(f"{folder}: slices are taken in plain alphabetical order, as PyStack3D does, which is not "
                     f"numeric order (e.g. {names[first]!r} comes before {sorted(names, key=_natural_key)[first]!r});"
                     " zero-pad the numbers in the file names if that is not intended")
    return files, notes


def _private_tags(page: tifffile.TiffPage) -> tuple:
    """The raw private tags, as tifffile writes them back: text as its bytes (a Fibics XML with a latin-1 "µ"
    cannot be written back from the decoded str, which tifffile requires to be 7-bit ASCII)."""
    return tuple(t.astuple() for t in page.tags.values() if t.code > PRIVATE_TAG_MIN)


def _inspect_page(path: Path, page: tifffile.TiffPage, index: int, name: str, size: int, mtime_ns: int) -> SliceInfo:
    where = f"{path}" + (f" (page {index})" if index else "")
    if page.samplesperpixel != 1 or len(page.shape) != 2:
        raise InputError(f"{where}: expected a single-channel 2-D image, found shape {page.shape}")
    # Uncompressed data in one block with no predictor: read it with one readinto, no TIFF decoding.
    final = page.is_contiguous and page.is_memmappable and int(page.compression) == 1
    return _slice_info(where, path, index, name, size, mtime_ns, tuple(page.shape), np.dtype(page.dtype),
                       page.dataoffsets, page.databytecounts, int(page.compression), final,
                       page.parent.byteorder, _private_tags(page))


def _slice_info(where: str, path: Path, index: int, name: str, size: int, mtime_ns: int, shape: tuple[int, int],
                dtype: np.dtype, offsets: tuple, bytecounts: tuple, compression: int, final: bool, byteorder: str,
                private_tags: tuple) -> SliceInfo:
    """The checks every slice passes, whether tifffile or `tiff_header` read its header."""
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{where}: pixel type {dtype} is not supported (uint8, uint16 or float32)")
    ends = [o + n for o, n in zip(offsets, bytecounts)]
    if not ends or any(n == 0 for n in bytecounts) or max(ends) > size:
        raise InputError(f"{where}: the file is truncated (its image data ends at byte {max(ends, default=0)}, "
                         f"the file has {size} bytes)")
    offset = int(offsets[0]) if final and compression == 1 else None
    swapped = byteorder != ("<" if sys.byteorder == "little" else ">")
    if swapped:  # written back in this machine's order, as tifffile writes: the numbers must be too
        private_tags = tuple((code, kind, count, native_value(kind, value), once)
                             for code, kind, count, value, once in private_tags)
    return SliceInfo(path, index, name, offset, swapped and dtype.itemsize > 1, compression, private_tags, size,
                     mtime_ns, shape, dtype)


TIFF_MAGICS = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs its own warnings about broken files; gpustack reports them once, as an error."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _broken(path: Path, detail: str) -> InputError:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic in TIFF_MAGICS:
        return InputError(f"{path}: the TIFF file is truncated or corrupted ({detail}); copy it again from the "
                          "acquisition")
    return InputError(f"{path}: not a TIFF file (it starts with {magic!r})")


def _open_tiff(path: Path) -> tifffile.TiffFile:
    try:
        tif = tifffile.TiffFile(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, struct.error) as exc:
        raise _broken(path, str(exc)) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(tif.pages) == 0:
        tif.close()
        raise _broken(path, "no readable image in it")
    return tif


def inspect_file(path: Path) -> tuple[SliceInfo, int]:
    """Header of a one-slice TIFF file (its first page), and how many more full-resolution pages it holds
    (reduced-resolution ones, such as a thumbnail, are not counted). A plain one-page file is read directly
    (`tiff_header`: 400 headers in a third of tifffile's time); anything else, and every error message, comes
    from tifffile."""
    stat = path.stat()
    try:
        with open(path, "rb") as fh:
            page = read_plain_page(fh, stat.st_size)
    except (OSError, struct.error):
        page = None
    if page is not None:
        return _slice_info(str(path), path, 0, path.name, stat.st_size, stat.st_mtime_ns, page.shape, page.dtype,
                           page.offsets, page.bytecounts, page.compression, page.final, page.byteorder,
                           page.private_tags), 0
    with _open_tiff(path) as tif:
        more = sum(1 for page in tif.pages[1:] if not getattr(page, "is_reduced", False))
        return _inspect_page(path, tif.pages[0], 0, path.name, stat.st_size, stat.st_mtime_ns), more


def inspect_multipage(path: Path) -> list[SliceInfo]:
    """Every page of a multi-page TIFF/BigTIFF becomes a slice named `<stem>_<page>.tif`."""
    stat = path.stat()
    with _open_tiff(path) as tif:
        pages = list(tif.pages)
        width = max(4, len(str(len(pages) - 1)))
        return [_inspect_page(path, page, i, f"{path.stem}_{i:0{width}d}.tif", stat.st_size, stat.st_mtime_ns)
                for i, page in enumerate(pages)]


def open_channel(project_dir: Path, channel: str, ind_min: int = 0, ind_max: int | None = None,
                 *, threads: int = 8) -> tuple[StackSource, list[str]]:
    """Find, order and inspect the slices of one channel; raise InputError on anything a run would trip over."""
    root = project_dir if channel == "." else project_dir / channel
    what = "project folder" if channel == "." else f"channel {channel!r}"
    if not root.exists():
        raise InputError(f"{what} not found: {root}")
    notes: list[str] = []
    with _quiet_tifffile():
        if root.is_file():
            if root.suffix.lower() not in TIFF_SUFFIXES:
                raise InputError(f"{what}: {root} is a file but not a .tif/.tiff stack")
            infos = inspect_multipage(root)[ind_min:None if ind_max is None else ind_max + 1]
        else:
            files, notes = list_slice_files(root)
            if not files:
                raise InputError(f"{what}: no .tif or .tiff slices in {root}")
            files = files[ind_min:None if ind_max is None else ind_max + 1]  # only the slices used are read
            if not files:
                raise InputError(f"{what}: no slice left in {root} with ind_min={ind_min}, ind_max={ind_max}")
            with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:  # header reads are IO-bound
                infos, more = zip(*pool.map(inspect_file, files))
            stacked = [info.path.name for info, extra in zip(infos, more) if extra]
            if stacked:  # a folder of stacks, not of slices: say what is used rather than drop pages silently
                notes.append(f"{root}: {len(stacked)} file(s) hold more than one image ({', '.join(stacked[:3])}"
                             f"{', ...' if len(stacked) > 3 else ''}); only the first page of each is used as its "
                             "slice (a multi-page stack is read page by page when project_dir or the channel names "
                             "the file itself)")
    if not infos:
        raise InputError(f"{what}: no slice left in {root} with ind_min={ind_min}, ind_max={ind_max}")
    kinds = Counter((info.shape, info.dtype) for info in infos)
    if len(kinds) > 1:  # blame the slices that differ from the majority, not whichever came first
        (shape, dtype), count = kinds.most_common(1)[0]
        odd = next(info for info in infos if (info.shape, info.dtype) != (shape, dtype))
        raise InputError(f"{odd.path}: slice is {odd.shape[1]}x{odd.shape[0]} (width x height) {odd.dtype}, but "
                         f"{count} of the {len(infos)} slices are {shape[1]}x{shape[0]} {dtype}: all slices must "
                         "match")
    first = infos[0]
    return StackSource(channel, root, tuple(infos), first.shape, first.dtype), notes


_handles = threading.local()  # per reader thread: open multi-page stacks, so page k is not found by re-walking IFDs


def _cached_tiff(path: Path) -> tifffile.TiffFile:
    cache = _handles.__dict__.setdefault("files", {})
    if path not in cache:
        cache[path] = _open_tiff(path)
    return cache[path]


def _decode(page: tifffile.TiffPage, out: np.ndarray, rows: slice | None) -> None:
    if rows is None:
        page.asarray(out=out)
    else:
        out[...] = page.asarray()[rows]


def read_slice(info: SliceInfo, out: np.ndarray, rows: slice | None = None) -> None:
    """Read one slice, or only its `rows`, into `out` (C-contiguous, that shape, the slice's dtype).

    Uncompressed slices are read straight from their byte range (for a row band, only the band's bytes).
    Errors name the file.
    """
    try:
        if info.offset is not None:
            row_bytes = info.shape[1] * info.dtype.itemsize
            with open(info.path, "rb", buffering=0) as fh:
                fh.seek(info.offset + (rows.start * row_bytes if rows is not None else 0))
                if fh.readinto(memoryview(out).cast("B")) != out.nbytes:
                    raise InputError(f"{info.path}: the file is truncated (it changed since it was inspected)")
            if info.byteswap:
                out.byteswap(inplace=True)
        elif info.page == 0:  # a file of its own (or a stack's first page): opened and closed at once, or a
            # folder of a few thousand compressed slices would hold as many files open (ulimit: often 1024)
            with _open_tiff(info.path) as tif:
                _decode(tif.pages[0], out, rows)
        else:
            _decode(_cached_tiff(info.path).pages[info.page], out, rows)
    except InputError:
        raise
    except KeyError as exc:  # tifffile's way of saying a codec is missing
        raise InputError(f"{info.path}: {exc.args[0] if exc.args else exc}; install it with "
                         "`pip install imagecodecs`") from None
    except Exception as exc:
        if info.compression != 1 and _is_codec_error(exc):
            raise InputError(f"{info.path}: cannot decode the slice, its compressed data are damaged "
                             f"({_error_name(exc)}: {exc}); copy it again from the source") from None
        if isinstance(exc, (OSError, ValueError, RuntimeError, struct.error)):
            raise InputError(f"{info.path}: cannot read the slice ({exc})") from None
        raise


def _is_codec_error(exc: Exception) -> bool:
    """zlib's own error (tifffile's fallback codec) or one of imagecodecs' (ZlibError, LzwError...)."""
    return isinstance(exc, zlib.error) or type(exc).__module__.split(".")[0] in ("imagecodecs", "_imagecodecs")


def _error_name(exc: Exception) -> str:
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def write_slice(path: Path, data: np.ndarray, info: SliceInfo) -> None:
    """One TIFF with the input slice's private tags and compression, as PyStack3D writes them."""
    compression = None if info.compression == 1 else info.compression
    try:
        with open(path, "wb") as fh:  # an open handle spares tifffile's path resolution, per slice
            # plain slices: the same bytes as tifffile's, without its per-tag Python (tiff_writer)
            if compression is not None or not write_plain_tiff(fh, data, info.private_tags):
                tifffile.imwrite(fh, data, compression=compression, extratags=info.private_tags,
                                 photometric="minisblack", metadata=None)
    except KeyError as exc:
        raise InputError(f"{path}: cannot write with the input's compression: {exc.args[0] if exc.args else exc}; "
                         "install it with `pip install imagecodecs`") from None
