"""bkg_removal: the basis grammar, the batched IRLS against statsmodels' RLM, known backgrounds removed in 2D and
3D (also with ind_min/ind_max, where PyStack3D crashes), data-dependent edge cases and the step's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

import gpustack
from gpustack.config import load_workflow
from gpustack.device import resolve_device
from gpustack.errors import ConfigError
from gpustack.kernels import polynomial, robust
from gpustack.pipeline.runner import prepare, run
from tests.conftest import write_params


# -- basis grammar -------------------------------------------------------------------------------------------
def test_basis_from_expression_sorted_with_constant():
    assert polynomial.powers_from_expr("1 + x + y + x*y + x**2 + z", 3) == (
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0))
    assert polynomial.powers_from_expr("y**2 + x", 2) == ((0, 0), (0, 2), (1, 0))  # constant forced


def test_basis_multi_digit_exponents_and_repeated_factors():
    # PyStack3D reads x**12 as x and x*x as x (PEERS §1.2)
    assert polynomial.powers_from_expr("x**12", 2) == ((0, 0), (12, 0))
    assert polynomial.powers_from_expr("x*x*y", 2) == ((0, 0), (2, 1))
    assert polynomial.expr_from_powers(((0, 0, 0), (2, 1, 0), (0, 0, 3))) == "1 + x**2*y + z**3"


@pytest.mark.parametrize("expr, text", [
    ("2*x", "cannot read the term"),
    ("x^2", "cannot read the term"),
    ("x + + y", "empty term"),
    ("", "empty"),
    ("x + x**1", "same monomial"),
    ("x + z", "z needs dim = 3"),
    ("sin(x)", "cannot read the term"),
])
def test_basis_errors_are_clear(expr, text):
    with pytest.raises(ValueError, match=text):
        polynomial.powers_from_expr(expr, 2)


def test_orders_with_and_without_cross_terms():
    full = polynomial.powers_from_orders((1, 2, 1), True)
    assert len(full) == 12 and full[0] == (0, 0, 0)
    # PEERS §1.2: [1,2,1] without cross terms is 1, z, y, y**2, x
    assert polynomial.powers_from_orders((1, 2, 1), False) == ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 2, 0), (1, 0, 0))


@pytest.mark.reference
def test_orders_match_pystack3d():
    bkg = pytest.importorskip("pystack3d.bkg_removal")
    for orders in ((1, 2, 1), (2, 2), (3, 1, 2)):
        for cross in (True, False):
            ours = [list(p) for p in polynomial.powers_from_orders(orders, cross)]
            theirs = [list(p) for p in bkg.powers_from_orders(list(orders), cross)]
            assert sorted(ours) == sorted(theirs)


def test_separable_evaluation_equals_dense_basis(device):
    powers = polynomial.powers_from_orders((2, 3), True)
    coefs = torch.randn(3, len(powers), dtype=torch.float64, device=device)
    grid = polynomial.slice_coefficients(powers, coefs)
    fast = polynomial.evaluate(grid, 7, 5, torch.float64)
    ys = polynomial.unit_coords(7, dtype=torch.float64, device=device)
    xs = polynomial.unit_coords(5, dtype=torch.float64, device=device)
    dense = (polynomial.design_matrix(powers, xs, ys) @ coefs.T).T.reshape(3, 7, 5)
    torch.testing.assert_close(fast, dense)


# -- IRLS against statsmodels ---------------------------------------------------------------------------------
def _problems(seed=0, b=4, outlier_every=7):
    powers = polynomial.powers_from_orders((2, 2), True)
    xs = polynomial.unit_coords(300, dtype=torch.float64, device="cpu")[::10]
    ys = polynomial.unit_coords(200, dtype=torch.float64, device="cpu")[::10]
    a = polynomial.design_matrix(powers, xs, ys).numpy()
    rng = np.random.default_rng(seed)
    true = rng.normal(0, 100, (b, len(powers)))
    true[:, 0] += 1000
    y = (a @ true.T).T + rng.normal(0, 10, (b, a.shape[0]))
    y[:, ::outlier_every] += 500  # gross outliers on 1/7 of the samples
    valid = np.ones_like(y, bool)
    valid[1, :300] = False  # one problem with half of its samples masked
    return a, y, valid


@pytest.mark.parametrize("masked", [True, False])  # False: every sample valid, the MAD's kthvalue path
@pytest.mark.parametrize("norm", ["HuberT", "Hampel", "None"])
def test_irls_agrees_with_statsmodels_rlm(device, norm, masked):
    sm = pytest.importorskip("statsmodels.api")
    a, y, valid = _problems()
    if not masked:
        valid[:] = True
    basis = robust.Basis(torch.from_numpy(a).to(device))
    fit = robust.fit(basis, torch.from_numpy(y).float().to(device), torch.from_numpy(valid).to(device), norm=norm)
    for k in range(len(y)):
        if norm == "None":
            ref = np.linalg.lstsq(a[valid[k]], y[k][valid[k]], rcond=None)[0]
        else:
            ref = sm.RLM(y[k][valid[k]], a[valid[k]], M=getattr(sm.robust.norms, norm)()).fit().params
        surface = a @ (fit.coefs[k].cpu().numpy() - ref)
        # The fitted backgrounds agree to 1 % of the noise (sigma 10) in RMS.
        assert np.sqrt(np.mean(surface ** 2)) < 0.1, (norm, k)


@pytest.mark.parametrize("m", [9, 10, 8281])
def test_mad_of_all_valid_samples_is_the_lower_median(device, m):
    """The kthvalue path (no mask) gives statsmodels' MAD with torch's lower median, as the masked path does."""
    rng = np.random.default_rng(m)
    resid = torch.tensor(rng.normal(0, 5, (3, m)), dtype=torch.float32, device=device)
    valid = torch.ones(3, m, dtype=torch.bool, device=device)
    fast = robust._mad_scale(resid, valid, all_valid=True)
    masked = robust._mad_scale(resid, valid)
    assert torch.equal(fast, masked)
    lower = np.sort(np.abs(resid.cpu().numpy()), axis=1)[:, (m - 1) // 2]
    np.testing.assert_allclose(fast.cpu().numpy(), lower / robust.MAD_NORMAL, rtol=1e-6)


def test_lower_median_selection_matches_kthvalue(device):
    """The CPU path selects with NumPy in place; it must give kthvalue's value, also on a non-contiguous view."""
    rng = np.random.default_rng(5)
    a = torch.tensor(np.abs(rng.standard_cauchy((4, 1001))), dtype=torch.float32, device=device)
    a[1, ::7] = a[1, 0]  # ties
    expected = torch.kthvalue(a, 501, dim=1).values
    assert torch.equal(robust._lower_median(a.clone()), expected)
    wide = torch.zeros(4, 2002, dtype=torch.float32, device=device)
    wide[:, ::2] = a
    assert torch.equal(robust._lower_median(wide[:, ::2]), expected)


