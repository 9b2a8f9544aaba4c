"""Degenerate and hostile data (issue 14): every case ends in right maps or one clear line.

Each refusal asserts the exit code, one line of bidsglm's own naming the file (and column or
line) without a traceback, and that no statistic map was written. Cases bidsglm warns about
assert one warning line and the record in the run's _design.json. Property tests (hypothesis)
feed arbitrary text to the contrast parser and the events reader: they parse or give a typed
error, never an internal error.
"""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bidsglm.cli import main
from bidsglm.design import parse_contrast, read_confounds, read_events
from bidsglm.errors import BidsGlmError, DataError
from bidsglm.fixedeffects import DegenerateRunError, fixed_effects
from conftest import write_participant_outputs

FUNC = "sub-01/func"
PREP = "derivatives/fmriprep/sub-01/func"
RUN1 = "sub-01_task-flanker_run-1"
BOLD1 = f"{PREP}/{RUN1}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
MASK1 = f"{PREP}/{RUN1}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"
EVENTS1 = f"{FUNC}/{RUN1}_events.tsv"
CONFOUNDS1 = f"{PREP}/{RUN1}_desc-confounds_timeseries.tsv"


def _participant(bids, out, *options):
    return main([str(bids), str(out), "participant", "--skip-bids-validation", "-q",
                 "--participant-label", "01", *options])


def _one_error_line(capsys) -> str:
    """The one ERROR line (warnings about the inputs may precede it); all lines are bidsglm's own."""
    err = capsys.readouterr().err.strip().splitlines()
    assert all(" bidsglm " in line for line in err), err  # no traceback, no raw library warning
    errors = [line for line in err if " bidsglm ERROR: " in line]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert "internal error" not in errors[0]
    return errors[0]


def _statmaps(out):
    return sorted(out.rglob("*_statmap.nii.gz")) if out.exists() else []


def _edit_table(path, edit):
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    edited = edit(table)  # a new table, or None for an edit in place
    (table if edited is None else edited).to_csv(path, sep="\t", index=False)


def _rewrite_bold(bids, change):
    path = bids / BOLD1
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    change(data, np.asanyarray(nib.load(str(bids / MASK1)).dataobj) > 0)
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1, 0)
    nib.save(nib.Nifti1Image(data, img.affine, header), str(path))


# --- events and confounds: refused -------------------------------------------------

def _set(column, row, value):
    def edit(table):
        table.loc[row, column] = value
    return edit


EVENT_REFUSALS = [
    ("onset inf", _set("onset", 0, "inf"), "column 'onset', line 2: 'inf' is not a finite number"),
    ("onset nan", _set("onset", 1, "nan"), "column 'onset', line 3: 'nan' is not a number"),
    ("onset n/a", _set("onset", 2, "n/a"), "column 'onset', line 4: n/a is not a number"),
    ("duration -inf", _set("duration", 0, "-inf"), "column 'duration', line 2: '-inf' is not a finite number"),
    ("negative duration", _set("duration", 3, "-1"), "column 'duration', line 5: negative duration"),
    ("no trial_type", lambda t: t.drop(columns="trial_type"), "missing required column(s) trial_type"),
    ("trial_type all n/a", lambda t: t.__setitem__("trial_type", "n/a"), "trial_type is n/a or empty in every row"),
    ("header only", lambda t: t.iloc[:0], "no events (the table has a header and no rows)"),
]


@pytest.mark.parametrize("case,edit,message", EVENT_REFUSALS, ids=[c[0] for c in EVENT_REFUSALS])
def test_bad_events_refused(demo_copy, tmp_path, capsys, case, edit, message):
    _edit_table(demo_copy / EVENTS1, edit)
    out = tmp_path / "out"
    assert _participant(demo_copy, out) == 65
    line = _one_error_line(capsys)
    assert f"{RUN1}_events.tsv" in line and message in line
    assert _statmaps(out) == []


