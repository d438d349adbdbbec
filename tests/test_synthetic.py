"""Synthetic stacks: known answers for every defect, the file layout, determinism and truth.json round-trips."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from gpustack.synthetic import (BAND, FIBICS_TAG, TRUTH_FILE, SyntheticSpec, SyntheticStack, generate,
                                parse_name)

SMALL = SyntheticSpec(n_slices=20, height=96, width=112)
QUANT = 0.51  # rounding to integers, plus float32 slack (one ulp is 0.004 near 65535)


def read(path) -> np.ndarray:
    return tifffile.imread(path).astype(np.float64)


def by_k(stack: SyntheticStack, channel: str = ".") -> dict[int, np.ndarray]:
    return {int(k): read(p) for k, p in zip(stack.kept, stack.files(channel))}


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory) -> SyntheticStack:
    return generate(tmp_path_factory.mktemp("default"), SyntheticSpec())


def test_files_names_and_deleted_slices(default_stack):
    st, n = default_stack, default_stack.spec.n_slices
    deleted = [k for k in range(n) if k % 2 == 1 and k >= 0.66 * n]
    assert len(deleted) == 10
    assert st.kept.tolist() == [k for k in range(n) if k not in deleted]
    on_disk = sorted(p.name for p in st.root.glob("*.tif"))
    assert on_disk == [p.name for p in st.files()] and len(on_disk) == n - len(deleted)
    for p, k, z in zip(st.files(), st.kept, st.z):
        k2, z2 = parse_name(p.name)
        assert k2 == k and z2 == pytest.approx(z, abs=1e-12) and z == pytest.approx(k * 0.01)
    assert st.files()[3].name == "slice_0003_z=0.0300um.tif"
    assert (st.root / TRUTH_FILE).is_file()
    assert not list(st.root.glob(".*.part"))


def test_clean_slice_equals_truth_and_band(tmp_path):
    spec = SMALL.without_defects()
    st = generate(tmp_path, spec)
    rows, cols = slice(st.spec.height - st.area[3], st.spec.height - st.area[2]), slice(st.area[0], st.area[1])
    band = round(BAND * st.scale)
    for k, img in by_k(st).items():
        t = st.truth(st.z[list(st.kept).index(k)])
        assert np.abs(img[rows, cols] - t).max() <= QUANT
        assert np.array_equal(st.crop(img), img[rows, cols])
        mask = np.ones(img.shape, bool)
        mask[rows, cols] = False
        assert np.all(img[mask] == band)
        assert t.std() > 0.05 * st.scale  # there is content to compare
    # asymmetric band: pad at left/bottom, pad // 2 at right/top (PyStack3D area, origin bottom-left)
    pad = spec.pad_px
    assert st.area == [pad, spec.width - pad // 2, pad, spec.height - pad // 2]
    assert rows == slice(pad // 2, spec.height - pad)


def test_float32_is_unscaled_truth(tmp_path):
    st = generate(tmp_path, SMALL.without_defects(dtype="float32", n_slices=4))
    assert st.scale == 1.0
    img = tifffile.imread(st.files()[2])
    assert img.dtype == np.float32
    assert np.array_equal(st.crop(img), st.truth(st.z[2]))


def test_uint8(tmp_path):
    st = generate(tmp_path, SMALL.without_defects(dtype="uint8", n_slices=3))
    img = tifffile.imread(st.files()[1])
    assert img.dtype == np.uint8 and st.scale == pytest.approx(0.75 * 255)
    assert np.abs(st.crop(img.astype(float)) - st.truth(st.z[1])).max() <= QUANT


def test_shift_convention_integer():
    st_spec = SMALL.without_defects()
    from gpustack.synthetic import _Model

    st = SyntheticStack("unused", _Model(st_spec))
    a = st.truth(0.05, cropped=False)
    b = st.truth(0.05, cropped=False, shift=(3.0, -2.0))  # right by 3, up by 2 rows
    # observed[i, j] = truth[i - dy, j - dx]
    assert np.allclose(b[10:-10, 10:-10], a[12:-8, 7:-13], atol=1e-2)
    assert np.abs(b - a).max() > 0.2 * st.scale


def test_shifted_slices_equal_truth_with_offset(tmp_path):
    spec = SMALL.without_defects(shift_range=(0.07, 0.23), max_shift=4.0)
    st = generate(tmp_path, spec)
    block = [k for k in range(20) if 0.07 * 20 <= k < 0.23 * 20]
    assert block == [2, 3, 4]
    moved = np.flatnonzero(np.any(st.shifts != 0, axis=1)).tolist()
    assert moved == block
    dx, dy = st.shifts[block[0]]
    assert np.all(st.shifts[block] == (dx, dy))
    assert 1.2 <= abs(dx) <= 4 and 1.2 <= abs(dy) <= 4
    assert dx % 1 != 0 and dy % 1 != 0  # subpixel
    data = by_k(st)
    for k in block:
        z = k * spec.z_step
        img = st.crop(data[k])
        assert np.abs(img - st.truth(z, shift=(dx, dy))).max() <= QUANT
        assert np.abs(img - st.truth(z)).max() > 0.2 * st.scale  # really moved
    k = 10
    assert np.abs(st.crop(data[k]) - st.truth(k * spec.z_step)).max() <= QUANT


def test_drift_is_a_random_walk(tmp_path):
    from gpustack.synthetic import _Model

    spec = SMALL.without_defects(drift_sigma=0.3)
    sh = _Model(spec).shifts
    steps = np.diff(sh, axis=0)
    assert np.all(sh[0] == 0) and 0.15 < steps.std() < 0.45 and len(np.unique(sh[:, 0])) == 20


def test_curtains_are_column_structured(default_stack):
    st = default_stack
    n = st.spec.n_slices
    assert np.flatnonzero(st.curtain_mask).tolist() == [0, int(0.28 * (n - 1))]
    data = by_k(st)
    col_var, row_var = {}, {}
    for k in (0, 2, 8, 30, 40):
        z = k * st.spec.z_step
        r = st.crop(data[k] - st.background(k)) - st.truth(z, shift=st.shifts[k])
        col_var[k] = r.mean(axis=0).var()
        row_var[k] = r.mean(axis=1).var()
    assert col_var[0] > 50 * max(col_var[k] for k in (2, 8, 30, 40))
    assert col_var[0] > 20 * row_var[0]
    cur = st.curtain(0)
    assert np.allclose(cur[0].std(), st.spec.curtain_amplitude * st.scale, rtol=1e-3)
    assert np.corrcoef(st.crop(cur).mean(axis=0), (st.crop(data[0] - st.background(0)) - st.truth(0)).mean(axis=0))[0, 1] > 0.95
    assert not st.curtain(2).any()


def test_contrast_factor_is_recovered(default_stack):
    st = default_stack
    n = st.spec.n_slices
    drop = [k for k in range(n) if 0.25 * n <= k < 0.33 * n]
    assert np.flatnonzero(st.contrast != 1).tolist() == drop and np.all(st.contrast[drop] == 0.6)
    data = by_k(st)
    for k in drop + [30]:
        if st.curtain_mask[k]:
            continue
        t = st.truth(k * st.spec.z_step, shift=st.shifts[k]).ravel()
        y = st.crop(data[k] - st.background(k)).ravel()
        slope = np.polyfit(t, y, 1)[0]
        assert slope == pytest.approx(st.contrast[k], abs=0.01)
        assert y.mean() == pytest.approx(t.mean(), abs=0.01 * st.scale)  # contrast around the mean


def test_background_is_known(tmp_path):
    spec = SMALL.without_defects(background_amplitude=0.2)
    st = generate(tmp_path, spec)
    data = by_k(st)
    for k in (0, 19):
        b = st.background(k)
        assert np.abs(st.crop(data[k] - b) - st.truth(k * spec.z_step)).max() <= QUANT
        assert b.min() >= 0 and b.max() <= 0.2 * st.scale * (1 + 1e-6)
    c = st.background_coefficients
    assert sum(c.values()) == pytest.approx(1) and c["xyz"] >= 0.3
    # the x*y*z term: the bottom-right corner grows along z more than the top-left
    d = st.background(19) - st.background(0)
    assert d[-1, -1] > d[0, 0] + 0.25 * 0.2 * st.scale


def test_band_and_noise_level(default_stack):
    st = default_stack
    img = read(st.files()[5])
    top = img[: st.spec.height - st.area[3]]
    assert top.mean() == pytest.approx(BAND * st.scale, rel=0.03)
    assert top.std() == pytest.approx(st.spec.noise_sigma * st.scale, rel=0.1)
    assert st.crop(img).mean() > 2 * top.mean()


def test_private_tag(default_stack):
    st = default_stack
    p = st.files()[4]
    with tifffile.TiffFile(p) as tf:
        page = tf.pages[0]
        xml = page.tags[FIBICS_TAG].value
        assert page.compression == 1
    assert "<FibicsImage>" in xml and "<ZPos>0.0400</ZPos>" in xml
    assert xml.split("\n")[1].startswith("<FibicsImage>")  # PyStack3D's Fibics reader takes line 1


def test_compression_zlib(tmp_path):
    a = generate(tmp_path / "a", SMALL.without_defects(n_slices=3))
    b = generate(tmp_path / "b", SMALL.without_defects(n_slices=3, compression="zlib"))
    with tifffile.TiffFile(b.files()[1]) as tf:
        assert tf.pages[0].compression == 8 and FIBICS_TAG in tf.pages[0].tags
    assert np.array_equal(tifffile.imread(a.files()[1]), tifffile.imread(b.files()[1]))


def test_determinism(tmp_path):
    a = generate(tmp_path / "a", SMALL)
    b = generate(tmp_path / "b", SMALL)
    c = generate(tmp_path / "c", SMALL.without_defects(seed=1, n_slices=3))
    for pa, pb in zip(a.files(), b.files()):
        assert pa.read_bytes() == pb.read_bytes()
    assert (a.root / TRUTH_FILE).read_text() == (b.root / TRUTH_FILE).read_text()
    assert not np.array_equal(tifffile.imread(a.files()[0]), tifffile.imread(c.files()[0]))


def test_load_round_trip(default_stack):
    st = default_stack
    ld = SyntheticStack.load(st.root)
    assert ld.spec == st.spec and ld.area == st.area
    for name in ("kept", "z", "shifts", "contrast", "curtain_mask"):
        assert np.array_equal(getattr(ld, name), getattr(st, name)), name
    assert [p.name for p in ld.files()] == [p.name for p in st.files()]
    assert np.array_equal(ld.truth(0.123), st.truth(0.123))
    assert np.array_equal(ld.background(7), st.background(7))
    k = 16  # curtain + contrast drop: the whole forward model
    i = list(st.kept).index(k)
    assert np.array_equal(ld.render(k)[0], tifffile.imread(st.files()[i]))


def test_truth_is_continuous_in_z(default_stack):
    st = default_stack
    a, b = st.truth(0.2), st.truth(0.2 + 1e-5)
    assert 0 < np.abs(a - b).mean() < 1e-3 * st.scale
    mid = st.truth(0.205)
    assert not np.array_equal(mid, a) and not np.array_equal(mid, st.truth(0.21))


def test_channels_layout(tmp_path):
    spec = SMALL.without_defects(channels=("SE2", "ESB"), noise_sigma=0.02, n_slices=6)
    st = generate(tmp_path, spec)
    assert not list(tmp_path.glob("*.tif"))
    names = [p.name for p in st.files("SE2")]
    assert names == [p.name for p in st.files("ESB")] == sorted(p.name for p in (tmp_path / "ESB").glob("*.tif"))
    assert len(names) == 6 and st.files("SE2")[0].parent == tmp_path / "SE2"
    t0, t1 = st.truth(0.03, "SE2"), st.truth(0.03, "ESB")
    # same geometry: the same pixels are blobs; different contrast: inverted blob intensities
    m0, m1 = (np.median(t[t < 0.4 * st.scale]) for t in (t0, t1))
    blob0, blob1 = np.abs(t0 - m0) > 0.07 * st.scale, np.abs(t1 - m1) > 0.07 * st.scale
    inside = blob0 & blob1
    assert inside.mean() > 0.1 and (blob0 ^ blob1).mean() < 0.1 * inside.mean()
    assert np.corrcoef(t0[inside], t1[inside])[0, 1] < -0.5
    r0 = st.crop(read(st.files("SE2")[3])) - t0
    r1 = st.crop(read(st.files("ESB")[3])) - t1
    assert abs(np.corrcoef(r0.ravel(), r1.ravel())[0, 1]) < 0.1  # own noise
    with tifffile.TiffFile(st.files("ESB")[0]) as tf:
        assert "<Channel>ESB</Channel>" in tf.pages[0].tags[FIBICS_TAG].value
    with pytest.raises(ValueError):
        st.files(".")


def test_progress(tmp_path):
    calls = []
    generate(tmp_path, SMALL.without_defects(n_slices=4), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("change, match", [
    (dict(dtype="int16"), "dtype"),
    (dict(height=30, width=30, pad=10), "real region"),
    (dict(channels=(".", "ESB")), "cannot be combined"),
    (dict(channels=("a/b",)), "channel name"),
    (dict(channels=()), "non-empty"),
    (dict(z_step=0.00015), "multiple of 0.0001"),
    (dict(contrast_range=(0.5, 0.2)), "contrast_range"),
    (dict(compression="jpeg"), "compression"),
    (dict(n_slices=0), "n_slices"),
    (dict(noise_sigma=-1.0), "noise_sigma"),
])
def test_bad_spec(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path, SyntheticSpec(**{**dict(n_slices=4, height=64, width=64), **change}))
    assert not list(tmp_path.rglob("*.tif"))


def test_refuses_folder_with_tifs(tmp_path):
    (tmp_path / "old.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds .tif"):
        generate(tmp_path, SMALL)
    st = generate(tmp_path / "ok", SMALL.without_defects(n_slices=2))
    with pytest.raises(ValueError, match="already"):
        generate(st.root, SMALL.without_defects(n_slices=2))
    with pytest.raises(ValueError, match="truth.json"):
        SyntheticStack.load(tmp_path)


def test_no_torch_import():
    code = "import sys, gpustack.synthetic; assert 'torch' not in sys.modules and 'scipy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_refuses_root_tifs_with_named_channels(tmp_path):
    (tmp_path / "slice_0000.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds .tif"):
        generate(tmp_path, SMALL.without_defects(channels=("SE2",), n_slices=2))
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path / "x", SMALL.without_defects(seed=-1))


@pytest.mark.reference
def test_pystack3d_reads_names_tags_and_area(default_stack):
    resampling = pytest.importorskip("pystack3d.resampling")
    st = default_stack
    z = resampling.extract_z_from_filenames([str(p) for p in st.files()], "slice_{slice_nb}_z={z_coord}um.tif")
    assert np.allclose(z, st.z, atol=1e-12)
    cropping = pytest.importorskip("pystack3d.cropping")
    fnames = [st.files()[0]]
    imin, imax, jmin, jmax = cropping.inds_from_area(st.area, fnames, 0, None)
    img = read(fnames[0])
    assert np.array_equal(img[imin:imax, jmin:jmax], st.crop(img))
    fibics = pytest.importorskip("pystack3d.utils_metadata_fibics")
    fibics.read_tags(str(st.files()[1]))  # parses our XML like a Fibics one