def test_huber_weights_in_three_operations_match_the_norm(device):
    rng = np.random.default_rng(6)
    resid = torch.tensor(rng.normal(0, 3, (3, 500)), dtype=torch.float32, device=device)
    scale = torch.tensor([0.5, 2.0, 9.0], dtype=torch.float32, device=device)
    fast = robust._weights(resid, scale, "HuberT")
    reference = robust.norm_weights(resid / scale[:, None], "HuberT")
    torch.testing.assert_close(fast, reference, rtol=2e-7, atol=0)
    assert torch.equal(fast == 1, resid.abs() <= robust.HUBER_T * scale[:, None])


def test_robust_fit_ignores_outliers_that_bias_least_squares(device):
    a, y, valid = _problems()
    basis = robust.Basis(torch.from_numpy(a).to(device))
    yt, vt = torch.from_numpy(y).float().to(device), torch.from_numpy(valid).to(device)
    huber = robust.fit(basis, yt, vt, norm="HuberT").coefs.cpu().numpy()
    ols = robust.fit(basis, yt, vt, norm="None").coefs.cpu().numpy()
    # the outliers add 500/7 ~ 71 to the least-squares constant; the robust fit stays near the true one
    # (problem 1 is half masked, which changes the geometry: left out)
    assert np.all(ols[[0, 2, 3], 0] - huber[[0, 2, 3], 0] > 40)


