"""The reports' plots drawn with Pillow: axes, ticks, lines, markers, legends, bands, images and colour bars.

A run writes a dozen to a few dozen PNG plots. Drawn by matplotlib each took 110-160 ms of Python (tick objects,
text layout, the Agg renderer), about 2.9 s of CPU on the workflow benchmark's 10 s run, taken from the
passes on a small machine; drawn here, a stats plot of 200 slices takes about 35 ms (156 ms in matplotlib), and
`import matplotlib` (0.3 s) is gone from a run. The API is the small part of matplotlib's that the reports use, with the same
names (`new_figure`, `subplots`, `plot`, `axhline`, `legend`, ...), so a report reads like a matplotlib script.

Everything is drawn at SCALE times the size and reduced (a box filter): antialiased lines and text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DPI = 100
SCALE = 2
FONT_PT = 10.0
TITLE_PT = 12.0
TICK_PT = 3.5  # tick length
MARGIN = 0.05  # data margins of autoscaled axes, as matplotlib's axes.xmargin / ymargin
CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf"]  # matplotlib's tab10, its default colour cycle
NAMED = {"grey": "#808080", "gray": "#808080", "black": "#000000", "red": "#ff0000", "white": "#ffffff",
         "k": "#000000", "r": "#ff0000", "b": "#0000ff", "g": "#008000",
         **{f"C{i}": c for i, c in enumerate(CYCLE)},
         **{f"tab:{n}": c for n, c in zip(["blue", "orange", "green", "red", "purple", "brown", "pink", "gray",
                                           "olive", "cyan"], CYCLE)}}
# viridis at 9 evenly spaced points, interpolated linearly in between
VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
                    [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)
FONT_SIZES = {"xx-small": 0.579, "x-small": 0.694, "small": 0.833, "medium": 1.0, "large": 1.2}
DASH = (3.7, 1.6)  # matplotlib's "--" pattern, in line widths


def rgb(color: Any) -> tuple[int, int, int]:
    """'#rrggbb', a name (tab:red, C1, grey), or an (r, g, b[, a]) tuple of floats in [0, 1]."""
    if isinstance(color, (tuple, list, np.ndarray)):
        return tuple(int(round(255 * float(c))) for c in color[:3])  # type: ignore[return-value]
    text = NAMED.get(str(color), str(color))
    if not (text.startswith("#") and len(text) == 7):
        raise ValueError(f"unknown colour {color!r}")
    return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)


def viridis(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3)."""
    t = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(VIRIDIS) - 1)
    k = np.minimum(t.astype(np.int64), len(VIRIDIS) - 2)
    f = (t - k)[..., None]
    return np.round(VIRIDIS[k] * (1 - f) + VIRIDIS[k + 1] * f).astype(np.uint8)


def _font(points: float) -> ImageFont.FreeTypeFont:
    return _FONTS.setdefault(points, ImageFont.load_default(size=max(1, round(points * DPI / 72 * SCALE))))


_FONTS: dict[float, Any] = {}


def _points(size: Any, default: float = FONT_PT) -> float:
    if size is None:
        return default
    return FONT_PT * FONT_SIZES[size] if isinstance(size, str) else float(size)


def _px(points: float) -> float:
    """Points -> pixels of the drawing (at SCALE)."""
    return points * DPI / 72 * SCALE


