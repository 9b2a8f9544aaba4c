"""Run-level design matrices of a BIDS Stats Model.

Variables (events, their columns, fMRIPrep confounds) and the
pybids-transforms-v1 instructions are evaluated by pybids' ``bids.modeling``,
the reference implementation of those transformations, so a model gives the
same regressors here as in other tools built on it (tests compare the
published models' design matrices column by column). bidsglm adds what
pybids leaves to the estimating software (pybids evaluates ``Model.Formula``
with formulaic): ``Model.HRF`` (convolution of the
listed variables), ``Model.Options.HighPassFilterCutoffHz`` (a cosine drift
basis, as nilearn's) and contrasts, which are checked against each run's
columns.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .design import ContrastSpec, leading_na_as_zero
from .discovery import RunInputs
from .errors import BidsGlmError, ModelError
from .statsmodel import ModelContrast, Node, StatsModel, brief_list

log = logging.getLogger("bidsglm")

# pybids' entity names for the BIDS filename entities (Model.Input uses pybids' names too)
PYBIDS_ENTITY = {"sub": "subject", "ses": "session", "task": "task", "run": "run", "acq": "acquisition",
                  "rec": "reconstruction", "dir": "direction", "echo": "echo"}


class RunDesigner:
    """Design matrices and contrasts of a model's Run node, one run at a time.

    The pybids layout is indexed once (raw dataset plus fMRIPrep derivatives);
    each run's variables are loaded with that run's entities only."""

    def __init__(self, bids_dir: Path, derivatives: list[Path], model: StatsModel, node: Node):
        from bids import BIDSLayout

        self.model, self.node = model, node
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.layout = BIDSLayout(str(bids_dir), derivatives=[str(d) for d in derivatives], validate=False)

    def _spec(self) -> dict:
        """A one-node model for pybids: the Run node, HRF convolution appended to its transformations."""
        raw = copy.deepcopy(self.node.raw)
        instructions = list((raw.get("Transformations") or {}).get("Instructions", []))
        model = raw.setdefault("Model", {})
        if self.node.hrf:
            name = self.node.hrf["Model"]
            derivative, dispersion = "derivative" in name, "dispersion" in name
            instructions.append({"Name": "Convolve", "Input": self.node.hrf["Variables"],
                                 "Model": name.split("+")[0].strip(), "Derivative": derivative,
                                 "Dispersion": dispersion})
            # the derivative regressors join the design beside their variable
            suffixes = ["_derivative"] * derivative + ["_dispersion"] * dispersion
            extra = [v + s for v in self.node.hrf["Variables"] for s in suffixes]
            model["X"] = list(model["X"]) + [c for c in extra if not any(
                isinstance(p, str) and fnmatch.fnmatchcase(c, p) for p in model["X"])]
        raw["Transformations"] = {"Transformer": "pybids-transforms-v1", "Instructions": instructions}
        model.pop("HRF", None)
        model.pop("Options", None)
        if self.node.formula is not None:  # the checked formula only, never the model's own text
            model["Formula"] = self.node.formula_text
        return {"Name": self.model.name, "BIDSModelVersion": "1.0.0", "Nodes": [raw]}

    def design(self, run: RunInputs, n_volumes: int, tr: float) -> pd.DataFrame:
        """(n_volumes, columns) design of one run, in the order Model.X lists them."""
        from bids.modeling import BIDSStatsModelsGraph

        entities = {PYBIDS_ENTITY[k]: v for k, v in run.entities.items() if k in PYBIDS_ENTITY}
        if "run" in entities:
            entities["run"] = int(entities["run"]) if str(entities["run"]).isdigit() else entities["run"]
        where = f"node '{self.node.name}'"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = BIDSStatsModelsGraph(self.layout, self._spec())
                graph.load_collections(scan_length=n_volumes * tr, **entities)
                _absent_where_na(graph.root_node)
                outputs = graph.root_node.run(group_by=self.node.group_by, force_dense=True,
                                              transformation_history=False)
        except KeyError as exc:
            raise ModelError(f"{run.label}: variable {exc.args[0]!r} is not available (not an events column, "
                             "a confound or the output of an earlier transformation)",
                             self.model.path, where=f"{where}, field 'Transformations' or 'Model.X'") from exc
        except ValueError as exc:
            if "X specification includes variable" in str(exc):  # pybids: a text column, or absent
                missing = self._missing_x(str(exc))
                raise ModelError(f"{run.label}: Model.X names {len(missing)} variable(s) not in the data: "
                                 f"{brief_list(missing)} (a column of text must be turned into numbers first, "
                                 "e.g. by Factor)", self.model.path, where=f"{where}, field 'Model.X'") from exc
            hint = (" (an n/a onset or duration in a convolved variable, e.g. a duration assigned from a "
                    "column with n/a values)" if "NaN" in str(exc) else "")
            raise ModelError(f"{run.label}: the transformations failed: {first_line(exc)}{hint}", self.model.path,
                             where=f"{where}, field 'Transformations'") from exc
        except (BidsGlmError, MemoryError):
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("formulaic"):  # Model.Formula's errors share no base class
                raise ModelError(f"{run.label}: {type(exc).__name__}: {first_line(exc)} (formula terms "
                                 "name Model.X variables, dotted names in backquotes: `trial_type.a`)",
                                 self.model.path, where=f"{where}, field 'Model.Formula'") from exc
            # anything else pybids raises on this model (NotImplementedError for what it does not
            # build, TypeError, IndexError...): the model's problem, named, never an internal error
            raise ModelError(f"pybids cannot build the design of {run.label} from this node "
                             f"({type(exc).__name__}: {first_line(exc)})", self.model.path, where=where) from exc
        if len(outputs) != 1:
            raise ModelError(f"{run.label}: the model's variables give {len(outputs)} designs for one run "
                             "(are the events and confounds found?)", self.model.path, where=where)
        X = outputs[0].X.reset_index(drop=True)
        if len(X) != n_volumes:
            raise ModelError(f"{run.label}: design has {len(X)} rows, the BOLD run {n_volumes} volumes",
                             self.model.path, where=where)
        X = self._fill_leading_nan(X, run)
        hp = self.node.options.get("HighPassFilterCutoffHz")
        if hp:
            X = pd.concat([X, cosine_drift(hp, np.arange(n_volumes) * tr)], axis=1)
        return X.astype(float)

    def _missing_x(self, text: str) -> list[str]:
        """The names pybids reports as not in the data, in Model.X's order (its list is a set)."""
        listed = re.search(r"variable\(s\) \[(.*)\], but", text, re.S)
        names = ([a or b for a, b in re.findall(r"'([^']*)'|\"([^\"]*)\"", listed.group(1))]
                 if listed else [])
        order = {str(v): i for i, v in enumerate(self.node.x)}
        return sorted(names, key=lambda n: (order.get(n, len(order)), n))

    def _fill_leading_nan(self, X: pd.DataFrame, run: RunInputs) -> pd.DataFrame:
        """Leading n/a (fMRIPrep's derivative columns) become 0; n/a later, or throughout, is an error."""
        for col in X.columns:
            values, bad_row = leading_na_as_zero(X[col].to_numpy(dtype=float))
            if bad_row is not None:
                problem = ("is n/a throughout (n/a values in an events column make its convolved regressor n/a)"
                           if bad_row < 0 else f"is n/a at volume {bad_row + 1}")
                raise ModelError(f"{run.label}: variable '{col}' {problem}", self.model.path,
                                 where=f"node '{self.node.name}', field 'Model.X'")
            X[col] = values
        return X

    def analysis_mask(self, run: RunInputs) -> Path | None:
        """Model.Options.Mask: the one image of the input datasets with these entities
        (and the run's subject, session and space), used instead of the brain mask."""
        wanted = self.node.options.get("Mask")
        if not wanted:
            return None
        query = {k: v for k, v in wanted.items()}
        query.setdefault("subject", run.entities["sub"])
        if "ses" in run.entities:
            query.setdefault("session", run.entities["ses"])
        if "space" in run.entities:
            query.setdefault("space", run.entities["space"])
        files = self.layout.get(return_type="file", extension=[".nii.gz", ".nii"], **query)
        if len(files) != 1:
            found = f"{len(files)} images" + (f" ({', '.join(Path(f).name for f in files[:3])})" if files else "")
            raise ModelError(f"{run.label}: the mask {wanted} matches {found}; exactly one is needed",
                             self.model.path, where=f"node '{self.node.name}', field 'Model.Options.Mask'")
        return Path(files[0])

    def contrasts(self, columns: list[str]) -> tuple[list[ContrastSpec], dict]:
        """This run's contrasts (explicit and dummy) and those dropped, with why."""
        return node_contrasts(self.node, columns, self.model.path)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text, at most ``limit`` characters: one line on the terminal."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def check_run_grouping(model: StatsModel, node: Node, runs: list[RunInputs]) -> None:
    """The Run node's GroupBy may be any set of entities (``[run, subject]``, ``[run]`` for one
    subject, ``[subject]`` for one run each...) as long as each group is one BOLD run: bidsglm
    fits one design per run and does not concatenate runs (BIDS Stats Models, Node.GroupBy)."""
    where = f"node '{node.name}', field 'GroupBy'"
    filename = {v: k for k, v in PYBIDS_ENTITY.items()}
    unknown = [g for g in node.group_by if g not in filename]
    if unknown:
        raise ModelError(f"grouping a Run node by {', '.join(unknown)} is not supported (entities: "
                         f"{', '.join(filename)})", model.path, where=where)
    groups: dict[tuple, list[RunInputs]] = {}
    for run in runs:
        # tasks are modelled apart whatever the grouping (select one with Model.Input or --task)
        key = (run.entities.get("task"), *(run.entities.get(filename[g]) for g in node.group_by))
        groups.setdefault(key, []).append(run)
    for members in groups.values():
        if len(members) > 1:
            raise ModelError(f"GroupBy {node.group_by} puts {len(members)} runs in one design "
                             f"({', '.join(r.label for r in members[:3])}); bidsglm fits one design per BOLD "
                             "run and does not concatenate runs (BIDS Stats Models, Node.GroupBy): group by "
                             "run and subject (and session)", model.path, where=where)


