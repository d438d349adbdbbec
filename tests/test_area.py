import numpy as np
import pytest

from gpustack.area import Area
from gpustack.api import crop


def test_bottom_left_origin():
    # 10 rows x 20 cols; keep x in [2, 5), y in [1, 4) counted from the bottom row.
    rows, cols = Area(2, 5, 1, 4).rows_cols(10, 20)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (6, 9, 2, 5)


@pytest.mark.parametrize("sentinel", [9999, 99999])
def test_pystack3d_edge_sentinels_mean_whole_extent(sentinel):
    assert Area(0, sentinel, 0, sentinel).shape(30, 40) == (30, 40)


@pytest.mark.parametrize("area", [(0, 41, 0, 10), (0, 10, 0, 31), (0, 1000, 0, 10)])
def test_outside_the_image_is_an_error(area):
    with pytest.raises(ValueError, match="outside the 40x30"):
        Area(*area).shape(30, 40)


def test_crop_function_matches_numpy_slicing():
    stack = np.arange(2 * 10 * 20).reshape(2, 10, 20)
    out = crop(stack, [2, 5, 1, 4])
    np.testing.assert_array_equal(out, stack[:, 6:9, 2:5])
    np.testing.assert_array_equal(crop(stack[0], [0, 20, 0, 10]), stack[0])
