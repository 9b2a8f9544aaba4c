"""Mixed-effects (random-effects meta-regression) fit against PyMARE, a direct likelihood
maximisation with scipy, OLS where they must agree, and ground truth on simulated data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from bidsglm.groupmodels import fit_ols
from bidsglm.mixedeffects import fit_mixed


def _dataset(n=16, v=600, seed=0, covariate=True):
    """Effects with per-input variances from 0.1 to 4 and tau^2 from 0 (often at the boundary) to 4."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=n)]) if covariate else np.ones((n, 1))
    variances = rng.uniform(0.1, 4.0, (n, v))
    tau2 = rng.choice([0.0, 0.05, 0.5, 4.0], v)
    beta = np.vstack([rng.normal(0.5, 1.0, v), rng.normal(0, 0.5, v)])[: X.shape[1]]
    Y = X @ beta + rng.normal(size=(n, v)) * np.sqrt(variances + tau2)
    return Y, variances, X


def _neg_loglik(tau2, y, v, X, method):
    """-log likelihood of one voxel, written out from the model (no shared code)."""
    total = v + tau2
    W = np.diag(1.0 / total)
    A = X.T @ W @ X
    b = np.linalg.solve(A, X.T @ W @ y)
    r = y - X @ b
    value = 0.5 * (np.sum(np.log(total)) + r @ W @ r)
    if method == "REML":
        value += 0.5 * np.linalg.slogdet(A)[1]
    return value


