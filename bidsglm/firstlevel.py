"""The run-level GLM: OLS, or AR(1) prewhitening as nilearn does it, vectorised.

nilearn's ``run_glm`` fits OLS, estimates each voxel's lag-1 autocorrelation
of the residuals, truncates it to a grid of 1/bins, and refits every group of
voxels sharing a coefficient with that coefficient's whitening.

This module gets the same estimates from one pass over the data. AR(1)
whitening W (rows t >= 1 become y_t - rho y_(t-1), the first row is kept) is
linear in rho, so every quantity the fits need is a quadratic form in the
data that a few time-shifted copies of the design reach:

    X'W'Wy  = X'y - rho (X_next + X_prev)'y + rho^2 X_trunc'y
    |Wy|^2  = S0 - 2 rho S1 + rho^2 S2          (S: sums of y_t y_t and y_t y_(t-1))

One float64 product of the stacked designs with the data, chunk by chunk,
gives the OLS fit, its residual autocorrelation and every whitened refit;
the data are never gathered by AR group, copied or whitened. Agreement with
nilearn's explicit residuals is to rounding (tests: 1e-10 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg import sqrtm
from threadpoolctl import threadpool_limits

from .errors import DataError, ModelError
from .statistics import ContrastResult, f_contrast, t_contrast

CHUNK = 16384  # voxels per matrix product: large enough for BLAS, small for memory
CONSTANT = 1e-10  # variance over time below this fraction of the mean square: a constant voxel
ZERO_REGRESSOR = 1e-10  # a column whose largest value is below this fraction of the design's: zero
ZERO_VARIANCE = 1e-12  # residual variance below this fraction of the mean square: fitted exactly


def element_means(Y: np.ndarray) -> np.ndarray:
    """Each voxel's mean over time, as nilearn computes it (in Y's precision); where that sum
    overflows (values near the float32 limit), in float64: finite data have a finite mean."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean = Y.mean(axis=0)
        bad = ~np.isfinite(mean)
        if bad.any():
            mean[bad] = Y[:, bad].mean(axis=0, dtype=np.float64)
    return mean


def mean_scaling(Y: np.ndarray, in_place: bool = False, mean: np.ndarray | None = None) -> np.ndarray:
    """Percent signal change around each voxel's mean (nilearn's signal_scaling=0; a mean below 1
    is taken as 1, as nilearn does). ``mean``: element_means(Y), when the caller has it.

    In place, the same float operations run in the same order, without the
    temporary copies of ``100 * (Y / mean - 1)``."""
    mean = np.maximum(element_means(Y) if mean is None else mean, 1)
    if not in_place:
        return 100 * (Y / mean - 1)
    Y /= mean
    Y -= 1
    Y *= 100
    return Y


def whiten_ar1(A: np.ndarray, rho: float) -> np.ndarray:
    """Rows t >= 1 become A[t] - rho * A[t-1]; the first row is kept (nilearn's ARModel)."""
    A = np.asarray(A, dtype=np.float64)
    out = A.copy()
    out[1:] = out[1:] - rho * A[:-1]
    return out


def _chunks(n: int, size: int = CHUNK):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# Singular values below this fraction of the largest count as zero, in the rank (degrees of
# freedom) and in every pseudo-inverse alike. Columns that are linear combinations of others up
# to rounding (e.g. a parametric modulator built from two others) leave a singular value near
# 1e-13 of the largest: kept, it multiplies the data by 1e13 along a direction of pure noise,
# and the residual sums that the AR(1) estimate is made of lose every digit (rho of 900 was
# seen). Real designs, whatever their units, stay far above this (condition numbers < 1e8).
RANK_RTOL = 1e-10


def design_pinv(A: np.ndarray) -> np.ndarray:
    """Pseudo-inverse with the rank tolerance of design_rank (RANK_RTOL)."""
    return scipy.linalg.pinv(np.asarray(A, dtype=np.float64), atol=0.0, rtol=RANK_RTOL)


def design_rank(X: np.ndarray) -> int:
    X = np.asarray(X, dtype=np.float64)
    if X.size == 0:
        return 0
    s = np.linalg.svd(X, compute_uv=False)
    return int((s > RANK_RTOL * s[0]).sum())