def nice_ticks(lo: float, hi: float, target: int) -> np.ndarray:
    """About `target` round values (steps of 1, 2, 2.5 or 5 x 10^k) inside [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.array([lo]) if math.isfinite(lo) else np.array([])
    raw = (hi - lo) / max(1, target)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next((m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw), 10 * power)
    first = math.ceil(lo / step - 1e-9)
    ticks = (first + np.arange(int(math.floor(hi / step + 1e-9)) - first + 1)) * step
    return np.where(np.abs(ticks) < step * 1e-9, 0.0, ticks)


def tick_labels(ticks: np.ndarray) -> list[str]:
    """Labels with as many decimals as the step needs, the same for all ticks; large or tiny values in
    scientific notation."""
    if len(ticks) == 0:
        return []
    top = float(np.abs(ticks).max())
    if top >= 1e6 or 0 < top < 1e-3:
        return [f"{t:.3g}" for t in ticks]
    step = float(np.min(np.diff(ticks))) if len(ticks) > 1 else max(top, 1.0)
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > 1e-9 * max(1.0, abs(step)):
        decimals += 1
    return [f"{t:.{decimals}f}" for t in ticks]


def _log_ticks(lo: float, hi: float) -> np.ndarray:
    """Decades (log10 values) inside [lo, hi]; with fewer than two, 1-2-5 in each decade."""
    decades = np.arange(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1, dtype=np.float64)
    if len(decades) >= 2:
        return decades
    candidates = np.log10(np.array([m * 10.0 ** d for d in range(math.floor(lo) - 1, math.ceil(hi) + 1)
                                    for m in (1, 2, 5)]))
    return candidates[(candidates >= lo - 1e-9) & (candidates <= hi + 1e-9)]


class _Line:
    def __init__(self, x, y, color, lw, ls, marker, ms, label):
        self.x, self.y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        self.color, self.lw, self.ls, self.marker, self.ms, self.label = color, lw, ls, marker, ms, label


class Rectangle:
    """An unfilled rectangle in data coordinates (matplotlib.patches.Rectangle's first arguments)."""

    def __init__(self, xy: tuple[float, float], width: float, height: float, *, color: Any = "black",
                 lw: float = 1.0):
        self.x, self.y, self.width, self.height = float(xy[0]), float(xy[1]), float(width), float(height)
        self.color, self.lw = color, lw


class AxesImage:
    def __init__(self, data: np.ndarray, extent: tuple[float, float, float, float], origin: str):
        self.data = np.asarray(data, dtype=np.float64)
        self.extent, self.origin = extent, origin
        finite = self.data[np.isfinite(self.data)]
        self.vmin, self.vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


class Axes:
    """One panel. `rect` = (left, bottom, right, top) in figure fractions."""

    def __init__(self, fig: Figure, rect: tuple[float, float, float, float]):
        self.fig, self.rect = fig, rect
        self.lines: list[_Line] = []
        self.hlines: list[tuple] = []
        self.spans: list[tuple] = []
        self.images: list[AxesImage] = []
        self.patches: list[Rectangle] = []
        self.notes: list[str] = []
        self.title = self.xlabel = self.ylabel = ""
        self.title_pt, self.xlabel_pt, self.ylabel_pt, self.tick_pt = TITLE_PT, FONT_PT, FONT_PT, FONT_PT
        self.xlim: tuple[float, float] | None = None
        self.ylim: tuple[float, float] | None = None
        self.yscale = "linear"
        self.equal = False
        self.visible = True
        self.legend_spec: tuple[str, float] | None = None
        self.share_x: list[Axes] = [self]  # axes whose x limits are one (sharex, twinx)
        self.share_y: list[Axes] = [self]  # sharey
        self.hide_xticklabels = self.hide_yticklabels = False
        self.right = False  # y axis on the right (twinx, colour bars)
        self.twin = False  # drawn over its host: no frame, no x axis of its own
        self._cycle = 0

    # -- what the reports call ----------------------------------------------------------------------------

    def plot(self, *args, color: Any = None, lw: float | None = None, linewidth: float | None = None,
             ms: float | None = None, markersize: float | None = None, ls: str | None = None,
             linestyle: str | None = None, label: str | None = None) -> None:
        fmt = args[-1] if args and isinstance(args[-1], str) else None
        data = args[:-1] if fmt is not None else args
        y = np.asarray(data[-1], dtype=np.float64)
        x = np.asarray(data[0], dtype=np.float64) if len(data) > 1 else np.arange(len(y), dtype=np.float64)
        marker = None
        style = ls or linestyle
        if fmt is not None:
            marker = "." if "." in fmt else ("o" if "o" in fmt else None)
            rest = fmt.replace(".", "").replace("o", "")
            style = style or ("--" if "--" in rest else (":" if ":" in rest else ("-" if "-" in rest else "")))
        style = "-" if style is None else style
        if color is None:
            color = CYCLE[self._cycle % len(CYCLE)]
            self._cycle += 1
        self.lines.append(_Line(x, y, color, lw or linewidth or 1.5, style, marker, ms or markersize or 6.0, label))

    def axhline(self, y: float, *, color: Any = "black", lw: float = 1.0, ls: str = "-",
                label: str | None = None) -> None:
        self.hlines.append((float(y), color, lw, ls, label))

    def axhspan(self, y0: float, y1: float, *, color: Any = "C0", alpha: float = 0.3,
                label: str | None = None) -> None:
        self.spans.append((float(y0), float(y1), color, alpha, label))

    def imshow(self, data: np.ndarray, *, extent: tuple[float, float, float, float], origin: str = "upper"
               ) -> AxesImage:
        """Shown with viridis between its minimum and maximum, filling the extent (matplotlib's aspect="auto",
        interpolation="nearest")."""
        image = AxesImage(data, extent, origin)
        self.images.append(image)
        return image

    def add_patch(self, patch: Rectangle) -> None:
        self.patches.append(patch)

    def note(self, text: str) -> None:
        """A message in the middle of the panel (where there is nothing to plot)."""
        self.notes.append(text)

    def set_title(self, text: str, fontsize: Any = None) -> None:
        self.title, self.title_pt = text, _points(fontsize, TITLE_PT)

    def set_xlabel(self, text: str, fontsize: Any = None) -> None:
        self.xlabel, self.xlabel_pt = text, _points(fontsize)

    def set_ylabel(self, text: str, fontsize: Any = None) -> None:
        self.ylabel, self.ylabel_pt = text, _points(fontsize)

    def tick_params(self, labelsize: Any = None) -> None:
        self.tick_pt = _points(labelsize)

    def set_xlim(self, lo: float, hi: float) -> None:
        self.xlim = (float(lo), float(hi))

    def set_ylim(self, lo: float, hi: float) -> None:
        self.ylim = (float(lo), float(hi))

    def set_yscale(self, scale: str) -> None:
        if scale not in ("linear", "log"):
            raise ValueError(f"scale must be 'linear' or 'log', got {scale!r}")
        self.yscale = scale

    def set_aspect(self, aspect: str) -> None:
        self.equal = aspect == "equal"

    def set_visible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def legend(self, loc: str = "best", fontsize: Any = None) -> None:
        self.legend_spec = (loc, _points(fontsize))

    def twinx(self) -> Axes:
        twin = Axes(self.fig, self.rect)
        twin.right, twin.twin = True, True
        twin._cycle = len(self.lines)
        twin.share_x = self.share_x
        self.share_x.append(twin)
        self.fig.axes.append(twin)
        return twin

    # -- limits and transforms ----------------------------------------------------------------------------

    def _y_of(self, y: np.ndarray) -> np.ndarray:
        if self.yscale == "log":
            with np.errstate(all="ignore"):
                return np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
        return y

    def _data_x(self) -> list[np.ndarray]:
        out = [line.x for line in self.lines]
        out += [np.array(im.extent[:2]) for im in self.images]
        out += [np.array([p.x, p.x + p.width]) for p in self.patches]
        return out

    def _data_y(self) -> list[np.ndarray]:
        out = [self._y_of(line.y) for line in self.lines]
        out += [self._y_of(np.array([h[0]])) for h in self.hlines]
        out += [self._y_of(np.array(s[:2])) for s in self.spans]
        out += [np.array(im.extent[2:]) for im in self.images]
        out += [np.array([p.y, p.y + p.height]) for p in self.patches]
        return out

    @staticmethod
    def _limits(values: list[np.ndarray], fixed: tuple[float, float] | None, tight: bool) -> tuple[float, float]:
        if fixed is not None:
            return fixed
        finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
        if finite.size == 0:
            return 0.0, 1.0
        lo, hi = float(finite.min()), float(finite.max())
        if hi == lo:
            pad = abs(lo) * 0.05 if lo else 0.5
            return lo - pad, hi + pad
        pad = 0.0 if tight else MARGIN * (hi - lo)
        return lo - pad, hi + pad

    def x_limits(self) -> tuple[float, float]:
        group = self.share_x
        fixed = next((a.xlim for a in group if a.xlim is not None), None)
        tight = any(a.images or a.patches for a in group)
        return self._limits([v for a in group for v in a._data_x()], fixed, tight)

    def y_limits(self) -> tuple[float, float]:
        group = self.share_y
        fixed = next((a.ylim for a in group if a.ylim is not None), None)
        if fixed is not None and self.yscale == "log":
            fixed = (math.log10(fixed[0]), math.log10(fixed[1]))
        tight = any(a.images or a.patches for a in group)
        return self._limits([v for a in group for v in a._data_y()], fixed, tight)


class Figure:
    """A figure of width x height inches; margins (left, right, bottom, top) in inches, or matplotlib's
    subplots_adjust fractions."""

    def __init__(self, width: float, height: float, *, margins: tuple[float, float, float, float] | None = None):
        self.width, self.height = float(width), float(height)
        self.params = {"left": 0.125, "right": 0.9, "bottom": 0.11, "top": 0.88, "wspace": 0.2, "hspace": 0.2}
        if margins is not None:
            left, right, bottom, top = margins
            self.params.update(left=left / width, right=1 - right / width, bottom=bottom / height,
                               top=1 - top / height)
        self.axes: list[Axes] = []
        self.suptitle_text: str | None = None
        self.suptitle_pt = TITLE_PT
        self.colorbars: list[tuple[AxesImage, Axes]] = []

    def subplots_adjust(self, **kwargs: float) -> None:
        self.params.update({k: float(v) for k, v in kwargs.items() if v is not None})

    def subplots(self, nrows: int = 1, ncols: int = 1, *, sharex: bool = False, sharey: bool = False,
                 squeeze: bool = True) -> Any:
        p = self.params
        cell_w = (p["right"] - p["left"]) / (ncols + p["wspace"] * (ncols - 1))
        cell_h = (p["top"] - p["bottom"]) / (nrows + p["hspace"] * (nrows - 1))
        grid = np.empty((nrows, ncols), dtype=object)
        for r in range(nrows):
            for c in range(ncols):
                left = p["left"] + c * cell_w * (1 + p["wspace"])
                top = p["top"] - r * cell_h * (1 + p["hspace"])
                grid[r, c] = Axes(self, (left, top - cell_h, left + cell_w, top))
                self.axes.append(grid[r, c])
        if sharex:
            for c in range(ncols):
                column = list(grid[:, c])
                for r, ax in enumerate(column):
                    ax.share_x = column
                    ax.hide_xticklabels = r < nrows - 1
        if sharey:
            for r in range(nrows):
                row = list(grid[r, :])
                for c, ax in enumerate(row):
                    ax.share_y = row
                    ax.hide_yticklabels = c > 0
        if not squeeze:
            return grid
        if nrows == ncols == 1:
            return grid[0, 0]
        return grid.ravel() if 1 in (nrows, ncols) else grid

    def suptitle(self, text: str, fontsize: Any = None) -> None:
        self.suptitle_text, self.suptitle_pt = text, _points(fontsize, TITLE_PT)

    def colorbar(self, image: AxesImage, ax: Axes, shrink: float = 1.0) -> None:
        """A vertical colour bar right of `ax`, in a sixth of its width (taken from it)."""
        left, bottom, right, top = ax.rect
        width = right - left
        ax.rect = (left, bottom, right - 0.15 * width, top)
        height = (top - bottom) * shrink
        middle = (top + bottom) / 2
        bar = Axes(self, (right - 0.1 * width, middle - height / 2, right - 0.05 * width, middle + height / 2))
        bar.right = True
        self.axes.append(bar)
        self.colorbars.append((image, bar))

    # -- drawing ------------------------------------------------------------------------------------------

    def render(self) -> Image.Image:
        w, h = round(self.width * DPI * SCALE), round(self.height * DPI * SCALE)
        canvas = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(canvas)
        bars = {id(bar): image for image, bar in self.colorbars}
        for ax in self.axes:
            if ax.visible:
                _Painter(canvas, draw, ax, w, h, bars.get(id(ax))).paint()
        if self.suptitle_text:
            font = _font(self.suptitle_pt)
            draw.text((w / 2, _px(4)), self.suptitle_text, fill="black", font=font, anchor="ma")
        return canvas.reduce(SCALE)

    def savefig(self, path: Path | str) -> None:
        self.render().save(path, format="png", compress_level=1)


class _Painter:
    """Draws one Axes onto the figure's canvas."""

    def __init__(self, canvas: Image.Image, draw: ImageDraw.ImageDraw, ax: Axes, w: int, h: int,
                 colorbar: AxesImage | None):
        self.canvas, self.draw, self.ax, self.colorbar = canvas, draw, ax, colorbar
        left, bottom, right, top = ax.rect
        self.x0, self.x1 = left * w, right * w
        self.y0, self.y1 = (1 - top) * h, (1 - bottom) * h  # pixel rows: y0 the top edge
        if colorbar is not None:
            self.xl, self.yl = (0.0, 1.0), (colorbar.vmin, colorbar.vmax if colorbar.vmax > colorbar.vmin
                                             else colorbar.vmin + 1)
        else:
            self.xl, self.yl = ax.x_limits(), ax.y_limits()
        if ax.equal:  # shrink the box so that one unit is as long along x as along y
            sx = (self.x1 - self.x0) / abs(self.xl[1] - self.xl[0])
            sy = (self.y1 - self.y0) / abs(self.yl[1] - self.yl[0])
            s = min(sx, sy)
            cx, cy = (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2
            half_w, half_h = s * abs(self.xl[1] - self.xl[0]) / 2, s * abs(self.yl[1] - self.yl[0]) / 2
            self.x0, self.x1, self.y0, self.y1 = cx - half_w, cx + half_w, cy - half_h, cy + half_h

    def px(self, x: np.ndarray) -> np.ndarray:
        return self.x0 + (x - self.xl[0]) / (self.xl[1] - self.xl[0]) * (self.x1 - self.x0)

    def py(self, y: np.ndarray) -> np.ndarray:
        return self.y1 - (y - self.yl[0]) / (self.yl[1] - self.yl[0]) * (self.y1 - self.y0)

    def paint(self) -> None:
        ax = self.ax
        box = (round(self.x0), round(self.y0), round(self.x1), round(self.y1))
        # the panel's contents are drawn on a layer of its size and pasted: clipped to the frame
        layer = Image.new("RGBA", (max(1, box[2] - box[0]), max(1, box[3] - box[1])), (0, 0, 0, 0))
        pen = ImageDraw.Draw(layer)
        ox, oy = box[0], box[1]
        if self.colorbar is not None:
            ramp = viridis(np.linspace(1, 0, layer.size[1]))[:, None, :].repeat(layer.size[0], axis=1)
            layer.paste(Image.fromarray(ramp, "RGB"))
        for image in ax.images:
            self._image(layer, image, ox, oy)
        for y0, y1, color, alpha, _ in ax.spans:
            top, bottom = self.py(ax._y_of(np.array([y1, y0]))) - oy
            if not (math.isfinite(top) and math.isfinite(bottom)):  # a band at or below 0 on a log axis
                continue
            top, bottom = (float(np.clip(v, -1, layer.size[1] + 1)) for v in (top, bottom))
            shade = Image.new("RGBA", layer.size, (*rgb(color), 0))
            ImageDraw.Draw(shade).rectangle((0, top, layer.size[0], bottom), fill=(*rgb(color), round(255 * alpha)))
            layer.alpha_composite(shade)
        for y, color, lw, ls, _ in ax.hlines:
            row = float(self.py(ax._y_of(np.array([y])))[0]) - oy
            self._polyline(pen, np.array([0.0, layer.size[0]]), np.array([row, row]), color, lw, ls)
        for patch in ax.patches:
            xs = np.clip(self.px(np.array([patch.x, patch.x + patch.width])) - ox, -10, layer.size[0] + 10)
            ys = np.clip(self.py(np.array([patch.y, patch.y + patch.height])) - oy, -10, layer.size[1] + 10)
            pen.rectangle((xs.min(), ys.min(), xs.max(), ys.max()), outline=rgb(patch.color),
                          width=max(1, round(_px(patch.lw))))
        for line in ax.lines:
            xs, ys = self.px(line.x) - ox, self.py(ax._y_of(line.y)) - oy
            if line.ls not in ("", "None", "none"):
                self._polyline(pen, xs, ys, line.color, line.lw, line.ls)
            if line.marker:
                radius = _px(line.ms * (0.25 if line.marker == "." else 0.5))
                inside = np.isfinite(xs) & np.isfinite(ys) & (np.abs(xs) < 1e5) & (np.abs(ys) < 1e5)
                for x, y in zip(xs[inside].tolist(), ys[inside].tolist()):  # points far outside: not drawn
                    pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=rgb(line.color))
        self.canvas.paste(layer, box[:2], layer)
        if not ax.twin:
            self.draw.rectangle(box, outline="black", width=max(1, round(_px(0.8))))
        for text in ax.notes:
            self.draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fill="black",
                           font=_font(FONT_PT), anchor="mm")
        self._axis_x(box)
        self._axis_y(box)
        if ax.title:
            self.draw.text(((box[0] + box[2]) / 2, box[1] - _px(6)), ax.title, fill="black",
                           font=_font(ax.title_pt), anchor="md")
        if ax.legend_spec is not None:
            self._legend(box)

    def _image(self, layer: Image.Image, image: AxesImage, ox: float, oy: float) -> None:
        x0, x1, y0, y1 = image.extent
        span = image.vmax - image.vmin
        colours = viridis((image.data - image.vmin) / (span if span > 0 else 1.0))
        if image.origin == "lower":
            colours = colours[::-1]
        picture = Image.fromarray(np.ascontiguousarray(colours), "RGB")
        left, right = sorted(self.px(np.array([x0, x1])) - ox)
        top, bottom = sorted(self.py(np.array([y0, y1])) - oy)
        size = (max(1, round(right - left)), max(1, round(bottom - top)))
        layer.paste(picture.resize(size, Image.Resampling.NEAREST), (round(left), round(top)))

    def _polyline(self, pen: ImageDraw.ImageDraw, xs: np.ndarray, ys: np.ndarray, color: Any, lw: float,
                  ls: str) -> None:
        """A line through the points, broken where one is not finite; dashed for '--' and ':'."""
        width = max(1, round(_px(lw)))
        fill = rgb(color)
        ok = np.isfinite(xs) & np.isfinite(ys)
        # very far points (log of a huge range, a mistaken limit) would overflow Pillow's integer coordinates
        xs, ys = np.clip(xs, -1e5, 1e5), np.clip(ys, -1e5, 1e5)
        start = 0
        for stop in [*np.flatnonzero(~ok), len(xs)]:
            run = list(zip(xs[start:stop].tolist(), ys[start:stop].tolist()))
            start = stop + 1
            if len(run) < 2:
                continue
            if ls in ("-", "solid"):
                pen.line(run, fill=fill, width=width, joint="curve")
            else:
                on, off = (DASH if ls in ("--", "dashed") else (1.0, 1.65))
                self._dashes(pen, run, fill, width, on * width, off * width)

    @staticmethod
    def _dashes(pen: ImageDraw.ImageDraw, run: list[tuple[float, float]], fill, width: int, on: float,
                off: float) -> None:
        phase, drawing = 0.0, True
        for (xa, ya), (xb, yb) in zip(run[:-1], run[1:]):
            length = math.hypot(xb - xa, yb - ya)
            pos = 0.0
            while pos < length:
                left = (on if drawing else off) - phase
                step = min(left, length - pos)
                if drawing:
                    f0, f1 = pos / length, (pos + step) / length
                    pen.line([(xa + (xb - xa) * f0, ya + (yb - ya) * f0), (xa + (xb - xa) * f1, ya + (yb - ya) * f1)],
                             fill=fill, width=width)
                pos += step
                phase += step
                if phase >= (on if drawing else off) - 1e-9:
                    phase, drawing = 0.0, not drawing

    def _ticks(self, lo: float, hi: float, length_px: float, log: bool) -> tuple[np.ndarray, list[str]]:
        a, b = min(lo, hi), max(lo, hi)
        if log:
            ticks = _log_ticks(a, b)
            return ticks, [f"{10.0 ** t:g}" for t in ticks]  # one value each: 0.1, 1, 10, 200
        target = int(min(8, max(3, round(length_px / _px(54)))))
        ticks = nice_ticks(a, b, target)
        return ticks, tick_labels(ticks)

    def _axis_x(self, box: tuple[int, int, int, int]) -> None:
        ax = self.ax
        if ax.twin or self.colorbar is not None:  # a twin's x axis is its host's; a colour bar has none
            return
        ticks, labels = self._ticks(*self.xl, box[2] - box[0], False)
        font = _font(ax.tick_pt)
        length = _px(TICK_PT)
        bottom = box[3]
        for t, label in zip(ticks, labels):
            x = float(self.px(np.array([t]))[0])
            self.draw.line([(x, bottom), (x, bottom + length)], fill="black", width=max(1, round(_px(0.8))))
            if not ax.hide_xticklabels:
                self.draw.text((x, bottom + length + _px(2)), label, fill="black", font=font, anchor="ma")
        if ax.xlabel and not ax.hide_xticklabels:
            y = bottom + length + _px(4) + _px(ax.tick_pt) * 1.2
            self.draw.text(((box[0] + box[2]) / 2, y), ax.xlabel, fill="black", font=_font(ax.xlabel_pt),
                           anchor="ma")

    def _axis_y(self, box: tuple[int, int, int, int]) -> None:
        ax = self.ax
        ticks, labels = self._ticks(*self.yl, box[3] - box[1], ax.yscale == "log")
        font = _font(ax.tick_pt)
        length = _px(TICK_PT)
        right = ax.right
        edge = box[2] if right else box[0]
        widest = 0.0
        for t, label in zip(ticks, labels):
            y = float(self.py(np.array([t]))[0])
            end = edge + length if right else edge - length
            self.draw.line([(edge, y), (end, y)], fill="black", width=max(1, round(_px(0.8))))
            if ax.hide_yticklabels:
                continue
            self.draw.text((end + _px(2) if right else end - _px(2), y), label, fill="black", font=font,
                           anchor="lm" if right else "rm")
            widest = max(widest, font.getlength(label))
        if ax.ylabel and not ax.hide_yticklabels:
            font = _font(ax.ylabel_pt)
            left, top, r, b = font.getbbox(ax.ylabel)
            text = Image.new("L", (max(1, r - left), max(1, b - top)), 0)
            ImageDraw.Draw(text).text((-left, -top), ax.ylabel, fill=255, font=font)
            text = text.rotate(-90 if right else 90, expand=True)
            gap = length + _px(4) + widest + _px(3)
            x = edge + gap if right else edge - gap - text.size[0]
            y = (box[1] + box[3]) / 2 - text.size[1] / 2
            self.canvas.paste((0, 0, 0), (round(x), round(y)), text)

    def _legend(self, box: tuple[int, int, int, int]) -> None:
        ax = self.ax
        entries = [(ln.label, ln) for ln in ax.lines if ln.label]
        entries += [(h[4], ("hline", h)) for h in ax.hlines if h[4]]
        entries += [(s[4], ("span", s)) for s in ax.spans if s[4]]
        if not entries:
            return
        loc, points = ax.legend_spec
        font = _font(points)
        pad, sample = _px(4), _px(20)
        line_h = _px(points) * 1.4
        width = pad * 3 + sample + max(font.getlength(label) for label, _ in entries)
        height = pad * 2 + line_h * len(entries)
        if loc == "best":
            loc = self._emptiest_corner(box, width, height)
        left = box[0] + pad if "left" in loc else box[2] - pad - width
        top = box[1] + pad if "upper" in loc else box[3] - pad - height
        self.draw.rectangle((left, top, left + width, top + height), fill="white", outline=(204, 204, 204),
                            width=max(1, round(_px(0.8))))
        for k, (label, item) in enumerate(entries):
            y = top + pad + line_h * (k + 0.5)
            x = left + pad
            if isinstance(item, _Line):
                if item.ls not in ("", "None", "none"):
                    self._polyline(self.draw, np.array([x, x + sample]), np.array([y, y]), item.color, item.lw,
                                   item.ls)
                if item.marker:
                    r = _px(item.ms * (0.25 if item.marker == "." else 0.5))
                    self.draw.ellipse((x + sample / 2 - r, y - r, x + sample / 2 + r, y + r), fill=rgb(item.color))
            elif item[0] == "hline":
                _, (_, color, lw, ls, _) = item
                self._polyline(self.draw, np.array([x, x + sample]), np.array([y, y]), color, lw, ls)
            else:
                _, (_, _, color, alpha, _) = item
                c = np.array(rgb(color), dtype=np.float64)
                shade = tuple(int(v) for v in np.round(255 - alpha * (255 - c)))
                self.draw.rectangle((x, y - line_h * 0.3, x + sample, y + line_h * 0.3), fill=shade)
            self.draw.text((x + sample + pad, y), label, fill="black", font=font, anchor="lm")

    def _emptiest_corner(self, box: tuple[int, int, int, int], width: float, height: float) -> str:
        """The corner whose legend-sized area covers the fewest plotted points (matplotlib's 'best', simply)."""
        points = [(self.px(ln.x), self.py(self.ax._y_of(ln.y))) for ln in self.ax.lines]
        best, fewest = "upper right", None
        for loc in ("upper right", "upper left", "lower left", "lower right"):
            left = box[0] if "left" in loc else box[2] - width
            top = box[1] if "upper" in loc else box[3] - height
            count = sum(int(((xs >= left) & (xs <= left + width) & (ys >= top) & (ys <= top + height)).sum())
                        for xs, ys in points)
            if fewest is None or count < fewest:
                best, fewest = loc, count
        return best


def new_figure(width: float = 10, height: float = 4, *, margins: Sequence[float] | None = None) -> Figure:
    """A figure of width x height inches; `margins` (left, right, bottom, top) in inches."""
    return Figure(width, height, margins=tuple(margins) if margins is not None else None)
