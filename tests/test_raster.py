"""The reports' plotting: tick values and labels, colours, and where things land in the drawn image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gpustack.report.plotting import save
from gpustack.report.raster import DPI, Figure, Rectangle, nice_ticks, rgb, tick_labels, viridis

RED = (255, 0, 0)


def test_nice_ticks_and_their_labels():
    np.testing.assert_allclose(nice_ticks(-4.15, 87.15, 5), [0, 20, 40, 60, 80])
    np.testing.assert_allclose(nice_ticks(-0.55, 0.55, 5), [-0.5, -0.25, 0, 0.25, 0.5])
    np.testing.assert_allclose(nice_ticks(-0.55, 0.55, 4), [-0.5, 0, 0.5])
    np.testing.assert_allclose(nice_ticks(38000, 61000, 5), [40000, 45000, 50000, 55000, 60000])
    np.testing.assert_allclose(nice_ticks(38000, 61000, 4), [40000, 50000, 60000])
    assert tick_labels(np.array([-0.5, -0.25, 0.0, 0.25, 0.5])) == ["-0.50", "-0.25", "0.00", "0.25", "0.50"]
    assert tick_labels(np.array([0.0, 20000.0, 40000.0])) == ["0", "20000", "40000"]
    assert tick_labels(np.array([0.0, 0.5, 1.0])) == ["0.0", "0.5", "1.0"]
    assert tick_labels(np.array([1e-4, 2e-4])) == ["0.0001", "0.0002"]
    assert tick_labels(np.array([0.0, 5e6, 1e7])) == ["0", "5e+06", "1e+07"]


def test_colours():
    assert rgb("tab:red") == rgb("C3") == (214, 39, 40)
    assert rgb((1.0, 0.0, 0.0, 0.5)) == RED and rgb("grey") == (128, 128, 128)
    with pytest.raises(ValueError, match="unknown colour"):
        rgb("no such colour")
    assert tuple(viridis(np.array(0.0))) == (68, 1, 84) and tuple(viridis(np.array(1.0))) == (253, 231, 37)


def _one_panel(width=4.0, height=3.0):
    fig = Figure(width, height, margins=(0.5, 0.5, 0.5, 0.5))  # the panel: 50..350 x 50..250 px at 100 dpi
    return fig, fig.subplots()


def _is_red(px) -> bool:
    r, g, b = px[:3]
    return r > 200 and g < 120 and b < 120


def test_a_line_lands_where_its_data_are_and_is_clipped_to_the_frame():
    fig, ax = _one_panel()
    ax.plot([0, 10], [0, 10], color="red", lw=2)
    ax.plot([0, 10], [20, 20], color="red", lw=2)  # above the fixed limits: not drawn
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    img = np.asarray(fig.render())
    assert img.shape == (3 * DPI, 4 * DPI, 3)
    # the diagonal's middle: data (5, 5) -> pixel (200, 150)
    assert _is_red(img[150, 200]) and not _is_red(img[100, 200])
    assert not any(_is_red(px) for px in img[:48].reshape(-1, 3))  # nothing above the panel
    assert (img[50, 100:300] < 60).all()  # the frame's top edge is black


def test_nan_breaks_a_line_and_log_axes_space_decades_evenly():
    fig, ax = _one_panel()
    x = np.arange(11, dtype=float)
    y = np.where((x > 3) & (x < 7), np.nan, 5.0)
    ax.plot(x, y, color="red", lw=2)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    row = np.asarray(fig.render())[150]  # y = 5
    assert _is_red(row[80]) and _is_red(row[320]) and not _is_red(row[200])  # x = 1, 9 drawn; x = 5 not

    fig, ax = _one_panel()
    ax.set_yscale("log")
    ax.plot([0, 1, 2], [1, 10, 100], ".", color="red", ms=8)
    ax.set_ylim(1, 100)
    img = np.asarray(fig.render())
    rows = [r for r in range(50, 251) if _is_red(img[r, 200])]  # the middle point, x = 1: y = 10
    assert rows and abs(np.mean(rows) - 150) < 3


def test_image_origin_colour_bar_rectangle_twin_axes_and_legend(tmp_path):
    fig = Figure(6, 4, margins=(0.8, 0.8, 0.6, 0.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    data = np.zeros((4, 5))
    data[0, 0] = 1.0  # the first row is at the bottom with origin="lower"
    image = top.imshow(data, extent=(0, 5, 0, 4), origin="lower")
    fig.colorbar(image, ax=top, shrink=0.8)
    bottom.plot([0, 5], [0, 1], ".-", label="a line")
    bottom.axhline(0.5, color="grey", ls="--", label="a level")
    bottom.axhspan(0.2, 0.3, color="tab:orange", alpha=0.2, label="a band")
    bottom.add_patch(Rectangle((1, 0.1), 2, 0.5, color="red"))
    bottom.legend(loc="upper left", fontsize=8)
    twin = bottom.twinx()
    twin.plot([0, 5], [10, 0], color="tab:purple")
    twin.set_ylabel("iterations")
    top.set_title("a title")
    fig.suptitle("a figure")
    save(fig, tmp_path / "f.png")
    assert not (tmp_path / ".f.png.tmp").exists()
    img = np.asarray(Image.open(tmp_path / "f.png").convert("RGB"))
    assert img.shape == (400, 600, 3)
    left = 80
    top_edge = 50
    bottom_edge = round(top_edge + (400 - 110) / 2.2)  # two rows, hspace 0.2
    near_bottom_left = img[bottom_edge - 4, left + 4]
    np.testing.assert_allclose(near_bottom_left, viridis(np.array(1.0)), atol=2)  # data[0, 0], the maximum
    np.testing.assert_allclose(img[top_edge + 4, left + 4], viridis(np.array(0.0)), atol=2)


def test_reports_draw_without_matplotlib():
    """matplotlib's import alone took 0.3 s of every run: the reports no longer need it."""
    import subprocess
    import sys

    code = ("import sys; import gpustack.report.plotting, gpustack.report.stats, gpustack.report.background, "
            "gpustack.report.intensity, gpustack.report.registration, gpustack.report.destriping, "
            "gpustack.report.resampling; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_points_far_outside_fixed_limits_and_empty_or_all_nan_data_draw_nothing_and_do_not_fail():
    fig, ax = _one_panel()
    ax.plot([0, 1, 2], [1e12, -1e12, np.nan], ".-", color="red")
    ax.axhspan(-1e12, 1e12, color="tab:orange", alpha=0.2)
    ax.add_patch(Rectangle((-1e12, -1e12), 2e12, 2e12, color="tab:green"))
    ax.set_xlim(0, 2)
    ax.set_ylim(0, 1)
    ax2 = Figure(3, 2).subplots()
    ax2.plot([], [])
    ax2.plot([1.0, 2.0], [np.nan, np.nan])
    ax2.set_yscale("log")
    ax2.axhspan(-1, 0, label="nothing on a log axis")
    ax2.legend()
    img = np.asarray(fig.render())
    assert not any(_is_red(px) for px in img[:50].reshape(-1, 3))  # nothing drawn above the panel
    assert np.asarray(ax2.fig.render()).shape == (200, 300, 3)