def check_design(X: np.ndarray, columns: list[str]) -> None:
    """A design the GLM can estimate: finite, no regressor that is zero throughout, at least one
    residual degree of freedom (the variance is RSS / (T - P), as nilearn's). O(T x P)."""
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    bad = ~np.isfinite(X).all(axis=0)
    if bad.any():
        raise ModelError(f"column '{columns[int(np.argmax(bad))]}' of the design has non-finite values")
    # a regressor at rounding level (events beyond the scan leave ~1e-300 from the convolution) is zero
    zero = np.abs(X).max(axis=0) <= ZERO_REGRESSOR * max(np.abs(X).max(), 1.0)
    if zero.any():
        raise ModelError(f"column '{columns[int(np.argmax(zero))]}' is zero in every volume")
    if n - p < 1:
        raise ModelError(f"design has {p} columns for {n} volumes: no residual degrees of freedom")


def is_estimable(c: np.ndarray, X: np.ndarray) -> bool:
    """Every row of c is a combination of the rows of X, so c @ beta does not depend
    on which solution the pseudo-inverse picked."""
    c = np.atleast_2d(c)
    projected = c @ design_pinv(X) @ X
    return bool(np.allclose(projected, c, atol=1e-8 * max(1.0, np.abs(c).max())))


def check_estimable(c: np.ndarray, X: np.ndarray, columns: list[str], name: str) -> None:
    """A contrast of a rank-deficient design (duplicate or collinear columns) must not depend
    on the pseudo-inverse's choice of solution."""
    X = np.asarray(X, dtype=np.float64)
    if design_rank(X) == X.shape[1] or is_estimable(c, X):
        return
    used = [columns[j] for j in np.flatnonzero(np.atleast_2d(c).any(axis=0))]
    raise ModelError(f"contrast '{name}' is not estimable: the design's columns are linearly dependent "
                     f"(duplicate regressors?) and its weights on {', '.join(used)} are not identified")


# largest share of the mask that may be left out (constant, non-finite) before a run is refused
MAX_VOXELS_LEFT_OUT = 0.5


def check_left_out(valid: np.ndarray, unit: str = "brain-mask voxels", hint: str = "") -> str:
    """The rule for elements without usable data (constant in time, non-finite, fitted exactly),
    shared by volumes and surfaces: none usable, or more than half left out, is refused (DataError);
    a few left out give the one-line note returned (to log and record); none gives ''.
    ``hint`` is added to a refusal (e.g. why the data look constant)."""
    valid = np.asarray(valid, bool)
    n, left_out = valid.size, int((~valid).sum())
    if not left_out:
        return ""
    hint = f" ({hint})" if hint else ""
    if left_out == n:
        raise DataError(f"BOLD is constant in time or non-finite in all {n} {unit}: nothing to model "
                        f"(an empty or broken run){hint}")
    share = left_out / n
    if share > MAX_VOXELS_LEFT_OUT:
        raise DataError(f"BOLD is constant in time, non-finite or fitted exactly by the design in {left_out} "
                        f"of {n} {unit} ({share:.0%}): an empty or broken run{hint}")
    return (f"{left_out} of {n} {unit} left out of this run's mask (BOLD constant in time, non-finite, or "
            "fitted exactly by the design: no residual variance)")


def check_statistic_maps(values: dict[str, np.ndarray]) -> None:
    """Maps as they will be written (float32): finite everywhere in the mask, variances positive.
    Raises DataError naming the statistic and how many voxels fail."""
    for stat, v in values.items():
        with np.errstate(over="ignore"):
            v32 = np.asarray(v).astype(np.float32, copy=False)
        bad = ~np.isfinite(v32)
        if stat == "variance":
            bad |= ~(v32 > 0)
        if bad.any():
            what = "is zero, negative or non-finite" if stat == "variance" else "is non-finite"
            raise DataError(f"the {stat} map {what} in {int(bad.sum())} of {bad.size} voxels in the mask; "
                            "no maps written")


@dataclass
class _Moments:
    """Per-voxel sufficient statistics of (T, V) data for a (T, P) design.

    xy : (3P, V) rows X'y, (X_next + X_prev)'y, X_trunc'y
    s0, s1, s2 : (V,) sum y_t^2, sum_(t>=1) y_t y_(t-1), sum_(t<=T-2) y_t^2
    total, first, last : (V,) sum y_t, y_0, y_(T-1)
    """

    xy: np.ndarray
    s0: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    total: np.ndarray
    first: np.ndarray
    last: np.ndarray


def _varying_voxels(m: "_Moments", n: int) -> np.ndarray:
    """(V,) True where the data are finite and vary in time, from the moments (no pass over Y)."""
    with np.errstate(invalid="ignore", over="ignore"):
        mean_square = m.s0 / n
        variance = mean_square - (m.total / n) ** 2
        return np.isfinite(m.s0) & np.isfinite(m.total) & (variance > CONSTANT * mean_square)


