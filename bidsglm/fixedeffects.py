"""Precision-weighted fixed effects across runs of one subject."""

from __future__ import annotations

import numpy as np

from .statistics import ContrastResult, t_contrast

_FLOOR = 1e-16  # nilearn's floor on run variances before inverting them


def fixed_effects(effects: np.ndarray, variances: np.ndarray, dofs) -> ContrastResult:
    """Combine run-level t contrasts.

    Parameters
    ----------
    effects, variances : (R, V) run effects and their variances
    dofs : (R,) run residual degrees of freedom

    The combined effect weights each run by its precision (1/variance), its
    variance is 1 / sum(1/variance), and the t statistic has sum(dofs)
    degrees of freedom (as nilearn's compute_fixed_effects). One run passes
    through unchanged.
    """
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    variances = np.maximum(np.atleast_2d(np.asarray(variances, dtype=np.float64)), _FLOOR)
    if effects.shape != variances.shape:
        raise ValueError(f"effects {effects.shape} and variances {variances.shape} differ")
    if len(dofs) != effects.shape[0]:
        raise ValueError(f"{len(dofs)} dofs for {effects.shape[0]} runs")
    precision = 1.0 / variances
    variance = 1.0 / precision.sum(axis=0)
    effect = (effects * precision).sum(axis=0) * variance
    return t_contrast(effect, variance, float(np.sum(dofs)))
