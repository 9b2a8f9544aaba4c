"""BIDS Stats Models: read a model JSON, check it against the specification
(BIDS Stats Models 1.0) and against what bidsglm can honour.

Every problem is a ModelError naming the node and the field, so a user sees
``model.json: node 'run_level', field 'Model.Options.LowPassFilterCutoffHz':
not supported by bidsglm`` rather than a silently different analysis.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelError
from .modelformula import FormulaError, check_query, check_variable_name, formulaic_text, parse_formula

LEVELS = ("Run", "Session", "Subject", "Dataset")
MODEL_TYPES = ("glm", "meta")
TESTS = ("t", "F", "pass")
TRANSFORMER = "pybids-transforms-v1"
# nilearn's HRF names, which the BIDS Stats Models examples also use
HRF_MODELS = ("spm", "spm + derivative", "spm + derivative + dispersion",
              "glover", "glover + derivative", "glover + derivative + dispersion")

# fields of each object in the specification (BIDS Stats Models 1.0.0)
_FIELDS = {
    "model": {"Name", "BIDSModelVersion", "Description", "Input", "Nodes", "Edges"},
    "node": {"Level", "Name", "GroupBy", "Transformations", "Model", "Contrasts", "DummyContrasts",
             "Description"},
    "transformations": {"Transformer", "Instructions", "Description"},
    "Model": {"Type", "X", "Formula", "HRF", "Options", "Software", "Description"},
    "HRF": {"Variables", "Model", "Parameters", "Description"},
    "Options": {"HighPassFilterCutoffHz", "LowPassFilterCutoffHz", "ReplaceVariables", "Mask",
                "Aggregate", "Description"},
    "contrast": {"Name", "ConditionList", "Weights", "Test", "Description"},
    "DummyContrasts": {"Contrasts", "Test", "Description"},
    "edge": {"Source", "Destination", "Filter", "Description"},
}
# in the specification, but not something bidsglm can honour: an error, never ignored
_UNSUPPORTED = {
    "Model.Options.LowPassFilterCutoffHz": "low-pass filtering is not implemented (BIDS Stats Models, Model.Options)",
    "Model.Options.ReplaceVariables": "voxel-wise regressors are not implemented (BIDS Stats Models, Model.Options)",
}
AGGREGATES = ("none", "mean", "pca")
# keyword options of pybids' BIDSLayout.get, which Options.Mask's keys must not reach
_QUERY_OPTIONS = {"return_type", "target", "scope", "regex_search", "absolute_paths", "invalid_filters",
                  "drop_invalid_filters"}


MAX_WEIGHT = 1e10  # larger contrast weights overflow the float32 effect and variance maps
LISTED = 10  # names shown in a message before "... and N more"


def brief_list(names, limit: int = LISTED) -> str:
    """``a, b, c`` or, past ``limit`` names, the first ``limit`` and ``... and N more``, so a
    message stays one readable line whatever the model lists."""
    names = [str(n) for n in names]
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" ... and {len(names) - limit} more"


@dataclass(frozen=True)
class ModelContrast:
    """A contrast of a node: t (one row of weights), F (several rows) or pass."""

    name: str
    conditions: tuple
    weights: tuple  # t/pass: (w, ...); F: ((w, ...), ...)
    test: str


@dataclass
class Node:
    level: str
    name: str
    group_by: list
    model_type: str
    x: list
    transformations: list = field(default_factory=list)  # pybids instructions
    hrf: dict | None = None
    options: dict = field(default_factory=dict)
    contrasts: list = field(default_factory=list)  # ModelContrast
    dummy_contrasts: dict | None = None  # {"Contrasts": [...] or None, "Test": ...}
    raw: dict = field(default_factory=dict)
    formula: list | None = None  # modelformula.Term list of a checked Model.Formula

    @property
    def formula_text(self) -> str | None:
        """Model.Formula as formulaic gets it: the checked terms, every name backquoted."""
        return formulaic_text(self.formula) if self.formula is not None else None

    @property
    def intercept_only(self) -> bool:
        return all(v in (1, "1", "intercept") for v in self.x)


@dataclass
class Edge:
    source: str
    destination: str
    filter: dict = field(default_factory=dict)


@dataclass
class StatsModel:
    name: str
    path: Path
    nodes: list
    edges: list
    input: dict
    raw: dict

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def children(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.source == name]

    def parent_edge(self, name: str) -> Edge | None:
        return next((e for e in self.edges if e.destination == name), None)


def node_label(name: str) -> str:
    """The node's folder label (``node-<label>``): letters, digits and _ only, so a name such as
    ``run level`` or ``../x`` never makes an odd or escaping path (``runLevel``, ``x``)."""
    words = [w for w in re.split(r"[^A-Za-z0-9_]+", name) if w]
    if not words:
        import hashlib

        return "n" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return words[0] + "".join(w[0].upper() + w[1:] for w in words[1:])


class _Checker:
    """Collects the location of each problem: file, node and field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str, node: str | None = None, where: str | None = None):
        loc = ", ".join(p for p in (f"node '{node}'" if node else None,
                                    f"field '{where}'" if where else None) if p)
        raise ModelError(message, self.path, where=loc or None)

    def keys(self, obj, kind: str, node: str | None, prefix: str) -> dict:
        if not isinstance(obj, dict):
            self.fail(f"must be a JSON object, not {type(obj).__name__}", node, prefix or None)
        for key in obj:
            if key not in _FIELDS[kind]:
                self.fail(f"unknown field (BIDS Stats Models 1.0 allows: {', '.join(sorted(_FIELDS[kind]))})",
                          node, f"{prefix}.{key}" if prefix else key)
        return obj

    def required(self, obj: dict, names, node, prefix: str) -> None:
        for name in names:
            if name not in obj:
                self.fail("required field is missing", node, f"{prefix}.{name}" if prefix else name)

    def string_list(self, value, node, where: str, allow_one: bool = False) -> list:
        ok = isinstance(value, list) and all(
            isinstance(v, str) or (allow_one and v == 1 and not isinstance(v, bool)) for v in value)
        if not ok:
            self.fail("must be a list of strings" + (" (or the number 1)" if allow_one else ""), node, where)
        return value