def _shifted_designs(X: np.ndarray) -> np.ndarray:
    """(T, 3P): X, X_next + X_prev, X_trunc (rows t hold x_t, x_(t+1) + x_(t-1), x_t for t < T-1)."""
    nxt = np.zeros_like(X)
    nxt[:-1] = X[1:]
    prev = np.zeros_like(X)
    prev[1:] = X[:-1]
    trunc = X.copy()
    trunc[-1] = 0
    return np.hstack([X, nxt + prev, trunc])


def _moments(Y: np.ndarray, X: np.ndarray) -> _Moments:
    """One pass over Y in float64 chunks of voxels."""
    # a row of ones on the stacked designs gives sum y_t from the same product
    G = np.vstack([_shifted_designs(X).T, np.ones(X.shape[0])])
    n_vox = Y.shape[1]
    xy = np.empty((G.shape[0], n_vox))
    s0, s1 = np.empty(n_vox), np.empty(n_vox)
    for sl in _chunks(n_vox):
        y = np.asarray(Y[:, sl], dtype=np.float64)
        xy[:, sl] = G @ y  # (matmul into a strided view of xy would bypass BLAS)
        s0[sl] = np.einsum("tv,tv->v", y, y)
        s1[sl] = np.einsum("tv,tv->v", y[1:], y[:-1])
    first = np.asarray(Y[0], dtype=np.float64)
    last = np.asarray(Y[-1], dtype=np.float64)
    return _Moments(xy[:-1], s0, s1, s0 - last**2, xy[-1], first, last)


