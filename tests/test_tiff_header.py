"""The fast header reader against tifffile: the same slice description for every plain file, and a refusal
(None, so tifffile decides) for every file it does not fully understand."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from gpustack.io import tiff
from gpustack.io.tiff_header import read_plain_page

FIBICS_XML = b'<?xml version="1.0" encoding="iso-8859-1"?><Fibics><Scan><Ux>0.005 \xb5m</Ux></Scan></Fibics>\0'
PRIVATE = [(51023, "B", len(FIBICS_XML), FIBICS_XML, True), (40000, "H", 3, (1, 2, 3), True),
           (40001, "s", 0, "short", True), (40002, "d", 1, 2.5, True), (40003, "I", 1, 7, True)]


def _plain(tmp_path, name, data, **kwargs):
    path = tmp_path / name
    tifffile.imwrite(path, data, photometric="minisblack", metadata=None, **kwargs)
    return path


def _tifffile_info(path):
    """What the header check reported before the fast reader: tifffile's page."""
    stat = path.stat()
    with tifffile.TiffFile(path) as tif:
        return tiff._inspect_page(path, tif.pages[0], 0, path.name, stat.st_size, stat.st_mtime_ns)


def _fast(path):
    with open(path, "rb") as fh:
        return read_plain_page(fh, path.stat().st_size)


PLAIN = {
    "uint16": (np.arange(60 * 70, dtype=np.uint16).reshape(60, 70), {}),
    "uint8 with private tags": (np.arange(50 * 40, dtype=np.uint8).reshape(50, 40), {"extratags": PRIVATE}),
    "float32": (np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20), {}),
    "big-endian uint16": (np.arange(40 * 30, dtype=">u2").reshape(40, 30), {"byteorder": ">"}),
    "big-endian uint8": (np.arange(40 * 30, dtype=np.uint8).reshape(40, 30), {"byteorder": ">", "extratags": PRIVATE}),
    "several strips": (np.arange(64 * 50, dtype=np.uint16).reshape(64, 50), {"rowsperstrip": 7}),
    "zlib": (np.arange(64 * 50, dtype=np.uint16).reshape(64, 50), {"compression": "zlib", "extratags": PRIVATE}),
    "zlib, predictor": (np.arange(64 * 50, dtype=np.uint16).reshape(64, 50),
                        {"compression": "zlib", "predictor": True, "rowsperstrip": 16}),
    "one row": (np.arange(9, dtype=np.uint16).reshape(1, 9), {}),
}


@pytest.mark.parametrize("case", list(PLAIN))
def test_plain_files_read_as_tifffile_reads_them(tmp_path, case):
    data, kwargs = PLAIN[case]
    path = _plain(tmp_path, "slice.tif", data, **kwargs)
    assert _fast(path) is not None, case
    info, more = tiff.inspect_file(path)
    assert more == 0
    assert info == _tifffile_info(path)
    out = np.empty(data.shape, info.dtype)
    tiff.read_slice(info, out)
    np.testing.assert_array_equal(out, data)


def test_private_tags_are_written_back_as_they_were(tmp_path):
    data = np.arange(20 * 10, dtype=np.uint16).reshape(20, 10)
    src = _plain(tmp_path, "in.tif", data, extratags=PRIVATE)
    info, _ = tiff.inspect_file(src)
    tiff.write_slice(tmp_path / "out.tif", data, info)
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(tmp_path / "out.tif") as b:
        assert tiff._private_tags(a.pages[0]) == tiff._private_tags(b.pages[0]) == info.private_tags
        assert (51023, 1, len(FIBICS_XML), FIBICS_XML, True) in info.private_tags