def test_convergence_is_per_slice(device):
    """A slice that converges stops changing while a harder one goes on; each equals its own solo fit."""
    a, y, valid = _problems(b=3)
    basis = robust.Basis(torch.from_numpy(a).to(device))
    y[2] = a @ np.r_[1000, np.zeros(a.shape[1] - 1)]  # exact plane: zero scale after least squares
    y[2, ::3] += np.linspace(0, 1, len(y[2, ::3]))  # ... almost: converges at once
    yt, vt = torch.from_numpy(y).float().to(device), torch.from_numpy(valid).to(device)
    together = robust.fit(basis, yt, vt, norm="Hampel")
    iters = together.iterations.cpu().numpy()
    assert iters.max() > iters.min()
    for k in range(3):
        alone = robust.fit(basis, yt[k:k + 1], vt[k:k + 1], norm="Hampel")
        assert alone.iterations[0] == together.iterations[k]
        # Same fitted surface up to float32 rounding of the batched sums (measured 2e-4; the noise sigma is 10).
        surface = a @ (together.coefs[k] - alone.coefs[0]).cpu().numpy()
        assert np.sqrt(np.mean(surface ** 2)) < 1e-3


def _bright_structures(b=4, n=60, seed=3):
    """A plane under bright discs of 3-13 % of the width: residuals far from normal, where plain IRLS crawls."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    a = np.stack([np.ones(n * n), yy.ravel(), xx.ravel(), (xx * yy).ravel()], 1)
    ys = []
    for _ in range(b):
        img = 1000 + 300 * xx - 200 * yy + 100 * xx * yy + rng.normal(0, 5, xx.shape)
        for _ in range(20):
            cy, cx, r = rng.uniform(0, 1, 3)
            img += 3000 * rng.uniform(0.2, 1) * ((yy - cy) ** 2 + (xx - cx) ** 2 < (0.03 + 0.1 * r) ** 2)
        ys.append(img.ravel())
    return a, np.array(ys)


def test_accelerated_irls_reaches_the_plain_fixed_point_in_fewer_steps(device):
    a, y = _bright_structures()
    basis = robust.Basis(torch.from_numpy(a).to(device))
    yt = torch.from_numpy(y).float().to(device)
    valid = torch.ones_like(yt, dtype=torch.bool)
    plain = robust.fit(basis, yt, valid, accelerate=False, maxiter=2000, tol=1e-7)  # the fixed point, tightly
    fast = robust.fit(basis, yt, valid)
    plain_default = robust.fit(basis, yt, valid, accelerate=False)
    # measured: 43 iterations in all against 125 plain (42, 16, 25, 42), scales 300-500
    assert int(fast.iterations.sum()) <= 0.5 * int(plain_default.iterations.sum())
    surface = a @ (fast.coefs - plain.coefs).cpu().numpy().T
    rms = np.sqrt(np.mean(surface ** 2, axis=0))
    assert np.all(rms < 0.01 * plain.scale.cpu().numpy()), rms  # measured up to 0.21 grey levels


def test_gram_products_chunked_or_cached_agree(device):
    a, y = _bright_structures(b=3)
    basis = robust.Basis(torch.from_numpy(a).to(device))
    assert basis.outer is not None  # 3600 samples x 16 products: cached
    yt = torch.from_numpy(y).float().to(device)
    valid = torch.ones_like(yt, dtype=torch.bool)
    cached = robust.fit(basis, yt, valid)
    w = torch.rand_like(yt)
    gram, rhs = robust._gram(basis, w, yt)
    basis.outer = None  # as for a basis too large to cache
    chunked = robust.fit(basis, yt, valid)
    torch.testing.assert_close(chunked.coefs, cached.coefs, rtol=1e-6, atol=1e-6)
    gram_chunks, rhs_chunks = robust._gram(basis, w, yt, chunk=16 * 500)  # 8 chunks of 500 samples
    torch.testing.assert_close(gram_chunks, gram, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rhs_chunks, rhs)
    q = basis.q.double()
    torch.testing.assert_close(gram, torch.einsum("bs,si,sj->bij", w.double(), q, q), rtol=1e-5, atol=1e-4)


def test_unfittable_rows_are_flagged_not_guessed(device):
    a, y, valid = _problems(b=2)
    valid[0] = False  # all masked
    valid[1, 5:] = False  # fewer samples than terms
    fit = robust.fit(robust.Basis(torch.from_numpy(a).to(device)), torch.from_numpy(y).float().to(device),
                     torch.from_numpy(valid).to(device))
    assert not fit.fitted.any() and torch.isnan(fit.coefs).all()


# -- the correction -------------------------------------------------------------------------------------------
def _stack_with_background(n=8, h=60, w=80, seed=1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = xx / (w - 1), yy / (h - 1)
    clean = rng.normal(1000, 5, (n, h, w))
    z = np.arange(n)[:, None, None] / max(1, n - 1)
    background = 300 * x + 200 * y - 150 * x * y + 100 * z + 80 * x * z
    return clean, clean + background


def test_2d_removal_recovers_a_known_plane(device):
    clean, data = _stack_with_background()
    out, coefs = gpustack.remove_background(torch.from_numpy(data).float().to(device), orders=(1, 1),
                                            skip_factors=(2, 2), weight="HuberT")
    out = out.cpu().numpy()
    residual = out - clean
    # each slice: the background is gone up to a per-slice constant (the fitted constant is kept)
    assert np.abs(residual - residual.mean(axis=(1, 2), keepdims=True)).max() < 5
    assert gpustack.background_terms(orders=(1, 1)) == ["1", "y", "x", "x*y"]
    np.testing.assert_allclose(coefs.cpu().numpy()[:, 3], -150, atol=8)  # x*y, from 1200 noisy samples


def test_3d_removal_recovers_a_known_polynomial_and_preserves_the_mean(device):
    clean, data = _stack_with_background()
    out, coefs = gpustack.remove_background(torch.from_numpy(data).float().to(device), orders=(1, 1, 1),
                                            skip_factors=(2, 2, 1), preserve_avg=True)
    out = out.cpu().numpy()
    terms = gpustack.background_terms(orders=(1, 1, 1))
    got = dict(zip(terms, coefs.cpu().numpy()))
    for term, value in {"x": 300, "y": 200, "x*y": -150, "z": 100, "x*z": 80, "y*z": 0, "x*y*z": 0}.items():
        assert abs(got[term] - value) < 3, term
    assert np.abs(out - clean - (out - clean).mean()).max() < 5  # one constant for the whole stack
    assert abs(out.mean() - data.mean()) < 1e-2  # preserve_avg: exact up to float32 rounding


def test_constant_and_fully_masked_slices_are_left_intact(device):
    _, data = _stack_with_background(n=3)
    data[1] = 1234.0
    out, coefs = gpustack.remove_background(torch.from_numpy(data).float().to(device), orders=(1, 1),
                                            threshold_max=5000)
    torch.testing.assert_close(out[1], torch.full_like(out[1], 1234.0))
    data[2] = 9000.0  # above threshold_max: nothing to fit
    with pytest.warns(RuntimeWarning, match="could not be fitted on 1 slice"):
        out, coefs = gpustack.remove_background(torch.from_numpy(data).float().to(device), orders=(1, 1),
                                                threshold_max=5000)
    torch.testing.assert_close(out[2], torch.full_like(out[2], 9000.0))
    assert torch.isnan(coefs[2]).all() and torch.isfinite(coefs[0]).all()


def test_masked_pixels_are_corrected_unless_asked_otherwise(device):
    _, data = _stack_with_background(n=2)
    data[:, :5, :5] = 10  # a dark pore, outside threshold_min
    t = torch.from_numpy(data).float().to(device)
    corrected, _ = gpustack.remove_background(t, orders=(1, 1), threshold_min=100)
    kept, _ = gpustack.remove_background(t, orders=(1, 1), threshold_min=100, correct_masked=False)
    assert torch.equal(kept[:, :5, :5], t[:, :5, :5])  # PyStack3D's behaviour
    assert not torch.equal(corrected[:, :5, :5], t[:, :5, :5])
    torch.testing.assert_close(kept[:, 10:, 10:], corrected[:, 10:, 10:])


@pytest.mark.reference
@pytest.mark.parametrize("weight", ["None", "HuberT"])
def test_2d_slice_matches_pystack3d_bkg_eval(weight):
    bkg = pytest.importorskip("pystack3d.bkg_removal")
    _, data = _stack_with_background(n=1, h=100, w=120)
    img = data[0]
    powers = [list(p) for p in polynomial.powers_from_orders((1, 2), True)]
    ref, _, ref_coefs = bkg.bkg_eval(img, powers, skip_factors=(10, 10),
                                     weight_func=None if weight == "None" else weight)
    out, coefs = gpustack.remove_background(img.astype(np.float32), orders=(1, 2), skip_factors=(10, 10),
                                            weight=weight)
    np.testing.assert_allclose(coefs, ref_coefs, atol=0.5)
    np.testing.assert_allclose(out, ref, atol=0.5)


# -- through the runner ---------------------------------------------------------------------------------------
def _write(tmp_path, data, table):
    folder = tmp_path / "stack"
    folder.mkdir()
    for k, img in enumerate(data):
        tifffile.imwrite(folder / f"slice_{k:03d}.tif", np.clip(np.round(img), 0, 65535).astype(np.uint16))
    return write_params(folder, 'process_steps = ["bkg_removal"]\noutput_dtype = "float32"\n'
                                f"ind_min = 2\nind_max = 9\n[bkg_removal]\n{table}\n")


@pytest.mark.parametrize("table", ["orders = [1, 1, 1]\nskip_factors = [4, 4, 1]",
                                   'poly_basis = "x + y + x*y"\nskip_factors = [4, 4]\nweight_func = "Hampel"'])
def test_runner_writes_pystack3d_outputs_with_ind_range(tmp_path, table):
    clean, data = _stack_with_background(n=12)
    params = _write(tmp_path, data, table)
    logs = []
    run(prepare(load_workflow(params)), device_choice=resolve_device("cpu"), show_progress=False, log=logs.append)
    step = params.parent / "process" / "bkg_removal"
    outputs = step / "outputs"
    names = sorted(p.name for p in step.glob("*.tif"))
    assert names == [f"slice_{k:03d}.tif" for k in range(2, 10)]
    for name in ("coefs.npz", "coefs.png", "stats_X.png", "stats_Y.png", "log.txt", "stats.csv"):
        assert (outputs / name).is_file(), name
    assert len(list((outputs / "bkgs").glob("*.png"))) == 8
    npz = np.load(outputs / "coefs.npz")
    assert npz["coefs"].shape == (8, len(npz["powers"]))
    residual = np.stack([tifffile.imread(step / n) for n in names]) - clean[2:10]
    spread = np.abs(residual - residual.mean(axis=(1, 2), keepdims=True)).max()
    assert spread < 6  # noise 5 plus rounding to uint16 on input
    assert not any("left as they are" in line for line in logs)


def test_runner_warns_about_slices_it_cannot_fit(tmp_path):
    _, data = _stack_with_background(n=4)
    data[1] = 60000
    params = _write(tmp_path, data, "orders = [1, 1]\nthreshold_max = 50000")
    params.write_text(params.read_text().replace("ind_min = 2\nind_max = 9\n", ""))
    logs = []
    run(prepare(load_workflow(params)), device_choice=resolve_device("cpu"), show_progress=False, log=logs.append)
    assert any("1 slice(s) were left as they are" in line and "slice_001.tif" in line for line in logs)
    out = tifffile.imread(params.parent / "process" / "bkg_removal" / "slice_001.tif")
    assert (out == 60000).all()


@pytest.mark.parametrize("table, key, text", [
    ('poly_basis = "1 + 2*x"', "poly_basis", "cannot read the term"),
    ("orders = [1, 1]\nskip_factors = [10, 10, 10]", "skip_factors", "needs 2"),
    ("orders = [1, 1, 1, 1]", "orders", "give 2 orders"),
    ("threshold_min = 10\nthreshold_max = 10", "threshold_max", "must be less than"),
    ('weight_func = "Tukey"', "weight_func", "not one of"),
    ("dim = 2\norders = [1, 1, 1]", "dim", "dim = 2"),
])
def test_config_mistakes_name_the_key(tmp_path, table, key, text):
    params = write_params(tmp_path, f'process_steps = ["bkg_removal"]\n[bkg_removal]\n{table}\n')
    with pytest.raises(ConfigError) as info:
        load_workflow(params)
    message = str(info.value)
    assert "[bkg_removal]" in message and key in message and text in message


def test_too_few_samples_for_the_basis_is_a_config_error(tmp_path):
    _clean, data = _stack_with_background(n=2, h=20, w=20)
    params = _write(tmp_path, data, "orders = [3, 3]\nskip_factors = [10, 10]")
    params.write_text(params.read_text().replace("ind_min = 2\nind_max = 9\n", ""))
    with pytest.raises(ConfigError, match="skip_factors"):
        prepare(load_workflow(params))


def test_background_thumbnail_files_show_the_background_and_red_text(tmp_path):
    from PIL import Image

    from gpustack.report.background import THUMBNAIL, _write_thumbnails
    from gpustack.steps.background import BkgRemoval, BkgRemovalConfig

    step = BkgRemoval(BkgRemovalConfig(orders=(1, 1), cross_terms=False))  # 1, x, y
    assert step.powers == ((0, 0), (0, 1), (1, 0))  # 1, y, x
    coefs = np.array([[100.0, 0.0, 50.0], [10.0, -20.0, 0.0], [np.nan, np.nan, np.nan]])
    names = ["a.tif", "b.tif", "c.tif"]
    _write_thumbnails(tmp_path, step, coefs, names, (200, 400))
    for k, name in enumerate(["a", "b"]):
        image = Image.open(tmp_path / f"{name}.png")
        assert image.size == (THUMBNAIL, 50)
        rgb = np.asarray(image.convert("RGB")).astype(int)
        red = (rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)
        assert 20 < red[:25, :50].sum() and not red[30:].any()  # the vmin/vmax text, top left only
        grey = rgb[30:, :, 0]
        assert np.array_equal(grey, rgb[30:, :, 1])
        if k == 0:  # background 100 + 50 x: dark left, white right, constant down the columns
            assert grey[:, 0].max() == 0 and grey[:, -1].min() == 254 and np.ptp(grey, axis=0).max() == 0
        else:  # 10 - 20 y: white at y = 0 (top row), black at the bottom
            assert grey[-1].max() == 0 and np.ptp(grey, axis=1).max() == 0
    assert (tmp_path / "c.png").is_file()  # not fitted: a flat image saying so


@pytest.mark.parametrize("basis", ["1 + x + y + x*y + x**2", "1 + x + y + z + x*y*z + y**2*z"])
def test_background_thumbnails_are_the_fitted_polynomial(basis):
    """The report's thumbnails (NumPy, on the reporter thread) are the step's own kernel's backgrounds on a
    coarser grid of the same unit coordinates, for per-slice (2D) and stack (3D) fits."""
    from gpustack.report.background import _thumbnail_backgrounds
    from gpustack.steps.background import BkgRemoval, BkgRemovalConfig

    step = BkgRemoval(BkgRemovalConfig(poly_basis=basis))
    rng = np.random.default_rng(0)
    n, q = 5, len(step.powers)
    coefs = rng.normal(size=(n, q)) if step.dim == 2 else np.tile(rng.normal(size=q), (n, 1))
    got = _thumbnail_backgrounds(step, coefs, n, (300, 200))
    c = torch.from_numpy(coefs)
    grid = (polynomial.slice_coefficients(step.powers, c) if step.dim == 2 else
            polynomial.slice_coefficients(step.powers, c[0], torch.arange(n, dtype=torch.float64) / (n - 1)))
    want = polynomial.evaluate(grid, 100, 67, torch.float64).numpy()
    assert got.shape == (n, 100, 67)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
