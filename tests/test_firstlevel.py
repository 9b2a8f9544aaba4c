"""RunGLM against nilearn's run_glm (same algorithm), statsmodels (independent) and
simulated ground truth."""

import numpy as np
import pytest
from nilearn.glm.contrasts import compute_contrast
from nilearn.glm.first_level import run_glm

from bidsglm.firstlevel import RunGLM, mean_scaling, whiten_ar1


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


def test_degenerate_voxels_give_finite_statistics():
    """An empty voxel and one the design fits exactly: no NaN, no negative variance."""
    X, Y, _ = _simulated(seed=4, V=4)
    Y[:, 0] = 0
    Y[:, 1] = X @ np.arange(1.0, 7.0)
    glm = RunGLM("ar1").fit(Y, X)
    res = glm.contrast(np.eye(6)[0])
    assert np.all(np.isfinite(res.stat)) and np.all(glm.dispersion_ >= 0)
    assert res.stat[0] == 0
    assert np.all(np.abs(glm.ar1_) <= 1)
