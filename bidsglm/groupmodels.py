"""Second-level models: design matrices and a mass-univariate OLS fit.

Designs are pandas tables (rows: input maps, columns: regressors). The fit
uses the pseudo-inverse, so designs that are rank deficient by construction
(the repeated-measures model has one column per condition *and* one per
subject) are allowed; residual degrees of freedom are N - rank(X) and only
estimable contrasts are accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg
from scipy.linalg import sqrtm

from .design import ContrastSpec
from .errors import ModelError
from .firstlevel import design_pinv, design_rank, is_estimable  # noqa: F401 - is_estimable re-exported (group planning)
from .statistics import ContrastResult, f_contrast, t_contrast

INTERCEPT = "mean"
SPHERICITY_NOTE = (
    "Repeated-measures model (one column per condition, one per subject) with a single pooled "
    "error term: it assumes sphericity (equal variance of every difference between conditions). "
    "No Greenhouse-Geisser or Huynh-Feldt correction is applied, so F tests with more than one "
    "numerator degree of freedom can be liberal when sphericity is violated."
)
SPHERICITY_CORRECTED_NOTE = (
    "Repeated-measures model (one column per condition, one per subject) with a single pooled "
    "error term, which assumes sphericity (equal variance of every difference between conditions). "
    "F tests with more than one numerator degree of freedom are corrected for its failure: both "
    "degrees of freedom are multiplied by the {method} epsilon of the condition factor, estimated "
    "per voxel (stat-epsilon map). t tests and one-row F tests are not corrected."
)


# --- designs ------------------------------------------------------------------

def column_name(prefix: str, level) -> str:
    """``sex`` + ``M`` -> ``sex_M``: a name usable in contrast expressions."""
    return re.sub(r"\W", "_", f"{prefix}_{level}")


def _is_numeric(values: pd.Series) -> bool:
    return bool(pd.to_numeric(values, errors="coerce").notna().all())


def _check_mostly_numeric(values: pd.Series, table: pd.DataFrame, column: str, source) -> None:
    """A column whose values are numbers but for a few (``2O`` for 20) is a typo, not a
    categorical covariate: refuse it, naming the row, rather than code every level as a category."""
    numbers = pd.to_numeric(values, errors="coerce")
    text = numbers.isna()
    if text.any() and text.sum() * 2 < len(values):
        sub = values.index[int(np.flatnonzero(text.to_numpy())[0])]
        line = int(table.index.get_loc(sub)) + 2
        raise ModelError(f"{values[sub]!r} is not a number, while {int((~text).sum())} of {len(values)} values "
                         "are: a typo? (use n/a for a missing value)", source,
                         where=f"column '{column}', line {line} (sub-{sub})")
    finite = np.isfinite(numbers.to_numpy(dtype=float)) | text.to_numpy()
    if not finite.all():
        sub = values.index[int(np.flatnonzero(~finite)[0])]
        raise ModelError(f"{values[sub]!r} is not a finite number", source,
                         where=f"column '{column}', line {int(table.index.get_loc(sub)) + 2} (sub-{sub})")


def code_covariates(table: pd.DataFrame, columns: list[str], subjects: list[str],
                    source=None, group_by: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Regressors from participants.tsv for the given subjects.

    Parameters
    ----------
    table : participants table indexed by label without ``sub-`` (values as strings, NaN for n/a)
    columns : covariate columns; numeric ones are mean-centred, others become 0/1
        indicators for every level but the first, also centred (so the intercept stays
        the mean over subjects)
    group_by : a column whose levels get one indicator column each (cell means, no intercept)

    Returns
    -------
    regressors : (S, K) table indexed by the included subjects
    excluded : {subject: reason} for subjects without a value (or absent from the table)
    """
    wanted = list(columns) + ([group_by] if group_by else [])
    repeated = sorted({c for c in wanted if wanted.count(c) > 1})
    if repeated:
        raise ModelError(f"participants.tsv column(s) {', '.join(repeated)} given more than once "
                         "(as covariate and group, or twice)", source)
    for col in wanted:
        if col not in table.columns:
            raise ModelError(f"column '{col}' is not in participants.tsv "
                             f"(columns: {', '.join(map(str, table.columns))})", source)
    excluded = {}
    for sub in subjects:
        if sub not in table.index:
            excluded[sub] = "not listed in participants.tsv"
            continue
        missing = [c for c in wanted if pd.isna(table.at[sub, c]) or str(table.at[sub, c]).strip() == ""]
        if missing:
            excluded[sub] = f"n/a in participants.tsv column(s) {', '.join(missing)}"
    kept = [s for s in subjects if s not in excluded]
    rows = table.loc[kept, wanted] if kept else table.iloc[:0][wanted]
    out = pd.DataFrame(index=pd.Index(kept, name="participant"))
    if group_by:
        levels = sorted(rows[group_by].astype(str).unique())
        if len(levels) < 2:
            raise ModelError(f"--group-by column '{group_by}' has a single value "
                             f"({levels[0] if levels else 'none'}) among the included subjects", source)
        for level in levels:
            _add_column(out, column_name(group_by, level), (rows[group_by].astype(str) == level).astype(float),
                        group_by, level, source)
    else:
        out[INTERCEPT] = 1.0
    if not kept:
        raise ModelError(f"no included subject has a value in column(s) {', '.join(wanted)} "
                         f"({len(excluded)} subject(s) without one: n/a or not listed)", source)
    for col in columns:
        values = rows[col]
        _check_mostly_numeric(values, table, col, source)
        if values.astype(str).nunique() < 2:
            raise ModelError(f"covariate column '{col}' is constant "
                             f"({values.iloc[0] if len(values) else 'no values'}) among the "
                             f"{len(kept)} included subjects", source)
        if _is_numeric(values):
            numbers = pd.to_numeric(values).astype(float)
            out[col] = numbers - numbers.mean()
        else:
            levels = sorted(values.astype(str).unique())
            for level in levels[1:]:
                indicator = (values.astype(str) == level).astype(float)
                _add_column(out, column_name(col, level), indicator - indicator.mean(), col, level, source)
    return out, excluded