def load_model(path: Path) -> StatsModel:
    """Read and check a BIDS Stats Model JSON file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ModelError(f"cannot read the model ({exc.strerror})", path) from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"not valid JSON: {exc.msg}", path, where=f"line {exc.lineno}, column {exc.colno}") from exc
    except RecursionError as exc:
        raise ModelError("not valid JSON: nested too deeply", path) from exc
    except UnicodeDecodeError as exc:
        raise ModelError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from exc
    check = _Checker(path)
    check.keys(raw, "model", None, "")
    check.required(raw, ("Name", "BIDSModelVersion", "Nodes"), None, "")
    if not isinstance(raw["Name"], str) or not raw["Name"].strip():
        check.fail("must be a non-empty string (sidecars name the model by it)", None, "Name")
    if not isinstance(raw["Nodes"], list) or not raw["Nodes"]:
        check.fail("must be a non-empty list of nodes", None, "Nodes")
    model_input = raw.get("Input") or {}
    if not isinstance(model_input, dict) or not all(isinstance(v, list) for v in model_input.values()):
        check.fail("must map entities to lists of values", None, "Input")
    nodes = [_node(check, n, i) for i, n in enumerate(raw["Nodes"])]
    names = [n.name for n in nodes]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        check.fail(f"node names must be unique; repeated: {', '.join(sorted(dup))}", None, "Nodes")
    # folders differing only in case are one folder on macOS, Windows and Docker Desktop mounts
    folders = [node_label(n).lower() for n in names]
    clash = {f for f in folders if folders.count(f) > 1}
    if clash:
        first = sorted(clash)[0]
        same = [n for n, f in zip(names, folders) if f == first]
        check.fail(f"node names {', '.join(repr(n) for n in same)} give the same folder name "
                   f"node-{node_label(same[0])} (letters compared without case, as case-insensitive file "
                   "systems do); rename one", None, "Nodes")
    edges = _edges(check, raw.get("Edges"), nodes)
    _check_nodes_produce(check, nodes)
    return StatsModel(raw["Name"], path, nodes, edges,
                      {k: [str(v) for v in vals] for k, vals in model_input.items()}, raw)


def _check_nodes_produce(check: _Checker, nodes: list) -> None:
    """A node's outputs are its contrasts (BIDS Stats Models): a node with no Contrasts and no
    DummyContrasts writes nothing, and the nodes it feeds get nothing. Refused, rather than a
    run that ends well with no maps."""
    for node in nodes:
        dummy = node.dummy_contrasts is not None and node.dummy_contrasts["Contrasts"] != []
        if not node.contrasts and not dummy:
            check.fail("the node defines no contrasts (Contrasts empty or absent, no DummyContrasts or "
                       "DummyContrasts.Contrasts empty): it "
                       "would write no maps, and the nodes it feeds none either; add Contrasts or "
                       "DummyContrasts", node.name, "Contrasts")


def _check_node_name(check: _Checker, name, index: int) -> None:
    """A node's name becomes its folder label node-<label> (BIDS labels: ASCII letters and
    digits); a name that would lose letters on the way, or keep none, is refused."""
    where = f"Nodes[{index}].Name"
    if not isinstance(name, str) or not name.strip():
        check.fail("a node needs a non-empty Name (it names the node's folder node-<label>)", None, where)
    odd = list(dict.fromkeys(ch for ch in name if not ch.isascii()))
    if odd:
        check.fail(f"node name {name!r} has characters outside ASCII ({''.join(odd[:10])}); the name becomes "
                   "the folder label node-<label>, which BIDS allows in ASCII letters and digits only: "
                   "rename the node (the Description can hold any text)", None, where)
    if not re.search(r"[A-Za-z0-9]", name):
        check.fail(f"node name {name!r} has no letter or digit; it becomes the folder label node-<label>",
                   None, where)


def _node(check: _Checker, raw, index: int) -> Node:
    label = raw.get("Name") if isinstance(raw, dict) and isinstance(raw.get("Name"), str) else f"#{index + 1}"
    check.keys(raw, "node", label, "")
    check.required(raw, ("Level", "Name", "GroupBy", "Model"), label, "")
    _check_node_name(check, raw["Name"], index)
    level = raw["Level"]
    if not isinstance(level, str) or level.capitalize() not in LEVELS:
        check.fail(f"{level!r} is not a level ({', '.join(LEVELS)})", label, "Level")
    level = level.capitalize()
    group_by = check.string_list(raw["GroupBy"], label, "GroupBy")
    model = check.keys(raw["Model"], "Model", label, "Model")
    check.required(model, ("Type", "X"), label, "Model")
    if model["Type"] not in MODEL_TYPES:
        check.fail(f"{model['Type']!r} is not a model type ({', '.join(MODEL_TYPES)})", label, "Model.Type")
    x = check.string_list(model["X"], label, "Model.X", allow_one=True)
    if not x:
        check.fail("lists no variables: name the design's columns (and 1 for the intercept)", label, "Model.X")
    if level == "Run" and all(v in (1, "1", "intercept") for v in x):
        # the intercept of a run is the mean BOLD signal: no effect of an event or condition is
        # estimated (pybids does not build such designs either)
        check.fail("a Run node with the intercept only models nothing but the mean BOLD signal; list the "
                   "variables of interest (events, confounds) in Model.X", label, "Model.X")
    formula = None
    if "Formula" in model:
        # formulaic would evaluate it as Python: only the parsed safe subset goes on, all names backquoted
        try:
            formula = parse_formula(model["Formula"])
        except FormulaError as exc:
            check.fail(f"refused: {exc}", label, "Model.Formula")
        if level != "Run":
            check.fail("not supported by bidsglm: formulas are supported on Run nodes only; list the "
                       "variables in Model.X (BIDS Stats Models, Model.Formula)", label, "Model.Formula")
    for key, why in _UNSUPPORTED.items():
        parts = key.split(".")[1:]
        obj = model
        for part in parts[:-1]:
            obj = obj.get(part) or {}
        if parts[-1] in obj:
            check.fail(f"not supported by bidsglm: {why}", label, key)
    if model.get("Software"):
        # options for named software packages; none is addressed to bidsglm, so say so rather than drop them
        logging.getLogger("bidsglm").warning(
            "%s: node '%s', field 'Model.Software': options for %s are not used by bidsglm", check.path.name,
            label, ", ".join(sorted(model["Software"])))
    node = Node(level, raw["Name"], group_by, model["Type"], x, raw=raw)
    node.formula = formula
    node.transformations = _transformations(check, raw.get("Transformations"), label, level)
    node.hrf = _hrf(check, model.get("HRF"), label, x)
    options = model.get("Options") or {}
    check.keys(options, "Options", label, "Model.Options")
    node.options = options
    if "HighPassFilterCutoffHz" in options:
        hp = options["HighPassFilterCutoffHz"]
        if not isinstance(hp, numbers.Real) or isinstance(hp, bool) or hp <= 0:
            check.fail("must be a positive number of Hz", label, "Model.Options.HighPassFilterCutoffHz")
    if "Aggregate" in options:
        # "none" (the spec's default) is what bidsglm does: one time course per voxel of the mask
        if options["Aggregate"] not in AGGREGATES:
            check.fail(f"{options['Aggregate']!r} is not one of {', '.join(AGGREGATES)}", label,
                       "Model.Options.Aggregate")
        if options["Aggregate"] != "none":
            check.fail("not supported by bidsglm: region-of-interest models (time series averaged or reduced "
                       "within the mask) are not implemented; \"none\" fits every voxel (BIDS Stats Models, "
                       "Model.Options)", label,
                       "Model.Options.Aggregate")
    if "Mask" in options and not isinstance(options["Mask"], dict):
        check.fail("must map BIDS entities to values, e.g. {\"desc\": \"brain\", \"suffix\": \"mask\"}",
                   label, "Model.Options.Mask")
    for key, value in (options.get("Mask") or {}).items():
        # the keys become keyword arguments of pybids' layout query: entities only, not its options
        if not re.fullmatch(r"[a-z][a-zA-Z]*", key) or key in _QUERY_OPTIONS:
            check.fail(f"{key!r} is not a BIDS entity", label, f"Model.Options.Mask.{key}")
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            check.fail("must be a string or a list of strings", label, f"Model.Options.Mask.{key}")
    if "Contrasts" in raw and not isinstance(raw["Contrasts"], list):
        check.fail("must be a list of contrasts", label, "Contrasts")
    node.contrasts = [_contrast(check, c, label, i) for i, c in enumerate(raw.get("Contrasts") or [])]
    _check_contrast_names(check, node.contrasts, label)
    if raw.get("DummyContrasts") is not None:
        dummy = check.keys(raw["DummyContrasts"], "DummyContrasts", label, "DummyContrasts")
        if dummy.get("Test", "t") not in TESTS:
            check.fail(f"{dummy.get('Test')!r} is not a test ({', '.join(TESTS)})", label, "DummyContrasts.Test")
        if "Contrasts" in dummy:
            check.string_list(dummy["Contrasts"], label, "DummyContrasts.Contrasts", allow_one=True)
        node.dummy_contrasts = {"Contrasts": dummy.get("Contrasts"), "Test": dummy.get("Test", "t")}
    return node


def _transformations(check: _Checker, raw, node: str, level: str) -> list:
    if raw is None:
        return []
    check.keys(raw, "transformations", node, "Transformations")
    if raw.get("Transformer", TRANSFORMER) != TRANSFORMER:
        check.fail(f"transformer {raw.get('Transformer')!r} is not supported (only {TRANSFORMER})",
                   node, "Transformations.Transformer")
    instructions = raw.get("Instructions", [])
    if not isinstance(instructions, list):
        check.fail("must be a list", node, "Transformations.Instructions")
    if instructions and level not in ("Run", "Dataset"):
        check.fail("not supported by bidsglm: transformations are supported on Run nodes only (BIDS Stats "
                   f"Models, Node.Transformations at a {level} node)", node, "Transformations")
    from bids.modeling import transformations as pybids_transformations

    for i, ins in enumerate(instructions):
        where = f"Transformations.Instructions[{i}]"
        if not isinstance(ins, dict) or not isinstance(ins.get("Name"), str):
            check.fail("each instruction needs a Name", node, where)
        if not hasattr(pybids_transformations, ins["Name"]):
            check.fail(f"unknown transformation {ins['Name']!r}", node, f"{where}.Name")
        if "Input" not in ins:
            check.fail(f"transformation {ins['Name']} needs an Input", node, f"{where}.Input")
        _check_evaluated_text(check, ins, node, where)
    return instructions


def _names(value) -> list:
    return value if isinstance(value, list) else [value]


def _check_evaluated_text(check: _Checker, ins: dict, node: str, where: str) -> None:
    """pybids hands Filter's Query to pandas.query and builds a formulaic formula from
    Split's By: only the safe subset reaches them (see modelformula)."""
    try:
        for key in ("Input", "Output", "By"):
            for name in _names(ins.get(key, [])):
                check_variable_name(name)
    except FormulaError as exc:
        check.fail(f"refused: {exc}", node, f"{where}.{key}")
    name = ins["Name"]
    if name == "Split":
        for by in _names(ins.get("By", [])):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", by):
                check.fail(f"refused: Split By {by!r} must be a plain name (letters, digits, _), as pybids "
                           "builds a formula from it", node, f"{where}.By")
    if name == "Filter":
        query = next((ins[k] for k in ins if k.lower() == "query"), None)
        if query is None:
            check.fail("Filter needs a Query", node, f"{where}.Query")
        try:
            check_query(query, set(_names(ins["Input"])) | set(_names(ins.get("By", []))))
        except FormulaError as exc:
            check.fail(f"refused: {exc}", node, f"{where}.Query")