def test_duplicate_event_column_refused(demo_copy, tmp_path, capsys):
    path = demo_copy / EVENTS1
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace("response_time", "onset")
    path.write_text("\n".join(lines) + "\n")
    assert _participant(demo_copy, tmp_path / "out") == 65
    line = _one_error_line(capsys)
    assert f"{RUN1}_events.tsv: line 1: column 'onset' appears more than once" in line
    assert _statmaps(tmp_path / "out") == []


CONFOUND_REFUSALS = [
    ("inf", _set("trans_x", 5, "inf"), "column 'trans_x', line 7: 'inf' is not a finite number"),
    ("text", _set("rot_z", 9, "abc"), "column 'rot_z', line 11: 'abc' is not a number"),
    ("fewer rows", lambda t: t.iloc[:-3], "rows but the BOLD run has"),
]


@pytest.mark.parametrize("case,edit,message", CONFOUND_REFUSALS, ids=[c[0] for c in CONFOUND_REFUSALS])
def test_bad_confounds_refused(demo_copy, tmp_path, capsys, case, edit, message):
    _edit_table(demo_copy / CONFOUNDS1, edit)
    assert _participant(demo_copy, tmp_path / "out") == 65
    line = _one_error_line(capsys)
    assert f"{RUN1}_desc-confounds_timeseries.tsv" in line and message in line
    assert _statmaps(tmp_path / "out") == []