def _absent_where_na(node) -> None:
    """n/a in a numeric events column means the event has no value for it (a parametric
    modulator given for some trial types only, a response time of a trial without
    response). pybids keeps such rows, and a NaN amplitude or duration makes the whole
    convolved regressor n/a; a 0 gives that event no weight, as dropping it would.

    An event whose trial_type is n/a belongs to no condition: it is left out of every
    variable of its events file (pybids' Factor cannot sort n/a among labels, and the
    variables of one file must keep the same events for Assign); n/a in another text
    column leaves those events out of that column only. Each is said once per run."""
    from bids.variables import SparseRunVariable

    for collection in getattr(node, "_collections", []):
        sparse = [v for v in collection.variables.values() if isinstance(v, SparseRunVariable)]
        for var in sparse:
            if var.values.isna().any() and not pd.api.types.is_numeric_dtype(var.values.dtype):
                keep = (~var.values.isna()).to_numpy()
                log.warning("%s: events column '%s' is n/a in %d of %d rows; those events are in no "
                            "condition", _run_text(var), var.name, int((~keep).sum()), len(keep))
                same_file = [v for v in sparse if len(v.values) == len(keep)] if var.name == "trial_type" else [var]
                for other in same_file:
                    other.select_rows(np.flatnonzero(keep))
        for var in sparse:
            if pd.api.types.is_float_dtype(var.values.dtype) and var.values.isna().any():
                var.values = var.values.fillna(0.0)