def _handmade(order: str, ifd_last: bool, extra: tuple = (), photometric: int = 1, compression: int = 1,
              strips: int = 1) -> bytes:
    """A TIFF as other writers lay it out: data first and the IFD at the end, SHORT strip offsets, a 3-byte
    ASCII private tag inline, entries in the given byte order."""
    import struct

    data = np.arange(6 * 5, dtype=np.uint16).reshape(6, 5).astype(order + "u2").tobytes()
    magic = b"II*\0" if order == "<" else b"MM\0*"
    entries = [(256, 3, 1, 5), (257, 3, 1, 6), (258, 3, 1, 16), (259, 3, 1, compression), (262, 3, 1, photometric),
               (273, 3, 1, None), (277, 3, 1, 1), (278, 3, 1, 6 // strips), (279, 4, 1, len(data)),
               (50000, 2, 3, b"ab\0"), *extra]
    data_at = 8 if ifd_last else 8 + 2 + 12 * len(entries) + 4
    ifd_at = 8 + len(data) if ifd_last else 8
    ifd = struct.pack(order + "H", len(entries))
    for code, kind, count, value in entries:
        value = data_at if value is None else value
        if isinstance(value, bytes):
            field = value.ljust(4, b"\0")
        elif kind == 3:
            field = struct.pack(order + "HH", value, 0)
        else:
            field = struct.pack(order + "I", value)
        ifd += struct.pack(order + "HHI", code, kind, count) + field
    ifd += struct.pack(order + "I", 0)
    head = magic + struct.pack(order + "I", ifd_at)
    return head + (data + ifd if ifd_last else ifd + data)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("ifd_last", [True, False])
def test_handmade_layouts_agree_with_tifffile(tmp_path, order, ifd_last):
    path = tmp_path / "hand.tif"
    path.write_bytes(_handmade(order, ifd_last))
    assert _fast(path) is not None
    info, _ = tiff.inspect_file(path)
    assert info == _tifffile_info(path)
    assert info.private_tags == ((50000, 2, 3, b"ab\0", True),)
    out = np.empty((6, 5), np.uint16)
    tiff.read_slice(info, out)
    np.testing.assert_array_equal(out, np.arange(30).reshape(6, 5))


REFUSED = {
    "two pages": lambda p: tifffile.imwrite(p, np.zeros((2, 8, 8), np.uint16), photometric="minisblack"),
    "tiles": lambda p: tifffile.imwrite(p, np.zeros((32, 32), np.uint16), tile=(16, 16)),
    "rgb": lambda p: tifffile.imwrite(p, np.zeros((8, 8, 3), np.uint8), photometric="rgb"),
    "bigtiff": lambda p: tifffile.imwrite(p, np.zeros((8, 8), np.uint16), bigtiff=True),
    "int16": lambda p: tifffile.imwrite(p, np.zeros((8, 8), np.int16)),
    "not a tiff": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_anything_else_is_left_to_tifffile(tmp_path, case):
    path = tmp_path / "odd.tif"
    REFUSED[case](path)
    assert _fast(path) is None


def test_truncated_ifd_is_left_to_tifffile_and_truncated_data_named(tmp_path):
    path = _plain(tmp_path, "slice.tif", np.zeros((100, 100), np.uint16))
    whole = path.read_bytes()
    path.write_bytes(whole[:-5000])  # tifffile writes the IFD first: the data is cut
    with pytest.raises(tiff.InputError, match="truncated"):
        tiff.inspect_file(path)
    path.write_bytes(whole[:20])  # the IFD itself is cut
    assert _fast(path) is None
    with pytest.raises(tiff.InputError, match="truncated or corrupted"):
        tiff.inspect_file(path)


def test_ind_range_reads_only_the_headers_it_keeps(tmp_path):
    for k in range(6):
        _plain(tmp_path, f"s{k}.tif", np.full((4, 4), k, np.uint16))
    (tmp_path / "s0.tif").write_bytes(b"broken")  # outside the range: never opened
    source, _ = tiff.open_channel(tmp_path, ".", ind_min=2, ind_max=4)
    assert [s.name for s in source.slices] == ["s2.tif", "s3.tif", "s4.tif"]
    with pytest.raises(tiff.InputError, match="no slice left"):
        tiff.open_channel(tmp_path, ".", ind_min=7)


def test_ascii_tags_come_back_as_tifffile_gives_them(tmp_path):
    """tifffile strips an ASCII value (an XML ending in CRLF) and pads it again with NULs: the same bytes here."""
    xml = b'<?xml version="1.0"?>\r\n<Fibics><ZPos>1.0</ZPos></Fibics>\r\n\0'
    path = _plain(tmp_path, "crlf.tif", np.zeros((4, 4), np.uint16),
                  extratags=[(51023, "s", len(xml), xml, True), (40010, "s", 0, "  padded  ", True)])
    assert _fast(path) is not None
    info, _ = tiff.inspect_file(path)
    assert info == _tifffile_info(path)
    tags = {t[0]: t[3] for t in info.private_tags}
    assert tags[51023] == xml[:-3] + b"\0\0\0" and tags[40010] == b"padded\0\0\0\0\0"


@pytest.mark.parametrize("case", ["colour photometric", "repeated tag", "strips missing", "old JPEG"])
def test_layouts_tifffile_reads_its_own_way_are_left_to_it(tmp_path, case):
    kwargs = {"colour photometric": {"photometric": 2},  # tifffile: shape (6, 5, 1), refused
              "repeated tag": {"extra": ((256, 3, 1, 2),)},  # tifffile keeps the first
              "strips missing": {"strips": 2},  # RowsPerStrip 3 says 2 strips, the file has 1
              "old JPEG": {"compression": 6}}[case]
    path = tmp_path / "odd.tif"
    path.write_bytes(_handmade("<", True, **kwargs))
    assert _fast(path) is None