def test_duplicate_confound_header_refused(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("trans_x\ttrans_x\n1\t2\n3\t4\n")
    with pytest.raises(DataError, match="column 'trans_x' appears more than once"):
        read_confounds(path, ["trans_x"], 2)


# --- events: warned about, recorded ---------------------------------------------------

def test_event_timing_warned_once_and_recorded(demo_copy, tmp_path, capsys):
    """A negative onset, an onset after the end of the scan and an n/a trial_type: exit 0, one
    warning line of bidsglm's own each (no raw nilearn/pandas warning), and the same lines in
    the run's _design.json."""
    def edit(table):
        table.loc[0, "onset"] = "-5"
        table.loc[1, "onset"] = "99999"
        table.loc[2, "trial_type"] = "n/a"
    _edit_table(demo_copy / EVENTS1, edit)
    out = tmp_path / "out"
    assert _participant(demo_copy, out) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert all(" bidsglm WARNING: " in line for line in err), err  # nothing raw from a library
    ours = [line for line in err if f"{RUN1}_events.tsv" in line]
    assert len(ours) == 3
    assert any("negative onset" in line for line in ours)
    assert any("after the end of the scan" in line for line in ours)
    assert any("trial_type n/a are not modelled (line(s) 4)" in line for line in ours)
    record = json.loads((out / FUNC / f"{RUN1}_design.json").read_text())
    assert len(record["Warnings"]) == 3 and record["VoxelsLeftOut"] == 0


# --- designs without an estimable model ----------------------------------------------------

def test_condition_outside_the_scan_is_an_all_zero_regressor_refused(demo_copy, tmp_path, capsys):
    def edit(table):
        table.loc[table["trial_type"] == "congruent_correct", "onset"] = "99999"
    _edit_table(demo_copy / EVENTS1, edit)
    assert _participant(demo_copy, tmp_path / "out") == 65
    line = _one_error_line(capsys)
    assert f"{RUN1}_events.tsv: column 'congruent_correct' is zero in every volume" in line
    assert _statmaps(tmp_path / "out") == []


@pytest.mark.parametrize("high_pass,message", [("10", "not below the Nyquist frequency 0.25 Hz"),
                                               ("0.24", "no residual degrees of freedom")])
def test_high_pass_leaving_no_degrees_of_freedom_refused(demo_copy, tmp_path, capsys, high_pass, message):
    assert _participant(demo_copy, tmp_path / "out", "--high-pass", high_pass) == 65
    line = _one_error_line(capsys)
    assert message in line and "sub-01_task-flanker_run-1" in line
    assert _statmaps(tmp_path / "out") == []


# --- BOLD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.0, 850.0])
def test_constant_bold_refused(demo_copy, tmp_path, capsys, value):
    """All zeros or one constant in the mask: refused, never a zero variance that swamps fixed effects."""
    _rewrite_bold(demo_copy, lambda data, mask: data.__setitem__(Ellipsis, value))
    assert _participant(demo_copy, tmp_path / "out") == 65
    line = _one_error_line(capsys)
    assert f"{RUN1}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz" in line
    assert "constant in time" in line
    assert not list((tmp_path / "out").rglob("sub-01_task-flanker_*statmap*"))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_bold_inside_the_mask_refused(demo_copy, tmp_path, capsys, value):
    def one_bad(data, mask):
        data[tuple(np.argwhere(mask)[100]) + (9,)] = value
    _rewrite_bold(demo_copy, one_bad)
    assert _participant(demo_copy, tmp_path / "out") == 65
    line = _one_error_line(capsys)
    assert "preproc_bold.nii.gz: volume 10: 1 non-finite value(s) (NaN or infinite) inside the brain mask" in line
    assert not list((tmp_path / "out").rglob("sub-01_task-flanker_*statmap*"))


def test_bold_mostly_constant_refused(demo_copy, tmp_path, capsys):
    def half_flat(data, mask):
        flat = np.zeros(mask.shape, bool)
        flat[: mask.shape[0] * 2 // 3] = True  # two thirds of the volume (and of the mask)
        data[flat & mask] = 500.0
    _rewrite_bold(demo_copy, half_flat)
    assert _participant(demo_copy, tmp_path / "out", "--smoothing-fwhm", "0") == 65
    line = _one_error_line(capsys)
    assert "an empty or broken run" in line and "preproc_bold.nii.gz" in line


def test_a_few_broken_voxels_are_left_out_and_recorded(demo_copy, tmp_path, capsys):
    """A voxel zero throughout and a constant voxel inside the mask: left out of the run's mask
    with one warning, recorded; every map written is finite with a positive variance."""
    voxels = []

    def break_two(data, mask):
        ijk = np.argwhere(mask)
        a, b = tuple(ijk[len(ijk) // 3]), tuple(ijk[2 * len(ijk) // 3])
        data[a] = 0.0
        data[b] = 900.0
        voxels.extend([a, b])
    _rewrite_bold(demo_copy, break_two)
    out = tmp_path / "out"
    assert _participant(demo_copy, out, "--smoothing-fwhm", "0") == 0
    err = capsys.readouterr().err
    assert "2 of" in err and "left out of this run's mask" in err, err
    record = json.loads((out / FUNC / f"{RUN1}_design.json").read_text())
    assert record["VoxelsLeftOut"] == 2 and any("left out" in w for w in record["Warnings"])
    run_mask = np.asanyarray(nib.load(str(out / record["Mask"])).dataobj) > 0
    fmriprep_mask = np.asanyarray(nib.load(str(demo_copy / MASK1)).dataobj) > 0
    assert run_mask.sum() == fmriprep_mask.sum() - 2 and not any(run_mask[v] for v in voxels)
    for path in out.rglob("sub-01_*_statmap.nii.gz"):
        data = np.asanyarray(nib.load(str(path)).dataobj)
        assert np.isfinite(data).all(), path
        if "stat-variance" in path.name:
            mask = run_mask if "run-1" in path.name else data != 0
            assert (data[mask] > 0).all(), path


# --- fixed effects ------------------------------------------------------------------------------------

def test_fixed_effects_refuse_zero_or_nonfinite_variance():
    effects = np.ones((2, 4))
    good = np.full((2, 4), 0.5)
    fixed_effects(effects, good, [10, 10])
    for bad_value, what in ((0.0, "variance"), (-1.0, "variance"), (np.nan, "variance")):
        variances = good.copy()
        variances[1, 2] = bad_value
        with pytest.raises(DegenerateRunError, match=what) as info:
            fixed_effects(effects, variances, [10, 10])
        assert info.value.row == 1
    effects[0, 0] = np.inf
    with pytest.raises(DegenerateRunError, match="effect is non-finite") as info:
        fixed_effects(effects, good, [10, 10])
    assert info.value.row == 0


# --- command-line values ----------------------------------------------------------------------------

OPTION_REFUSALS = [
    (("--smoothing-fwhm", "nan"), "--smoothing-fwhm"),
    (("--smoothing-fwhm", "inf"), "--smoothing-fwhm"),
    (("--smoothing-fwhm", "-2"), "--smoothing-fwhm"),
    (("--smoothing-fwhm", "1e9"), "--smoothing-fwhm must be at most 50 mm"),
    (("--high-pass", "nan"), "--high-pass"),
    (("--high-pass", "inf"), "--high-pass"),
    (("--high-pass", "1/0"), "--high-pass"),
    (("--alpha", "0"), "--alpha must be between 0 and 1"),
    (("--alpha", "1.5"), "--alpha must be between 0 and 1"),
    (("--alpha", "nan"), "--alpha must be between 0 and 1"),
    (("--fwe-alpha", "1"), "--fwe-alpha must be between 0 and 1"),
    (("--cluster-forming-p", "0"), "--cluster-forming-p must be between 0 and 1"),
    (("--cluster-forming-p", "nan"), "--cluster-forming-p must be between 0 and 1"),
    (("--permutations", "-5"), "--permutations must not be negative"),
    (("--cluster-extent", "-1"), "--cluster-extent must not be negative"),
    (("--exclude-fd-mean", "nan"), "--exclude-fd-mean"),
    (("--contrast", "x=a", "--contrast", "x=b"), "--contrast: contrast name 'x' is given more than once"),
    (("--contrast", "a-b=a - b", "--contrast", "a minus b=a - b"), "would both be written as contrast-aMinusB"),
    (("--group-contrast", "m=mean", "--group-f-contrast", "m=mean"), "contrast name 'm' is given more than once"),
    (("--group-contrast", "age=age", "--group-contrast", "age=-age"), "contrast name 'age' is given more than once"),
]


def _levels_of(flag: str) -> list[str]:
    """The levels an option is accepted at (the other level refuses it before its value is checked)."""
    from bidsglm.cli import build_parser, option_levels

    level = option_levels(build_parser())[flag]
    return ["participant", "group"] if level == "common" else [level]


OPTION_CASES = [(level, options, message) for options, message in OPTION_REFUSALS
                for level in _levels_of(options[0])]


@pytest.mark.parametrize("level,options,message", OPTION_CASES,
                         ids=[f"{level} {' '.join(o)}" for level, o, _ in OPTION_CASES])
def test_bad_option_values_are_usage_errors(tmp_path, capsys, options, message, level):
    try:
        code = main([str(tmp_path / "bids"), str(tmp_path / "out"), level, "-q", *options])
    except SystemExit as exc:  # argparse's own checks (a type that is not a number)
        code = exc.code
    assert code == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("expression,message", [
    ("1e400*incongruent_correct", "overflows"),
    ("incongruent_correct/0", "division by zero"),
    ("incongruent_correct**999999", "only +, -, * and / by numbers"),
    ("__import__('os').system('touch x')", "only +, -, * and / by numbers"),
    ("1e-300*incongruent_correct", "outside [1e-12, 1e+12]"),
])
def test_bad_contrast_expressions_refused(demo_copy, tmp_path, capsys, monkeypatch, expression, message):
    monkeypatch.chdir(tmp_path)  # where 'touch x' would land if anything evaluated the text
    assert _participant(demo_copy, tmp_path / "out", "--contrast", f"x={expression}") == 65
    line = _one_error_line(capsys)
    assert "contrast 'x'" in line and message in line
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "x").exists()


# --- property tests: arbitrary text never crashes ------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.from_regex(r"[a-c0-9 .e+\-*/()`]{0,40}", fullmatch=True))
def test_contrast_parser_parses_or_refuses_any_text(text):
    try:
        spec = parse_contrast("x", text)
    except BidsGlmError as exc:
        assert exc.exit_code == 65 and "\n" not in exc.message.replace(repr(text), "")
        return
    assert spec.weights and all(math.isfinite(w) and w != 0 for _, w in spec.weights)


_cell = st.sampled_from(["0", "1.5", "-3", "n/a", "", "inf", "nan", "1e400", "go", "a\tb", "\"q", "1,5"]) | \
    st.text(max_size=6)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=st.lists(st.tuples(_cell, _cell), min_size=0, max_size=5),
       header=st.sampled_from(["trans_x\trot_z", "trans_x\ttrans_x", "rot_z", "trans_x\trot_z\textra"]))
def test_confounds_reader_parses_or_refuses_any_table(tmp_path, cells, header):
    path = tmp_path / "confounds.tsv"
    path.write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in cells), encoding="utf-8")
    try:
        table = read_confounds(path, ["trans_x", "rot_z"], len(cells))
    except DataError as exc:
        assert str(path) in exc.message
        return
    assert np.isfinite(table.to_numpy()).all() and list(table.columns) == ["trans_x", "rot_z"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_cell, _cell, _cell), max_size=6),
       header=st.sampled_from(["onset\tduration\ttrial_type", "onset\tonset\ttrial_type", "onset\tduration",
                               "trial_type\tduration\tonset"]))