def _hrf(check: _Checker, raw, node: str, x: list) -> dict | None:
    if raw is None:
        return None
    check.keys(raw, "HRF", node, "Model.HRF")
    check.required(raw, ("Variables", "Model"), node, "Model.HRF")
    variables = check.string_list(raw["Variables"], node, "Model.HRF.Variables")
    if str(raw["Model"]).lower() not in HRF_MODELS:
        check.fail(f"HRF model {raw['Model']!r} is not supported ({', '.join(HRF_MODELS)}; BIDS Stats Models, "
                   "Model.HRF)", node, "Model.HRF.Model")
    if raw.get("Parameters"):
        check.fail("HRF parameters are not supported: the canonical shapes are used (BIDS Stats Models, "
                   "Model.HRF.Parameters)", node,
                   "Model.HRF.Parameters")
    import fnmatch

    for v in variables:
        if not any(isinstance(p, str) and fnmatch.fnmatchcase(v, p) for p in x):
            check.fail(f"variable {v!r} is convolved but not in Model.X", node, "Model.HRF.Variables")
    return {"Variables": variables, "Model": str(raw["Model"]).lower()}


def _check_contrast_names(check: _Checker, contrasts: list, node: str) -> None:
    """Each contrast names its maps: the same name twice would overwrite the first's, and names
    equal but for case give files that are one file on case-insensitive file systems."""
    from .design import bids_label

    seen: dict[str, int] = {}
    for i, con in enumerate(contrasts):
        key = bids_label(con.name).lower()
        if key in seen:
            j = seen[key]
            same = con.name == contrasts[j].name
            check.fail(f"Contrasts[{j}] and Contrasts[{i}] are both named {con.name!r}" if same else
                       f"Contrasts[{j}] ({contrasts[j].name!r}) and Contrasts[{i}] ({con.name!r}) give file "
                       "labels that differ only in case (one file on case-insensitive file systems)",
                       node, "Contrasts")
        seen[key] = i