class RunGLM:
    """Mass-univariate GLM for one run.

    Parameters
    ----------
    noise_model : {'ar1', 'ols'}
    bins : int
        AR(1) coefficients are truncated to multiples of 1/bins (nilearn: 100).

    Attributes after ``fit``
    ------------------------
    beta_ : (P, V) parameter estimates
    dispersion_ : (V,) residual variance of the (whitened) model
    ar1_ : (V,) truncated AR(1) coefficient (0 for OLS)
    dof_ : residual degrees of freedom, T - rank(X)
    """

    def __init__(self, noise_model: str = "ar1", bins: int = 100):
        if noise_model not in ("ar1", "ols"):
            raise ValueError(f"noise_model must be 'ar1' or 'ols', not {noise_model!r}")
        self.noise_model = noise_model
        self.bins = bins

    def fit(self, Y: np.ndarray, X: np.ndarray) -> "RunGLM":
        """Y : (T, V) data (float32 or float64); X : (T, P) design.

        Voxels without signal to model (a non-finite value, constant in time, or
        reproduced exactly by the design: zero residual variance) are left out
        and the fit is that of the other voxels alone; ``valid_`` (V,) marks the
        voxels fitted, and every per-voxel attribute covers those only."""
        X = np.asarray(X, dtype=np.float64)
        n, p = X.shape
        if Y.shape[0] != n:
            raise ValueError(f"Y has {Y.shape[0]} rows, design has {n}")
        if n < 2:
            raise ValueError("a run needs at least 2 volumes")
        self.design_ = X
        self.dof_ = float(n - design_rank(X))
        m = _moments(Y, X)
        valid = _varying_voxels(m, n)
        if not valid.all():  # rare: refit without them, so the AR(1) grand mean never sees them
            m = self._moments_of(Y, X, valid)
        self._fit_moments(m, X)
        exact = ~(self.dispersion_ > ZERO_VARIANCE * m.s0 / n)
        if exact.any():
            valid[np.flatnonzero(valid)[exact]] = False
            self._fit_moments(self._moments_of(Y, X, valid), X)
        self.valid_ = valid
        return self

    @staticmethod
    def _moments_of(Y: np.ndarray, X: np.ndarray, valid: np.ndarray) -> "_Moments":
        if not valid.any():
            raise DataError("the data are non-finite or constant in time in every voxel: nothing to model")
        return _moments(Y[:, valid], X)

    def _fit_moments(self, m: "_Moments", X: np.ndarray) -> None:
        n, p = X.shape
        if self.noise_model == "ols":
            self.ar1_ = np.zeros(m.s0.shape[0])
        else:
            self.ar1_ = self._ar1_coefficients(m, X)
        self.rhos_, self.group_ = np.unique(self.ar1_, return_inverse=True)
        self.covs_ = []  # (P, P) normalised covariance of beta, one per AR value
        # one BLAS thread for these small SVDs: threads only wait on each other there (on a busy
        # machine a 300 x 60 pseudo-inverse took 40 times longer with two threads than with one)
        with threadpool_limits(1, "blas"):
            for rho in self.rhos_:
                pinv = design_pinv(whiten_ar1(X, rho) if rho != 0 else X)
                self.covs_.append(pinv @ pinv.T)
        self.beta_, rss = self._whitened_fits(m, p)
        self.dispersion_ = rss / (n - p)

    def _whitened_fits(self, m: _Moments, p: int) -> tuple[np.ndarray, np.ndarray]:
        """beta = (wX'wX)^+ wX'wy per AR group and the residual sum of squares |wy|^2 - beta'wX'wy."""
        rho = self.ar1_
        xwy = m.xy[:p] - rho * m.xy[p:2 * p] + rho**2 * m.xy[2 * p:]
        beta = np.empty_like(xwy)
        order = np.argsort(self.group_, kind="stable")
        bounds = np.searchsorted(self.group_[order], np.arange(len(self.rhos_) + 1))
        for g, cov in enumerate(self.covs_):
            idx = order[bounds[g]:bounds[g + 1]]
            beta[:, idx] = cov @ xwy[:, idx]
        wyy = m.s0 - 2 * rho * m.s1 + rho**2 * m.s2
        rss = np.maximum(wyy - np.einsum("pv,pv->v", beta, xwy), 0.0)
        return beta, rss

    def _ar1_coefficients(self, m: _Moments, X: np.ndarray) -> np.ndarray:
        """Yule-Walker AR(1) of the OLS residuals, truncated to the bin grid.

        As nilearn's ``_yule_walker``, residuals are centred by their grand
        mean and r1/r0 carries the n/(n-1) factor of the biased estimates.
        The residual sums come from the moments: with r = y - X b,
        sum r_t r_(t-1) = S1 - b'(X_next + X_prev)'y + b'K b, K = sum x_t x_(t-1)'."""
        n, p = X.shape
        pinv = design_pinv(X)
        b = (pinv @ pinv.T) @ m.xy[:p]  # OLS fit, as pinv(X) @ y
        K = X[1:].T @ X[:-1]
        r_sum = m.total - X.sum(axis=0) @ b
        r_sq = np.maximum(m.s0 - np.einsum("pv,pv->v", b, m.xy[:p]), 0.0)
        r_lag = m.s1 - np.einsum("pv,pv->v", b, m.xy[p:2 * p]) + np.einsum("pv,pq,qv->v", b, K, b)
        r_first = m.first - X[0] @ b
        r_last = m.last - X[-1] @ b
        g = r_sum.sum() / (n * r_sum.size)  # grand mean of all residuals
        s0 = (r_sq - 2 * g * r_sum + n * g * g) / (n * n)
        s1 = (r_lag - g * (2 * r_sum - r_first - r_last) + (n - 1) * g * g) / ((n - 1) * n)
        # residuals at rounding level (a voxel the design fits exactly) have no AR structure
        floor = 1e-12 * m.s0 / (n * n)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where(s0 > floor, s1 / s0, 0.0)
        return (rho * self.bins).astype(np.int64) * 1.0 / self.bins

    def contrast(self, weights: np.ndarray) -> ContrastResult:
        """t contrast for a (P,) vector, F contrast for a (k, P) matrix."""
        c = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if c.shape[1] != self.beta_.shape[0]:
            raise ValueError(f"contrast has {c.shape[1]} weights, design has {self.beta_.shape[0]} columns")
        # extreme weights overflow to inf: check_statistic_maps refuses such maps, in one line
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._contrast(c)

    def _contrast(self, c: np.ndarray) -> ContrastResult:
        if c.shape[0] == 1:
            effect = (c @ self.beta_)[0]
            scale = np.array([(c @ cov @ c.T).item() for cov in self.covs_])
            variance = scale[self.group_] * self.dispersion_
            return t_contrast(effect, variance, self.dof_)
        dim = c.shape[0]
        whitened = np.empty((dim, self.beta_.shape[1]))
        for g, cov in enumerate(self.covs_):
            idx = self.group_ == g
            root = np.real(sqrtm(np.linalg.inv(c @ cov @ c.T)))
            whitened[:, idx] = root @ (c @ self.beta_[:, idx])
        return f_contrast(whitened, self.dispersion_.copy(), self.dof_)
