"""RunGLM against nilearn's run_glm (same algorithm), statsmodels (independent) and
simulated ground truth."""

import numpy as np
import pytest
from nilearn.glm.contrasts import compute_contrast
from nilearn.glm.first_level import run_glm

from bidsglm.errors import DataError, ModelError
from bidsglm.firstlevel import (
    RunGLM,
    check_design,
    check_estimable,
    check_statistic_maps,
    mean_scaling,
    whiten_ar1,
)


def _simulated(seed=0, T=160, V=3000, P=6, rho=0.4):
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.standard_normal((T, P - 1)), np.ones(T)])
    noise = rng.standard_normal((T, V))
    for t in range(1, T):
        noise[t] += rho * noise[t - 1]
    beta = rng.standard_normal((P, V))
    return X, (X @ beta + noise).astype(np.float32), beta


@pytest.mark.parametrize("noise_model", ["ar1", "ols"])
def test_matches_nilearn_run_glm(noise_model):
    X, Y, _ = _simulated()
    labels, results = run_glm(Y, X, noise_model=noise_model)
    glm = RunGLM(noise_model).fit(Y, X)
    for con in (np.eye(6)[0], np.eye(6)[1] - np.eye(6)[2], np.eye(6)[:3]):
        ref = compute_contrast(labels, results, con)
        mine = glm.contrast(con)
        # same operations in the same order: agreement to rounding
        np.testing.assert_allclose(mine.stat, ref.stat(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mine.z, ref.z_score(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mine.p, ref.p_value(), rtol=1e-10, atol=1e-300)
        np.testing.assert_allclose(mine.variance, ref.effect_variance(), rtol=1e-10)
        assert mine.dof == ref.dof


def test_ols_matches_statsmodels():
    """Independent check: statsmodels OLS t-values for a few voxels."""
    sm = pytest.importorskip("statsmodels.api")
    X, Y, _ = _simulated(seed=1, V=5)
    glm = RunGLM("ols").fit(Y, X)
    c = np.array([1.0, -1.0, 0, 0, 0, 0])
    res = glm.contrast(c)
    for v in range(5):
        fit = sm.OLS(Y[:, v].astype(float), X).fit()
        tt = fit.t_test(c)
        tval, pval = np.asarray(tt.tvalue).item(), np.asarray(tt.pvalue).item()
        assert res.stat[v] == pytest.approx(tval, rel=1e-8)
        assert res.effect[v] == pytest.approx(np.asarray(tt.effect).item(), rel=1e-8)
        # statsmodels is two-sided; bidsglm's p is one-sided upper tail
        one_sided = pval / 2 if tval > 0 else 1 - pval / 2
        assert res.p[v] == pytest.approx(one_sided, rel=1e-6)
    F = glm.contrast(np.eye(6)[:2])
    for v in range(5):
        ftest = sm.OLS(Y[:, v].astype(float), X).fit().f_test(np.eye(6)[:2])
        assert F.stat[v] == pytest.approx(float(np.squeeze(ftest.fvalue)), rel=1e-8)


def test_ar1_prewhitening_matches_statsmodels_gls():
    """With a known rho, the AR fit equals GLS with nilearn's whitening matrix."""
    sm = pytest.importorskip("statsmodels.api")
    X, Y, _ = _simulated(seed=2, V=1)
    rho = 0.3
    wX, wy = whiten_ar1(X, rho), whiten_ar1(Y[:, :1], rho)[:, 0]
    fit = sm.OLS(wy, wX).fit()
    # force the coefficient by binning: RunGLM truncates to 1/100, 0.3 is on the grid
    glm = RunGLM("ar1")
    glm._ar1_coefficients = lambda Y, X: np.array([rho])
    glm.fit(Y[:, :1], X)
    np.testing.assert_allclose(glm.beta_[:, 0], fit.params, rtol=1e-10)
    c = np.eye(6)[0]
    assert glm.contrast(c).stat[0] == pytest.approx(np.asarray(fit.t_test(c).tvalue).item(), rel=1e-8)


def test_ar1_estimate_recovers_true_rho():
    """Ground truth: pure AR(1) noise with rho 0.4 gives coefficients near 0.4
    (Yule-Walker on OLS residuals is biased low by about (1 + 3 rho) / T)."""
    X, Y, _ = _simulated(seed=3, T=400, V=4000, rho=0.4)
    glm = RunGLM("ar1").fit(Y, X)
    # noise was built as e_t += 0.4 e_{t-1} on white noise: AR(1) with rho 0.4
    assert abs(np.median(glm.ar1_) - 0.4) < 0.03
    # truncation to the 1/100 grid, as nilearn
    assert np.allclose(glm.ar1_ * 100, np.round(glm.ar1_ * 100))


def test_effects_unbiased_and_t_calibrated():
    """Ground truth: under the null, t follows t(dof); with an effect, beta is recovered."""
    X, Y, beta = _simulated(seed=4, T=200, V=20000, rho=0.3)
    glm = RunGLM("ar1").fit(Y, X)
    err = glm.beta_ - beta
    assert abs(err.mean()) < 0.01
    # z of (beta_hat - beta_true) standardised by its variance must be ~N(0,1)
    res = glm.contrast(np.eye(6)[0])
    z = err[0] / np.sqrt(res.variance)
    assert abs(z.std() - 1) < 0.05
    # nominal false-positive rate of the t-test on a true-null column
    Y0 = Y - (X[:, :1] @ beta[:1]).astype(np.float32)
    p = RunGLM("ar1").fit(Y0, X).contrast(np.eye(6)[0]).p
    assert 0.04 < np.mean(p < 0.05) < 0.06


def test_mean_scaling_percent():
    Y = np.array([[100.0, 10.0], [110.0, 30.0]], dtype=np.float32)
    out = mean_scaling(Y)
    # float32 data stay float32 (as nilearn): agreement to float32 precision
    np.testing.assert_allclose(out[:, 0], [100 * (100 / 105 - 1), 100 * (110 / 105 - 1)], rtol=1e-5)
    np.testing.assert_allclose(out[:, 1], [-50, 50], rtol=1e-5)


def test_large_offset_data_match_nilearn():
    """Unscaled data around 10000: the sums of squares the fit is built from are
    large against the residuals; agreement with explicit residuals stays close."""
    X, Y, _ = _simulated(seed=3)
    Y = Y.astype(np.float64) + 1e4
    labels, results = run_glm(Y, X, noise_model="ar1")
    glm = RunGLM("ar1").fit(Y, X)
    ref = compute_contrast(labels, results, np.eye(6)[1])
    np.testing.assert_allclose(glm.contrast(np.eye(6)[1]).stat, ref.stat(), rtol=1e-6)


@pytest.mark.parametrize("noise_model", ["ar1", "ols"])
def test_degenerate_voxels_are_left_out_and_the_rest_match_nilearn(noise_model):
    """An empty voxel, a constant one, one with a NaN, one with an inf and one the design
    fits exactly are left out (valid_ False); the other voxels get exactly the fit
    nilearn gives without them (the AR(1) grand mean never sees the broken voxels)."""
    X, Y, _ = _simulated(seed=4, V=400)
    Y[:, 0] = 0
    Y[:, 1] = 7.5
    Y[5, 2] = np.nan
    Y[9, 3] = np.inf
    Y[:, 4] = X @ np.arange(1.0, 7.0)
    glm = RunGLM(noise_model).fit(Y, X)
    assert glm.valid_.tolist()[:6] == [False] * 5 + [True] and glm.valid_[5:].all()
    labels, results = run_glm(Y[:, 5:], X, noise_model=noise_model)
    for con in (np.eye(6)[0], np.eye(6)[:3]):
        mine, ref = glm.contrast(con), compute_contrast(labels, results, con)
        np.testing.assert_allclose(mine.stat, ref.stat(), rtol=1e-10, atol=1e-12)
    assert np.all(glm.dispersion_ > 0) and np.all(np.abs(glm.ar1_) <= 1)


def test_all_voxels_degenerate_is_a_data_error():
    X, Y, _ = _simulated(seed=4, V=10)
    Y[:] = 3.0
    with pytest.raises(DataError, match="every voxel"):
        RunGLM("ar1").fit(Y, X)


def test_check_design_refuses_zero_column_and_no_dof():
    X, _, _ = _simulated(T=20, V=1)
    cols = [f"c{i}" for i in range(6)]
    check_design(X, cols)
    Z = X.copy()
    Z[:, 2] = 0
    with pytest.raises(ModelError, match="column 'c2' is zero in every volume"):
        check_design(Z, cols)
    with pytest.raises(ModelError, match="design has 6 columns for 6 volumes: no residual degrees of freedom"):
        check_design(X[:6], cols)
    N = X.copy()
    N[3, 1] = np.nan
    with pytest.raises(ModelError, match="column 'c1'"):
        check_design(N, cols)


def test_check_estimable_duplicate_columns():
    X, _, _ = _simulated(T=30, V=1)
    D = np.column_stack([X, X[:, 0]])  # column 6 duplicates column 0
    cols = [f"c{i}" for i in range(7)]
    check_estimable(np.eye(7)[1], D, cols, "ok")  # untouched by the duplication
    check_estimable(np.eye(7)[0] + np.eye(7)[6], D, cols, "sum")  # estimable: the sum is identified
    with pytest.raises(ModelError, match="contrast 'x' is not estimable"):
        check_estimable(np.eye(7)[0], D, cols, "x")


def test_check_statistic_maps():
    check_statistic_maps({"effect": np.ones(3), "variance": np.ones(3)})
    with pytest.raises(DataError, match="variance map is zero"):
        check_statistic_maps({"variance": np.array([1.0, 0.0])})
    with pytest.raises(DataError, match="t map is non-finite in 1 of 2"):
        check_statistic_maps({"t": np.array([1.0, np.nan])})
    with pytest.raises(DataError, match="effect map is non-finite"):  # overflows float32, as written
        check_statistic_maps({"effect": np.array([1e39])})