def _run_text(var) -> str:
    ent = var.index.iloc[0] if len(var.index) else {}
    short = {"subject": "sub", "session": "ses", "task": "task", "run": "run"}
    return " ".join(f"{short[k]}-{ent[k]}" for k in short if k in ent and ent[k] == ent[k])


def cosine_drift(high_pass_hz: float, frame_times: np.ndarray) -> pd.DataFrame:
    """nilearn's discrete cosine basis below the cut-off (its constant left out: the model has one)."""
    from nilearn.glm.first_level import make_first_level_design_matrix

    drift = make_first_level_design_matrix(frame_times, drift_model="cosine", high_pass=high_pass_hz)
    return drift.drop(columns="constant").reset_index(drop=True)


def node_contrasts(node: Node, columns: list[str], model_path: Path) -> tuple[list[ContrastSpec], dict]:
    """ContrastSpecs of a node over the given design columns.

    DummyContrasts give one contrast per listed variable (all of Model.X's
    variables, wildcards expanded, when none are listed); explicit Contrasts
    replace dummy ones of the same name. A contrast naming a variable that is
    not a column is dropped for this design, with the reason."""
    specs: dict[str, ContrastSpec] = {}
    dropped: dict[str, str] = {}
    if node.dummy_contrasts is not None:
        listed = node.dummy_contrasts["Contrasts"]
        listed = node.x if listed is None else listed  # absent: all of X; [] none (refused when alone)
        names = []
        for var in listed:
            var = "intercept" if var in (1, "1") else var
            names += [c for c in columns if fnmatch.fnmatchcase(c, var)] or [var]
        for var in dict.fromkeys(names):
            specs[var] = _spec(ModelContrast(var, (var,), (1.0,), node.dummy_contrasts["Test"]))
    for con in node.contrasts:
        specs[con.name] = _spec(con)
    usable = []
    for spec in specs.values():
        missing = [c for c in spec.conditions if c not in columns]
        if missing:
            dropped[spec.name] = f"variable(s) {', '.join(missing)} not in this design"
        else:
            usable.append(spec)
    return usable, dropped


def _spec(con: ModelContrast) -> ContrastSpec:
    if con.test == "F":
        rows = tuple(tuple(zip(con.conditions, row)) for row in con.weights)
        expr = "; ".join(" + ".join(f"{w:g}*{c}" for c, w in row if w) for row in rows)
        return ContrastSpec(con.name, expr, rows[0], "F", rows)
    pairs = tuple(zip(con.conditions, con.weights))
    expr = " + ".join(f"{w:g}*{c}" for c, w in pairs if w)
    return ContrastSpec(con.name, expr, pairs, con.test)
