"""Group statistics beyond OLS from the command line: --group-estimator mixed,
--sphericity-correction and --connectivity, checked against PyMARE, pingouin-equivalent
formulas and scipy.ndimage on the maps the participant level wrote."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from bidsglm.cli import main
from conftest import write_participant_outputs

PREFIX = "task-loc_space-MNI152NLin2009cAsym"
SUBJECTS = [f"{s:02d}" for s in range(1, 9)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("groupstats") / "glm"
    mask, blob = write_participant_outputs(out, contrasts=("faces", "houses", "scenes"))
    return out, mask, blob


@pytest.fixture
def outputs(synthetic, tmp_path):
    out, mask, blob = synthetic
    dst = tmp_path / "glm"
    shutil.copytree(out, dst)
    return dst, mask, blob


def _group(out, *options):
    return main([str(out.parent / "raw"), str(out), "group", "-q", "--atlases", "none", *options])


def _data(path):
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float64)


def _subject_maps(out, label, stat, mask):
    return np.array([_data(_subject_map(out, s, label, stat))[mask] for s in SUBJECTS])


def _subject_map(out, sub, label, stat):
    return out / f"sub-{sub}" / "func" / f"sub-{sub}_{PREFIX}_contrast-{label}_stat-{stat}_statmap.nii.gz"


def _side(path):
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


def _make_variances_unequal(out, mask):
    """Give subjects different first-level variances (sub-01 a noisy one), so the mixed model
    differs from OLS."""
    for i, s in enumerate(SUBJECTS):
        for label in ("faces", "houses"):
            path = _subject_map(out, s, label, "variance")
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj) * (1 + i) * (10 if i == 0 else 1)
            nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), str(path))


def test_mixed_estimator_matches_pymare_and_writes_tau2(outputs):
    pytest.importorskip("pymare")
    from pymare.estimators import VarianceBasedLikelihoodEstimator

    out, mask, blob = outputs
    _make_variances_unequal(out, mask)
    assert _group(out, "--group-estimator", "mixed") == 0
    g = out / "group"
    Y, V = _subject_maps(out, "faces", "effect", mask), _subject_maps(out, "faces", "variance", mask)
    est = VarianceBasedLikelihoodEstimator(method="REML", small_sample_correction="wald", xtol=1e-12,
                                           maxiter=200).fit(Y, V, np.ones((8, 1)))
    summary = est.summary()
    fe = summary.get_fe_stats()
    effect = _data(g / f"{PREFIX}_contrast-faces_stat-effect_statmap.nii.gz")[mask]
    t = _data(g / f"{PREFIX}_contrast-faces_stat-t_statmap.nii.gz")[mask]
    tau2 = _data(g / f"{PREFIX}_contrast-faces_stat-tau2_statmap.nii.gz")[mask]
    variance = _data(g / f"{PREFIX}_contrast-faces_stat-variance_statmap.nii.gz")[mask]
    # maps are float32: stated tolerance 1e-4 relative
    np.testing.assert_allclose(effect, fe["est"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t, fe["z"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tau2, np.asarray(summary.tau2).ravel(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(variance), fe["se"][0], rtol=1e-4, atol=1e-6)
    # p from t on N - p = 7 degrees of freedom (FLAME1's choice), z from p
    p = _data(g / f"{PREFIX}_contrast-faces_stat-p_statmap.nii.gz")[mask]
    np.testing.assert_allclose(p, stats.t.sf(fe["z"][0], 7), rtol=1e-3, atol=1e-6)
    side = _side(g / f"{PREFIX}_contrast-faces_stat-t_statmap.nii.gz")
    assert side["Estimator"]["Name"] == "mixed" and side["Estimator"]["Method"] == "REML"
    assert side["DegreesOfFreedom"] == 7 and "N - p" in side["Estimator"]["DegreesOfFreedomNote"]
    assert "mixed-effects" in side["Model"]
    assert _side(g / f"{PREFIX}_contrast-faces_stat-tau2_statmap.nii.gz")["Estimator"] == "REML"
    # ground truth: the blob is found
    kept = _data(g / f"{PREFIX}_contrast-faces_stat-z_desc-thresholded_statmap.nii.gz")
    assert np.mean(kept[blob & mask] > 0) > 0.9


def test_mixed_with_groups_and_covariates_matches_pymare(outputs):
    pytest.importorskip("pymare")
    from pymare.estimators import VarianceBasedLikelihoodEstimator

    out, mask, _ = outputs
    _make_variances_unequal(out, mask)
    assert _group(out, "--group-estimator", "mixed", "--group-by", "group", "--covariates", "age") == 0
    g = out / "group"
    design = pd.read_csv(g / f"{PREFIX}_contrast-faces_design.tsv", sep="\t").set_index("participant_id")
    assert list(design.index) == [f"sub-{s}" for s in SUBJECTS]
    # PyMARE fits voxel by voxel in Python (0.2 ms each): every 10th of the 48,000 voxels is the reference
    Y, V = _subject_maps(out, "faces", "effect", mask), _subject_maps(out, "faces", "variance", mask)
    est = VarianceBasedLikelihoodEstimator(method="REML", small_sample_correction="wald", xtol=1e-12,
                                           maxiter=200).fit(Y[:, ::10], V[:, ::10], design.to_numpy())
    fe = est.summary().get_fe_stats()
    columns = list(design.columns)
    c = np.array([1.0 if col == "group_control" else -1.0 if col == "group_patient" else 0.0 for col in columns])
    diff = _data(g / f"{PREFIX}_contrast-facesGroupControlMinusGroupPatient_stat-effect_statmap.nii.gz")[mask][::10]
    np.testing.assert_allclose(diff, c @ fe["est"], rtol=1e-4, atol=1e-5)
    side = _side(g / f"{PREFIX}_contrast-facesGroupControlMinusGroupPatient_stat-t_statmap.nii.gz")
    assert "pooled over all subjects and groups" in side["Estimator"]["BetweenSubjectVariance"]
    assert side["DegreesOfFreedom"] == 8 - 3


def test_mixed_estimator_refusals(outputs, capsys):
    out, _, _ = outputs
    assert _group(out, "--group-estimator", "mixed", "--group-model", "anova") == 64
    assert "applies to the one-sample model" in capsys.readouterr().err
    (out / "sub-02" / "func" / f"sub-02_{PREFIX}_contrast-faces_stat-variance_statmap.nii.gz").unlink()
    assert _group(out, "--group-estimator", "mixed") == 65
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "variance map" in err[0] and "sub-02" in err[0]
    assert not (out / "group").exists()


def test_mixed_permutations_say_ols_is_permuted(outputs):
    out, _, _ = outputs
    assert _group(out, "--group-estimator", "mixed", "--permutations", "50", "--random-seed", "1") == 0
    g = out / "group"
    side = _side(g / f"{PREFIX}_contrast-faces_stat-logp_desc-voxelFWE_statmap.nii.gz")
    assert side["PermutedStatistic"].startswith("OLS t") and "mixed" in side["PermutedStatistic"]
    assert "OLS t" in _side(g / f"{PREFIX}_contrast-faces_stat-t_statmap.nii.gz")["PermutationNote"]


def _anova_reference(out, mask, labels=("faces", "houses", "scenes")):
    data = np.stack([_subject_maps(out, lab, "effect", mask) for lab in labels], axis=1)  # (S, K, V)
    s, k, _ = data.shape
    grand = data.mean(axis=(0, 1))
    ss_cond = s * np.sum((data.mean(axis=0) - grand) ** 2, axis=0)
    ss_subj = k * np.sum((data.mean(axis=1) - grand) ** 2, axis=0)
    ss_error = np.sum((data - grand) ** 2, axis=(0, 1)) - ss_cond - ss_subj
    f = (ss_cond / (k - 1)) / (ss_error / ((k - 1) * (s - 1)))
    cov = np.einsum("skv,slv->klv", data - data.mean(axis=0), data - data.mean(axis=0)) / (s - 1)
    centred = cov - cov.mean(axis=0) - cov.mean(axis=1)[:, None] + cov.mean(axis=(0, 1))
    gg = np.einsum("kkv->v", centred) ** 2 / ((k - 1) * np.einsum("klv,klv->v", centred, centred))
    hf = np.minimum(1, (s * (k - 1) * gg - 2) / ((k - 1) * (s - 1 - (k - 1) * gg)))
    return f, gg, hf, s, k


@pytest.mark.parametrize("correction", ["default", "gg", "hf", "none"])
def test_anova_f_is_corrected_for_nonsphericity(outputs, correction):
    out, mask, _ = outputs
    options = ["--group-model", "anova"] + ([] if correction == "default" else ["--sphericity-correction", correction])
    assert _group(out, *options) == 0
    g = out / "group"
    f_ref, gg, hf, s, k = _anova_reference(out, mask)
    f = _data(g / f"{PREFIX}_contrast-effectOfCondition_stat-F_statmap.nii.gz")[mask]
    np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-5)
    eps = {"default": gg, "gg": gg, "hf": hf, "none": np.ones_like(gg)}[correction]
    p = _data(g / f"{PREFIX}_contrast-effectOfCondition_stat-p_statmap.nii.gz")[mask]
    p_ref = stats.f.sf(f_ref, eps * (k - 1), eps * (k - 1) * (s - 1))
    np.testing.assert_allclose(p, p_ref, rtol=1e-3, atol=1e-6)
    side = _side(g / f"{PREFIX}_contrast-effectOfCondition_stat-F_statmap.nii.gz")
    epsilon_map = g / f"{PREFIX}_contrast-effectOfCondition_stat-epsilon_statmap.nii.gz"
    if correction == "none":
        assert "SphericityCorrection" not in side and not epsilon_map.exists()
        assert "No Greenhouse-Geisser" in side["Assumptions"]
    else:
        name = "Huynh-Feldt" if correction == "hf" else "Greenhouse-Geisser"
        assert side["SphericityCorrection"]["Method"] == name and name in side["Model"]
        np.testing.assert_allclose(_data(epsilon_map)[mask], eps, rtol=1e-4)
        assert side["DegreesOfFreedom"] == [k - 1, (k - 1) * (s - 1)]  # nominal; corrected per voxel


@pytest.mark.parametrize("connectivity", [6, 26])
def test_cluster_tables_follow_connectivity(outputs, connectivity):
    out, mask, _ = outputs
    assert _group(out, "--connectivity", str(connectivity), "--alpha", "0.05", "--permutations", "20",
                  "--tfce", "--random-seed", "3") == 0
    g = out / "group"
    kept = _data(g / f"{PREFIX}_contrast-houses_stat-z_desc-thresholded_statmap.nii.gz")
    table = pd.read_csv(g / f"{PREFIX}_contrast-houses_clusters.tsv", sep="\t")
    structure = ndimage.generate_binary_structure(3, {6: 1, 26: 3}[connectivity])
    sizes = []
    for sign in (1, -1):
        labels, _ = ndimage.label(sign * kept > 0, structure)
        sizes += list(np.bincount(labels.ravel())[1:])
    assert sorted(table["cluster_size_voxels"].dropna().astype(int)) == sorted(sizes)
    side = json.loads((g / f"{PREFIX}_contrast-houses_clusters.json").read_text())
    assert f"{connectivity}-neighbour" in side["ClusterConnectivity"]
    perm = _side(g / f"{PREFIX}_contrast-houses_stat-logp_desc-clustersizeFWE_statmap.nii.gz")
    assert f"{connectivity}-neighbour" in perm["ClusterConnectivity"]
    assert f"{connectivity}-neighbour" in perm["TFCE"]["Connectivity"]


def test_dataset_node_of_a_stats_model_uses_the_mixed_estimator(tmp_path):
    """--group-estimator mixed with --model: the Dataset node's one-sample fit is the mixed one
    (PyMARE on the Subject node's effect and variance maps)."""
    pytest.importorskip("pymare")
    from pymare.estimators import VarianceBasedLikelihoodEstimator

    from conftest import shared_path
    from simulate import simulate_dataset

    root = simulate_dataset(shared_path("events", "ds000102"), tmp_path / "bids", ["14", "15", "16"], 146, runs=2)
    model = next(shared_path("models", "ds000102").glob("*_specs.json"))
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "--model", str(model), "--skip-bids-validation", "-q",
                 "--smoothing-fwhm", "0"]) == 0
    assert main([str(root), str(out), "group", "--model", str(model), "-q", "--group-estimator", "mixed",
                 "--no-reports"]) == 0
    t_path = next(out.glob("node-*/task-flanker_*_contrast-inVcon_stat-t_statmap.nii.gz"))
    side = _side(t_path)
    assert side["Estimator"]["Method"] == "REML" and side["DegreesOfFreedom"] == 2
    tau2 = t_path.with_name(t_path.name.replace("_stat-t_", "_stat-tau2_"))
    effect = t_path.with_name(t_path.name.replace("_stat-t_", "_stat-effect_"))
    from bidsglm.statsmodel import load_model

    subject_node = [n for n in load_model(model).nodes if n.level == "Subject"][0].name
    subject = sorted(out.glob(f"node-{subject_node}/sub-*/**/*_contrast-inVcon_stat-effect_statmap.nii.gz"))
    assert len(subject) == 3
    inside = _data(t_path) != 0
    Y = np.array([_data(p)[inside] for p in subject])
    V = np.array([_data(p.with_name(p.name.replace("_stat-effect_", "_stat-variance_")))[inside] for p in subject])
    est = VarianceBasedLikelihoodEstimator(method="REML", small_sample_correction="wald", xtol=1e-12,
                                           maxiter=200).fit(Y, V, np.ones((3, 1)))
    summary = est.summary()
    np.testing.assert_allclose(_data(effect)[inside], summary.get_fe_stats()["est"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_data(tau2)[inside], np.asarray(summary.tau2).ravel(), rtol=1e-3, atol=1e-4)