def test_events_reader_parses_or_refuses_any_table(tmp_path, rows, header):
    path = tmp_path / "events.tsv"
    path.write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    try:
        events = read_events(path)
    except DataError as exc:
        assert str(path) in exc.message
        return
    assert len(events) > 0
    assert np.isfinite(events["onset"]).all() and np.isfinite(events["duration"]).all()
    assert (events["duration"] >= 0).all() and events["trial_type"].notna().all()


# --- group level ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def group_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_group") / "glm"
    write_participant_outputs(out, n_subjects=5)
    return out


@pytest.fixture
def group_copy(group_outputs, tmp_path):
    dst = tmp_path / "glm"
    shutil.copytree(group_outputs, dst)
    return dst


def _group(out, *options):
    return main([str(out.parent / "raw"), str(out), "group", "-q", "--atlases", "none", *options])


def _subject_map(out, sub, label="faces", stat="effect"):
    return out / f"sub-{sub}" / "func" / \
        f"sub-{sub}_task-loc_space-MNI152NLin2009cAsym_contrast-{label}_stat-{stat}_statmap.nii.gz"


def test_group_subject_without_any_map_of_a_contrast_is_not_dropped_silently(group_copy, capsys):
    """sub-02's run records list 'faces' but its subject maps are gone: 65 naming it, or with
    --allow-incomplete a warning and a row in the exclusions table."""
    for path in (group_copy / "sub-02" / "func").glob("sub-02_task-loc_space-*_contrast-*_statmap.*"):
        path.unlink()
    assert _group(group_copy) == 65
    line = _one_error_line(capsys)
    assert "contrast 'faces' is missing for sub-02" in line and "--allow-incomplete" in line
    assert not (group_copy / "group").exists()
    assert _group(group_copy, "--allow-incomplete") == 0
    err = capsys.readouterr().err
    assert "no subject-level map for sub-02" in err
    table = pd.read_csv(next((group_copy / "group").glob("*_exclusions.tsv")), sep="\t")
    assert "sub-02" in set(table["participant_id"])