def _contrast(check: _Checker, raw, node: str, index: int) -> ModelContrast:
    prefix = f"Contrasts[{index}]"
    check.keys(raw, "contrast", node, prefix)
    check.required(raw, ("Name", "ConditionList", "Weights", "Test"), node, prefix)
    name = raw["Name"]
    if not isinstance(name, str) or not name.strip():
        check.fail("a contrast needs a non-empty Name", node, f"{prefix}.Name")
    where = f"Contrasts[{index}] ('{name}')"
    conditions = check.string_list(raw["ConditionList"], node, f"{where}.ConditionList", allow_one=True)
    repeated = sorted({str(c) for c in conditions if conditions.count(c) > 1})
    if repeated:  # e.g. [x, x] with weights [1, -1]: a contrast of nothing, surely a typo for [x, y]
        check.fail(f"names {', '.join(repeated)} more than once: each condition takes one weight",
                   node, f"{where}.ConditionList")
    if raw["Test"] not in TESTS:
        check.fail(f"{raw['Test']!r} is not a test ({', '.join(TESTS)})", node, f"{where}.Test")
    weights = raw["Weights"]
    rows = weights if weights and all(isinstance(w, list) for w in weights) else [weights]
    for r, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(conditions):
            check.fail(f"needs one weight per condition ({len(conditions)})", node, f"{where}.Weights")
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in row):
            check.fail("weights must be numbers", node, f"{where}.Weights")
        if not all(np.isfinite(w) for w in row):
            check.fail("weights must be finite", node, f"{where}.Weights")
        if any(abs(w) > MAX_WEIGHT for w in row):
            check.fail(f"weights beyond {MAX_WEIGHT:g} in size overflow the effect and variance maps; t and z "
                       "do not depend on the weights' scale (use weights near 1)", node, f"{where}.Weights")
        if not any(row):
            check.fail(f"row {r + 1} of the F contrast's weights is all zero (each row must test something; "
                       "remove it)" if len(rows) > 1 else "weights are all zero", node, f"{where}.Weights")
    if raw["Test"] != "F" and len(rows) > 1:
        check.fail("several rows of weights need Test 'F'", node, f"{where}.Test")
    cond = tuple("intercept" if c in (1, "1") else c for c in conditions)
    if raw["Test"] == "F":
        return ModelContrast(name, cond, tuple(tuple(float(w) for w in r) for r in rows), "F")
    return ModelContrast(name, cond, tuple(float(w) for w in rows[0]), raw["Test"])


