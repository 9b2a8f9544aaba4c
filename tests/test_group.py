"""The group level from the command line: models against nilearn and scipy, ground truth,
exclusions, and every bad input the issue lists (exit 65, one line, nothing written)."""

from __future__ import annotations

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bidsglm.cli import main
from conftest import GROUP_AFFINE, write_participant_outputs

PREFIX = "task-loc_space-MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("group") / "glm"
    mask, blob = write_participant_outputs(out)
    return out, mask, blob


@pytest.fixture
def outputs(synthetic, tmp_path):
    """A private copy of the synthetic participant-level outputs."""
    out, mask, blob = synthetic
    dst = tmp_path / "glm"
    shutil.copytree(out, dst)
    return dst, mask, blob


def _group(out, *options):
    return main([str(out.parent / "raw"), str(out), "group", "-q", *options])


def _data(path):
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float64)


def _subject_effects(out, label, subjects):
    return [out / f"sub-{s}" / "func" / f"sub-{s}_{PREFIX}_contrast-{label}_stat-effect_statmap.nii.gz"
            for s in subjects]


def _nilearn_group(paths, mask, design, contrast):
    from nilearn.glm.second_level import SecondLevelModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SecondLevelModel(mask_img=nib.Nifti1Image(mask.astype(np.uint8), GROUP_AFFINE))
        model.fit([str(p) for p in paths], design_matrix=design)
        res = model.compute_contrast(contrast, output_type="all")
    return {k: np.asanyarray(v.dataobj) for k, v in res.items()}


SUBJECTS = [f"{s:02d}" for s in range(1, 9)]


def test_one_sample_matches_nilearn_and_finds_the_effect(outputs):
    out, mask, blob = outputs
    assert _group(out) == 0
    g = out / "group"
    t = _data(g / f"{PREFIX}_contrast-faces_stat-t_statmap.nii.gz")
    ref = _nilearn_group(_subject_effects(out, "faces", SUBJECTS), mask,
                         pd.DataFrame({"intercept": np.ones(8)}), "intercept")
    # both read float32 maps; stated tolerance 1e-5 (relative) on t and z
    np.testing.assert_allclose(t[mask], ref["stat"][mask], rtol=1e-5, atol=1e-5)
    z = _data(g / f"{PREFIX}_contrast-faces_stat-z_statmap.nii.gz")
    np.testing.assert_allclose(z[mask], ref["z_score"][mask], rtol=1e-5, atol=1e-5)
    # ground truth: the blob survives p < 0.001, the null contrast stays near its nominal rate
    kept = _data(g / f"{PREFIX}_contrast-faces_stat-z_desc-thresholded_statmap.nii.gz")
    assert np.mean(kept[blob & mask] > 0) > 0.9
    p_null = _data(g / f"{PREFIX}_contrast-houses_stat-p_statmap.nii.gz")[mask]
    assert 0.035 < np.mean(p_null < 0.05) < 0.065  # one-sided, 40,000 voxels (correlated only by design)
    side = json.loads((g / f"{PREFIX}_contrast-faces_stat-t_statmap.json").read_text())
    assert side["DegreesOfFreedom"] == 7 and side["Participants"] == [f"sub-{s}" for s in SUBJECTS]
    table = pd.read_csv(g / f"{PREFIX}_contrast-faces_clusters.tsv", sep="\t")
    top = table.iloc[0]
    assert top["peak_z"] > 4 and np.linalg.norm([top.x + 40, top.y + 60, top.z + 12]) <= 12
    assert "aal_peak" in table.columns and "harvard_oxford_cluster" in table.columns
    thresh = json.loads((g / f"{PREFIX}_contrast-faces_stat-z_desc-thresholded_statmap.json").read_text())
    assert thresh["Threshold"] == pytest.approx(stats.norm.isf(0.0005)) and thresh["TwoSided"] is True