def test_group_map_on_another_grid_refused(group_copy, capsys):
    path = _subject_map(group_copy, "03")
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-2], img.affine), str(path))
    assert _group(group_copy) == 65
    line = _one_error_line(capsys)
    assert path.name in line and "on another grid" in line
    assert not (group_copy / "group").exists()


def test_group_all_nan_effect_map_refused(group_copy, capsys):
    path = _subject_map(group_copy, "04")
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.full(img.shape, np.nan, np.float32), img.affine), str(path))
    assert _group(group_copy) == 65
    line = _one_error_line(capsys)
    assert path.name in line and "non-finite" in line and "do not overlap" not in line
    assert not list(group_copy.glob("group/*_statmap.nii.gz"))  # (leftover tables: the no-partial-files work)


def test_group_ragged_participants_table_refused(group_copy, capsys):
    path = group_copy / "participants.tsv"
    lines = path.read_text().splitlines()
    lines[3] = "\t".join(lines[3].split("\t")[:2])
    path.write_text("\n".join(lines) + "\n")
    assert _group(group_copy, "--covariates", "age") == 65
    line = _one_error_line(capsys)
    assert "participants.tsv: line 4: 2 tab-separated field(s), the header has 5" in line
    assert not (group_copy / "group").exists()


def test_group_numeric_covariate_typo_refused(group_copy, capsys):
    path = group_copy / "participants.tsv"
    table = pd.read_csv(path, sep="\t", dtype=str)
    table.loc[2, "age"] = "2O"
    table.to_csv(path, sep="\t", index=False)
    assert _group(group_copy, "--covariates", "age") == 65
    line = _one_error_line(capsys)
    assert "participants.tsv: column 'age', line 4 (sub-03): '2O' is not a number" in line
    assert not (group_copy / "group").exists()