def _edges(check: _Checker, raw, nodes: list[Node]) -> list[Edge]:
    names = [n.name for n in nodes]
    if raw is None:  # implicit: each node feeds the next
        return [Edge(a, b) for a, b in zip(names, names[1:])]
    if not isinstance(raw, list):
        check.fail("must be a list", None, "Edges")
    edges = []
    for i, e in enumerate(raw):
        check.keys(e, "edge", None, f"Edges[{i}]")
        check.required(e, ("Source", "Destination"), None, f"Edges[{i}]")
        for key in ("Source", "Destination"):
            if e[key] not in names:
                check.fail(f"no node named {e[key]!r} (nodes: {brief_list(names)})", None, f"Edges[{i}].{key}")
        flt = e.get("Filter") or {}
        if not isinstance(flt, dict) or not all(isinstance(v, list) for v in flt.values()):
            check.fail("must map entities to lists of values", None, f"Edges[{i}].Filter")
        if set(flt) - {"contrast"}:
            check.fail(f"filtering on {', '.join(sorted(set(flt) - {'contrast'}))} is not supported "
                       "(only contrast; select participants, sessions and tasks on the command line)",
                       None, f"Edges[{i}].Filter")
        edges.append(Edge(e["Source"], e["Destination"], {k: [str(v) for v in vals] for k, vals in flt.items()}))
    order = {n: i for i, n in enumerate(names)}
    for i, e in enumerate(edges):
        src, dst = nodes[order[e.source]], nodes[order[e.destination]]
        if LEVELS.index(src.level) >= LEVELS.index(dst.level):
            check.fail(f"goes from a {src.level} node to a {dst.level} node; edges must go up a level",
                       None, f"Edges[{i}]")
    return edges