def test_covariates_and_groups_match_nilearn(outputs):
    out, mask, _ = outputs
    assert _group(out, "--covariates", "age", "sex", "--group-contrast", "age=age", "--atlases", "none") == 0
    g = out / "group"
    design = pd.read_csv(g / f"{PREFIX}_contrast-faces_design.tsv", sep="\t")
    assert list(design.columns) == ["participant_id", "mean", "age", "sex_M"]
    assert design["age"].sum() == pytest.approx(0) and design["sex_M"].sum() == pytest.approx(0)
    ref = _nilearn_group(_subject_effects(out, "faces", SUBJECTS), mask, design.drop(columns="participant_id"),
                         [0, 1, 0])
    t = _data(g / f"{PREFIX}_contrast-facesAge_stat-t_statmap.nii.gz")
    np.testing.assert_allclose(t[mask], ref["stat"][mask], rtol=1e-5, atol=1e-5)

    table = pd.read_csv(out / "participants.tsv", sep="\t")
    table.loc[table["participant_id"] == "sub-05", "age"] = np.nan
    table.to_csv(out / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    assert _group(out, "--covariates", "age", "--atlases", "none") == 0
    side = json.loads((g / f"{PREFIX}_contrast-faces_stat-t_statmap.json").read_text())
    assert "sub-05" not in side["Participants"] and side["DegreesOfFreedom"] == 5
    excluded = pd.read_csv(g / f"{PREFIX}_exclusions.tsv", sep="\t", keep_default_na=False)
    assert "n/a in participants.tsv column(s) age" in set(excluded.loc[excluded.participant_id == "sub-05", "reason"])

    assert _group(out, "--group-by", "group", "--atlases", "none") == 0
    diff = _data(g / f"{PREFIX}_contrast-facesGroupControlMinusGroupPatient_stat-t_statmap.nii.gz")
    effects = np.array([_data(p)[mask] for p in _subject_effects(out, "faces", SUBJECTS)])
    patients = [i for i, s in enumerate(SUBJECTS) if int(s) <= 4]
    controls = [i for i in range(8) if i not in patients]
    # two-group t with pooled variance = scipy's Student t-test
    ref_t = stats.ttest_ind(effects[controls], effects[patients], axis=0).statistic
    np.testing.assert_allclose(diff[mask], ref_t, rtol=1e-4, atol=1e-4)


def test_repeated_measures_t_is_the_paired_t_test(outputs):
    out, mask, _ = outputs
    assert _group(out, "--group-model", "anova", "--group-contrast", "fmh=faces - houses",
                  "--group-f-contrast", "any=faces - houses", "--atlases", "none") == 0
    g = out / "group"
    t = _data(g / f"{PREFIX}_contrast-fmh_stat-t_statmap.nii.gz")[mask]
    faces = np.array([_data(p)[mask] for p in _subject_effects(out, "faces", SUBJECTS)])
    houses = np.array([_data(p)[mask] for p in _subject_effects(out, "houses", SUBJECTS)])
    np.testing.assert_allclose(t, stats.ttest_rel(faces, houses, axis=0).statistic, rtol=1e-4, atol=1e-4)
    F = _data(g / f"{PREFIX}_contrast-any_stat-F_statmap.nii.gz")[mask]
    np.testing.assert_allclose(F, t**2, rtol=1e-4, atol=1e-4)  # a one-row F is t squared
    side = json.loads((g / f"{PREFIX}_contrast-any_stat-F_statmap.json").read_text())
    assert "sphericity" in side["Assumptions"] and side["DegreesOfFreedom"] == [1, 7]
    design = pd.read_csv(g / f"{PREFIX}_desc-anova_design.tsv", sep="\t")
    assert list(design.columns[:3]) == ["input", "faces", "houses"] and design.shape == (16, 11)


def test_excluded_runs_are_recomputed_and_listed(outputs):
    out, mask, _ = outputs
    assert _group(out, "--exclude-run", "sub-01_run-2", "--exclude-participant-label", "sub-02",
                  "--exclude-fd-mean", "0.5", "--atlases", "none") == 0
    g = out / "group"
    excluded = pd.read_csv(g / f"{PREFIX}_exclusions.tsv", sep="\t", keep_default_na=False)
    reasons = {(r.participant_id, r.run): r.reason for r in excluded.itertuples()}
    assert reasons[("sub-02", "")] == "excluded by --exclude-participant-label"
    assert reasons[("sub-01", "sub-01_task-loc_run-2")] == "excluded by --exclude-run"
    assert "0.9000 mm > 0.5 mm" in reasons[("sub-03", "sub-03_task-loc_run-2")]
    # the group mean is the mean of the inputs: sub-01 and sub-03 contribute run 1 alone
    inputs = []
    for s in [x for x in SUBJECTS if x != "02"]:
        if s in ("01", "03"):
            run1 = out / f"sub-{s}" / "func" / f"sub-{s}_task-loc_run-1_space-MNI152NLin2009cAsym_contrast-faces_stat-effect_statmap.nii.gz"
            inputs.append(_data(run1)[mask])
        else:
            inputs.append(_data(_subject_effects(out, "faces", [s])[0])[mask])
    effect = _data(g / f"{PREFIX}_contrast-faces_stat-effect_statmap.nii.gz")[mask]
    np.testing.assert_allclose(effect, np.mean(inputs, axis=0), rtol=1e-5, atol=1e-6)
    side = json.loads((g / f"{PREFIX}_contrast-faces_stat-t_statmap.json").read_text())
    assert side["DegreesOfFreedom"] == 6


def _fails(capsys, out, *options, match):
    code = _group(out, *options)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 65, err
    assert len(err) == 1 and match in err[0] and "Traceback" not in err[0]
    assert not (out / "group").exists()  # checked before anything was written


def test_bad_inputs_exit_65_with_one_line(outputs, capsys, tmp_path):
    out, _, _ = outputs
    _fails(capsys, out, "--covariates", "height", match="column 'height' is not in participants.tsv")
    _fails(capsys, out, "--covariates", "site", match="covariate column 'site' is constant")
    _fails(capsys, out, "--group-contrast", "x=mean - nope", match="names unknown condition(s) or column(s) nope")
    _fails(capsys, out, "--participant-label", "01", match="at least 2 are needed")
    _fails(capsys, out, "--group-model", "anova", "--group-contrast", "f=faces",
           match="not estimable in the repeated-measures model")
    _fails(capsys, out, "--group-model", "anova", "--group-contrast", "f=faces - scenes",
           match="unknown condition(s) or column(s) scenes")
    empty = tmp_path / "empty"
    _fails(capsys, empty, match="not a bidsglm output folder")
    (empty / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (empty / "dataset_description.json").write_text("{}")
    _fails(capsys, empty, match="no subject-level maps found")


def test_contrast_missing_for_some_subjects(outputs, capsys):
    out, _, _ = outputs
    for path in (out / "sub-04" / "func").glob("sub-04_task-loc_space-*_contrast-houses_*"):
        path.unlink()
    _fails(capsys, out, match="contrast 'houses' is missing for sub-04")
    assert _group(out, "--allow-incomplete", "--atlases", "none") == 0
    side = json.loads((out / "group" / f"{PREFIX}_contrast-houses_stat-t_statmap.json").read_text())
    assert "sub-04" not in side["Participants"] and len(side["Participants"]) == 7
    excluded = pd.read_csv(out / "group" / f"{PREFIX}_exclusions.tsv", sep="\t", keep_default_na=False)
    assert ("sub-04", "houses") in set(zip(excluded["participant_id"], excluded["contrast"]))


def test_group_level_reads_what_the_participant_level_wrote(demo_results, tmp_path):
    """The real participant-level layout: group maps equal nilearn's on the subjects' maps."""
    _, out, _ = demo_results
    copy = tmp_path / "glm"
    shutil.copytree(out, copy)
    assert main([str(tmp_path / "raw"), str(copy), "group", "-q", "--atlases", "none",
                 "--allow-incomplete"]) == 0
    subject_maps = sorted(copy.glob("sub-*/func/*_contrast-incongruentMinusCongruent_stat-effect_statmap.nii.gz"))
    subject_maps = [p for p in subject_maps if "_run-" not in p.name]
    masks = [_data(p.parent / (p.name.split("_contrast-")[0] + "_desc-brain_mask.nii.gz")) > 0
             for p in subject_maps]
    mask = np.logical_and.reduce(masks)
    prefix = subject_maps[0].name.split("_", 1)[1].split("_contrast-")[0]
    t = _data(copy / "group" / f"{prefix}_contrast-incongruentMinusCongruent_stat-t_statmap.nii.gz")
    from nilearn.glm.second_level import SecondLevelModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        affine = nib.load(str(subject_maps[0])).affine
        model = SecondLevelModel(mask_img=nib.Nifti1Image(mask.astype(np.uint8), affine))
        model.fit([str(p) for p in subject_maps], design_matrix=pd.DataFrame({"i": np.ones(len(subject_maps))}))
        ref = np.asanyarray(model.compute_contrast("i", output_type="stat").dataobj)
    np.testing.assert_allclose(t[mask], ref[mask], rtol=1e-5, atol=1e-5)


def _perm_files(g, label):
    return sorted(p.name for p in g.glob(f"{PREFIX}_contrast-{label}_*") if "FWE" in p.name or "tfce" in p.name)


def test_permutation_inference_from_the_command_line(outputs):
    """Maps, masked maps and tables for every kind of FWE inference; the same seed gives
    the same maps; the masked map and the table agree with the -log10 p map."""
    out, mask, blob = outputs
    options = ("--permutations", "300", "--random-seed", "5", "--tfce", "--atlases", "none",
               "--group-model", "anova", "--group-contrast", "fmh=faces - houses",
               "--group-f-contrast", "any=faces - houses")
    assert _group(out, *options) == 0
    g = out / "group"
    for label, stat in (("fmh", "t"), ("any", "F")):
        names = _perm_files(g, label)
        for kind in ("voxel", "clustersize", "clustermass", "tfce"):
            assert f"{PREFIX}_contrast-{label}_stat-logp_desc-{kind}FWE_statmap.nii.gz" in names
            assert f"{PREFIX}_contrast-{label}_stat-{stat}_desc-{kind}FWE_statmap.nii.gz" in names
            assert f"{PREFIX}_contrast-{label}_desc-{kind}FWE_clusters.tsv" in names
        assert f"{PREFIX}_contrast-{label}_stat-tfce_statmap.nii.gz" in names
    logp = _data(g / f"{PREFIX}_contrast-fmh_stat-logp_desc-voxelFWE_statmap.nii.gz")
    masked = _data(g / f"{PREFIX}_contrast-fmh_stat-t_desc-voxelFWE_statmap.nii.gz")
    t = _data(g / f"{PREFIX}_contrast-fmh_stat-t_statmap.nii.gz")
    significant = logp > -np.log10(0.05)
    np.testing.assert_array_equal(masked != 0, significant)
    np.testing.assert_allclose(masked[significant], t[significant], rtol=1e-6)
    # the voxel-level FWE p equals the share of permuted maxima of |t| at least |t|: F = t^2
    # makes the F contrast's voxel-level p the t contrast's two-sided one
    logp_f = _data(g / f"{PREFIX}_contrast-any_stat-logp_desc-voxelFWE_statmap.nii.gz")
    np.testing.assert_allclose(logp_f[mask], logp[mask], atol=1e-6)
    side = json.loads((g / f"{PREFIX}_contrast-fmh_stat-logp_desc-tfceFWE_statmap.json").read_text())
    assert side["Rearrangement"] == "permutation within subjects of Freedman-Lane residuals"
    assert side["NumberOfRearrangements"] == 256 and side["Exhaustive"]  # 2!^8 <= 301: all of them
    rule = side["TFCE"].pop("dhRule")
    assert side["TFCE"] == {"E": 0.5, "H": 2.0, "dh": 0.1, "Connectivity": "faces (6-neighbour)"}
    assert rule.startswith("0.1, or each map's largest |value| / 10000")
    table = pd.read_csv(g / f"{PREFIX}_contrast-fmh_desc-clustermassFWE_clusters.tsv", sep="\t")
    assert (table["p_fwe"] < 0.05).all()
    first = {n: _data(g / n) for n in _perm_files(g, "fmh") if n.endswith(".nii.gz")}
    assert _group(out, *options) == 0
    for name, data in first.items():
        np.testing.assert_array_equal(_data(g / name), data)


def test_one_sample_permutations_record_seed_and_find_the_blob(outputs):
    out, mask, blob = outputs
    assert _group(out, "--permutations", "100", "--covariates", "age", "--random-seed", "9",
                  "--atlases", "none") == 0
    g = out / "group"
    side = json.loads((g / f"{PREFIX}_contrast-faces_stat-logp_desc-clustersizeFWE_statmap.json").read_text())
    assert side["RandomSeed"] == 9 and side["NumberOfRearrangements"] == 101 and not side["Exhaustive"]
    assert side["Rearrangement"] == "sign flipping of Freedman-Lane residuals"
    logp = _data(g / f"{PREFIX}_contrast-faces_stat-logp_desc-clustersizeFWE_statmap.nii.gz")
    assert (logp[blob & mask] > -np.log10(0.05)).mean() > 0.5
    assert (logp[mask & ~blob] > -np.log10(0.05)).mean() < 0.05


def test_permutation_options_are_checked(outputs, capsys):
    out, _, _ = outputs
    for options, match in [(("--tfce",), "--tfce needs --permutations"),
                           (("--permutations", "-1"), "--permutations must not be negative"),
                           (("--permutations", "10", "--cluster-forming-p", "2"), "--cluster-forming-p"),
                           (("--permutations", "10", "--fwe-alpha", "0"), "--fwe-alpha")]:
        assert _group(out, *options) == 64
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0]
        assert not (out / "group").exists()


def test_interrupted_permutations_leave_no_file(outputs, monkeypatch, capsys):
    """Ctrl-C during the second model's permutations: exit 130, and nothing of the
    interrupted command is kept - neither the first model's files nor the exclusions
    table - and no temporary files (tests/test_hostile_filesystem.py sends real signals)."""
    import bidsglm.group as group_module

    out, _, _ = outputs
    real = group_module.run_permutations
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    shutil.rmtree(out / "group", ignore_errors=True)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(group_module, "run_permutations", interrupt_second)
    assert _group(out, "--permutations", "50", "--atlases", "none") == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(calls) == 2  # the first model was fitted and written before the interrupt
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_too_few_rearrangements_are_reported(outputs, capsys):
    """4 subjects have 16 sign flips: the smallest FWE p is 1/16 > 0.05, which the user is told."""
    out, _, _ = outputs
    assert _group(out, "--participant-label", "01", "02", "03", "04", "--permutations", "100",
                  "--atlases", "none") == 0
    assert "only 16 rearrangements exist (all used)" in capsys.readouterr().err
    logp = _data(out / "group" / f"{PREFIX}_contrast-faces_stat-logp_desc-voxelFWE_statmap.nii.gz")
    assert logp.max() == pytest.approx(-np.log10(1 / 16), rel=1e-6)


def test_outputs_with_group_level_pass_bids_validator(demo_results, tmp_path):
    """The whole OUTPUT_DIR, group/ included, is a valid derivative dataset (.bidsignore
    names folders without a trailing slash, which the validator would not honour)."""
    import os
    import shutil
    import subprocess

    from bidsglm.validation import validator_command

    if validator_command() is None:
        pytest.skip("bids-validator-deno not installed")
    root, out, _ = demo_results
    work = tmp_path / "out"
    shutil.copytree(out, work)
    assert main([str(root), str(work), "group", "-q", "--allow-incomplete"]) == 0
    assert any((work / "group").glob("*_statmap.nii.gz"))
    proc = subprocess.run([validator_command(), "--format", "json", str(work)], capture_output=True, text=True,
                          env={**os.environ, "DENO_DIR": str(tmp_path / "deno")})
    errors = [i for i in json.loads(proc.stdout)["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, errors[:3]


@pytest.mark.parametrize("option, value, fragment", [
    ("--exclude-participant-label", "sub-99", "no subject-level maps for sub-99"),
    ("--exclude-run", "sub-01_run-7", "--exclude-run sub-01_run-7: matches no run"),
])
def test_exclusion_matching_nothing_is_refused(outputs, capsys, option, value, fragment):
    """A mistyped exclusion would silently model the subject or run it meant to leave out."""
    out, _, _ = outputs
    assert _group(out, option, value, "--atlases", "none") == 64
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (out / "group").exists()


def test_too_few_requested_permutations_are_reported_as_such(outputs, capsys):
    """8 subjects have 256 sign flips; 10 requested are not 'all that exist'."""
    out, _, _ = outputs
    assert _group(out, "--permutations", "10", "--atlases", "none") == 0
    err = capsys.readouterr().err
    assert "only 10 permutations were requested" in err and "raise --permutations" in err
    assert "rearrangements exist" not in err