def test_group_constant_covariate_message_has_the_count(group_copy, capsys):
    assert _group(group_copy, "--covariates", "site") == 65
    line = _one_error_line(capsys)
    assert "covariate column 'site' is constant (A) among the 5 included subjects" in line


def test_group_outputs_are_strict_json(group_copy):
    assert _group(group_copy) == 0
    for path in (group_copy / "group").glob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))


# --- both front doors: a PreparedRun (command line or Stats Model) checks its design -------------

def _prepared(design: pd.DataFrame, contrasts=(), confounds=()):
    from pathlib import Path

    from bidsglm.discovery import RunInputs
    from bidsglm.participant import PreparedRun

    run = RunInputs({"sub": "01", "task": "t", "run": "1"}, Path("/d/bold.nii.gz"), Path("/d/mask.nii.gz"),
                    Path("/d/confounds.tsv"), Path("/d/events.tsv"))
    return PreparedRun(run, 2.0, len(design), 0.0, design, list(contrasts), {}, list(confounds))


def test_prepared_run_refuses_what_a_stats_model_design_can_hold():
    """A Stats Model's Model.X may hold an events column that is n/a in every row (an all-zero
    regressor, as in pybids' copy of ds000005), a duplicated column or more columns than volumes:
    the run is refused when it is prepared, naming its file, as on the command line."""
    from bidsglm.design import parse_contrast
    from bidsglm.errors import ModelError

    rng = np.random.default_rng(0)
    good = pd.DataFrame({"gain": rng.standard_normal(20), "loss": rng.standard_normal(20),
                         "trans_x": rng.standard_normal(20), "constant": np.ones(20)})
    _prepared(good, [parse_contrast("g", "gain")], ["trans_x"])
    with pytest.raises(ModelError, match=r"events.tsv: column 'loss' is zero in every volume"):
        _prepared(good.assign(loss=0.0))
    with pytest.raises(ModelError, match=r"confounds.tsv: column 'trans_x' is zero in every volume"):
        _prepared(good.assign(trans_x=0.0), confounds=["trans_x"])
    with pytest.raises(ModelError, match=r"bold.nii.gz: design has 4 columns for 4 volumes"):
        _prepared(good.iloc[:4])
    dup = good.assign(gain2=good["gain"])
    _prepared(dup, [parse_contrast("l", "loss")])  # estimable: the duplication does not touch it
    with pytest.raises(ModelError, match=r"events.tsv: contrast 'g' is not estimable"):
        _prepared(dup, [parse_contrast("g", "gain")])


