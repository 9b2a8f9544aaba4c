"""BIDS Stats Model reading and checking: the published models load; broken ones
fail with the node and field named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bidsglm.errors import ModelError
from bidsglm.statsmodel import load_model
from conftest import SHARED_DATA

MODELS = sorted((SHARED_DATA / "models").glob("*/*_specs.json")) if (SHARED_DATA / "models").is_dir() else []

MINIMAL = {
    "Name": "minimal", "BIDSModelVersion": "1.0.0",
    "Nodes": [
        {"Level": "Run", "Name": "run", "GroupBy": ["run", "subject"],
         "Model": {"Type": "glm", "X": [1, "a", "b"]},
         "Contrasts": [{"Name": "aVsB", "ConditionList": ["a", "b"], "Weights": [1, -1], "Test": "t"},
                       {"Name": "any", "ConditionList": ["a", "b"], "Weights": [[1, 0], [0, 1]], "Test": "F"}]},
        {"Level": "Subject", "Name": "subject", "GroupBy": ["subject", "contrast"],
         "Model": {"Type": "meta", "X": [1]}, "DummyContrasts": {"Test": "t"}},
    ],
}


def _write(tmp_path: Path, model: dict) -> Path:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    return path


@pytest.mark.parametrize("path", MODELS, ids=[p.parent.name for p in MODELS])
def test_published_models_load(path):
    model = load_model(path)
    assert [n.level for n in model.nodes] == ["Run", "Subject", "Dataset"]
    assert [(e.source, e.destination) for e in model.edges] == [
        (model.nodes[0].name, model.nodes[1].name), (model.nodes[1].name, model.nodes[2].name)]
    assert model.nodes[0].contrasts and all(c.test == "t" for c in model.nodes[0].contrasts)
    assert model.nodes[1].dummy_contrasts == {"Contrasts": None, "Test": "t"}


CORPUS = sorted((SHARED_DATA / "models" / "openneuro_glmfitlins").glob("*/*_specs.json")) \
    if (SHARED_DATA / "models" / "openneuro_glmfitlins").is_dir() else []


@pytest.fixture(scope="module")
def strict_schema():
    """bsmschema 0.1.1 sets ``extras`` (not pydantic's ``extra``) to 'forbid', so its models accept
    any unknown field; here every model of the package forbids them, as the spec's schema does."""
    models = pytest.importorskip("bsmschema.models")
    import pydantic

    classes = [c for c in vars(models).values()
               if isinstance(c, type) and issubclass(c, pydantic.BaseModel) and c.__module__ == models.__name__]
    saved = {c: dict(c.model_config) for c in classes}
    for c in classes:
        c.model_config["extra"] = "forbid"
    for c in classes:
        c.model_rebuild(force=True)
    yield models
    for c in classes:
        c.model_config.clear()
        c.model_config.update(saved[c])
        c.model_rebuild(force=True)


def test_strict_schema_rejects_unknown_fields(strict_schema):
    """The check below can fail: an unknown field is rejected, with its path, by the strict schema and by ours."""
    import pydantic

    for where, change in (("Nodes.0.Model.Colour", lambda m: m["Nodes"][0]["Model"].update(Colour="red")),
                          ("Nodes.0.Model.Options.AggregateMethod",
                           lambda m: m["Nodes"][0]["Model"].update(Options={"AggregateMethod": "mean"})),
                          ("Nodes.1.Flavour", lambda m: m["Nodes"][1].update(Flavour=1))):
        with pytest.raises(pydantic.ValidationError) as err:
            strict_schema.BIDSStatsModel.model_validate(_broken(change))
        assert where.split(".")[-1] in str(err.value)


# schema-valid models whose content the schema cannot check: refused by bidsglm, naming the field
INVALID_CONTENT = {"ds003481-verbs": "field 'Contrasts[4] ('lexicalvprelexical').Weights': needs one weight per "
                                     "condition (3)",
                  "ds001715-dts": "field 'Contrasts[5] ('absmotionvcolor').ConditionList': names signedcolor_abs "
                                  "more than once",
                  # two contrasts named digitsvletter: the second's maps would overwrite the first's
                  "ds002033-ChangeDetection": "Contrasts[0] and Contrasts[1] are both named 'digitsvletter'"}


@pytest.mark.parametrize("path", MODELS + CORPUS, ids=[p.name.removesuffix("_specs.json") for p in MODELS + CORPUS])
def test_models_agree_with_strict_bsmschema(strict_schema, path):
    """Independent check: the community's schema (made strict) accepts every model bidsglm accepts;
    bidsglm refuses only what the schema cannot see (weights not matching the conditions)."""
    raw = json.loads(path.read_text())
    strict_schema.BIDSStatsModel.model_validate(raw)
    name = path.name.removesuffix("_specs.json")
    if name in INVALID_CONTENT:
        with pytest.raises(ModelError) as err:
            load_model(path)
        assert INVALID_CONTENT[name] in err.value.message and "node 'run_level'" in err.value.message
    else:
        load_model(path)


def test_minimal_model_parses(tmp_path):
    model = load_model(_write(tmp_path, MINIMAL))
    run = model.nodes[0]
    assert run.contrasts[0].weights == (1.0, -1.0)
    assert run.contrasts[1].test == "F" and run.contrasts[1].weights == ((1.0, 0.0), (0.0, 1.0))
    assert model.nodes[1].model_type == "meta" and model.nodes[1].intercept_only


def _broken(path_fn):
    model = copy.deepcopy(MINIMAL)
    path_fn(model)
    return model


@pytest.mark.parametrize("change,node,field,words", [
    (lambda m: m["Nodes"][1]["Model"].update(Formula="1"), "subject", "Model.Formula", "Run nodes only"),
    (lambda m: m["Nodes"][0]["Model"].update(Colour="red"), "run", "Model.Colour", "unknown field"),
    (lambda m: m["Nodes"][0]["Model"].pop("X"), "run", "Model.X", "required"),
    (lambda m: m["Nodes"][0]["Contrasts"][0].update(Test="z"), "run", "Contrasts[0] ('aVsB').Test", "not a test"),
    (lambda m: m["Nodes"][0]["Contrasts"][0].update(Weights=[1]), "run", "Contrasts[0] ('aVsB').Weights",
     "one weight per condition"),
    (lambda m: m["Nodes"][0]["Model"].update(Options={"LowPassFilterCutoffHz": 0.1}), "run",
     "Model.Options.LowPassFilterCutoffHz", "not supported"),
    (lambda m: m["Nodes"][0].update(Transformations={"Transformer": "pybids-transforms-v1",
                                                     "Instructions": [{"Name": "Frobnicate", "Input": ["a"]}]}),
     "run", "Transformations.Instructions[0].Name", "unknown transformation"),
    (lambda m: m["Nodes"][0]["Model"].update(HRF={"Variables": ["c"], "Model": "spm"}), "run",
     "Model.HRF.Variables", "not in Model.X"),
    (lambda m: m["Nodes"][1].update(Level="Group"), "subject", "Level", "not a level"),
    (lambda m: m["Nodes"][0]["Model"].update(Options={"AggregateMethod": "mean"}), "run",
     "Model.Options.AggregateMethod", "unknown field"),
    (lambda m: m["Nodes"][0]["Model"].update(Options={"Mask": {"regex_search": "True"}}), "run",
     "Model.Options.Mask.regex_search", "not a BIDS entity"),
    (lambda m: m["Nodes"][0]["Model"].update(Options={"Aggregate": "pca"}), "run",
     "Model.Options.Aggregate", "region-of-interest"),
])
def test_broken_models_name_node_and_field(tmp_path, change, node, field, words):
    with pytest.raises(ModelError) as err:
        load_model(_write(tmp_path, _broken(change)))
    message = err.value.message
    assert f"node '{node}'" in message and f"field '{field}'" in message and words in message, message
    assert str(tmp_path / "model.json") in message


def test_edges_must_name_nodes_and_go_up(tmp_path):
    model = _broken(lambda m: m.update(Edges=[{"Source": "run", "Destination": "dataset"}]))
    with pytest.raises(ModelError, match=r"Edges\[0\]\.Destination.*no node named 'dataset'"):
        load_model(_write(tmp_path, model))
    model = _broken(lambda m: m.update(Edges=[{"Source": "subject", "Destination": "run"}]))
    with pytest.raises(ModelError, match="edges must go up a level"):
        load_model(_write(tmp_path, model))


def test_not_json(tmp_path):
    path = tmp_path / "model.json"
    path.write_text('{"Name": "x",\n "Nodes": [}')
    with pytest.raises(ModelError, match="line 2, column 12: not valid JSON"):
        load_model(path)


# --- no text of a model is ever run as code ------------------------------------------

_PAYLOAD = "__import__('os').system('touch {marker}')"


def _formula(text):
    return lambda m: m["Nodes"][0]["Model"].update(X=[1, "a", "b"], Formula=text)


def _instruction(ins):
    return lambda m: m["Nodes"][0].update(Transformations={"Transformer": "pybids-transforms-v1",
                                                           "Instructions": [ins]})


HOSTILE = [  # (change, field, words)
    (_formula("1 + {" + _PAYLOAD + "}"), "Model.Formula", "'{' at character 5 is not allowed"),
    (_formula("a + " + _PAYLOAD), "Model.Formula", "function calls"),
    (_formula("a + `{" + _PAYLOAD + "}`"), "Model.Formula", "backquoted name"),
    (_formula("a + a.__class__"), "Model.Formula", "dotted name"),
    (_formula("a + 'x'"), "Model.Formula", "not allowed"),
    (_formula("y ~ a"), "Model.Formula", "right-hand side"),
    (_instruction({"Name": "Filter", "Input": ["a"], "Query": "a > 0 or " + _PAYLOAD}),
     "Transformations.Instructions[0].Query", "refused"),
    (_instruction({"Name": "Filter", "Input": ["a"], "Query": "a > @x"}),
     "Transformations.Instructions[0].Query", "@"),
    (_instruction({"Name": "Filter", "Input": ["a"], "Query": "a.__class__ == 1"}),
     "Transformations.Instructions[0].Query", "Attribute is not allowed"),
    (_instruction({"Name": "Split", "Input": ["a"], "By": ["{" + _PAYLOAD + "}"]}),
     "Transformations.Instructions[0].By", "refused"),
    (_instruction({"Name": "Split", "Input": ["a"], "By": ["b.c"]}),
     "Transformations.Instructions[0].By", "plain name"),
    (_instruction({"Name": "Scale", "Input": ["a`+{" + _PAYLOAD + "}`"]}),
     "Transformations.Instructions[0].Input", "refused"),
]


@pytest.mark.parametrize("change,field,words", HOSTILE, ids=[f"{i}-{h[1]}" for i, h in enumerate(HOSTILE)])
def test_text_that_an_evaluator_would_run_is_refused(tmp_path, change, field, words):
    marker = tmp_path / "pwned"
    model = json.loads(json.dumps(_broken(change)).replace("{marker}", str(marker)))
    with pytest.raises(ModelError) as err:
        load_model(_write(tmp_path, model))
    assert f"node 'run', field '{field}'" in err.value.message and words in err.value.message, err.value.message
    assert err.value.exit_code == 65
    assert not marker.exists()


@pytest.mark.parametrize("formula,terms", [
    ("a + b", [(), ("a",), ("b",)]),
    ("0 + a + b", [("a",), ("b",)]),
    ("a + b - 1", [("a",), ("b",)]),
    ("-1 + a", [("a",)]),
    ("a*b", [(), ("a",), ("b",), ("a", "b")]),
    ("(a + b):c", [(), ("a", "c"), ("b", "c")]),
    ("`trial_type.face` + a - a", [(), ("trial_type.face",)]),
])
def test_safe_formulas_parse(formula, terms):
    from bidsglm.modelformula import parse_formula

    assert [t.factors for t in parse_formula(formula)] == terms


def test_safe_queries_pass():
    from bidsglm.modelformula import check_query

    check_query("trial_type == 'face' and rt > 0.2", {"trial_type", "rt"})
    check_query("~(trial_type.face != 1) | (rt <= -1.5)", {"trial_type.face", "rt"})
    check_query("trial_type in ['a', 'b']", {"trial_type"})


def test_aggregate_none_and_node_folder_labels(tmp_path):
    from bidsglm.statsmodel import node_label

    model = _broken(lambda m: m["Nodes"][0]["Model"].update(Options={"Aggregate": "none"}))
    model["Nodes"][0]["Name"] = "run level"
    model["Nodes"][1]["Name"] = "../../etc"
    loaded = load_model(_write(tmp_path, model))
    assert [node_label(n.name) for n in loaded.nodes] == ["runLevel", "etc"]
    model["Nodes"][1]["Name"] = "run-level"
    with pytest.raises(ModelError, match="same folder name node-runLevel"):
        load_model(_write(tmp_path, model))


def _run_contrast(**fields):
    return {"Name": "c", "ConditionList": ["a", "b"], "Weights": [1, -1], "Test": "t", **fields}


@pytest.mark.parametrize("change,where,words", [
    # attack D1: node names equal but for case are one folder on case-insensitive file systems
    (lambda m: m["Nodes"][1].update(Name="Run"), "field 'Nodes'", "node names 'run', 'Run' give the same folder"),
    # attack D3: the same contrast name twice in a node (the second's maps overwrite the first's)
    (lambda m: m["Nodes"][0]["Contrasts"].append(_run_contrast(Name="aVsB")), "node 'run', field 'Contrasts'",
     "Contrasts[0] and Contrasts[2] are both named 'aVsB'"),
    (lambda m: m["Nodes"][0]["Contrasts"].append(_run_contrast(Name="AVsB")), "node 'run', field 'Contrasts'",
     "differ only in case"),
    # attack F: names that lose letters, or have none, on their way to node-<label>
    (lambda m: m["Nodes"][0].update(Name="rün_ノード"), "field 'Nodes[0].Name'", "outside ASCII (üノード)"),
    (lambda m: m["Nodes"][0].update(Name=""), "field 'Nodes[0].Name'", "non-empty Name"),
    (lambda m: m["Nodes"][0].update(Name="___"), "field 'Nodes[0].Name'", "no letter or digit"),
    (lambda m: m["Nodes"][0]["Contrasts"][0].update(Name=""), "node 'run', field 'Contrasts[0].Name'",
     "non-empty Name"),
    (lambda m: m.update(Name=" "), "field 'Name'", "must be a non-empty string"),
    # attack C3 and A4: no variables, or the intercept only, in a Run node
    (lambda m: m["Nodes"][0]["Model"].update(X=[]), "node 'run', field 'Model.X'", "lists no variables"),
    (lambda m: (m["Nodes"][0]["Model"].update(X=[1]), m["Nodes"][0].update(Contrasts=[])),
     "node 'run', field 'Model.X'", "intercept only models nothing but the mean BOLD signal"),
    # attack D2: a node without contrasts writes nothing (and feeds nothing)
    (lambda m: m["Nodes"][0].update(Contrasts=[]), "node 'run', field 'Contrasts'", "defines no contrasts"),
    (lambda m: m["Nodes"][1].pop("DummyContrasts"), "node 'subject', field 'Contrasts'", "defines no contrasts"),
    (lambda m: m["Nodes"][1]["DummyContrasts"].update(Contrasts=[]), "node 'subject', field 'Contrasts'",
     "defines no contrasts"),
    # attack F: a zero row of an F contrast is named as such; C1: weights that overflow the maps
    (lambda m: m["Nodes"][0]["Contrasts"][1].update(Weights=[[1, -1], [0, 0]]),
     "node 'run', field 'Contrasts[1] ('any').Weights'", "row 2 of the F contrast's weights is all zero"),
    (lambda m: m["Nodes"][0]["Contrasts"][0].update(Weights=[0, 0]),
     "node 'run', field 'Contrasts[0] ('aVsB').Weights'", "weights are all zero"),
    (lambda m: m["Nodes"][0]["Contrasts"][0].update(Weights=[1e300, -1e300]),
     "node 'run', field 'Contrasts[0] ('aVsB').Weights'", "weights beyond 1e+10 in size overflow"),
])
def test_models_that_would_write_nothing_or_overwrite_are_refused(tmp_path, change, where, words):
    model = copy.deepcopy(MINIMAL)
    change(model)
    with pytest.raises(ModelError) as err:
        load_model(_write(tmp_path, model))
    assert f"model.json: {where}: " in err.value.message and words in err.value.message
    assert "\n" not in err.value.message


def test_long_lists_in_messages_are_capped():
    from bidsglm.statsmodel import brief_list

    assert brief_list(["a", "b"]) == "a, b"
    text = brief_list([f"c{i}" for i in range(200)])
    assert text.startswith("c0, c1,") and text.endswith("c9 ... and 190 more") and len(text) < 80


def test_dummy_contrasts_alone_and_ascii_names_still_load(tmp_path):
    model = copy.deepcopy(MINIMAL)
    model["Nodes"][0].pop("Contrasts")
    model["Nodes"][0]["DummyContrasts"] = {"Test": "t"}
    model["Nodes"][0]["Name"] = "run level 1"
    assert load_model(_write(tmp_path, model)).nodes[0].dummy_contrasts == {"Contrasts": None, "Test": "t"}
