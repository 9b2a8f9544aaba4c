"""Random-effects meta-regression of subject maps, every voxel at once.

Per voxel, the N input effects follow y = X b + u + e with e_i ~ N(0, v_i),
v_i the input's own (first-level) variance, and u_i ~ N(0, tau^2), one
between-subject variance per voxel (FSL's FLAME1, AFNI's 3dMEMA and PyMARE's
``VarianceBasedLikelihoodEstimator`` fit this model). tau^2 is estimated by
restricted (default) or full maximum likelihood with tau^2 >= 0; b by
generalised least squares with weights 1 / (v_i + tau^2).

The profile likelihood in tau^2 is maximised at every voxel by Newton's method
(Fisher scoring where the likelihood is not concave there), with step halving
and the bound tau^2 >= 0, started from a method-of-moments estimate. The
iteration runs in one compiled kernel (numba), parallel over voxels: per voxel
and step it needs only sums over inputs of W, W^2, W^3 times outer products of
design rows and a (P, P) Cholesky inverse, so no (N, N) matrix is formed.

Nothing here knows about images: inputs are (N, V) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import clusterkernels  # noqa: F401  (sets up numba's cache folder before numba is imported)
import numba  # noqa: E402

from .statistics import ContrastResult, t_contrast

METHODS = ("REML", "ML")
TOLERANCE = 1e-8  # on the tau^2 step, relative to tau^2 + the voxel's mean input variance
MAX_ITERATIONS = 200


@dataclass
class MixedFit:
    """Random-effects fit of every voxel.

    beta : (P, V) GLS estimates; cov : (V, P, P) their covariance (X' W X)^-1;
    tau2 : (V,) between-subject variance; dof : N - rank(X), the degrees of
    freedom the Wald statistics are referred to (as FLAME1: t with N - p);
    iterations : (V,) Fisher-scoring steps taken; converged : (V,) bool."""

    design: np.ndarray
    beta: np.ndarray
    cov: np.ndarray
    tau2: np.ndarray
    dof: float
    method: str
    iterations: np.ndarray
    converged: np.ndarray

    def contrast(self, c: np.ndarray, f_test: bool = False) -> ContrastResult:
        """Wald t for a (P,) vector or (1, P) row; Wald F (divided by its rows) for (k, P)
        rows, or for one row when ``f_test``. Both referred to ``dof`` error degrees of freedom."""
        c = np.atleast_2d(np.asarray(c, dtype=np.float64))
        if c.shape[0] > 1 and np.linalg.matrix_rank(c) < c.shape[0]:
            # redundant rows: test the row space (F is the same for any basis of it)
            _, s, vt = np.linalg.svd(c, full_matrices=False)
            c = vt[: int(np.sum(s > s.max() * 1e-10))]
        effect = c @ self.beta  # (k, V)
        var = np.einsum("kp,vpq,lq->vkl", c, self.cov, c)  # (V, k, k)
        if c.shape[0] == 1 and not f_test:
            return t_contrast(effect[0], var[:, 0, 0], self.dof)
        solved = np.linalg.solve(var, effect.T[:, :, None])[:, :, 0]  # (V, k)
        stat = np.einsum("vk,vk->v", effect.T, solved) / c.shape[0]
        return ContrastResult(effect, np.ones_like(stat), stat, float(self.dof), "F", c.shape[0])


@numba.njit(cache=True, nogil=True)
def _inverse_spd(A, out, L):
    """Inverse of the symmetric positive definite (P, P) ``A`` into ``out`` by Cholesky
    (``L`` is scratch); returns log det(A), or nan when A is not positive definite."""
    p = A.shape[0]
    for i in range(p):
        for j in range(p):
            L[i, j] = 0.0
    logdet = 0.0
    for j in range(p):
        d = A[j, j]
        for k in range(j):
            d -= L[j, k] * L[j, k]
        if not d > 0.0:
            return np.nan
        L[j, j] = np.sqrt(d)
        logdet += 2.0 * np.log(L[j, j])
        for i in range(j + 1, p):
            s = A[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s / L[j, j]
    # L^-1 in place of the upper triangle's mirror: solve column by column into out
    for c in range(p):
        for i in range(p):  # forward substitution L z = e_c
            s = 1.0 if i == c else 0.0
            for k in range(i):
                s -= L[i, k] * out[k, c]
            out[i, c] = s / L[i, i]
    # out holds L^-1; A^-1 = L^-T L^-1
    for i in range(p):
        for j in range(i, p):
            s = 0.0
            for k in range(j, p):
                s += out[k, i] * out[k, j]
            A[i, j] = s  # A is scratch from here on
    for i in range(p):
        for j in range(i, p):
            out[i, j] = A[i, j]
            out[j, i] = A[i, j]
    return logdet


@numba.njit(cache=True, nogil=True)
def _unpack(flat, out):
    p = out.shape[0]
    m = 0
    for a in range(p):
        for b in range(a, p):
            out[a, b] = flat[m]
            out[b, a] = flat[m]
            m += 1


@numba.njit(cache=True, nogil=True)
def _evaluate(y, v, tau2, X, XX, reml, w, acc, A, B2, B3, L, cov, beta, xv):
    """At one voxel and one tau^2: the negative log-likelihood (up to a constant) and
    the Newton step on tau^2 (Fisher scoring where the likelihood is not concave).
    Leaves (X'WX)^-1 in ``cov`` and the GLS estimate in ``beta``.

    With W = diag(1 / (v + tau^2)), P = W - W X (X'WX)^-1 X' W and r = y - X beta = W^-1 P y:
    score  ML: (y'P^2y - tr W) / 2             REML: (y'P^2y - tr P) / 2
    Fisher ML: tr(W^2) / 2                     REML: tr(P^2) / 2
    observed information: y'P^3y - Fisher information."""
    n, p = X.shape
    q = XX.shape[1]
    for m in range(3 * q):
        acc[m] = 0.0
    for a in range(p):
        xv[a] = 0.0
    sum_w = 0.0
    sum_w2 = 0.0
    sum_log_w = 0.0
    block = 1.0
    for i in range(n):
        wi = 1.0 / (v[i] + tau2)
        w[i] = wi
        w2 = wi * wi
        w3 = w2 * wi
        sum_w += wi
        sum_w2 += w2
        block *= wi
        if i % 8 == 7:  # one log per 8 inputs: logs dominate otherwise
            sum_log_w += np.log(block)
            block = 1.0
        wy = wi * y[i]
        for a in range(p):
            xv[a] += wy * X[i, a]
        for m in range(q):
            xx = XX[i, m]
            acc[m] += wi * xx
            acc[q + m] += w2 * xx
            acc[2 * q + m] += w3 * xx
    sum_log_w += np.log(block)
    _unpack(acc[:q], A)
    _unpack(acc[q:2 * q], B2)
    _unpack(acc[2 * q:], B3)
    logdet = _inverse_spd(A, cov, L)  # A is overwritten
    for a in range(p):
        s = 0.0
        for b in range(p):
            s += cov[a, b] * xv[b]
        beta[a] = s
    rwr = 0.0
    wr2 = 0.0
    wa2 = 0.0
    for a in range(p):
        xv[a] = 0.0  # now X' W a with a = W r = P y
    for i in range(n):
        r = y[i]
        for a in range(p):
            r -= X[i, a] * beta[a]
        wr = w[i] * r
        rwr += wr * r
        wr2 += wr * wr
        wwr = w[i] * wr
        wa2 += wwr * wr
        for a in range(p):
            xv[a] += wwr * X[i, a]
    for a in range(p):
        for b in range(p):
            wa2 -= xv[a] * cov[a, b] * xv[b]
    nll = 0.5 * (rwr - sum_log_w)
    if reml:
        nll += 0.5 * logdet
        tr_cb2 = 0.0
        tr_cb3 = 0.0
        tr_cb2cb2 = 0.0
        for a in range(p):
            for b in range(p):
                tr_cb2 += cov[a, b] * B2[b, a]
                tr_cb3 += cov[a, b] * B3[b, a]
        for a in range(p):  # tr((cov B2)^2), with L as scratch for cov B2
            for b in range(p):
                s = 0.0
                for k in range(p):
                    s += cov[a, k] * B2[k, b]
                L[a, b] = s
        for a in range(p):
            for b in range(p):
                tr_cb2cb2 += L[a, b] * L[b, a]
        score = 0.5 * (wr2 - (sum_w - tr_cb2))
        fisher = 0.5 * (sum_w2 - 2.0 * tr_cb3 + tr_cb2cb2)
    else:
        score = 0.5 * (wr2 - sum_w)
        fisher = 0.5 * sum_w2
    observed = wa2 - fisher
    information = observed if observed > 0.0 else fisher
    return nll, score / max(information, 1e-300)


@numba.njit(cache=True, nogil=True)
def _starting_tau2(y, v, X, pinv, dof):
    """Method-of-moments start: OLS residual variance less the mean input variance, >= 0."""
    n, p = X.shape
    rss = 0.0
    mean_v = 0.0
    for i in range(n):
        mean_v += v[i]
    b = np.zeros(p)
    for a in range(p):
        for i in range(n):
            b[a] += pinv[a, i] * y[i]
    for i in range(n):
        r = y[i]
        for a in range(p):
            r -= X[i, a] * b[a]
        rss += r * r
    return max(rss / dof - mean_v / n, 0.0)


@numba.njit(cache=True, parallel=True)
def _fit_voxels(Y, V, X, pinv, reml, tol, max_iterations, tau2, beta, cov, iterations, converged):
    """Newton / Fisher scoring with step halving at every voxel (columns of Y, V): a step that
    lowers the likelihood (it can overshoot, or bounce off tau^2 = 0) is halved until it does not.
    Columns are read in place: a thread's neighbouring voxels share cache lines."""
    n, p = X.shape
    dof = max(n - p, 1)
    a_idx, b_idx = np.triu_indices(p)
    XX = np.empty((n, len(a_idx)))
    for i in range(n):
        for m in range(len(a_idx)):
            XX[i, m] = X[i, a_idx[m]] * X[i, b_idx[m]]
    for j in numba.prange(Y.shape[1]):
        y = Y[:, j]
        v = V[:, j]
        w = np.empty(n)
        acc = np.empty(3 * XX.shape[1])
        A = np.empty((p, p))
        B2 = np.empty((p, p))
        B3 = np.empty((p, p))
        L = np.empty((p, p))
        xv = np.empty(p)
        trial_cov = np.empty((p, p))
        trial_beta = np.empty(p)
        scale = tol * np.mean(v)
        t = _starting_tau2(y, v, X, pinv, dof)
        best, step = _evaluate(y, v, t, X, XX, reml, w, acc, A, B2, B3, L, cov[j], beta[j], xv)
        candidate = max(t + step, 0.0)
        k = 0
        while abs(candidate - t) > scale + tol * t and k < max_iterations:
            nll, step = _evaluate(y, v, candidate, X, XX, reml, w, acc, A, B2, B3, L, trial_cov,
                                  trial_beta, xv)
            k += 1
            if nll <= best + 1e-12 * abs(best):
                t = candidate
                best = nll
                candidate = max(candidate + step, 0.0)
                cov[j, :, :] = trial_cov
                beta[j, :] = trial_beta
            else:
                candidate = 0.5 * (t + candidate)
        converged[j] = abs(candidate - t) <= scale + tol * t
        iterations[j] = k
        tau2[j] = t


def fit_mixed(Y: np.ndarray, V: np.ndarray, X: np.ndarray, method: str = "REML",
              tol: float = TOLERANCE, max_iterations: int = MAX_ITERATIONS) -> MixedFit:
    """Fit the random-effects model at every voxel.

    Y : (N, V) input effects; V : (N, V) their variances (> 0); X : (N, P) full-rank design.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    Y = np.asarray(Y, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    X = np.ascontiguousarray(X, dtype=np.float64)
    if Y.shape != V.shape or Y.shape[0] != X.shape[0]:
        raise ValueError(f"effects {Y.shape}, variances {V.shape} and design {X.shape} do not match")
    n, p = X.shape
    rank = np.linalg.matrix_rank(X)
    if rank < p:
        raise ValueError("the mixed-effects model needs a full-rank design")
    if not (np.all(np.isfinite(V)) and np.all(V > 0)):
        raise ValueError("input variances must be positive and finite")
    count = Y.shape[1]
    tau2 = np.empty(count)
    beta = np.empty((count, p))
    cov = np.empty((count, p, p))
    iterations = np.zeros(count, dtype=np.int32)
    converged = np.zeros(count, dtype=bool)
    _fit_voxels(Y, V, X, np.linalg.pinv(X), method == "REML", tol, max_iterations, tau2, beta, cov,
                iterations, converged)
    return MixedFit(X, beta.T, cov, tau2, float(n - rank), method, iterations, converged)
