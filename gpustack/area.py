"""PyStack3D's area convention: `[xmin, xmax, ymin, ymax]` in pixels, origin at the bottom-left of the image.

Rows kept are `H - ymax : H - ymin`, columns `xmin : xmax`. PyStack3D's templates and GUI write 9999 or 99999 as
a max bound meaning "to the image edge"; those two values are clamped, any other bound outside the image is an
error (PyStack3D clamps silently, which hides typos).
"""

from __future__ import annotations

from typing import NamedTuple

EDGE_SENTINELS = (9999, 99999)


class Area(NamedTuple):
    xmin: int
    xmax: int
    ymin: int
    ymax: int

    def clamped(self, height: int, width: int) -> "Area":
        """The area with PyStack3D's 'to the edge' sentinels replaced by the image size; raises if outside."""
        xmax = width if self.xmax in EDGE_SENTINELS and self.xmax > width else self.xmax
        ymax = height if self.ymax in EDGE_SENTINELS and self.ymax > height else self.ymax
        if xmax > width or ymax > height:
            raise ValueError(
                f"area {list(self)} reaches outside the {width}x{height} (width x height) image: "
                f"xmax must be <= {width} and ymax <= {height}"
            )
        if self.xmin >= xmax or self.ymin >= ymax:
            raise ValueError(f"area {list(self)} is empty inside the {width}x{height} image")
        return Area(self.xmin, xmax, self.ymin, ymax)

    def rows_cols(self, height: int, width: int) -> tuple[slice, slice]:
        """Array slices (rows, cols) of the area in an image of this size."""
        a = self.clamped(height, width)
        return slice(height - a.ymax, height - a.ymin), slice(a.xmin, a.xmax)

    def shape(self, height: int, width: int) -> tuple[int, int]:
        rows, cols = self.rows_cols(height, width)
        return rows.stop - rows.start, cols.stop - cols.start
