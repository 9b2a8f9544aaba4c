"""The run-level GLM: OLS, or AR(1) prewhitening as nilearn does it, vectorised.

nilearn's ``run_glm`` fits OLS, estimates each voxel's lag-1 autocorrelation
of the residuals, truncates it to a grid of 1/bins, and refits every group of
voxels sharing a coefficient with that coefficient's whitening. This module
computes the same quantities with array operations (no per-voxel Python, no
string labels), processing voxels in chunks so memory stays near one copy of
the data.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg import sqrtm

from .statistics import ContrastResult, f_contrast, t_contrast

CHUNK = 16384  # voxels per matrix product: large enough for BLAS, small for memory


def mean_scaling(Y: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Percent signal change around each voxel's mean (nilearn's signal_scaling=0).

    In place, the same float operations run in the same order, without the
    temporary copies of ``100 * (Y / mean - 1)``."""
    mean = np.maximum(Y.mean(axis=0), 1)
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


def design_rank(X: np.ndarray) -> int:
    eps = np.abs(X).sum() * np.finfo(np.float64).eps
    return int(np.linalg.matrix_rank(X, eps))


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
        """Y : (T, V) data; X : (T, P) design."""
        X = np.asarray(X, dtype=np.float64)
        n, p = X.shape
        if Y.shape[0] != n:
            raise ValueError(f"Y has {Y.shape[0]} rows, design has {n}")
        n_vox = Y.shape[1]
        self.design_ = X
        self.dof_ = float(n - design_rank(X))
        if self.noise_model == "ols":
            self.ar1_ = np.zeros(n_vox)
        else:
            self.ar1_ = self._ar1_coefficients(Y, X)
        self.beta_ = np.empty((p, n_vox))
        self.dispersion_ = np.empty(n_vox)
        self.group_ = np.empty(n_vox, dtype=np.int64)
        self.covs_ = []  # (P, P) normalised covariance of beta, one per AR value
        self.rhos_, inverse = np.unique(self.ar1_, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(self.rhos_) + 1))
        for g, rho in enumerate(self.rhos_):
            idx = order[bounds[g]:bounds[g + 1]]
            wX = whiten_ar1(X, rho) if rho != 0 else X
            pinv = scipy.linalg.pinv(wX)
            self.covs_.append(pinv @ pinv.T)
            self.group_[idx] = g
            for sl in _chunks(len(idx)):
                cols = idx[sl]
                wY = whiten_ar1(Y[:, cols], rho)
                beta = pinv @ wY
                resid = wY - wX @ beta
                self.beta_[:, cols] = beta
                self.dispersion_[cols] = np.sum(resid**2, axis=0) / (n - p)
        return self

    def _ar1_coefficients(self, Y: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Yule-Walker AR(1) of the OLS residuals, truncated to the bin grid.

        As nilearn's ``_yule_walker``, residuals are centred by their grand
        mean and r1/r0 carries the n/(n-1) factor of the biased estimates."""
        n = X.shape[0]
        pinv = scipy.linalg.pinv(X)
        n_vox = Y.shape[1]

        def residuals(sl):
            Yc = Y[:, sl]
            return Yc - X @ (pinv @ Yc)

        total = sum(residuals(sl).sum() for sl in _chunks(n_vox))
        grand_mean = total / (n * n_vox)
        rho = np.empty(n_vox)
        for sl in _chunks(n_vox):
            r = residuals(sl) - grand_mean
            s0 = np.einsum("tv,tv->v", r, r) / (n * n)
            s1 = np.einsum("tv,tv->v", r[:-1], r[1:]) / ((n - 1) * n)
            with np.errstate(invalid="ignore", divide="ignore"):
                rho[sl] = np.where(s0 > 0, s1 / s0, 0.0)
        return (rho * self.bins).astype(np.int64) * 1.0 / self.bins

    def contrast(self, weights: np.ndarray) -> ContrastResult:
        """t contrast for a (P,) vector, F contrast for a (k, P) matrix."""
        c = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if c.shape[1] != self.beta_.shape[0]:
            raise ValueError(f"contrast has {c.shape[1]} weights, design has {self.beta_.shape[0]} columns")
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
