"""Design matrices and contrasts for one run.

Events and confounds are read and checked here (every problem names the file,
column and line); HRF convolution and drift terms come from nilearn's
``make_first_level_design_matrix`` so the regressors are exactly the ones a
nilearn user gets.
"""

from __future__ import annotations

import ast
import csv
import fnmatch
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .defaults import DEFAULT_CONFOUNDS  # noqa: F401  (re-exported; cli.py imports it without pandas)
from .errors import DataError, ModelError

_WILDCARD = re.compile(r"[*?\[]")


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        # BIDS tables have no quoting: a stray " must not join lines (events silently lost)
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=str,
                            quoting=csv.QUOTE_NONE)
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty", path) from exc
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse as a tab-separated table ({exc})", path) from exc
    check_unique_header(path)
    return table


def check_unique_header(path: Path) -> None:
    """pandas renames a repeated column ('onset', 'onset.1') without a word: refuse it."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline().rstrip("\r\n").split("\t")
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"column '{name}' appears more than once in the header", path, where="line 1")
        seen.add(name)


def _numeric_column(table: pd.DataFrame, column: str, path: Path, allow_na: bool) -> pd.Series:
    """A column as floats; n/a (where allowed) becomes NaN. Text, 'nan' and +-inf are errors."""
    raw = table[column]
    values = pd.to_numeric(raw, errors="coerce").astype(float)
    bad = ~np.isfinite(values.to_numpy()) & (raw.notna().to_numpy() if allow_na else True)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        text = raw.iloc[row]
        shown = "n/a" if pd.isna(text) else repr(text)
        what = "not a finite number" if np.isinf(values.iloc[row]) else "not a number"
        raise DataError(
            f"{shown} is {what}", path,
            where=f"column '{column}', line {row + 2}",
        )
    return values


def read_events(path: Path) -> pd.DataFrame:
    """Return onset, duration, trial_type (rows with n/a trial_type dropped), and the
    ``modulation`` column (event amplitudes) where the file has one, as nilearn uses it.

    A duration of n/a is read as 0 (an impulse), as BIDS allows. What was
    dropped is noted in ``events.attrs["notes"]`` (one line each, for the
    log and the run's _design.json)."""
    table = _read_tsv(path)
    missing = [c for c in ("onset", "duration", "trial_type") if c not in table.columns]
    if missing:
        raise DataError(
            f"missing required column(s) {', '.join(missing)} "
            f"(columns present: {', '.join(table.columns) or 'none'})",
            path,
        )
    onset = _numeric_column(table, "onset", path, allow_na=False)
    duration = _numeric_column(table, "duration", path, allow_na=True).fillna(0.0)
    if (duration < 0).any():
        row = int(np.flatnonzero((duration < 0).to_numpy())[0])
        raise DataError("negative duration", path, where=f"column 'duration', line {row + 2}")
    events = pd.DataFrame(
        {"onset": onset, "duration": duration, "trial_type": table["trial_type"]}
    )
    if "modulation" in table.columns:  # event amplitudes, as nilearn's design matrix reads them
        events["modulation"] = _numeric_column(table, "modulation", path, allow_na=False)
    if events.empty:
        raise DataError("no events (the table has a header and no rows)", path)
    named = events["trial_type"].notna() & (events["trial_type"].str.strip() != "")
    notes = []
    if not named.any():
        raise DataError("trial_type is n/a or empty in every row: no condition to model", path,
                        where="column 'trial_type'")
    if not named.all():
        lines = [str(i + 2) for i in np.flatnonzero(~named.to_numpy())]
        notes.append(f"{len(lines)} event(s) with trial_type n/a are not modelled (line(s) "
                     f"{', '.join(lines[:5])}{', ...' if len(lines) > 5 else ''})")
    events = events[named].reset_index(drop=True)
    events.attrs["notes"] = notes
    return events


def event_timing_notes(events: pd.DataFrame, n_volumes: int, tr: float, min_onset: float) -> list[str]:
    """One line per kind of event the scan does not (fully) cover: before ``min_onset``
    (nilearn drops them), negative onsets, onsets after the last volume (not modelled)."""
    onset = events["onset"].to_numpy()
    end = n_volumes * tr
    notes = []
    for mask, what in ((onset < min_onset, f"start more than {-min_onset:g} s before the first volume "
                                           "and are not modelled"),
                       ((onset < 0) & (onset >= min_onset), "have a negative onset (before the first volume)"),
                       (onset >= end, f"start after the end of the scan ({end:g} s) and are not modelled")):
        if mask.any():
            conditions = sorted(set(events["trial_type"][mask]))
            notes.append(f"{int(mask.sum())} event(s) {what} (condition(s) {', '.join(conditions)})")
    return notes


def read_confounds(path: Path, requested: list[str], n_volumes: int) -> pd.DataFrame:
    """Select confound columns (exact names or shell wildcards) from an fMRIPrep table.

    Leading n/a values (fMRIPrep's first row of derivatives and framewise
    displacement) are set to 0; n/a anywhere else is an error. A wildcard that
    matches nothing selects nothing (e.g. no motion outliers in this run); an
    exact name that is absent is an error."""
    table = _read_tsv(path)
    if len(table) != n_volumes:
        raise DataError(
            f"has {len(table)} rows but the BOLD run has {n_volumes} volumes", path
        )
    columns: list[str] = []
    for pattern in requested:
        if _WILDCARD.search(pattern):
            hits = [c for c in table.columns if fnmatch.fnmatchcase(c, pattern)]
        else:
            if pattern not in table.columns:
                close = [c for c in table.columns if pattern.split("_")[0] in c][:5]
                hint = f" (similar columns: {', '.join(close)})" if close else ""
                raise DataError(f"requested confound column '{pattern}' is absent{hint}", path)
            hits = [pattern]
        columns.extend(c for c in hits if c not in columns)
    out = {}
    for col in columns:
        values, bad_row = leading_na_as_zero(_numeric_column(table, col, path, allow_na=True).to_numpy())
        if bad_row is not None:
            problem = "n/a throughout" if bad_row < 0 else "n/a after the first rows"
            raise DataError(problem, path, where=f"column '{col}'" + (f", line {bad_row + 2}" if bad_row >= 0 else ""))
        out[col] = values
    return pd.DataFrame(out, index=range(n_volumes))


def leading_na_as_zero(values: np.ndarray) -> tuple[np.ndarray, int | None]:
    """fMRIPrep's derivative columns start with n/a: those rows become 0.

    Returns the values and None, or the row of the first n/a after a value
    (-1 for a column that is n/a throughout), which the caller reports."""
    nan = np.isnan(values)
    if not nan.any():
        return values, None
    if nan.all():
        return values, -1
    first = int(np.argmin(nan))
    if nan[first:].any():
        return values, first + int(np.flatnonzero(nan[first:])[0])
    return np.where(nan, 0.0, values), None


def mean_framewise_displacement(path: Path) -> float | None:
    """Mean of fMRIPrep's ``framewise_displacement`` column (its leading n/a skipped),
    or None where the table has no such column. Recorded for group-level exclusions."""
    table = _read_tsv(path)
    if "framewise_displacement" not in table.columns:
        return None
    values = _numeric_column(table, "framewise_displacement", path, allow_na=True)
    return float(values.mean()) if values.notna().any() else None


@dataclass(frozen=True)
class DesignSettings:
    hrf_model: str = "glover"
    drift_model: str | None = "cosine"
    high_pass: float = 1.0 / 128
    drift_order: int = 1
    slice_time_ref: float = 0.0
    min_onset: float = -24.0


def _nilearn_design(make, *args, **kwargs) -> pd.DataFrame:
    """nilearn's design matrix; its refusals (ValueError) are a model error, not a crash.
    What nilearn prints on stdout (e.g. that it uses a modulation column) stays out of ours."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return make(*args, **kwargs)
    except ValueError as exc:
        raise ModelError(f"the design matrix cannot be built: {' '.join(str(exc).split())}") from exc


def frame_times(n_volumes: int, tr: float, slice_time_ref: float) -> np.ndarray:
    """Acquisition time of each volume, as nilearn computes it."""
    start = slice_time_ref * tr
    return np.linspace(start, (n_volumes - 1 + slice_time_ref) * tr, n_volumes)


def build_design(
    events: pd.DataFrame,
    confounds: pd.DataFrame,
    n_volumes: int,
    tr: float,
    settings: DesignSettings,
) -> pd.DataFrame:
    """Design matrix (n_volumes x regressors): conditions, confounds, drifts, constant.

    nilearn's warnings do not reach the terminal raw: they are kept, one line
    each, in ``design.attrs["notes"]`` for the caller to log and record."""
    import warnings

    from nilearn.glm.first_level import make_first_level_design_matrix

    clash = set(events["trial_type"]) & set(confounds.columns)
    if clash:
        raise ModelError(f"condition(s) {', '.join(sorted(clash))} have the same name as confound columns")
    reserved = sorted(c for c in set(events["trial_type"]) if c == "constant" or re.fullmatch(r"drift_\d+", c))
    if reserved:
        raise ModelError(f"condition name(s) {', '.join(reserved)} are those of the design's intercept or drift "
                         "columns; rename them in the events (column 'trial_type')")
    nyquist = 0.5 / tr
    if settings.drift_model == "cosine" and settings.high_pass >= nyquist:
        raise ModelError(f"high-pass cut-off {settings.high_pass:g} Hz is not below the Nyquist frequency "
                         f"{nyquist:g} Hz of this run (TR {tr:g} s): the drift terms would absorb every "
                         "degree of freedom (lower --high-pass, e.g. 1/128)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        design = _nilearn_design(
            make_first_level_design_matrix,
            frame_times(n_volumes, tr, settings.slice_time_ref),
            events,
            hrf_model=settings.hrf_model,
            drift_model=settings.drift_model,
            high_pass=settings.high_pass,
            drift_order=settings.drift_order,
            add_regs=confounds.to_numpy() if confounds.shape[1] else None,
            add_reg_names=list(confounds.columns) if confounds.shape[1] else None,
            min_onset=settings.min_onset,
        )
    notes = list(events.attrs.get("notes", []))
    notes += event_timing_notes(events, n_volumes, tr, settings.min_onset)
    # our own lines above cover nilearn's warnings about event timing; keep any other, in one line
    notes += [f"nilearn: {' '.join(str(w.message).split())}" for w in caught
              if "onset" not in str(w.message).lower()]
    design.attrs["notes"] = list(dict.fromkeys(notes))
    return design


# --- contrasts -------------------------------------------------------------

@dataclass(frozen=True)
class ContrastSpec:
    """A named linear combination of conditions, e.g. ``incongruent - congruent``.

    ``test`` is "t", "F" (``rows`` then holds one weights tuple per row) or
    "pass" (only the effect and its variance are estimated, for the next level)."""

    name: str
    expression: str
    weights: tuple  # ((condition, weight), ...), sorted by condition
    test: str = "t"
    rows: tuple = ()  # F: (((condition, weight), ...), ...)

    @property
    def conditions(self) -> list[str]:
        pairs = [p for row in self.rows for p in row] if self.rows else self.weights
        return list(dict.fromkeys(c for c, _ in pairs))

    def vector(self, columns: list[str]) -> np.ndarray:
        """Weights over design columns; conditions absent from ``columns`` are an error."""
        return _weights_vector(self.weights, columns)

    def matrix(self, columns: list[str]) -> np.ndarray:
        """(k, P) F-contrast matrix (one row for a t contrast)."""
        return np.array([_weights_vector(r, columns) for r in (self.rows or (self.weights,))])


def _weights_vector(pairs, columns: list[str]) -> np.ndarray:
    vec = np.zeros(len(columns))
    for cond, w in pairs:
        vec[columns.index(cond)] += w
    return vec


MAX_EXPRESSION = 2000  # characters: a contrast is a short sum, not a program
MAX_WEIGHT = 1e12  # weights beyond this (or non-zero below 1/MAX_WEIGHT) overflow the variance maps


def _linear_terms(node, names: dict) -> dict:
    """Walk a linear expression's syntax tree into {name: weight} (constant under key None).

    Only numbers, names, unary +/-, +, -, and * or / by a number are accepted;
    nothing is evaluated (no ``eval``, no calls, no attributes, no powers)."""
    if isinstance(node, ast.Expression):
        return _linear_terms(node.body, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return {None: _finite(float(node.value))}
    if isinstance(node, ast.Name):
        return {names.get(node.id, node.id): 1.0}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _linear_terms(node.operand, names)
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return {k: sign * v for k, v in inner.items()}
    if isinstance(node, ast.BinOp):
        left, right = _linear_terms(node.left, names), _linear_terms(node.right, names)
        if isinstance(node.op, (ast.Add, ast.Sub)):
            sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
            out = dict(left)
            for k, v in right.items():
                out[k] = out.get(k, 0.0) + sign * v
            return out
        if isinstance(node.op, ast.Mult):
            if set(left) == {None}:
                return {k: _finite(left[None] * v) for k, v in right.items()}
            if set(right) == {None}:
                return {k: _finite(right[None] * v) for k, v in left.items()}
            raise ValueError("product of two conditions is not linear")
        if isinstance(node.op, ast.Div) and set(right) == {None}:
            if right[None] == 0:
                raise ValueError("division by zero")
            return {k: _finite(v / right[None]) for k, v in left.items()}
    raise ValueError("only +, -, * and / by numbers, numbers and condition names are allowed")


def _finite(value: float) -> float:
    if not np.isfinite(value):
        raise ValueError(f"a weight overflows ({value})")
    return value


def parse_contrast(name: str, expression: str) -> ContrastSpec:
    """Parse ``incongruent - congruent`` or ``0.5*a + 0.5*b``.

    Condition names that are not Python identifiers can be written in
    backquotes: ```face-1` - `house-1```."""
    names = {}

    def _quote(match):
        key = f"__cond{len(names)}__"
        names[key] = match.group(1)
        return key

    if len(expression) > MAX_EXPRESSION:
        raise ModelError(f"contrast '{name}': expression is {len(expression)} characters long "
                         f"(at most {MAX_EXPRESSION})")
    text = re.sub(r"`([^`]+)`", _quote, expression)
    try:
        terms = _linear_terms(ast.parse(text.strip(), mode="eval"), names)
    except (SyntaxError, MemoryError, RecursionError) as exc:
        raise ModelError(f"contrast '{name}': cannot parse expression {expression!r}") from exc
    except (ValueError, OverflowError) as exc:  # ast.parse: ValueError for null bytes
        raise ModelError(f"contrast '{name}': {exc} in {expression!r}") from exc
    if terms.get(None, 0.0) != 0.0:
        raise ModelError(f"contrast '{name}': a constant term is not allowed in {expression!r}")
    terms.pop(None, None)
    weights = tuple(sorted((k, v) for k, v in terms.items() if v != 0.0))
    if not weights:
        raise ModelError(f"contrast '{name}': expression {expression!r} has no non-zero weight")
    extreme = [k for k, v in weights if not 1 / MAX_WEIGHT <= abs(v) <= MAX_WEIGHT]
    if extreme:
        raise ModelError(f"contrast '{name}': the weight of '{extreme[0]}' in {expression!r} is outside "
                         f"[{1 / MAX_WEIGHT:g}, {MAX_WEIGHT:g}] in magnitude (its maps would overflow)")
    return ContrastSpec(name, expression, weights)


def parse_contrast_option(text: str) -> ContrastSpec:
    """``NAME=EXPRESSION`` from the command line (a bare condition is its own name)."""
    name, sep, expr = text.partition("=")
    if not sep:
        expr = name
    name, expr = name.strip(), expr.strip()
    if not name or not expr:
        raise ModelError(f"--contrast {text!r}: expected NAME=EXPRESSION")
    return parse_contrast(name, expr)


def check_unique_names(names: list[str], option: str) -> None:
    """Two contrasts with one name, or names that give one file label, would overwrite
    each other's maps: refuse them, naming the option."""
    from .errors import UsageError

    seen: dict[str, str] = {}
    for name in names:
        label = bids_label(name)
        if name in seen.values():
            raise UsageError(f"{option}: contrast name '{name}' is given more than once")
        if label in seen:
            raise UsageError(f"{option}: contrasts '{seen[label]}' and '{name}' would both be written as "
                             f"contrast-{label}; rename one")
        seen[label] = name


def default_contrasts(conditions: list[str]) -> list[ContrastSpec]:
    """One contrast per condition against the implicit baseline."""
    return [ContrastSpec(c, c, ((c, 1.0),)) for c in sorted(conditions)]


def check_contrasts(contrasts: list[ContrastSpec], conditions: set[str], where: str) -> None:
    """Every condition a contrast names must occur in at least one run."""
    for con in contrasts:
        unknown = [c for c in con.conditions if c not in conditions]
        if unknown:
            raise ModelError(
                f"contrast '{con.name}' names unknown condition(s) {', '.join(unknown)}; "
                f"conditions in the events: {', '.join(sorted(conditions)) or 'none'}",
                where,
            )


def bids_label(name: str) -> str:
    """camelCase alphanumeric form of a contrast name: ``incongruent - congruent``
    -> ``incongruentMinusCongruent``."""
    text = name.replace("-", " Minus ").replace("+", " Plus ").replace("*", " Times ")
    words = [w for w in re.split(r"[^0-9A-Za-z]+", text) if w]
    if not words:
        return "c" + hashlib.sha1(name.encode()).hexdigest()[:8]
    first, rest = words[0], words[1:]
    return first[0].lower() + first[1:] + "".join(w[0].upper() + w[1:] for w in rest)


def contrast_labels(names: list[str]) -> dict[str, str]:
    """Map names to BIDS-safe labels; names that would collide get a short
    hash of the original name, so two contrasts never share a label."""
    labels = {n: bids_label(n) for n in names}
    counts: dict[str, int] = {}
    for lab in labels.values():
        counts[lab] = counts.get(lab, 0) + 1
    for n, lab in labels.items():
        if counts[lab] > 1:
            labels[n] = lab + hashlib.sha1(n.encode()).hexdigest()[:6]
    return labels
