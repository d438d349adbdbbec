"""Batched affine warp against scikit-image's `warp(img, AffineTransform(matrix=M))`
(PyStack3D's registration_transformation), and the stack's valid region."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpustack.kernels.warp import (
    shift_images,
    translation_matrices,
    valid_mask,
    valid_region,
    warp_affine,
)

skt = pytest.importorskip("skimage.transform")

MODES = ["constant", "edge", "reflect", "symmetric", "wrap"]
SHAPES = [(33, 47), (64, 64)]


def _about_centre(shape, **kw) -> np.ndarray:
    """skimage AffineTransform(**kw) about the image centre, (3, 3) output -> input."""
    h, w = shape
    c = np.array([[1, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1.0]])
    return c @ skt.AffineTransform(**kw).params @ np.linalg.inv(c)


def _shifts(*dxdy) -> np.ndarray:
    return translation_matrices(torch.tensor(dxdy, dtype=torch.float64)).numpy()


def _matrices(shape) -> np.ndarray:
    h, w = shape
    return np.stack([
        _about_centre(shape, translation=(0.37, -1.61)),  # subpixel translations
        _about_centre(shape, translation=(-2.75, 3.5)),
        _about_centre(shape, rotation=0.3, translation=(2.2, 1.1)),  # rotations
        _about_centre(shape, rotation=-2.0),
        _about_centre(shape, scale=(1.2, 0.8)),  # scalings
        _about_centre(shape, scale=(0.7, 0.7), translation=(0.4, -0.2)),
        _about_centre(shape, shear=0.25, scale=(0.9, 1.1), translation=(-3.3, 0.4)),
        # far outside, and several periods of the extension: modes at any distance
        _about_centre(shape, translation=(2.3 * w + 0.3, -1.7 * h - 0.6)),
        _about_centre(shape, rotation=0.05, scale=(3.1, 2.9)),
    ])


def _reference(img: np.ndarray, matrix: np.ndarray, mode: str, order: int = 1):
    # PyStack3D's call (float64 image; its order=None is bilinear for float input)
    tform = skt.AffineTransform(matrix=matrix)
    return skt.warp(img.astype(float), tform, order=order, mode=mode, cval=np.nan,
                    preserve_range=True)


def _warp(img: np.ndarray, mats: np.ndarray, device, **kw) -> np.ndarray:
    images = torch.from_numpy(np.repeat(img[None], len(mats), axis=0)).to(device)
    out = warp_affine(images, torch.from_numpy(mats).to(device), **kw)
    return out.cpu().numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_bilinear_matches_skimage(device, shape, mode):
    img = np.random.default_rng(3).uniform(50, 150, size=shape).astype(np.float32)
    mats = _matrices(shape)
    got = _warp(img, mats, device, mode=mode)
    for k, m in enumerate(mats):
        want = _reference(img, m, mode)
        # NaN positions identical, no boundary band: skimage's bilinear reads its four
        # neighbours with cval (NaN) outside the image, so exactly the positions outside
        # the closed [0, W-1] x [0, H-1] are NaN; so here (the one difference, positions
        # less than 1e-6 px outside, is not met by these transforms)
        np.testing.assert_array_equal(np.isnan(got[k]), np.isnan(want), f"matrix {k}")
        assert mode == "constant" or not np.isnan(want).any()
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=0, equal_nan=True,
                                   err_msg=f"matrix {k}")


@pytest.mark.parametrize("mode", MODES)
def test_nearest_matches_skimage_ties_included(device, mode):
    shape = (33, 47)
    h, w = shape
    img = np.random.default_rng(4).uniform(50, 150, size=shape).astype(np.float32)
    ties = [_shifts([t, t / 2])[0] for t in (-2 * w - 0.5, -2.5, 0.5, w + 0.5)]
    ties.append(np.array([[1.2, 0, -6.3], [0, 0.8, 6.3], [0, 0, 1.0]]))  # some x.5
    ties.append(np.array([[-1.0, 0, w - 0.5], [0, 2.0, -h + 0.5], [0, 0, 1.0]]))
    mats = np.concatenate([_matrices(shape), np.stack(ties)])
    got = _warp(img, mats, device, mode=mode, order=0)
    for k, m in enumerate(mats):  # the same pixel picked: equal values
        want = _reference(img, m, mode, order=0).astype(np.float32)
        np.testing.assert_array_equal(got[k], want, err_msg=f"matrix {k}")


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_identity_and_integer_shifts_are_exact(device, mode, order):
    img = np.random.default_rng(5).uniform(0, 65535, size=(33, 47)).astype(np.float32)
    got = _warp(img, _shifts([0.0, 0.0], [2.0, -3.0]), device, mode=mode, order=order)
    np.testing.assert_array_equal(got[0], img)  # bit for bit, no NaN on the border
    np.testing.assert_array_equal(got[1][3:, :-2], img[:-3, 2:])  # in[y - 3, x + 2]
    assert np.isnan(got[1][:3]).all() == (mode == "constant")


def test_tolerance_at_the_border(device):
    """Intentional difference: a position < 1e-6 px outside the image gives the border
    value here (skimage: NaN), so rounding noise in a matrix never puts NaN there."""
    img = np.random.default_rng(6).uniform(1, 2, size=(9, 11)).astype(np.float32)
    got = _warp(img, _shifts([1e-9, -1e-9], [1e-4, 0.0]), device)
    assert not np.isnan(got[0]).any()
    assert np.isnan(got[1][:, -1]).all() and not np.isnan(got[1][:, :-1]).any()


def test_fill_value(device):
    got = _warp(np.ones((8, 9), np.float32), _shifts([2.5, 0.0]), device, fill=-7.0)
    np.testing.assert_array_equal(got[0][:, -3:], -7.0)
    np.testing.assert_array_equal(got[0][:, :-3], 1.0)


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("mode", ["constant", "wrap"])
def test_batched_equals_one_by_one(device, mode, order):
    shape = (33, 47)
    rng = np.random.default_rng(7)
    images = torch.from_numpy(rng.uniform(50, 150, size=(9, *shape)).astype(np.float32))
    images = images.to(device)
    mats = torch.from_numpy(_matrices(shape)).to(device)
    batched = warp_affine(images, mats, mode=mode, order=order).cpu().numpy()
    for k in range(len(mats)):
        one = warp_affine(images[k:k + 1], mats[k:k + 1], mode=mode, order=order)
        np.testing.assert_array_equal(batched[k], one[0].cpu().numpy())


@pytest.mark.parametrize("mode", ["edge", "reflect", "symmetric", "wrap"])
def test_bicubic_extends_like_numpy_pad(device, mode):
    """Bicubic is grid_sample's (a = -0.75; not skimage's order 3, no parity with it),
    but its taps outside the image follow the mode: it equals grid_sample on the
    numpy.pad-extended image."""
    shape, pad = (17, 23), 40
    img = np.random.default_rng(8).uniform(0, 1, size=shape)  # float64: tight compare
    mats = _matrices(shape)[:-2]  # positions within `pad` px of the image
    got = _warp(img, mats, device, mode=mode, order=3)
    big = torch.from_numpy(np.pad(img, pad, mode=mode))[None, None]
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    for k, m in enumerate(mats):
        px = m[0, 0] * xs + m[0, 1] * ys + m[0, 2] + pad
        py = m[1, 0] * xs + m[1, 1] * ys + m[1, 2] + pad
        grid = np.stack([px * 2 / (big.shape[3] - 1) - 1,
                         py * 2 / (big.shape[2] - 1) - 1], axis=-1)
        want = F.grid_sample(big, torch.from_numpy(grid)[None], mode="bicubic",
                             padding_mode="border", align_corners=True)[0, 0].numpy()
        np.testing.assert_allclose(got[k], want, atol=1e-9, err_msg=f"matrix {k}")


def test_large_image_precision(device):
    """float64 geometry, float32 sampling: sub-pixel accurate on a wide image (on a
    ramp, value = x, so value errors are position errors)."""
    w = 4096
    img = np.tile(np.arange(w, dtype=np.float32), (4, 1))
    mats = _shifts([0.3, 0.0], [-1234.37, 0.0], [2000.123, 0.5])
    got = _warp(img, mats, device, mode="edge")
    for k, m in enumerate(mats):
        want = np.clip(np.arange(w) + m[0, 2], 0, w - 1)
        np.testing.assert_allclose(got[k][0], want, atol=5e-4)  # px


def test_bad_arguments():
    img = torch.zeros(2, 5, 6)
    eye = translation_matrices(torch.zeros(2, 2))
    with pytest.raises(ValueError):
        warp_affine(img, eye, mode="mirror")
    with pytest.raises(ValueError):
        warp_affine(img, eye, order=2)
    with pytest.raises(TypeError):
        warp_affine(img.to(torch.int32), eye)
    with pytest.raises(ValueError):
        warp_affine(img, eye[:1])
    with pytest.raises(ValueError):
        valid_region(torch.zeros(3, 2, 3), (5, 6))


def test_valid_region_translations_exact(device):
    h, w = 33, 47
    shifts = np.random.default_rng(9).uniform(-3.5, 2.2, size=(20, 2))
    shifts[0], shifts[1] = (-3.5, -3.5), (2.2, 2.2)
    mats = translation_matrices(torch.from_numpy(shifts).to(device))
    # 0 <= x + dx <= W - 1 for every dx in [-3.5, 2.2]: x in [3.5, W - 3.2], i.e. the
    # columns 4 .. W - 4; rows likewise
    assert valid_region(mats, (h, w)) == (slice(4, h - 3), slice(4, w - 3))
    full = (slice(0, h), slice(0, w))
    assert valid_region(translation_matrices(torch.zeros(3, 2)), (h, w)) == full
    away = translation_matrices(torch.tensor([[0.0, h + 1.0]]))
    assert valid_region(away, (h, w)) == (slice(0, 0), slice(0, 0))


def _brute_force_area(mask: np.ndarray) -> int:
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), np.int64)
    ii[1:, 1:] = mask.cumsum(0).cumsum(1)
    c0, c1 = np.triu_indices(w + 1, 1)
    best = 0
    for r0 in range(h):
        for r1 in range(r0 + 1, h + 1):
            count = ii[r1, c1] - ii[r0, c1] - ii[r1, c0] + ii[r0, c0]
            area = (r1 - r0) * (c1 - c0)
            full = count == area
            if full.any():
                best = max(best, int(area[full].max()))
    return best


def test_valid_region_rotations_against_skimage(device):
    shape = (21, 26)
    rng = np.random.default_rng(10)
    angles, shifts = rng.uniform(-0.1, 0.1, 6), rng.uniform(-2, 2, (6, 2))
    mats = np.stack([_about_centre(shape, rotation=a, translation=t)
                     for a, t in zip(angles, shifts, strict=True)])
    finite = np.ones(shape, bool)  # what PyStack3D does: warp all-ones, every slice
    for m in mats:
        finite &= np.isfinite(_reference(np.ones(shape), m, "constant"))
    mats_t = torch.from_numpy(mats).to(device)
    np.testing.assert_array_equal(valid_mask(mats_t, shape).cpu().numpy(), finite)
    rows, cols = valid_region(mats_t, shape)
    assert finite[rows, cols].all()
    area = (rows.stop - rows.start) * (cols.stop - cols.start)
    assert area == _brute_force_area(finite)  # maximal


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric", "wrap"])
@pytest.mark.parametrize("order", [0, 1])
def test_shift_images_equals_warp_affine(device, mode, order):
    from gpustack.kernels.warp import shift_images, translation_matrices

    rng = np.random.default_rng(11)
    images = torch.tensor(rng.uniform(0, 100, (4, 21, 33)), dtype=torch.float32, device=device)
    # subpixel, whole-pixel, within-tolerance and far-outside (several image sizes) shifts
    shifts = torch.tensor([[2.3, -1.6], [-4.0, 3.0], [5 - 1e-9, 0.2], [71.4, -47.8]], dtype=torch.float64)
    expected = warp_affine(images, translation_matrices(shifts).to(device), mode=mode, order=order)
    got = shift_images(images, shifts.to(device), mode=mode, order=order)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    torch.testing.assert_close(got.nan_to_num(), expected.nan_to_num(), rtol=0, atol=1e-4 * 100)
    # whole-pixel shifts move values exactly
    whole = shift_images(images[:1], torch.tensor([[3.0, -2.0]], dtype=torch.float64, device=device), mode=mode,
                         order=order)
    if mode == "constant":
        assert torch.equal(whole[0, 2:, :-3], images[0, :-2, 3:])


def test_warp_blocks_equals_warp_affine_for_equal_blocks_and_blends_between_centres(device):
    from gpustack.kernels.warp import translation_matrices, warp_blocks

    rng = np.random.default_rng(12)
    images = torch.tensor(rng.uniform(0, 100, (2, 40, 50)), dtype=torch.float32, device=device)
    shifts = torch.tensor([[1.5, -2.0], [0.3, 0.7]], dtype=torch.float64)
    m = translation_matrices(shifts).to(device)
    cy = torch.tensor([9.5, 29.5], device=device)
    cx = torch.tensor([12.0, 37.0], device=device)
    for mode in ("constant", "edge", "reflect", "symmetric", "wrap"):
        same = warp_blocks(images, m[:, None, None].expand(2, 2, 2, 3, 3), cy, cx, mode=mode)
        expected = warp_affine(images, m, mode=mode)
        assert torch.equal(same.isnan(), expected.isnan())
        torch.testing.assert_close(same.nan_to_num(), expected.nan_to_num(), rtol=0, atol=1e-3)
    # left blocks shift by +2 px in x, right blocks by 0: at a left centre column +2, at a right one 0,
    # halfway between +1 (a ramp image shows the displacement directly)
    ramp = torch.arange(50, dtype=torch.float32, device=device).expand(1, 40, 50).contiguous()
    grid = torch.eye(3, dtype=torch.float64, device=device).repeat(1, 2, 2, 1, 1)
    grid[:, :, 0, 0, 2] = 2.0
    out = warp_blocks(ramp, grid, cy, cx, mode="edge")
    np.testing.assert_allclose(out[0, 20, [12, 24, 37]].cpu().numpy(), [14.0, 24.0 + 2 * 13 / 25, 37.0], atol=1e-4)


@pytest.mark.parametrize("shift", [(12.3, -0.5), (-20.7, 3.2), (0.0, 0.0), (-1.0, 8.9), (3.5, -9.9)])
@pytest.mark.parametrize("mode", ["edge", "constant"])
def test_edge_blends_equal_the_gathers_even_beyond_the_slice(device, shift, mode):
    """The two-blend path of shift_images (edge and constant modes on the CPU) against its gather path, with
    shifts of more than the slice's size."""
    x = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(1)).to(device)
    shifts = torch.tensor([shift] * 3, dtype=torch.float64)
    blended = shift_images(x, shifts, mode=mode)
    gathered = shift_images(x, shifts, mode=mode, gather=True)
    assert torch.equal(blended.isnan(), gathered.isnan())
    torch.testing.assert_close(blended.nan_to_num(), gathered.nan_to_num(), rtol=0, atol=1e-6)