def anova_design(rows: list[tuple[str, str]], conditions: list[str]) -> pd.DataFrame:
    """Repeated-measures design: rows are (subject, condition) pairs.

    One indicator column per condition and one per subject; the subject columns
    absorb each subject's mean, so condition effects are tested within subjects."""
    subjects = sorted({s for s, _ in rows})
    data = np.zeros((len(rows), len(conditions) + len(subjects)))
    for i, (sub, cond) in enumerate(rows):
        data[i, conditions.index(cond)] = 1.0
        data[i, len(conditions) + subjects.index(sub)] = 1.0
    index = pd.Index([f"sub-{s}_{c}" for s, c in rows], name="input")
    return pd.DataFrame(data, index=index, columns=list(conditions) + [f"sub-{s}" for s in subjects])


# --- contrasts ----------------------------------------------------------------

def _add_column(out: pd.DataFrame, name: str, values: pd.Series, column: str, level: str, source) -> None:
    """A design column per level; two levels whose names map to one column name ('a b' and
    'a-b' both give grp_a_b) would silently merge two groups: refused instead."""
    if name in out.columns:
        raise ModelError(f"column '{column}': level {level!r} and another level both become design column "
                         f"'{name}' (names differ only in spaces or punctuation); rename one in participants.tsv",
                         source)
    out[name] = values


def contrast_rows(specs: list[ContrastSpec], columns: list[str], aliases: dict | None = None,
                  where: str = "group model") -> np.ndarray:
    """(k, P) weights of one t contrast (k=1) or the rows of an F contrast.

    ``aliases`` maps other accepted spellings (e.g. a contrast's name) to column names."""
    aliases = aliases or {}
    resolved = []
    for spec in specs:
        weights: dict[str, float] = {}
        for name, w in spec.weights:
            key = aliases.get(name, name)
            weights[key] = weights.get(key, 0.0) + w
        resolved.append(ContrastSpec(spec.name, spec.expression, tuple(sorted(weights.items()))))
    for spec in resolved:
        unknown = [c for c in spec.conditions if c not in columns]
        if unknown:
            raise ModelError(f"group contrast '{spec.name}' names unknown condition(s) or "
                             f"column(s) {', '.join(unknown)}; the {where} has: {', '.join(columns)}")
    return np.array([spec.vector(columns) for spec in resolved], dtype=np.float64)


# --- fitting --------------------------------------------------------------------

@dataclass
class GroupFit:
    """OLS fit of every voxel at once.

    design : (N, P); beta : (P, V); dispersion : (V,) residual variance (RSS / dof);
    cov : (P, P) pinv(X) pinv(X).T; dof : N - rank(X)."""

    design: np.ndarray
    beta: np.ndarray
    dispersion: np.ndarray
    cov: np.ndarray
    dof: float
    rank: int

    def contrast(self, c: np.ndarray, f_test: bool = False) -> ContrastResult:
        """t contrast for a (P,) vector or (1, P) row; F contrast for (k, P) rows, or for
        a single row when ``f_test`` (then F = t squared)."""
        c = np.atleast_2d(np.asarray(c, dtype=np.float64))
        if c.shape[0] == 1 and not f_test:
            effect = (c @ self.beta)[0]
            variance = (c @ self.cov @ c.T).item() * self.dispersion
            return t_contrast(effect, variance, self.dof)
        if np.linalg.matrix_rank(c) < c.shape[0]:
            # redundant rows: test the row space (F is the same for any basis of it)
            _, s, vt = np.linalg.svd(c, full_matrices=False)
            c = vt[: int(np.sum(s > s.max() * 1e-10))]
        root = np.real(sqrtm(np.linalg.inv(c @ self.cov @ c.T)))
        return f_contrast(root @ (c @ self.beta), self.dispersion, self.dof)


def fit_ols(Y: np.ndarray, X: np.ndarray) -> GroupFit:
    """Y : (N, V) one map per row; X : (N, P) design."""
    X = np.asarray(X, dtype=np.float64)
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"{Y.shape[0]} maps for a design with {X.shape[0]} rows")
    rank = design_rank(X)
    dof = X.shape[0] - rank
    pinv = design_pinv(X)
    beta = pinv @ Y
    resid = Y - X @ beta
    dispersion = np.einsum("nv,nv->v", resid, resid) / max(dof, 1)
    return GroupFit(X, beta, dispersion, pinv @ pinv.T, float(dof), rank)


class TooFewInputsError(ModelError):
    """The model has no residual degree of freedom."""


def check_enough_inputs(design: pd.DataFrame, what: str, source=None) -> None:
    """At least one residual degree of freedom."""
    rank = design_rank(design.to_numpy()) if design.size else 0
    if design.shape[0] - rank < 1:
        raise TooFewInputsError(
            f"{what}: {design.shape[0]} input map(s) for a model of rank {rank}; "
            f"at least {rank + 1} are needed to estimate the error", source)


def check_mixed_design(design: pd.DataFrame, what: str, source=None) -> None:
    """The mixed-effects fit needs a full-rank design (GLS has no pseudo-inverse shortcut)."""
    rank = design_rank(design.to_numpy())
    if rank < design.shape[1]:
        raise ModelError(f"{what}: the design's {design.shape[1]} columns ({', '.join(design.columns)}) "
                         f"have rank {rank}; the mixed-effects model needs them linearly independent "
                         "(drop a redundant covariate)", source)