def test_group_identical_maps_give_no_zero_variance_result(group_copy, capsys):
    """Inputs identical in part of the mask: those voxels left out with a warning (no zero
    variance written); identical everywhere: refused."""
    maps = [_subject_map(group_copy, f"{s:02d}") for s in range(1, 6)]
    first = nib.load(str(maps[0]))
    reference = np.asanyarray(first.dataobj).astype(np.float32)
    for path in maps[1:]:
        data = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
        data[:, :, :20] = reference[:, :, :20]
        nib.save(nib.Nifti1Image(data, first.affine), str(path))
    assert _group(group_copy) == 0
    assert "left out of the group mask: the model fits the inputs exactly" in capsys.readouterr().err
    for path in group_copy.glob("group/*contrast-faces_stat-*_statmap.nii.gz"):
        data = np.asanyarray(nib.load(str(path)).dataobj)
        assert np.isfinite(data).all()
        assert not data[:, :, :20].any(), path  # outside the group mask now
    for path in maps[1:]:
        nib.save(nib.Nifti1Image(reference, first.affine), str(path))
    shutil.rmtree(group_copy / "group")
    assert _group(group_copy) == 65
    line = _one_error_line(capsys)
    assert "fits the input maps exactly in every voxel" in line
    assert not list(group_copy.glob("group/*contrast-faces*_statmap.nii.gz"))


def test_group_contrast_named_like_a_default_refused(group_copy, capsys):
    """'mean' is the one-sample model's default contrast: a user contrast of that name would
    overwrite its maps."""
    assert _group(group_copy, "--group-contrast", "mean=-mean") == 65
    line = _one_error_line(capsys)
    assert "group contrast 'mean' (--group-contrast" in line and "name of a default contrast" in line
    assert not list(group_copy.glob("group/*_statmap.nii.gz"))


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(0, 1e6),
                               st.sampled_from(["a", "b", "constant", "x y", "é", "1", "drift_1"])),
                     min_size=1, max_size=8),
       hrf=st.sampled_from(["glover", "spm + derivative", "glover + derivative + dispersion"]),
       high_pass=st.floats(1e-4, 0.3))
def test_any_event_timing_gives_a_checked_design_or_a_model_error(rows, hrf, high_pass):
    """Onsets anywhere (before, inside, long after the scan), any durations, odd condition names:
    a design that passes every check, or a typed error; never an internal error."""
    from bidsglm.design import DesignSettings, build_design
    from bidsglm.firstlevel import check_design

    events = pd.DataFrame(rows, columns=["onset", "duration", "trial_type"])
    confounds = pd.DataFrame({"trans_x": np.linspace(0, 1, 40)})
    try:
        design = build_design(events, confounds, 40, 2.0, DesignSettings(hrf_model=hrf, high_pass=high_pass))
        check_design(design.to_numpy(), [str(c) for c in design.columns])
    except BidsGlmError as exc:
        assert exc.exit_code == 65
        return
    assert np.isfinite(design.to_numpy()).all()
    assert all("\n" not in note for note in design.attrs["notes"])


def test_stray_quote_does_not_join_event_lines(tmp_path):
    """BIDS tables have no quoting: a '"' in a cell stays a character, no events are lost."""
    path = tmp_path / "events.tsv"
    path.write_text('onset\tduration\ttrial_type\tstim\n1\t1\ta\t"pic.png\n5\t1\tb\tx"\n9\t1\ta\ty\n')
    assert read_events(path)["trial_type"].tolist() == ["a", "b", "a"]


# --- group inputs made with different models ---------------------------------------------------

@pytest.mark.parametrize("second,message", [
    (("--contrast", "c=congruent_correct"), "contrast weights {'congruent_correct': 1.0} here"),
    (("--contrast", "c=incongruent_correct", "--smoothing-fwhm", "0"), "SmoothingFWHM"),
])
def test_group_refuses_maps_of_different_models(demo_small, tmp_path, capsys, second, message):
    """A participant level rerun with other options for some subjects leaves maps of one
    contrast name that mean different things: the group level names them instead of averaging."""
    bids, _ = demo_small
    out = tmp_path / "out"
    base = [str(bids), str(out), "participant", "--skip-bids-validation", "-q", "--no-reports"]
    assert main([*base, "--participant-label", "01", "--contrast", "c=incongruent_correct"]) == 0
    assert main([*base, "--participant-label", "02", *second]) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main([str(bids), str(out), "group", "-q", "--no-reports"]) == 65
    line = _one_error_line(capsys)
    assert "contrast 'c' of sub-02 was made with another model than sub-01's" in line and message in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def _edit_participants(out, edit):
    path = out / "participants.tsv"
    table = pd.read_csv(path, sep="\t", dtype=str)
    edit(table)
    table.to_csv(path, sep="\t", index=False)


