"""The plain-slice writer against tifffile's own output: the same bytes, or a clean refusal."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile

from gpustack.io.tiff import inspect_file, write_slice
from gpustack.io.tiff_writer import plain_tiff_header, write_plain_tiff

TAG_SETS = {
    "none": (),
    "Fibics XML": ((51023, 2, 47, b"<FibicsImage><ZPos>0.0400</ZPos></FibicsImage>\x00", True),),
    # odd lengths (padding to even offsets), a value held in the entry itself, numbers, unsorted codes
    "mixed": ((51024, 2, 5, b"abcd\x00", True), (40000, 3, 2, b"\x01\x00\x02\x00", True),
              (51023, 2, 3, b"ab\x00", True), (40002, 12, 1, np.float64(1.5).tobytes(), True),
              (40001, 7, 9, bytes(range(9)), True), (40003, 4, 3, np.arange(3, dtype="<u4").tobytes(), True)),
}


def tifffile_bytes(data: np.ndarray, tags: tuple) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, data, photometric="minisblack", metadata=None, extratags=tags)
    return out.getvalue()


@pytest.mark.parametrize("tags", list(TAG_SETS))
@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 41), (901, 901)])
def test_the_same_bytes_as_tifffile(dtype, shape, tags):
    rng = np.random.default_rng(sum(shape))
    data = (rng.normal(0, 1000, shape) if dtype == "float32" else rng.integers(0, 100, shape)).astype(dtype)
    out = io.BytesIO()
    assert write_plain_tiff(out, data, TAG_SETS[tags])
    assert out.getvalue() == tifffile_bytes(data, TAG_SETS[tags])
    with tifffile.TiffFile(io.BytesIO(out.getvalue())) as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), data)
        for code, kind, count, value, _ in TAG_SETS[tags]:
            assert tif.pages[0].tags[code].astuple()[1:4] == (kind, count, value)


def test_a_cropped_view_is_written_as_its_pixels():
    data = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
    view = data[5:30, 7:50]
    out = io.BytesIO()
    assert write_plain_tiff(out, view, TAG_SETS["Fibics XML"])
    assert out.getvalue() == tifffile_bytes(np.ascontiguousarray(view), TAG_SETS["Fibics XML"])


@pytest.mark.parametrize("case", ["float64", "big-endian", "3-D", "empty", "str value", "wrong length",
                                  "unknown type", "repeated code", "text without NUL", "rational", "LONG8"])
def test_what_it_leaves_to_tifffile(case):
    data = np.zeros((4, 5), np.uint16)
    tags: tuple = ()
    if case == "float64":
        data = data.astype(np.float64)
    elif case == "big-endian":
        data = data.astype(">u2")
    elif case == "3-D":
        data = np.zeros((2, 4, 5), np.uint16)
    elif case == "empty":
        data = np.zeros((0, 5), np.uint16)
    elif case == "str value":
        tags = ((51023, 2, 4, "abc", True),)
    elif case == "wrong length":
        tags = ((51023, 2, 5, b"abc\x00", True),)
    elif case == "unknown type":
        tags = ((51023, 99, 4, b"abc\x00", True),)
    elif case == "text without NUL":  # tifffile adds it and counts it
        tags = ((51023, 2, 3, b"xyz", True),)
    elif case == "rational":  # tifffile writes count 2 for one rational
        tags = ((51023, 5, 1, b"\x03\x00\x00\x00\x04\x00\x00\x00", True),)
    elif case == "LONG8":  # a BigTIFF type: not for a classic file
        tags = ((51023, 16, 1, bytes(8), True),)
    else:
        tags = ((51023, 2, 4, b"abc\x00", True), (51023, 2, 4, b"xyz\x00", True))
    out = io.BytesIO()
    assert not write_plain_tiff(out, data, tags)
    assert out.getvalue() == b""  # nothing written: tifffile writes the whole file


def test_over_two_gib_is_left_to_tifffile():
    assert plain_tiff_header((32768, 32769), np.dtype("uint16"), ()) is None
    assert plain_tiff_header((32768, 32768), np.dtype("uint16"), ()) is not None


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_write_slice_keeps_the_input_tags_and_compression(tmp_path, compression):
    """Through write_slice: the plain writer for uncompressed slices, tifffile for compressed ones; either way
    the output reads back with the input's pixels, private tag and compression."""
    data = np.random.default_rng(4).integers(0, 65535, (64, 80)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", data, compression=compression, extratags=[TAG_SETS["Fibics XML"][0]])
    info, _ = inspect_file(tmp_path / "in.tif")
    write_slice(tmp_path / "out.tif", data[3:50], info)
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        page = tif.pages[0]
        np.testing.assert_array_equal(page.asarray(), data[3:50])
        assert page.compression == (8 if compression else 1)
        assert page.tags[51023].value == "<FibicsImage><ZPos>0.0400</ZPos></FibicsImage>"
    if compression is None:
        assert (tmp_path / "out.tif").read_bytes() == tifffile_bytes(data[3:50], info.private_tags)


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_numeric_private_tags_of_either_byte_order_are_written_back_as_read(tmp_path, byteorder):
    """A big-endian input's numbers are swapped to this machine's order before they are written (its raw bytes
    once came out as 1792 for a SHORT 7); text is as it was. Text without its NUL and a rational go to
    tifffile, which gives them the same values."""
    data = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10)
    tags = [(40000, 3, 2, (7, 300), True), (40001, 12, 1, 1.5, True), (40002, 5, 1, (3, 4), True),
            (51023, "s", 0, "<Fibics>um</Fibics>", True)]
    tifffile.imwrite(tmp_path / "in.tif", data, byteorder=byteorder, extratags=tags)
    info, _ = inspect_file(tmp_path / "in.tif")
    write_slice(tmp_path / "out.tif", data, info)
    with tifffile.TiffFile(tmp_path / "in.tif") as src, tifffile.TiffFile(tmp_path / "out.tif") as out:
        assert out.byteorder == "<"
        np.testing.assert_array_equal(out.pages[0].asarray(), data)
        for code in (40000, 40001, 51023):
            assert out.pages[0].tags[code].value == src.pages[0].tags[code].value, code
        assert out.pages[0].tags[40000].value == (7, 300) and out.pages[0].tags[40001].value == 1.5
