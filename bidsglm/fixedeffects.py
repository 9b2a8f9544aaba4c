"""Precision-weighted fixed effects across runs of one subject."""

from __future__ import annotations

import numpy as np

from .errors import DataError
from .statistics import ContrastResult, t_contrast

_FLOOR = 1e-16  # nilearn's floor on run variances before inverting them


class DegenerateRunError(DataError):
    """One run's maps cannot enter fixed effects; ``row`` is its index, for the caller to name its file."""

    def __init__(self, problem: str, row: int = 0):
        self.row = row
        super().__init__(problem)

    def __reduce__(self):
        return (self.__class__, (self.problem, self.row))


def check_runs(effects: np.ndarray, variances: np.ndarray) -> None:
    """A run with a non-finite effect, or a variance that is zero, negative or non-finite,
    would take all the weight (or poison the mean): refuse it. Two reductions on clean data;
    the offending run is looked for only when there is one."""
    with np.errstate(invalid="ignore"):
        clean = variances.min() > 0 and variances.max() < np.inf and np.isfinite(effects.sum())
    if clean:
        return
    for r in range(effects.shape[0]):
        bad_var = ~(np.isfinite(variances[r]) & (variances[r] > 0))
        if bad_var.any():
            raise DegenerateRunError(f"variance is zero, negative or non-finite in {int(bad_var.sum())} of "
                                     f"{bad_var.size} voxels: cannot weight this run by its precision", r)
        bad_eff = ~np.isfinite(effects[r])
        if bad_eff.any():
            raise DegenerateRunError(f"effect is non-finite in {int(bad_eff.sum())} of {bad_eff.size} voxels", r)


def fixed_effects(effects: np.ndarray, variances: np.ndarray, dofs) -> ContrastResult:
    """Combine run-level t contrasts.

    Parameters
    ----------
    effects, variances : (R, V) run effects and their variances
    dofs : (R,) run residual degrees of freedom

    The combined effect weights each run by its precision (1/variance), its
    variance is 1 / sum(1/variance), and the t statistic has sum(dofs)
    degrees of freedom (as nilearn's compute_fixed_effects). One run passes
    through unchanged. A run with a variance <= 0 or a non-finite value
    raises DegenerateRunError (its index in ``row``).
    """
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    variances = np.atleast_2d(np.asarray(variances, dtype=np.float64))
    if effects.shape != variances.shape:
        raise ValueError(f"effects {effects.shape} and variances {variances.shape} differ")
    if len(dofs) != effects.shape[0]:
        raise ValueError(f"{len(dofs)} dofs for {effects.shape[0]} runs")
    check_runs(effects, variances)
    precision = 1.0 / np.maximum(variances, _FLOOR)
    variance = 1.0 / precision.sum(axis=0)
    effect = (effects * precision).sum(axis=0) * variance
    return t_contrast(effect, variance, float(np.sum(dofs)))