def test_group_levels_that_would_share_a_column_refused(group_copy, capsys):
    """'a b' and 'a-b' both become grp_a_b: merging two groups silently would be a wrong model."""
    _edit_participants(group_copy, lambda t: t.__setitem__("grp", ["a b", "a-b", "a-b", "a b", "c"]))
    assert _group(group_copy, "--group-by", "grp") == 65
    assert "level 'a-b' and another level both become design column 'grp_a_b'" in _one_error_line(capsys)
    _edit_participants(group_copy, lambda t: t.__setitem__("grp", ["0x", "a-b", "a-b", "a b", "0x"]))
    assert _group(group_copy, "--covariates", "grp") == 65  # the first level ('0x') is the reference
    assert "both become design column 'grp_a_b'" in _one_error_line(capsys)
    assert not (group_copy / "group").exists()


def test_group_covariate_given_twice_refused(group_copy, capsys):
    assert _group(group_copy, "--covariates", "age", "age") == 65
    assert "column(s) age given more than once" in _one_error_line(capsys)


def test_group_contrast_on_collinear_covariates_refused(group_copy, capsys):
    """age2 = 2 x age: the split of an effect between them is arbitrary (a pseudo-inverse's choice)."""
    _edit_participants(group_copy, lambda t: t.__setitem__("age2", [str(2 * int(a)) for a in t["age"]]))
    assert _group(group_copy, "--covariates", "age", "age2", "--group-contrast", "a=age") == 65
    assert "group contrast 'a' is not estimable" in _one_error_line(capsys)
    assert not (group_copy / "group").exists()


def test_cluster_forming_p_without_a_finite_threshold_refused(tmp_path, capsys):
    assert main([str(tmp_path / "b"), str(tmp_path / "o"), "group", "--cluster-forming-p", "1e-250"]) == 64
    assert "--cluster-forming-p must be at least 1e-15" in _one_error_line(capsys)


def test_deeply_nested_json_sidecar_is_bad_data(demo_copy, tmp_path, capsys):
    sidecar = demo_copy / BOLD1.replace("_bold.nii.gz", "_bold.json")
    sidecar.write_text('{"RepetitionTime": 2.0, "x": ' + "[" * 100000 + "]" * 100000 + "}")
    assert _participant(demo_copy, tmp_path / "out") == 65
    assert "invalid JSON (nested too deeply)" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_modulation_column_scales_events_as_nilearn(demo_copy):
    """events.tsv's optional modulation column gives each event its amplitude (nilearn reads it too)."""
    from nilearn.glm.first_level import make_first_level_design_matrix

    path = demo_copy / EVENTS1
    table = pd.read_csv(path, sep="\t")
    table["modulation"] = np.linspace(0.5, 3.0, len(table)).round(3)
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    events = read_events(path)
    assert np.allclose(events["modulation"], table.loc[table["trial_type"].notna(), "modulation"])
    frame_times = np.arange(146) * 2.0
    ours = make_first_level_design_matrix(frame_times, events, hrf_model="glover", drift_model=None)
    plain = make_first_level_design_matrix(frame_times, events.drop(columns="modulation"), hrf_model="glover",
                                           drift_model=None)
    assert not np.allclose(ours["congruent_correct"], plain["congruent_correct"])  # amplitudes used
    table["modulation"] = table["modulation"].astype(object)
    table.loc[3, "modulation"] = "n/a"
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    with pytest.raises(DataError, match="modulation"):
        read_events(path)
