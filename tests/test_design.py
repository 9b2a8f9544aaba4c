"""Events, confounds, design matrices and contrast expressions."""

import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import make_first_level_design_matrix

from bidsglm.design import (
    DesignSettings,
    build_design,
    contrast_labels,
    parse_contrast,
    parse_contrast_option,
    read_confounds,
    read_events,
)
from bidsglm.errors import DataError, ModelError
from conftest import shared_path


def test_contrast_expressions():
    c = parse_contrast("x", "incongruent - congruent")
    assert dict(c.weights) == {"incongruent": 1.0, "congruent": -1.0}
    c = parse_contrast("x", "0.5*a + b/2 - (c - d)")
    assert dict(c.weights) == {"a": 0.5, "b": 0.5, "c": -1.0, "d": 1.0}
    c = parse_contrast("x", "`face-1` - `house 2`")
    assert dict(c.weights) == {"face-1": 1.0, "house 2": -1.0}
    assert parse_contrast_option("congruent").name == "congruent"
    for bad in ("a * b", "a - a", "a + 1", "a -", "import os"):
        with pytest.raises(ModelError):
            parse_contrast("bad", bad)


def test_contrast_vector_order():
    c = parse_contrast("x", "b - a")
    np.testing.assert_array_equal(c.vector(["a", "b", "constant"]), [-1, 1, 0])


def test_labels_are_bids_safe_and_unique():
    labels = contrast_labels(["IncongruentMinusCongruent", "face_gt_house", "face > house!"])
    assert labels["IncongruentMinusCongruent"] == "incongruentMinusCongruent"
    assert labels["face_gt_house"] == "faceGtHouse"
    assert labels["face > house!"] == "faceHouse"
    # names that camelCase to the same label are told apart by a hash of the name
    clash = contrast_labels(["IncongruentMinusCongruent", "incongruent - congruent", "a_b", "aB"])
    assert all(v.isalnum() for v in clash.values())
    assert len(set(clash.values())) == len(clash)
    assert clash["a_b"].startswith("aB") and clash["a_b"] != clash["aB"]
    assert clash == contrast_labels(["IncongruentMinusCongruent", "incongruent - congruent", "a_b", "aB"])


def test_events_na_duration_and_trial_type(tmp_path):
    path = tmp_path / "e.tsv"
    path.write_text("onset\tduration\ttrial_type\n1\tn/a\ta\n2\t1\tn/a\n3\t1\tb\n")
    events = read_events(path)
    assert list(events["trial_type"]) == ["a", "b"]
    assert events["duration"].tolist() == [0.0, 1.0]


def test_confounds_leading_na_zeroed_interior_na_rejected(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("a\tb\nn/a\t1\n2\t2\n3\tn/a\n")
    with pytest.raises(DataError, match="column 'b', line 4"):
        read_confounds(path, ["a", "b"], 3)
    assert read_confounds(path, ["a"], 3)["a"].tolist() == [0.0, 2.0, 3.0]
    path.write_text("a\tc\n1\tn/a\n2\tn/a\n3\tn/a\n")
    with pytest.raises(DataError, match="column 'c': n/a throughout"):  # not silently a column of zeros
        read_confounds(path, ["a", "c"], 3)


def test_design_equals_nilearn():
    events = pd.DataFrame({"onset": [0, 20, 40.5], "duration": [2, 2, 1], "trial_type": ["a", "b", "a"]})
    conf = pd.DataFrame({"m": np.linspace(0, 1, 100)})
    dm = build_design(events, conf, 100, 2.0, DesignSettings(slice_time_ref=0.5))
    ref = make_first_level_design_matrix(np.arange(100) * 2.0 + 1.0, events, hrf_model="glover",
                                         drift_model="cosine", high_pass=1 / 128, add_regs=conf.to_numpy(),
                                         add_reg_names=["m"])
    pd.testing.assert_frame_equal(dm, ref)


@pytest.mark.parametrize("dataset", ["ds000102", "ds000117", "ds000001"])
def test_real_event_files_read(dataset):
    """Real OpenNeuro event files: extra columns, n/a values, off-grid onsets."""
    root = shared_path("events", dataset)
    files = sorted(root.rglob("*_events.tsv"))
    assert files
    for path in files:
        events = read_events(path)
        raw = pd.read_csv(path, sep="\t")
        assert len(events) == raw["trial_type"].notna().sum()
        assert np.isfinite(events["onset"]).all()
        dm = build_design(events, pd.DataFrame(index=range(200)), 200, 2.0, DesignSettings())
        assert set(events["trial_type"]) <= set(dm.columns)


def test_real_confounds_files():
    """Real fMRIPrep confounds: first-row n/a in derivatives and FD handled."""
    root = shared_path("confounds")
    for path in sorted(root.glob("*_desc-confounds_*.tsv")):
        raw = pd.read_csv(path, sep="\t")
        wanted = [c for c in ("trans_x", "rot_z", "framewise_displacement", "trans_x_derivative1")
                  if c in raw.columns]
        if not wanted:
            continue
        table = read_confounds(path, wanted, len(raw))
        assert not table.isna().any().any()
        for col in wanted:
            valid = raw[col].notna().to_numpy()
            np.testing.assert_allclose(table[col].to_numpy()[valid], raw[col].to_numpy()[valid])
        comp = read_confounds(path, ["a_comp_cor_0[0-5]"], len(raw))
        assert list(comp.columns) == [c for c in raw.columns if c in {f"a_comp_cor_0{i}" for i in range(6)}]


def test_contrast_expressions_are_bounded_and_never_evaluated():
    """Overflow, division by zero, powers, calls, attributes, booleans, huge or deeply nested
    text: a ModelError (exit 65) naming the contrast, never an internal error or evaluation."""
    cases = {"1e400*a": "overflows", "a/0": "division by zero", "a*1e300*1e300": "overflows",
             "a**999999": "only +, -", "__import__('os').getcwd()": "only +, -", "a.real": "only +, -",
             "True*a": "only +, -", "1e-13*a": "outside", "1" * 5000 + "*a": "characters long",
             "-" * 1990 + "a": "cannot parse", "(" * 300 + "a" + ")" * 300: "cannot parse",
             "a\x00": "cannot parse", "1e300*a + 1e300*a - 1e300*a": "outside"}
    for text, message in cases.items():
        with pytest.raises(ModelError, match="contrast 'x'") as info:
            parse_contrast("x", text)
        assert message in info.value.message, (text[:40], info.value.message[:200])


def test_repeated_contrast_names_and_labels_refused():
    from bidsglm.design import check_unique_names
    from bidsglm.errors import UsageError

    check_unique_names(["a", "b", "aMinusB2"], "--contrast")
    with pytest.raises(UsageError, match="--contrast: contrast name 'a' is given more than once"):
        check_unique_names(["a", "b", "a"], "--contrast")
    with pytest.raises(UsageError, match="'a - b' and 'a_minus_b' would both be written as contrast-aMinusB"):
        check_unique_names(["a - b", "a_minus_b"], "--contrast")


def test_condition_named_like_a_design_column_refused():
    """nilearn would fail on duplicate column names (an internal error before): a model error."""
    conf = pd.DataFrame({"trans_x": np.linspace(0, 1, 50)})
    for name in ("constant", "drift_1", "trans_x"):
        events = pd.DataFrame({"onset": [0.0, 20.0], "duration": [1.0, 1.0], "trial_type": [name, "a"]})
        with pytest.raises(ModelError, match=name):
            build_design(events, conf, 50, 2.0, DesignSettings())
