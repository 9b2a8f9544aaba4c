"""Published BIDS Stats Models run on simulated BOLD around the real events:
run-level designs against the peer tool's design matrices, maps against
nilearn and scipy, node outputs, and clear errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bidsglm.cli import main
from bidsglm.discovery import SpaceSpec, discover_runs, find_derivatives
from bidsglm.modeldesign import RunDesigner
from bidsglm.statsmodel import load_model
from conftest import shared_path
from simulate import simulate_dataset

# ds000117's events code trial types as IniFF, ImmUF, DelSF...; the published model
# (and its design matrix) use famous_initial, unfamiliar_immediate, scrambled_delayed...
_REPEAT = {"Ini": "initial", "Imm": "immediate", "Del": "delayed"}
_FACE = {"FF": "famous", "UF": "unfamiliar", "SF": "scrambled"}
DS117_NAMES = {f"{r}{f}": f"{_FACE[f]}_{_REPEAT[r]}" for r in _REPEAT for f in _FACE}
# columns from fMRIPrep's confounds differ legitimately: the confounds are simulated here
CONFOUND_PREFIXES = ("trans_", "rot_", "cosine")
DESIGN_TOL = 1e-9


def _dataset(tmp_path_factory, ds, subjects, n_volumes, runs=None, rename=None):
    root = tmp_path_factory.mktemp(ds) / "bids"
    return simulate_dataset(shared_path("events", ds), root, subjects, n_volumes, runs=runs,
                            rename_trial_types=rename)


@pytest.fixture(scope="module")
def flanker(tmp_path_factory):
    return _dataset(tmp_path_factory, "ds000102", ["16"], 146)


def _designs(root, model_path, subject):
    model = load_model(model_path)
    derivatives = find_derivatives(root, None)
    runs = discover_runs(root, derivatives, SpaceSpec.parse("MNI152NLin2009cAsym"), [subject], None, None)
    designer = RunDesigner(root, derivatives, model, model.nodes[0])
    return {r.entities["run"]: designer.design(r, nib.load(r.bold).shape[3], 2.0) for r in runs}, designer


@pytest.mark.parametrize("ds,n_volumes,run,rename", [
    ("ds000102", 146, "2", None),
    ("ds000117", 208, "04", DS117_NAMES),
    ("ds000001", 300, "01", None),
])
def test_run_designs_match_published_design_matrices(tmp_path_factory, ds, n_volumes, run, rename):
    """The published design matrices are of sub-16 (ds000102 run 2, ds000117 run 4, ds000001
    run 1); every column built from the events (conditions, response-time regressor,
    ds000001's parametric modulators) matches to 1e-9; the confound columns are simulated."""
    root = _dataset(tmp_path_factory, ds, ["16"], n_volumes, runs=int(run), rename=rename)
    model_path = next(shared_path("models", ds).glob("*_specs.json"))
    reference = pd.read_csv(next(shared_path("models", ds).glob("*_design-matrix.tsv")), sep="\t")
    designs, _ = _designs(root, model_path, "16")
    X = designs[run]
    event_columns = [c for c in reference.columns if not c.startswith(CONFOUND_PREFIXES) and c != "intercept"]
    assert len(event_columns) >= 4
    for col in event_columns:
        np.testing.assert_allclose(X[col].to_numpy(), reference[col].to_numpy(), atol=DESIGN_TOL, err_msg=col)
    assert (X["intercept"] == 1).all() and (reference["intercept"] == 1).all()
    confounds = [c for c in reference.columns if c.startswith(CONFOUND_PREFIXES)]
    assert set(confounds) <= set(X.columns)  # the same columns, selected by the same wildcards


def test_contrast_conditions_absent_from_a_run_are_dropped_there(flanker):
    model_path = shared_path("models", "ds000102", "ds000102-flanker_specs.json")
    designs, designer = _designs(flanker, model_path, "16")
    for X in designs.values():
        contrasts, dropped = designer.contrasts(list(X.columns))
        assert {c.name for c in contrasts} | set(dropped) == {"inVcon", "inVbase", "rt"}


@pytest.fixture(scope="module")
def flanker_results(flanker, tmp_path_factory):
    out = tmp_path_factory.mktemp("flanker_out") / "out"
    model_path = shared_path("models", "ds000102", "ds000102-flanker_specs.json")
    code = main([str(flanker), str(out), "participant", "--model", str(model_path), "--skip-bids-validation",
                 "-q", "--smoothing-fwhm", "8"])
    assert code == 0
    return flanker, out, model_path


def test_node_outputs_and_sidecars(flanker_results):
    _, out, _ = flanker_results
    run_maps = sorted((out / "node-run_level").rglob("*_run-*_contrast-*_stat-z_statmap.nii.gz"))
    subject_maps = sorted((out / "node-subject_level").rglob("*_contrast-*_stat-z_statmap.nii.gz"))
    assert len(run_maps) == 2 * 3 and len(subject_maps) == 3
    side = json.loads(run_maps[0].with_name(run_maps[0].name.replace(".nii.gz", ".json")).read_text())
    assert side["Node"] == "run_level" and side["StatsModel"] == "ds000102" and side["NodeLevel"] == "Run"
    sub_side = json.loads(subject_maps[0].with_name(subject_maps[0].name.replace(".nii.gz", ".json")).read_text())
    assert sub_side["Node"] == "subject_level" and sub_side["NodeModelType"] == "glm"
    assert not list(out.glob("sub-*"))  # nothing outside the node folders


def test_run_maps_equal_nilearn_first_level_with_the_same_design(flanker_results):
    """Independent computation: nilearn's FirstLevelModel given the model's design matrix."""
    from nilearn.glm.first_level import FirstLevelModel

    root, out, model_path = flanker_results
    designs, _ = _designs(root, model_path, "16")
    bold = next(root.rglob("*run-1_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"))
    mask = next(root.rglob("*run-1_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"))
    flm = FirstLevelModel(t_r=2.0, noise_model="ar1", smoothing_fwhm=8, mask_img=str(mask), signal_scaling=0,
                          minimize_memory=False).fit(str(bold), design_matrices=[designs["1"]])
    m = np.asanyarray(nib.load(mask).dataobj) > 0
    for name, cond in (("inVbase", "trial_type.incongruent_correct"), ("rt", "rt_reg.rt")):
        ref = flm.compute_contrast(cond, output_type="z_score").get_fdata()[m]
        ours = nib.load(next((out / "node-run_level").rglob(f"*run-1_*contrast-{name}_stat-z_statmap.nii.gz")))
        np.testing.assert_allclose(ours.get_fdata()[m], ref, atol=1e-4)


def test_subject_glm_node_is_a_one_sample_test_across_runs(flanker_results):
    """Model.Type glm with X [1] at the Subject node: scipy's one-sample t-test on the run effects."""
    _, out, _ = flanker_results
    effects = [nib.load(p).get_fdata() for p in
               sorted((out / "node-run_level").rglob("*_run-*_contrast-inVbase_stat-effect_statmap.nii.gz"))]
    t_map = nib.load(next((out / "node-subject_level").rglob("*contrast-inVbase_stat-t_statmap.nii.gz"))).get_fdata()
    inside = np.flatnonzero(t_map.ravel() != 0)[::97]
    expected = stats.ttest_1samp(np.stack([e.ravel()[inside] for e in effects]), 0.0).statistic
    np.testing.assert_allclose(t_map.ravel()[inside], expected, rtol=1e-4)


def _run_cli(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_contrast_over_absent_conditions_is_an_error(flanker, tmp_path, capsys):
    model = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    model["Nodes"][0]["Contrasts"].append({"Name": "ghost", "ConditionList": ["trial_type.neutral"],
                                           "Weights": [1], "Test": "t"})
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    code, err = _run_cli(capsys, flanker, tmp_path / "out", "participant", "--model", path,
                         "--skip-bids-validation", "-q")
    assert code == 65 and len(err) == 1
    assert "node 'run_level'" in err[0] and "Contrasts[3].ConditionList" in err[0] and "ghost" in err[0]
    assert not (tmp_path / "out" / "node-run_level").exists()


def test_missing_variable_is_an_error(flanker, tmp_path, capsys):
    model = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    model["Nodes"][0]["Transformations"]["Instructions"][3]["Input"] = ["reaction_time"]  # Assign
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    code, err = _run_cli(capsys, flanker, tmp_path / "out", "participant", "--model", path,
                         "--skip-bids-validation", "-q")
    assert code == 65 and len(err) == 1 and "node 'run_level'" in err[0] and "reaction_time" in err[0]


def test_invalid_model_is_an_error_before_anything_runs(flanker, tmp_path, capsys):
    model = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    model["Nodes"][0]["Model"]["Options"] = {"LowPassFilterCutoffHz": 0.1}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    code, err = _run_cli(capsys, flanker, tmp_path / "out", "participant", "--model", path,
                         "--skip-bids-validation", "-q")
    assert code == 65 and len(err) == 1 and "LowPassFilterCutoffHz" in err[0]
    assert not (tmp_path / "out").exists()


MODELS = {  # dataset: (volumes, trial type recoding)
    "ds000102": (146, None),
    "ds000117": (208, DS117_NAMES),
    "ds000001": (300, None),
}


# ds000102 in the default run; ds000001 and ds000117 are slow: ds000001 runs at both levels in
# test_model_corpus's default set, and both their Run designs are checked in the test above
@pytest.mark.parametrize("ds", [ds if ds == "ds000102" else pytest.param(ds, marks=pytest.mark.slow)
                                for ds in MODELS])
def test_published_model_runs_at_both_levels(tmp_path_factory, ds):
    """Three subjects, two runs each: Run, Subject and Dataset nodes all write their maps,
    and the Dataset node's t is scipy's one-sample t-test over the Subject node's effects."""
    n_volumes, rename = MODELS[ds]
    root = _dataset(tmp_path_factory, ds, ["14", "15", "16"], n_volumes, runs=2, rename=rename)
    model_path = next(shared_path("models", ds).glob("*_specs.json"))
    model = load_model(model_path)
    out = root.parent / "out"
    assert main([str(root), str(out), "participant", "--model", str(model_path), "--skip-bids-validation",
                 "-q", "--smoothing-fwhm", "0"]) == 0
    assert main([str(root), str(out), "group", "--model", str(model_path), "-q"]) == 0
    run_node, subject_node, dataset_node = model.nodes
    run_z = list((out / f"node-{run_node.name}").rglob("*_run-*_stat-z_statmap.nii.gz"))
    assert len(run_z) >= 3 * 2 * 2
    for con in run_node.contrasts:
        subject_maps = list((out / f"node-{subject_node.name}").rglob(f"*_contrast-{con.name}_stat-effect_statmap.nii.gz"))
        assert len(subject_maps) == 3, con.name
        group_t = list((out / f"node-{dataset_node.name}").rglob(f"*_contrast-{con.name}_stat-t_statmap.nii.gz"))
        assert len(group_t) == 1, con.name
    con = run_node.contrasts[0].name
    effects = [nib.load(p).get_fdata() for p in
               sorted((out / f"node-{subject_node.name}").rglob(f"*_contrast-{con}_stat-effect_statmap.nii.gz"))]
    t_img = next((out / f"node-{dataset_node.name}").rglob(f"*_contrast-{con}_stat-t_statmap.nii.gz"))
    t_map = nib.load(t_img).get_fdata()
    inside = np.flatnonzero(t_map.ravel() != 0)[::53]
    expected = stats.ttest_1samp(np.stack([e.ravel()[inside] for e in effects]), 0.0).statistic
    np.testing.assert_allclose(t_map.ravel()[inside], expected, rtol=1e-4)
    side = json.loads(t_img.with_name(t_img.name.replace(".nii.gz", ".json")).read_text())
    assert side["Node"] == dataset_node.name and side["StatsModel"] == model.name
    _assert_valid_bids(out, root.parent)


def _assert_valid_bids(out, work):
    import os
    import subprocess

    from bidsglm.validation import validator_command

    if validator_command() is None:
        return
    proc = subprocess.run([validator_command(), "--format", "json", str(out)], capture_output=True, text=True,
                          env={**os.environ, "DENO_DIR": str(work / "deno")})
    errors = [i for i in json.loads(proc.stdout)["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, errors[:3]


def test_model_hrf_equals_the_convolve_transformation(flanker, tmp_path):
    """Model.HRF is applied as pybids' Convolve: without the Convolve instruction but with
    Model.HRF the regressors are the same; '+ derivative' adds the derivative columns."""
    published = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    with_hrf = json.loads(json.dumps(published))
    run = with_hrf["Nodes"][0]
    convolve = run["Transformations"]["Instructions"].pop()  # the Convolve instruction
    run["Model"]["HRF"] = {"Variables": ["trial_type.congruent_correct", "trial_type.incongruent_correct",
                                         "rt_reg.rt"], "Model": "spm + derivative"}
    path = tmp_path / "hrf.json"
    path.write_text(json.dumps(with_hrf))
    assert convolve["Name"] == "Convolve"
    reference, _ = _designs(flanker, shared_path("models", "ds000102", "ds000102-flanker_specs.json"), "16")
    ours, _ = _designs(flanker, path, "16")
    for col in ("trial_type.congruent_correct", "trial_type.incongruent_correct", "rt_reg.rt"):
        np.testing.assert_allclose(ours["1"][col], reference["1"][col], atol=1e-12)
        assert f"{col}_derivative" in ours["1"].columns
        assert np.abs(ours["1"][f"{col}_derivative"]).max() > 0


CUSTOM = {
    "Name": "flankerCustom", "BIDSModelVersion": "1.0.0",
    "Nodes": [
        {"Level": "Run", "Name": "runs", "GroupBy": ["run", "subject"],
         "Transformations": {"Transformer": "pybids-transforms-v1",
                             "Instructions": [{"Name": "Factor", "Input": ["trial_type"]}]},
         "Model": {"Type": "glm", "X": [1, "trial_type.congruent_correct", "trial_type.incongruent_correct",
                                        "trans_*", "rot_*"],
                   "HRF": {"Variables": ["trial_type.congruent_correct", "trial_type.incongruent_correct"],
                           "Model": "glover"},
                   "Options": {"HighPassFilterCutoffHz": 0.01}},
         "Contrasts": [
             {"Name": "incongruentVsCongruent", "ConditionList": ["trial_type.incongruent_correct",
                                                                  "trial_type.congruent_correct"],
              "Weights": [1, -1], "Test": "t"},
             {"Name": "anyEffect", "ConditionList": ["trial_type.incongruent_correct", "trial_type.congruent_correct"],
              "Weights": [[1, 0], [0, 1]], "Test": "F"},
             {"Name": "congruentEffect", "ConditionList": ["trial_type.congruent_correct"], "Weights": [1],
              "Test": "pass"}]},
        {"Level": "Subject", "Name": "subjects", "GroupBy": ["subject", "contrast"],
         "Model": {"Type": "meta", "X": [1]}, "DummyContrasts": {"Test": "t"}},
        {"Level": "Dataset", "Name": "groupAge", "GroupBy": ["contrast"],
         "Model": {"Type": "glm", "X": [1, "age"]},
         "Contrasts": [{"Name": "ageSlope", "ConditionList": ["age"], "Weights": [1], "Test": "t"}]},
    ],
    "Edges": [{"Source": "runs", "Destination": "subjects"},
              {"Source": "subjects", "Destination": "groupAge", "Filter": {"contrast": ["incongruentVsCongruent"]}}],
}


def test_custom_model_f_pass_meta_covariate_and_filter(tmp_path_factory, with_reports):
    """F and pass contrasts at the run level, fixed effects (meta) per subject, a Dataset node
    with an age covariate behind an edge that lets one contrast through."""
    root = _dataset(tmp_path_factory, "ds000102", ["01", "02", "03", "04"], 146)
    path = root.parent / "custom.json"
    path.write_text(json.dumps(CUSTOM))
    out = root.parent / "out"
    assert main([str(root), str(out), "participant", "--model", str(path), "--skip-bids-validation", "-q",
                 "--no-reports"]) == 0
    assert main([str(root), str(out), "group", "--model", str(path), "-q"]) == 0  # with its report
    # the participant report of a model with F contrasts (one row of weights per row)
    assert main([str(root), str(out), "participant", "--model", str(path), "--reports-only",
                 "--participant-label", "01", "-q"]) == 0
    page = (out / "node-runs" / "sub-01.html").read_text()
    # a design matrix image per run (correlations and weights are tables), z maps of 2 runs and the subject
    assert "Contrast anyEffect" in page and page.count("<img ") >= 2 * 1 + 3
    assert (out / "node-groupAge" / "report.html").is_file()
    runs = out / "node-runs"
    assert len(list(runs.rglob("*_run-*_contrast-anyEffect_stat-F_statmap.nii.gz"))) == 8
    assert not list(runs.rglob("*contrast-congruentEffect_stat-t_statmap.nii.gz"))  # pass: no test
    assert len(list(runs.rglob("*_run-*_contrast-congruentEffect_stat-effect_statmap.nii.gz"))) == 8
    design = pd.read_csv(next(runs.rglob("*_run-1_design.tsv")), sep="\t")
    assert any(c.startswith("drift_") for c in design.columns)  # HighPassFilterCutoffHz
    # meta: precision-weighted fixed effects of the two runs
    subject = next((out / "node-subjects").rglob("sub-01_*contrast-incongruentVsCongruent_stat-effect_statmap.nii.gz"))
    run_e = [nib.load(p).get_fdata() for p in sorted(runs.rglob(
        "sub-01_*_run-*_contrast-incongruentVsCongruent_stat-effect_statmap.nii.gz"))]
    run_v = [nib.load(p).get_fdata() for p in sorted(runs.rglob(
        "sub-01_*_run-*_contrast-incongruentVsCongruent_stat-variance_statmap.nii.gz"))]
    inside = run_v[0] > 0
    w = [1 / v[inside] for v in run_v]
    expected = (w[0] * run_e[0][inside] + w[1] * run_e[1][inside]) / (w[0] + w[1])
    np.testing.assert_allclose(nib.load(subject).get_fdata()[inside], expected, rtol=1e-4, atol=1e-6)
    # the edge filter: only incongruentVsCongruent reaches the Dataset node, which fits 1 + age
    group = out / "node-groupAge"
    assert {p.name.split("_contrast-")[1].split("_")[0] for p in group.glob("*_stat-t_statmap.nii.gz")} == \
        {"incongruentVsCongruentAgeSlope"}
    table = pd.read_csv(next(group.glob("*_design.tsv")), sep="\t")
    assert "age" in table.columns and len(table) == 4


def test_options_mask_restricts_the_analysis(flanker, tmp_path, capsys):
    """Model.Options.Mask names an image of the input datasets by its entities."""
    from simulate import AFFINE, SHAPE

    roi = np.zeros(SHAPE, np.uint8)
    roi[6:13, 8:15, 6:12] = 1
    func = flanker / "derivatives" / "fmriprep" / "sub-16" / "func"
    roi_path = func / "sub-16_task-flanker_space-MNI152NLin2009cAsym_desc-roi_mask.nii.gz"
    nib.save(nib.Nifti1Image(roi, AFFINE), roi_path)
    try:
        model = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
        model["Nodes"][0]["Model"]["Options"] = {"Mask": {"desc": "roi", "suffix": "mask"}}
        model["Nodes"] = model["Nodes"][:1]
        path = tmp_path / "masked.json"
        path.write_text(json.dumps(model))
        out = tmp_path / "out"
        assert main([str(flanker), str(out), "participant", "--model", str(path), "--skip-bids-validation",
                     "-q", "--smoothing-fwhm", "0"]) == 0
        z = nib.load(next(out.rglob("*_run-1_*contrast-inVbase_stat-z_statmap.nii.gz"))).get_fdata()
        assert np.all(z[roi == 0] == 0) and np.count_nonzero(z[roi == 1]) > 0.9 * roi.sum()
        model["Nodes"][0]["Model"]["Options"] = {"Mask": {"desc": "nothing", "suffix": "mask"}}
        path.write_text(json.dumps(model))
        code = main([str(flanker), str(tmp_path / "out2"), "participant", "--model", str(path),
                     "--skip-bids-validation", "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 65 and len(err) == 1 and "Model.Options.Mask" in err[0] and "matches 0 images" in err[0]
    finally:
        roi_path.unlink()


def test_formula_builds_the_design_from_model_x(flanker, tmp_path, capsys):
    """Model.Formula (evaluated by pybids with formulaic): 0 drops the intercept, a:b is the product."""
    model_path = shared_path("models", "ds000102", "ds000102-flanker_specs.json")
    reference, _ = _designs(flanker, model_path, "16")
    model = json.loads(model_path.read_text())
    model["Nodes"][0]["Model"]["Formula"] = ("0 + `trial_type.congruent_correct` + `trial_type.incongruent_correct` "
                                             "+ `rt_reg.rt` + `trial_type.congruent_correct`:`rt_reg.rt`")
    path = tmp_path / "formula.json"
    path.write_text(json.dumps(model))
    ours, _ = _designs(flanker, path, "16")
    X, ref = ours["1"], reference["1"]
    assert list(X.columns) == ["trial_type.congruent_correct", "trial_type.incongruent_correct", "rt_reg.rt",
                               "trial_type.congruent_correct:rt_reg.rt"]
    np.testing.assert_allclose(X["trial_type.congruent_correct:rt_reg.rt"],
                               ref["trial_type.congruent_correct"] * ref["rt_reg.rt"], atol=1e-12)
    model["Nodes"][0]["Model"]["Formula"] = "1 + trial_type.*"
    path.write_text(json.dumps(model))
    code = main([str(flanker), str(tmp_path / "out"), "participant", "--model", str(path),
                 "--skip-bids-validation", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 65 and len(err) == 1 and "Model.Formula" in err[0] and "node 'run_level'" in err[0]


def test_session_node_and_unsupported_graphs(tmp_path_factory, capsys):
    """A Session node (meta) feeding a Dataset node grouped by session; a Subject node fed
    by a Session node is refused with the node and field named."""
    root = _dataset(tmp_path_factory, "ds000117", ["15", "16"], 208, runs=2, rename=DS117_NAMES)
    published = json.loads(next(shared_path("models", "ds000117").glob("*_specs.json")).read_text())
    model = {"Name": "sessions", "BIDSModelVersion": "1.0.0", "Nodes": [
        published["Nodes"][0],
        {"Level": "Session", "Name": "perSession", "GroupBy": ["subject", "session", "contrast"],
         "Model": {"Type": "meta", "X": [1]}, "DummyContrasts": {"Test": "t"}},
        {"Level": "Dataset", "Name": "group", "GroupBy": ["contrast", "session"],
         "Model": {"Type": "glm", "X": [1]}, "DummyContrasts": {"Test": "t"}}]}
    path = root.parent / "sessions.json"
    path.write_text(json.dumps(model))
    out = root.parent / "out"
    assert main([str(root), str(out), "participant", "--model", str(path), "--skip-bids-validation", "-q"]) == 0
    assert main([str(root), str(out), "group", "--model", str(path), "-q"]) == 0
    assert len(list((out / "node-perSession").rglob("sub-*/ses-mri/func/*_stat-t_statmap.nii.gz"))) == 2 * 6
    assert len(list((out / "node-group" / "ses-mri").glob("*_stat-t_statmap.nii.gz"))) == 6
    model["Nodes"].insert(2, {"Level": "Subject", "Name": "perSubject", "GroupBy": ["subject", "contrast"],
                              "Model": {"Type": "meta", "X": [1]}, "DummyContrasts": {"Test": "t"}})
    path.write_text(json.dumps(model))
    code = main([str(root), str(root.parent / "out2"), "participant", "--model", str(path),
                 "--skip-bids-validation", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 65 and len(err) == 1 and "node 'perSubject', field 'Edges'" in err[0]


@pytest.mark.parametrize("level,option", [("participant", ["--contrast", "a=b"]),
                                          ("participant", ["--confounds", "csf"]),
                                          ("group", ["--group-model", "anova"]),
                                          ("group", ["--covariates", "age"])])
def test_options_the_model_defines_are_refused(tmp_path, capsys, level, option):
    code = main([str(tmp_path), str(tmp_path / "out"), level, "--model", str(tmp_path / "m.json"), *option])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 64 and len(err) == 1 and option[0] in err[0] and "cannot be used with --model" in err[0]


def test_dataset_node_problems_stop_the_participant_level(flanker, tmp_path, capsys):
    """A Dataset node bidsglm cannot fit is reported before any run is fitted."""
    model = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    model["Nodes"][2]["GroupBy"] = ["contrast", "group"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    code = main([str(flanker), str(tmp_path / "out"), "participant", "--model", str(path),
                 "--skip-bids-validation", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 65 and len(err) == 1 and "node 'data_level', field 'GroupBy'" in err[0]
    assert not (tmp_path / "out").exists()


def test_parallel_runs_give_the_same_maps(flanker_results, tmp_path):
    """--n-cpus 2 fits the Run node's runs in parallel processes: identical maps."""
    root, out, model_path = flanker_results
    par = tmp_path / "par"
    assert main([str(root), str(par), "participant", "--model", str(model_path), "--skip-bids-validation",
                 "-q", "--smoothing-fwhm", "8", "--n-cpus", "2"]) == 0
    for ref in sorted((out / "node-run_level").rglob("*_stat-z_statmap.nii.gz")):
        ours = par / ref.relative_to(out)
        np.testing.assert_array_equal(nib.load(ours).get_fdata(), nib.load(ref).get_fdata())


@pytest.mark.parametrize("field,value", [
    ("Formula", "1 + {__import__('os').system('touch MARKER')}"),
    ("Formula", "`trial_type.congruent_correct` + __import__('os').system('touch MARKER')"),
    ("Query", "trial_type == 'x' or __import__('os').system('touch MARKER') == 0"),
])
def test_model_text_is_never_run(flanker, tmp_path, capsys, field, value):
    """Payloads that would create a file, through Model.Formula (formulaic) and a Filter
    query (pandas): refused with 65 before anything runs; the file never appears."""
    marker = tmp_path / "pwned"
    model = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    value = value.replace("MARKER", str(marker))
    if field == "Formula":
        model["Nodes"][0]["Model"]["Formula"] = value
        where = "field 'Model.Formula'"
    else:
        model["Nodes"][0]["Transformations"]["Instructions"].insert(
            1, {"Name": "Filter", "Input": ["trial_type"], "Query": value})
        where = "field 'Transformations.Instructions[1].Query'"
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    for level in ("participant", "group"):
        code, err = _run_cli(capsys, flanker, tmp_path / "out", level, "--model", path,
                             "--skip-bids-validation", "-q")
        assert code == 65 and len(err) == 1, err
        assert "node 'run_level'" in err[0] and where in err[0] and "refused" in err[0], err[0]
        assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_variables_not_convolved_are_sampled_on_the_scan_grid(flanker, tmp_path):
    """The spec's own example leaves some variables unconvolved: like pybids and fitlins, every
    variable is resampled to one row per volume. A boxcar of the events sampled at each TR:
    values in [0, 1], its mean the fraction of the scan the events cover (independent count)."""
    model = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    model["Nodes"][0]["Transformations"]["Instructions"] = [{"Name": "Factor", "Input": ["trial_type"]}]
    model["Nodes"][0]["Model"]["X"] = [1, "trial_type.congruent_correct", "trans_x"]
    model["Nodes"][0]["Contrasts"] = []
    model["Nodes"][0]["DummyContrasts"] = {"Test": "t"}  # a node without contrasts is refused
    model["Nodes"] = model["Nodes"][:1]
    path = tmp_path / "sparse.json"
    path.write_text(json.dumps(model))
    designs, _ = _designs(flanker, path, "16")
    X = designs["1"]
    assert len(X) == 146
    box = X["trial_type.congruent_correct"].to_numpy()
    assert box.min() >= 0 and box.max() <= 1 and box.max() > 0
    events = pd.read_csv(next(flanker.rglob("sub-16_task-flanker_run-1_events.tsv")), sep="\t")
    chosen = events[events["trial_type"] == "congruent_correct"]
    frames = np.arange(146) * 2.0
    covered = np.zeros(146)
    for onset, duration in zip(chosen["onset"], chosen["duration"]):
        fine = np.arange(onset, onset + duration, 0.01)
        np.add.at(covered, np.clip((fine // 2.0).astype(int), 0, 145), 0.01 / 2.0)
    np.testing.assert_allclose(box.sum(), covered.sum(), rtol=0.05)


def test_dataset_node_over_run_maps_with_cell_means(tmp_path_factory):
    """A Run node feeding a Dataset node directly (run- entity in the files: bug A), whose
    Model.X has no intercept: one mean per participants.tsv gender (cell means), a t contrast
    between two of them and an F test over all three. Both statistics equal statsmodels' OLS
    on the run effect maps (rtol 1e-6)."""
    import statsmodels.api as sm

    subjects = ["01", "02", "03", "07", "08"]  # genders F, M, M, D, D
    root = _dataset(tmp_path_factory, "ds000102", subjects, 146)
    published = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    model = {"Name": "cellMeans", "BIDSModelVersion": "1.0.0", "Input": {"run": [1]}, "Nodes": [
        published["Nodes"][0],
        {"Level": "Dataset", "Name": "by gender", "GroupBy": ["contrast"],
         "Model": {"Type": "glm", "X": ["gender"]},
         "Contrasts": [{"Name": "anyGender", "ConditionList": ["gender.D", "gender.F", "gender.M"],
                        "Weights": [[1, -1, 0], [0, 1, -1]], "Test": "F"},
                       {"Name": "mVsD", "ConditionList": ["gender.M", "gender.D"], "Weights": [1, -1],
                        "Test": "t"}]},
        {"Level": "Dataset", "Name": "ageSlope", "GroupBy": ["contrast"],
         "Transformations": {"Transformer": "pybids-transforms-v1", "Instructions": [
             {"Name": "Scale", "Input": ["age"], "Output": ["age_z"]}]},
         "Model": {"Type": "glm", "X": [1, "age_z"]},
         "Contrasts": [{"Name": "perSd", "ConditionList": ["age_z"], "Weights": [1], "Test": "t"}]}],
        "Edges": [{"Source": "run_level", "Destination": "by gender", "Filter": {"contrast": ["inVbase"]}},
                  {"Source": "run_level", "Destination": "ageSlope", "Filter": {"contrast": ["inVbase"]}}]}
    path = root.parent / "cells.json"
    path.write_text(json.dumps(model))
    out = root.parent / "out"
    assert main([str(root), str(out), "participant", "--model", str(path), "--skip-bids-validation", "-q",
                 "--smoothing-fwhm", "0"]) == 0
    assert main([str(root), str(out), "group", "--model", str(path), "-q"]) == 0
    group = out / "node-byGender"  # a node name with a space gives a safe folder label
    f_img = next(group.glob("*_stat-F_statmap.nii.gz"))
    t_img = next(group.glob("*MVsD_stat-t_statmap.nii.gz"))
    effects = [nib.load(next((out / "node-run_level").rglob(
        f"sub-{s}_task-flanker_run-1_*contrast-inVbase_stat-effect_statmap.nii.gz"))).get_fdata() for s in subjects]
    gender = ["F", "M", "M", "D", "D"]
    X = np.array([[g == level for level in ("D", "F", "M")] for g in gender], dtype=float)
    f_map, t_map = nib.load(f_img).get_fdata(), nib.load(t_img).get_fdata()
    voxels = np.flatnonzero(f_map.ravel() != 0)[::41]
    assert len(voxels) > 10
    for v in voxels:
        fit = sm.OLS(np.array([e.ravel()[v] for e in effects]), X).fit()
        np.testing.assert_allclose(t_map.ravel()[v], float(np.squeeze(fit.t_test([-1, 0, 1]).tvalue)), rtol=1e-6)
        np.testing.assert_allclose(f_map.ravel()[v], float(np.squeeze(fit.f_test([[1, -1, 0], [0, 1, -1]]).fvalue)), rtol=1e-6)
    table = pd.read_csv(next(group.glob("*_design.tsv")), sep="\t")
    assert [c for c in table.columns if c.startswith("gender")] == ["gender_D", "gender_F", "gender_M"]
    # Dataset Transformations (pybids Scale: z-score with the sample SD): the slope per SD of age
    ages = pd.read_csv(root / "participants.tsv", sep="\t", index_col=0).loc[[f"sub-{s}" for s in subjects], "age"]
    z = ((ages - ages.mean()) / ages.std(ddof=1)).to_numpy()
    slope = nib.load(next((out / "node-ageSlope").glob("*PerSd_stat-effect_statmap.nii.gz"))).get_fdata()
    for v in voxels:
        fit = sm.OLS(np.array([e.ravel()[v] for e in effects]), sm.add_constant(z)).fit()
        np.testing.assert_allclose(slope.ravel()[v], fit.params[1], rtol=1e-6)


def test_groupings_and_a_subject_glm_over_one_run(flanker, tmp_path, capsys):
    """GroupBy session on data without sessions is a no-op at every node (bug E); a Run node
    grouped by [run] alone (one subject) fits each run; a Subject glm node whose subject has
    one run passes that run's estimate on (identical maps), instead of writing nothing."""
    published = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    run = published["Nodes"][0]
    run["GroupBy"] = ["run"]
    model = {"Name": "oneRun", "BIDSModelVersion": "1.0.0", "Input": {"run": [1]}, "Nodes": [
        run,
        {"Level": "Subject", "Name": "subject_level", "GroupBy": ["subject", "contrast", "session"],
         "Model": {"Type": "glm", "X": [1]}, "DummyContrasts": {"Test": "t"}},
        {"Level": "Dataset", "Name": "data_level", "GroupBy": ["contrast", "session"],
         "Model": {"Type": "glm", "X": [1]}, "DummyContrasts": {"Test": "t"}}]}
    path = tmp_path / "one.json"
    path.write_text(json.dumps(model))
    out = tmp_path / "out"
    code, err = _run_cli(capsys, flanker, out, "participant", "--model", path, "--skip-bids-validation", "-q",
                         "--smoothing-fwhm", "0")
    assert code == 0, err
    for stat in ("effect", "variance", "t"):
        ours = next((out / "node-subject_level").rglob(f"*contrast-inVbase_stat-{stat}_statmap.nii.gz"))
        ref = next((out / "node-run_level").rglob(f"*run-1_*contrast-inVbase_stat-{stat}_statmap.nii.gz"))
        np.testing.assert_allclose(nib.load(ours).get_fdata(), nib.load(ref).get_fdata(), rtol=1e-6, atol=1e-9)
    side = json.loads(ours.with_name(ours.name.replace(".nii.gz", ".json")).read_text())
    assert "one run" in side["SingleRun"]
    # [subject] with two runs of that subject would concatenate runs: refused, naming GroupBy
    model["Input"] = {}
    model["Nodes"][0]["GroupBy"] = ["subject"]
    path.write_text(json.dumps(model))
    code, err = _run_cli(capsys, flanker, tmp_path / "out2", "participant", "--model", path,
                         "--skip-bids-validation", "-q")
    assert code == 65 and len(err) == 1 and "node 'run_level', field 'GroupBy'" in err[0], err
    assert "2 runs in one design" in err[0] and not (tmp_path / "out2").exists()


def test_dataset_groupby_a_participants_column(tmp_path_factory):
    """Dataset GroupBy [contrast, gender]: one one-sample model per gender, over that gender's
    subjects only; its t equals scipy's one-sample t-test on those subjects' run effects."""
    subjects = ["02", "03", "07", "08"]  # genders M, M, D, D
    root = _dataset(tmp_path_factory, "ds000102", subjects, 146)
    published = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    model = {"Name": "perGender", "BIDSModelVersion": "1.0.0", "Input": {"run": [1]}, "Nodes": [
        published["Nodes"][0],
        {"Level": "Dataset", "Name": "data", "GroupBy": ["contrast", "gender"],
         "Model": {"Type": "glm", "X": [1]}, "DummyContrasts": {"Test": "t"}}],
        "Edges": [{"Source": "run_level", "Destination": "data", "Filter": {"contrast": ["inVbase"]}}]}
    path = root.parent / "gender.json"
    path.write_text(json.dumps(model))
    out = root.parent / "out"
    assert main([str(root), str(out), "participant", "--model", str(path), "--skip-bids-validation", "-q",
                 "--smoothing-fwhm", "0"]) == 0
    assert main([str(root), str(out), "group", "--model", str(path), "-q"]) == 0
    for gender, members in (("M", ["02", "03"]), ("D", ["07", "08"])):
        t_img = next((out / "node-data" / f"gender-{gender}").glob("*_stat-t_statmap.nii.gz"))
        table = pd.read_csv(next((out / "node-data" / f"gender-{gender}").glob("*_design.tsv")), sep="\t")
        assert sorted(table["participant_id"]) == [f"sub-{s}" for s in members]
        effects = [nib.load(next((out / "node-run_level").rglob(
            f"sub-{s}_task-flanker_run-1_*contrast-inVbase_stat-effect_statmap.nii.gz"))).get_fdata()
            for s in members]
        t_map = nib.load(t_img).get_fdata()
        inside = np.flatnonzero(t_map.ravel() != 0)[::37]
        expected = stats.ttest_1samp(np.stack([e.ravel()[inside] for e in effects]), 0.0).statistic
        np.testing.assert_allclose(t_map.ravel()[inside], expected, rtol=1e-6)


@pytest.mark.parametrize("change,field", [
    (lambda n: n["Model"].update(X=[1, "weight"]), "Model.X"),
    (lambda n: n.update(GroupBy=["contrast", "handedness"]), "GroupBy"),
    (lambda n: n.update(GroupBy=["contrast", "gender", "age"]), "GroupBy"),
    (lambda n: n.update(Transformations={"Transformer": "pybids-transforms-v1",
                                         "Instructions": [{"Name": "Demean", "Input": ["weight"]}]}), "Transformations"),
])
def test_dataset_columns_are_checked_before_fitting(flanker, tmp_path, capsys, change, field):
    """Dataset Model.X and GroupBy name participants.tsv columns; what is absent (or unsupported)
    is refused before any run is fitted, naming node and field."""
    model = json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())
    change(model["Nodes"][2])
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    code, err = _run_cli(capsys, flanker, tmp_path / "out", "participant", "--model", path,
                         "--skip-bids-validation", "-q")
    assert code == 65 and len(err) == 1 and f"node 'data_level', field '{field}'" in err[0], err
    assert not (tmp_path / "out").exists()


# --- BIDS Stats Models on surfaces and grayordinates (the options path's format layer) ---------

SURFACE_MODEL = {
    "Name": "surfaceModel", "BIDSModelVersion": "1.0.0",
    "Nodes": [
        {"Level": "Run", "Name": "runs", "GroupBy": ["run", "subject"],
         "Transformations": {"Transformer": "pybids-transforms-v1",
                             "Instructions": [{"Name": "Factor", "Input": ["trial_type"]}]},
         "Model": {"Type": "glm", "X": [1, "trial_type.congruent_correct", "trial_type.incongruent_correct",
                                        "trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"],
                   "HRF": {"Variables": ["trial_type.congruent_correct", "trial_type.incongruent_correct"],
                           "Model": "glover"},
                   "Options": {"HighPassFilterCutoffHz": 0.0078125}},
         "Contrasts": [{"Name": "incongruentVsCongruent",
                        "ConditionList": ["trial_type.incongruent_correct", "trial_type.congruent_correct"],
                        "Weights": [1, -1], "Test": "t"}]},
        {"Level": "Subject", "Name": "subjects", "GroupBy": ["subject", "contrast"],
         "Model": {"Type": "meta", "X": [1]}, "DummyContrasts": {"Test": "t"}},
        {"Level": "Dataset", "Name": "group", "GroupBy": ["contrast"],
         "Model": {"Type": "glm", "X": [1]}, "DummyContrasts": {"Test": "t"}}],
    "Edges": [{"Source": "runs", "Destination": "subjects"}, {"Source": "subjects", "Destination": "group"}],
}
SURFACE_SPACE = {"gifti": "fsaverage5", "cifti": "fsLR"}


def _surface_values(path_l_or_dscalar) -> np.ndarray:
    from bidsglm.surfaces import read_map

    return np.asarray(read_map(path_l_or_dscalar)[0], float)


def _surface_maps(folder, pattern: str) -> list:
    return sorted(p for p in folder.rglob(pattern) if "_hemi-R_" not in p.name and not p.name.endswith(".json"))


@pytest.fixture(scope="module", params=["gifti", pytest.param("cifti", marks=pytest.mark.slow)])
def surface_model_results(request, tmp_path_factory, with_reports_module):
    """The demo's surface variant (2 subjects x 2 runs), the model at both levels, with reports."""
    from bidsglm.demo import main as demo

    kind = request.param
    root = tmp_path_factory.mktemp(f"model-{kind}") / "demo"
    assert demo([str(root), "--subjects", "2", "--voxel-size", "8", "--surface", kind]) == 0
    model_path = root.parent / "model.json"
    model_path.write_text(json.dumps(SURFACE_MODEL))
    out = root.parent / "out"
    space = SURFACE_SPACE[kind]
    assert main([str(root), str(out), "participant", "--space", space, "--model", str(model_path),
                 "--skip-bids-validation", "-q"]) == 0
    assert main([str(root), str(out), "group", "--space", space, "--model", str(model_path), "-q"]) == 0
    return kind, root, out


@pytest.fixture(scope="module")
def with_reports_module(_no_reports_by_default):
    import bidsglm.cli

    patch = pytest.MonkeyPatch()
    patch.setattr(bidsglm.cli, "write_reports", _no_reports_by_default)
    yield
    patch.undo()


def test_surface_model_run_maps_equal_nilearn_with_the_models_design(surface_model_results):
    """Run node on GIfTI pairs / a CIFTI dtseries: z equals nilearn's run_glm on the same (time x
    elements) matrix with the model's design (mean scaling, AR(1)), as the options path's maps do
    (tests/test_surfaces.py)."""
    from nilearn.glm.contrasts import compute_contrast
    from nilearn.glm.first_level import mean_scaling, run_glm

    from bidsglm import surfaces

    kind, root, out = surface_model_results
    func = out / "node-runs" / "sub-01" / "func"
    z_path = _surface_maps(func, "*_run-1_*contrast-incongruentVsCongruent_stat-z_statmap.*")[0]
    assert z_path.name.endswith(".shape.gii" if kind == "gifti" else ".dscalar.nii")
    design = pd.read_csv(func / "sub-01_task-flanker_run-1_design.tsv", sep="\t")
    src = root / "derivatives" / "fmriprep" / "sub-01" / "func"
    if kind == "gifti":
        Y, _ = surfaces.read_gifti_pair(*(src / f"sub-01_task-flanker_run-1_hemi-{h}_space-fsaverage5_bold.func.gii"
                                          for h in "LR"), "fsaverage5")
    else:
        Y, _ = surfaces.read_cifti_series(src / "sub-01_task-flanker_run-1_space-fsLR_den-91k_bold.dtseries.nii")
    usable = surfaces.usable_elements(Y)
    Ys, _ = mean_scaling(np.asarray(Y[:, usable], np.float32))
    labels, results = run_glm(Ys, design.to_numpy(), noise_model="ar1", n_jobs=1)
    weights = np.array([{"trial_type.incongruent_correct": 1, "trial_type.congruent_correct": -1}.get(c, 0)
                        for c in design.columns], float)
    expected = compute_contrast(labels, results, weights, stat_type="t").z_score()
    z = _surface_values(z_path)
    # nilearn bins the AR(1) coefficient to 0.01: an element whose estimate falls on a bin edge (float32
    # data) may take the neighbouring bin, a small z difference at a handful of the 20,000+ elements
    close = np.isclose(z[usable], expected, rtol=0, atol=1e-3)
    assert close.mean() > 0.999 and np.abs(z[usable] - expected).max() < 0.05
    assert (z[~usable] == 0).all()
    side = json.loads(sorted(func.glob("*_run-1_*contrast-incongruentVsCongruent_stat-z_statmap.json"))[0].read_text())
    assert side["Node"] == "runs" and side["StatsModel"] == "surfaceModel"


def test_surface_model_subject_and_dataset_nodes(surface_model_results):
    """Subject node (meta): precision-weighted fixed effects of the run maps; Dataset node: scipy's
    one-sample t-test of the subject effects; maps in the input's format, reports drawn or listed."""
    kind, _, out = surface_model_results
    subjects = ("01", "02")
    effects = []
    for sub in subjects:
        runs = out / "node-runs" / f"sub-{sub}" / "func"
        e = [_surface_values(p) for p in _surface_maps(runs, "*_run-*_contrast-incongruentVsCongruent_stat-effect_statmap.*")]
        v = [_surface_values(p) for p in _surface_maps(runs, "*_run-*_contrast-incongruentVsCongruent_stat-variance_statmap.*")]
        assert len(e) == len(v) == 2
        inside = (v[0] > 0) & (v[1] > 0)
        w = [1 / x[inside] for x in v]
        subject = _surface_values(_surface_maps(out / "node-subjects" / f"sub-{sub}",
                                                "*contrast-incongruentVsCongruent_stat-effect_statmap.*")[0])
        np.testing.assert_allclose(subject[inside], (w[0] * e[0][inside] + w[1] * e[1][inside]) / (w[0] + w[1]),
                                   rtol=1e-4, atol=1e-6)
        effects.append(subject)
    group = out / "node-group"
    t = _surface_values(_surface_maps(group, "*contrast-incongruentVsCongruent_stat-t_statmap.*")[0])
    Y = np.stack(effects)
    inside = (Y != 0).all(axis=0)
    np.testing.assert_allclose(t[inside], stats.ttest_1samp(Y[:, inside], 0.0).statistic, rtol=1e-4)
    page = (group / "report.html").read_text()
    assert "contrast-incongruentVsCongruent_stat-z_statmap" in page
    if kind == "gifti":
        assert "<img" in page and (out / "node-runs" / "sub-01.html").read_text().count("<figure") >= 3
    else:  # no fsLR mesh drawn for the demo's stand-in cortex
        assert "<img" not in page


def test_model_mask_option_refused_on_surfaces(surface_model_results, tmp_path, capsys):
    kind, root, _ = surface_model_results
    if kind != "gifti":
        pytest.skip("one surface kind is enough")
    model = json.loads(json.dumps(SURFACE_MODEL))
    model["Nodes"][0]["Model"]["Options"]["Mask"] = {"desc": "brain", "suffix": "mask"}
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(model))
    code, err = _run_cli(capsys, root, tmp_path / "out", "participant", "--space", "fsaverage5", "--model", path,
                         "--skip-bids-validation")
    assert code == 65 and len([e for e in err if "ERROR" in e]) == 1
    assert "Model.Options.Mask is a volume" in err[-1]
    assert not (tmp_path / "out" / "node-runs" / "sub-01").exists()


def _flanker_model():
    return json.loads(shared_path("models", "ds000102", "ds000102-flanker_specs.json").read_text())


def _refused(capsys, flanker, tmp_path, model):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    code, err = _run_cli(capsys, flanker, tmp_path / "out", "participant", "--model", path,
                         "--skip-bids-validation", "-q")
    assert code == 65 and len(err) == 1 and "model.json" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*statmap*"))
    return err[0]


def test_any_pybids_failure_is_a_model_error_naming_the_node(flanker):
    """pybids raises NotImplementedError for a Run node of the intercept only (attack A4; bidsglm
    refuses that model when it reads it, so the raw node is changed behind the check here): any
    exception from pybids while building a design is a ModelError (65) naming the model and node."""
    from bidsglm.errors import ModelError

    model_path = shared_path("models", "ds000102", "ds000102-flanker_specs.json")
    _, designer = _designs(flanker, model_path, "16")
    designer.node.raw["Model"]["X"] = [1]
    run = discover_runs(flanker, find_derivatives(flanker, None), SpaceSpec.parse("MNI152NLin2009cAsym"),
                        ["16"], None, None)[0]
    with pytest.raises(ModelError) as err:
        designer.design(run, 146, 2.0)
    message = err.value.message
    assert "flanker_specs.json: node 'run_level': pybids cannot build the design" in message
    assert "NotImplementedError: Run level intercept only models" in message and "\n" not in message


def test_intercept_only_or_empty_run_model_is_refused(flanker, tmp_path, capsys):
    model = _flanker_model()
    model["Nodes"][0]["Model"]["X"] = [1]
    model["Nodes"][0]["Contrasts"] = []
    assert "field 'Model.X': a Run node with the intercept only" in _refused(capsys, flanker, tmp_path, model)
    model["Nodes"][0]["Model"]["X"] = []  # attack C3: was "TypeError ... reduce() of empty iterable"
    assert "field 'Model.X': lists no variables" in _refused(capsys, flanker, tmp_path, model)


def test_nodes_that_write_nothing_are_refused(flanker, tmp_path, capsys):
    """Attack D2: Contrasts [] gave exit 0 and no map; dummy contrasts over variables no run has too."""
    model = _flanker_model()
    model["Nodes"][0]["Contrasts"] = []
    assert "node 'run_level', field 'Contrasts': the node defines no contrasts" in _refused(
        capsys, flanker, tmp_path, model)
    model["Nodes"][0]["DummyContrasts"] = {"Contrasts": ["trial_type.neutral"], "Test": "t"}
    err = _refused(capsys, flanker, tmp_path, model)
    assert "no contrast can be estimated in any run" in err and "trial_type.neutral" in err
    model = _flanker_model()  # an edge whose Filter keeps none of the Run node's contrasts
    model["Edges"] = [{"Source": "run_level", "Destination": "subject_level", "Filter": {"contrast": ["inVcn"]}},
                      {"Source": "subject_level", "Destination": "data_level"}]
    err = _refused(capsys, flanker, tmp_path, model)
    assert "field 'Edges[0].Filter': the Filter keeps contrast(s) inVcn, which node 'run_level' does not " \
           "produce (inVcon, inVbase, rt): node 'subject_level' would write nothing" in err


def test_names_that_collide_on_case_insensitive_file_systems_are_refused(flanker, tmp_path, capsys):
    model = _flanker_model()  # attack D1: node-Run and node-run
    model["Nodes"][1]["Name"] = "RUN_level"
    assert "node names 'run_level', 'RUN_level' give the same folder" in _refused(capsys, flanker, tmp_path, model)
    model = _flanker_model()  # attack D3: the same contrast twice in a node
    model["Nodes"][0]["Contrasts"].append(dict(model["Nodes"][0]["Contrasts"][0]))
    assert "Contrasts[0] and Contrasts[3] are both named 'inVcon'" in _refused(capsys, flanker, tmp_path, model)
    model = _flanker_model()  # an explicit contrast and a dummy one whose labels differ only in case
    model["Nodes"][0]["DummyContrasts"] = {"Contrasts": ["trial_type.congruent_correct"], "Test": "t"}
    model["Nodes"][0]["Contrasts"][0]["Name"] = "trialtype congruentcorrect"
    err = _refused(capsys, flanker, tmp_path, model)
    assert "give file labels that differ only in case" in err and "trialtypeCongruentcorrect" in err


def test_many_missing_model_x_variables_give_a_short_line(flanker, tmp_path, capsys):
    """Attack F: 200 absent columns in Model.X gave one line of ~5,000 characters."""
    model = _flanker_model()
    model["Nodes"][0]["Model"]["X"] += [f"absent_{i:03d}" for i in range(200)]
    err = _refused(capsys, flanker, tmp_path, model)
    assert "Model.X names 200 variable(s) not in the data: absent_000, absent_001," in err
    assert "absent_009 ... and 190 more" in err and len(err) < 600


def test_dataset_transformation_failures_are_model_errors(tmp_path, monkeypatch):
    """Whatever pybids raises on a Dataset node's Transformations (here NotImplementedError, with a
    newline in its text) is a ModelError naming the node, in one line."""
    from bids.modeling.transformations import TransformerManager

    from bidsglm.errors import ModelError
    from bidsglm.modelrunner import _transformed_participants

    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t20\nsub-02\t30\n")
    model = _flanker_model()
    model["Nodes"][2]["Transformations"] = {"Transformer": "pybids-transforms-v1",
                                            "Instructions": [{"Name": "Scale", "Input": ["age"]}]}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    loaded = load_model(path)

    def refuse(*args, **kwargs):
        raise NotImplementedError("not in this version\nsee the issue tracker")

    monkeypatch.setattr(TransformerManager, "transform", refuse)
    with pytest.raises(ModelError) as err:
        _transformed_participants(loaded, loaded.nodes[2], tmp_path, {"01", "02"})
    assert "node 'data_level', field 'Transformations': the transformations failed (NotImplementedError: " \
           "not in this version)" in err.value.message and "\n" not in err.value.message


def test_dummy_contrasts_listing_no_variable_give_none(tmp_path):
    """DummyContrasts.Contrasts [] lists no variable (absent means all of Model.X): beside explicit
    contrasts it adds nothing."""
    from bidsglm.modeldesign import node_contrasts

    model = _flanker_model()
    model["Nodes"][0]["DummyContrasts"] = {"Contrasts": [], "Test": "t"}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    node = load_model(path).nodes[0]
    columns = ["intercept", "trial_type.congruent_correct", "trial_type.incongruent_correct", "rt_reg.rt"]
    usable, _ = node_contrasts(node, columns, path)
    assert [c.name for c in usable] == ["inVcon", "inVbase", "rt"]
    node.dummy_contrasts["Contrasts"] = None
    usable, _ = node_contrasts(node, columns, path)
    assert {"intercept", "trial_type.congruent_correct", "rt_reg.rt"} <= {c.name for c in usable}