def test_agrees_with_pymare_reml_on_every_voxel():
    pymare = pytest.importorskip("pymare")
    from pymare.estimators import VarianceBasedLikelihoodEstimator

    Y, V, X = _dataset()
    fit = fit_mixed(Y, V, X)
    assert fit.converged.all()
    est = VarianceBasedLikelihoodEstimator(method="REML", small_sample_correction="wald", xtol=1e-12,
                                           maxiter=200).fit(Y, V, X)
    summary = est.summary()
    fe = summary.get_fe_stats()
    tau2_ref = np.asarray(summary.tau2).ravel()
    # stated tolerance 1e-4 (absolute) in beta, tau^2 and z, on every voxel
    np.testing.assert_allclose(fit.beta, fe["est"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(fit.tau2, tau2_ref, atol=1e-4, rtol=0)
    for j in range(X.shape[1]):
        wald = fit.contrast(np.eye(X.shape[1])[j])
        np.testing.assert_allclose(wald.stat, fe["z"][j], atol=1e-4, rtol=0)  # PyMARE's z = b / se
        np.testing.assert_allclose(np.sqrt(wald.variance), fe["se"][j], atol=1e-4, rtol=0)
    assert (fit.tau2 == 0).sum() > 50  # the boundary is exercised
    assert pymare.__version__


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_maximises_the_likelihood_written_out_directly(method):
    Y, V, X = _dataset(n=12, v=40, seed=3)
    fit = fit_mixed(Y, V, X, method=method)
    for j in range(Y.shape[1]):
        y, v = Y[:, j], V[:, j]
        ref = optimize.minimize_scalar(_neg_loglik, bounds=(0.0, 100.0), method="bounded",
                                       args=(y, v, X, method), options={"xatol": 1e-12})
        best = min(ref.x, 0.0, key=lambda t: _neg_loglik(t, y, v, X, method))  # bounded search omits 0
        assert abs(fit.tau2[j] - best) < 1e-5 * max(1.0, best), (j, fit.tau2[j], best)
        assert _neg_loglik(fit.tau2[j], y, v, X, method) <= _neg_loglik(best, y, v, X, method) + 1e-10
        W = np.diag(1 / (v + fit.tau2[j]))
        cov = np.linalg.inv(X.T @ W @ X)
        np.testing.assert_allclose(fit.beta[:, j], cov @ X.T @ W @ y, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fit.cov[j], cov, rtol=1e-9, atol=1e-12)


def test_ml_tau2_is_below_reml():
    Y, V, X = _dataset(seed=4)
    reml, ml = fit_mixed(Y, V, X, "REML"), fit_mixed(Y, V, X, "ML")
    assert np.all(ml.tau2 <= reml.tau2 + 1e-9)


def test_equal_first_level_variances_give_the_ols_t():
    """With one variance v for every input, GLS is OLS and REML's v + tau^2 is the OLS residual
    variance wherever that exceeds v, so the t maps are identical there; elsewhere tau^2 = 0."""
    rng = np.random.default_rng(1)
    n, v = 20, 500
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Y = 0.3 + rng.normal(size=(n, v)) * np.sqrt(rng.uniform(0.5, 3, v))
    V = np.full((n, v), 1.0)
    mixed, ols = fit_mixed(Y, V, X), fit_ols(Y, X)
    c = np.array([1.0, 0.5])
    interior = ols.dispersion > 1.0
    assert 50 < interior.sum() < v
    np.testing.assert_allclose(mixed.beta, ols.beta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mixed.tau2[interior], ols.dispersion[interior] - 1.0, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(mixed.tau2[~interior], 0.0)
    np.testing.assert_allclose(mixed.contrast(c).stat[interior], ols.contrast(c).stat[interior], rtol=1e-6)
    assert mixed.dof == ols.dof == n - 2


def test_a_noisy_subject_is_down_weighted():
    rng = np.random.default_rng(2)
    n, v = 12, 200
    Y = 1.0 + rng.normal(0, 0.3, (n, v))
    V = np.full((n, v), 0.09)
    Y[0] += rng.normal(0, 10.0, v)  # one subject's estimates are noisy, and its variance map says so
    V[0] = 100.0
    fit = fit_mixed(Y, V, np.ones((n, 1)))
    ols = fit_ols(Y, np.ones((n, 1)))
    # the mixed estimate is the mean of the 11 good subjects almost exactly; OLS is pulled away
    assert np.max(np.abs(fit.beta[0] - Y[1:].mean(axis=0))) < 0.02
    assert np.mean(np.abs(fit.beta[0] - 1.0)) < 0.5 * np.mean(np.abs(ols.beta[0] - 1.0))


def test_f_contrast_is_the_wald_test():
    Y, V, X = _dataset(n=14, v=50, seed=5)
    fit = fit_mixed(Y, V, X)
    res = fit.contrast(np.eye(2), f_test=True)
    for j in range(5):
        b, cov = fit.beta[:, j], fit.cov[j]
        assert res.stat[j] == pytest.approx(b @ np.linalg.solve(cov, b) / 2, rel=1e-10)
    one_row = fit.contrast(np.array([[0.0, 1.0]]), f_test=True)
    np.testing.assert_allclose(one_row.stat, fit.contrast(np.array([0.0, 1.0])).stat ** 2, rtol=1e-10)
    np.testing.assert_allclose(res.p, stats.f.sf(res.stat, 2, 12), rtol=1e-8)
    redundant = fit.contrast(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), f_test=True)
    np.testing.assert_allclose(redundant.stat, res.stat, rtol=1e-9)  # same row space, same F
    assert redundant.dim == 2


def test_refuses_bad_inputs():
    Y, V, X = _dataset(n=6, v=4)
    with pytest.raises(ValueError, match="full-rank"):
        fit_mixed(Y, V, np.column_stack([X, X[:, 1]]))
    bad = V.copy()
    bad[0, 0] = 0.0
    with pytest.raises(ValueError, match="positive"):
        fit_mixed(Y, bad, X)


def _simulate(rng, n, v, effect, noisy):
    """One-sample data: true effect, between-subject sd 0.5, first-level sd 0.3 except
    ``noisy`` subjects whose first-level sd is 3 (and whose variance maps say so)."""
    sd = np.full(n, 0.3)
    sd[:noisy] = 3.0
    true = effect + rng.normal(0, 0.5, (n, v))
    Y = true + rng.normal(size=(n, v)) * sd[:, None]
    # first-level variance estimates with 100 degrees of freedom, as a run's GLM gives
    V = sd[:, None] ** 2 * rng.chisquare(100, (n, v)) / 100
    return Y, V


@pytest.mark.slow
def test_power_gain_and_nominal_false_positives_with_heterogeneous_variances():
    """16 subjects, 3 of them noisy. Null: the rate of p < 0.05 (one-sided) stays near 0.05
    for both estimators (20,000 voxels: binomial sd 0.0015). Effect 0.4: the mixed model,
    down-weighting the noisy subjects, detects it more often than OLS. Seeds 11, 12 gave null
    rates 0.051 (mixed) and 0.042 (OLS, conservative with heavy-tailed inputs), power 0.77 vs 0.37."""
    rng = np.random.default_rng(11)
    n, v = 16, 20000
    X = np.ones((n, 1))
    Y, V = _simulate(rng, n, v, 0.0, 3)
    p_mixed = fit_mixed(Y, V, X).contrast(np.array([1.0])).p
    p_ols = fit_ols(Y, X).contrast(np.array([1.0])).p
    assert 0.04 < np.mean(p_mixed < 0.05) < 0.06, np.mean(p_mixed < 0.05)
    assert 0.03 < np.mean(p_ols < 0.05) < 0.06
    Y, V = _simulate(rng, n, v, 0.4, 3)
    power_mixed = np.mean(fit_mixed(Y, V, X).contrast(np.array([1.0])).p < 0.05)
    power_ols = np.mean(fit_ols(Y, X).contrast(np.array([1.0])).p < 0.05)
    assert power_mixed > power_ols + 0.15, (power_mixed, power_ols)
