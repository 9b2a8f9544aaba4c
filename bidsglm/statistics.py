"""Contrast statistics shared by the first level, fixed effects and group level.

The conventions are nilearn's (``nilearn.glm.contrasts``): p-values are
one-sided upper-tail, z-scores come from the p-value (from its complement
where that is more precise), and variances are floored at 1e-50.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

TINY = 1e-50
DOF_MAX = 1e10


def z_from_p(p: np.ndarray, one_minus_p: np.ndarray) -> np.ndarray:
    """Standard-normal quantile matching an upper-tail p-value."""
    p = np.clip(p, 1e-300, 1.0 - 1e-16)
    one_minus_p = np.clip(one_minus_p, 1e-300, 1.0 - 1e-16)
    z = -special.ndtri(p)  # norm.isf, without importing scipy.stats (slow to import)
    use_cdf = z < 0
    z[use_cdf] = special.ndtri(one_minus_p[use_cdf])
    return z


@dataclass
class ContrastResult:
    """Voxel-wise statistics of one contrast.

    effect : (V,) for t, (k, V) for F (whitened effect, as nilearn)
    variance : (V,) variance of the effect (t) or residual variance (F)
    stat : (V,) t or F statistic
    """

    effect: np.ndarray
    variance: np.ndarray
    stat: np.ndarray
    dof: float
    stat_type: str = "t"
    dim: int = 1

    @property
    def p(self) -> np.ndarray:
        return self._tails()[0]

    @property
    def z(self) -> np.ndarray:
        p, one_minus_p = self._tails()
        return z_from_p(p, one_minus_p)

    def _tails(self):
        if not hasattr(self, "_tail_cache"):
            # the functions scipy.stats.t and .f call for sf and cdf
            dof = min(self.dof, DOF_MAX)
            stat = np.asarray(self.stat, dtype=np.float64)
            if self.stat_type == "t":
                self._tail_cache = (special.stdtr(dof, -stat), special.stdtr(dof, stat))
            else:
                self._tail_cache = (special.fdtrc(self.dim, dof, stat), special.fdtr(self.dim, dof, stat))
        return self._tail_cache


def t_contrast(effect: np.ndarray, variance: np.ndarray, dof: float) -> ContrastResult:
    stat = effect / np.sqrt(np.maximum(variance, TINY))
    return ContrastResult(effect, variance, stat, float(dof), "t", 1)


def f_contrast(whitened_effect: np.ndarray, variance: np.ndarray, dof: float) -> ContrastResult:
    dim = whitened_effect.shape[0]
    stat = np.sum(whitened_effect**2, axis=0) / dim / np.maximum(variance, TINY)
    return ContrastResult(whitened_effect, variance, stat, float(dof), "F", dim)
