"""Participant level end to end on the simulated demo: agreement with nilearn's
FirstLevelModel and compute_fixed_effects, detection of the known effects, and
BIDS validity of the outputs."""

import json
import os
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.glm.contrasts import compute_fixed_effects
from nilearn.glm.first_level import FirstLevelModel

from bidsglm.cli import main
from bidsglm.validation import validator_command

SPACE = "space-MNI152NLin2009cAsym"
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
CONTRASTS = {
    "incongruentMinusCongruent": "incongruent_correct - congruent_correct",
    "congruentCorrect": "congruent_correct",
    "incongruentCorrect": "incongruent_correct",
}


def _map(out, sub, label, stat, run=None):
    run_part = f"_run-{run}" if run else ""
    path = out / f"sub-{sub}" / "func" / f"sub-{sub}_task-flanker{run_part}_{SPACE}_contrast-{label}_stat-{stat}_statmap.nii.gz"
    return path


def _nilearn_model(root, sub, run):
    prefix = root / "derivatives" / "fmriprep" / f"sub-{sub}" / "func" / f"sub-{sub}_task-flanker_run-{run}"
    conf = pd.read_csv(f"{prefix}_desc-confounds_timeseries.tsv", sep="\t")[MOTION]
    events = pd.read_csv(root / f"sub-{sub}" / "func" / f"sub-{sub}_task-flanker_run-{run}_events.tsv", sep="\t")
    model = FirstLevelModel(
        t_r=2.0, slice_time_ref=0.0, hrf_model="glover", drift_model="cosine", high_pass=1 / 128,
        noise_model="ar1", smoothing_fwhm=6.0, mask_img=f"{prefix}_{SPACE}_desc-brain_mask.nii.gz",
        minimize_memory=True,
    )
    model.fit(f"{prefix}_{SPACE}_desc-preproc_bold.nii.gz", events=events[["onset", "duration", "trial_type"]],
              confounds=conf)
    return model, nib.load(f"{prefix}_{SPACE}_desc-brain_mask.nii.gz").get_fdata() > 0


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("sub,run", [("01", 1), ("01", 2), ("02", 1)])
def test_run_maps_match_nilearn(demo_results, sub, run):
    """Tolerance: z within 1e-4 absolute; effect, variance, t within 1e-5 relative
    (bidsglm stores float32 maps; the computations agree to rounding)."""
    root, out, _ = demo_results
    model, mask = _nilearn_model(root, sub, run)
    for label, expr in CONTRASTS.items():
        ref = model.compute_contrast(expr, output_type="all")
        for key, stat in [("effect_size", "effect"), ("effect_variance", "variance"), ("stat", "t"),
                          ("z_score", "z"), ("p_value", "p")]:
            expected = ref[key].get_fdata()[mask]
            got = nib.load(_map(out, sub, label, stat, run)).get_fdata()[mask]
            if stat == "z":
                np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
            elif stat == "p":
                np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)
            else:
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.filterwarnings("ignore")
def test_fixed_effects_match_nilearn(demo_results):
    root, out, _ = demo_results
    for label in CONTRASTS:
        for sub in ("01", "02"):
            runs = [1, 2]
            dofs = [json.loads(_map(out, sub, label, "t", r).with_suffix("").with_suffix(".json").read_text())
                    ["DegreesOfFreedom"] for r in runs]
            mask_img = out / f"sub-{sub}" / "func" / f"sub-{sub}_task-flanker_{SPACE}_desc-brain_mask.nii.gz"
            eff, var, stat, z = compute_fixed_effects(
                [str(_map(out, sub, label, "effect", r)) for r in runs],
                [str(_map(out, sub, label, "variance", r)) for r in runs],
                mask=str(mask_img), precision_weighted=True, dofs=dofs)
            mask = nib.load(mask_img).get_fdata() > 0
            for ref, s in [(eff, "effect"), (var, "variance"), (stat, "t"), (z, "z")]:
                got = nib.load(_map(out, sub, label, s)).get_fdata()[mask]
                expected = ref.get_fdata()[mask]
                # inputs are the float32 run maps for both: agreement to float32 rounding
                tol = (dict(atol=1e-4, rtol=0) if s == "z"
                       else dict(rtol=1e-5, atol=1e-5 * np.abs(expected).max()))
                np.testing.assert_allclose(got, expected, **tol)
            side = json.loads(_map(out, sub, label, "z").with_suffix("").with_suffix(".json").read_text())
            assert side["DegreesOfFreedom"] == sum(dofs)


def test_known_effects_detected_and_null_calibrated(demo_results):
    """Ground truth from the simulation: the blobs are found at the subject level,
    and outside them the run-level false-positive rate is near nominal."""
    _, out, truth = demo_results
    null = truth.null_region()
    for sub in ("01", "02"):
        z_diff = nib.load(_map(out, sub, "incongruentMinusCongruent", "z")).get_fdata()
        z_con = nib.load(_map(out, sub, "congruentCorrect", "z")).get_fdata()
        assert z_diff[truth.blobs["acc"]].max() > 4
        assert z_con[truth.blobs["visual"]].max() > 6
        # congruent trials do not drive the cingulate blob
        assert np.median(z_con[truth.blobs["acc"]]) < 2
    rates = []
    for sub in ("01", "02"):
        for run in (1, 2):
            for label in CONTRASTS:
                p = nib.load(_map(out, sub, label, "p", run)).get_fdata()[null]
                rates.append(np.mean(p < 0.05))
    # spatially smooth maps make each rate noisy; their mean estimates the rate
    assert 0.02 < np.mean(rates) < 0.09, rates


def test_missing_condition_drops_only_affected_contrast(demo_results):
    """'errors' needs incongruent_incorrect, present only in sub-01 run-2."""
    _, out, _ = demo_results
    rec1 = json.loads((out / "sub-01" / "func" / "sub-01_task-flanker_run-1_design.json").read_text())
    assert "errors" in rec1["DroppedContrasts"]
    assert "incongruent_incorrect" in rec1["DroppedContrasts"]["errors"]
    assert not _map(out, "01", "errors", "z", 1).exists()
    assert _map(out, "01", "errors", "z", 2).exists()
    side = json.loads(_map(out, "01", "errors", "z").with_suffix("").with_suffix(".json").read_text())
    assert side["Runs"] == ["2"] and "sub-01 task-flanker run-1" in side["RunsDropped"]
    # a subject with the condition in no run gets no subject map; others are unaffected
    assert not _map(out, "02", "errors", "z").exists()
    assert _map(out, "02", "incongruentMinusCongruent", "z").exists()


def test_outputs_pass_bids_validator(demo_results):
    if validator_command() is None:
        pytest.skip("bids-validator-deno not installed")
    _, out, _ = demo_results
    proc = subprocess.run([validator_command(), "--format", "json", str(out)], capture_output=True, text=True,
                          env={**os.environ, "DENO_DIR": str(out.parent / "deno")})
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    assert not errors, errors[:3]
    assert proc.returncode == 0


def test_dataset_description_and_sidecars(demo_results):
    root, out, _ = demo_results
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "bidsglm" and desc["GeneratedBy"][0]["Version"]
    assert desc["GeneratedBy"][0]["CodeURL"].startswith("https://")
    assert any(s["URL"].endswith(str(root)) for s in desc["SourceDatasets"])
    side = json.loads(_map(out, "01", "incongruentMinusCongruent", "t", 1).with_suffix("").with_suffix(".json").read_text())
    assert side["Contrast"]["Weights"]["incongruent_correct"] == 1.0
    assert side["Contrast"]["Weights"]["congruent_correct"] == -1.0
    assert side["Contrast"]["Expression"] == "incongruent_correct - congruent_correct"
    assert side["NoiseModel"] == "ar1" and side["SmoothingFWHM"] == 6.0 and side["HRFModel"] == "glover"
    assert side["DegreesOfFreedom"] > 100 and side["Test"] == "t"
    assert any(s.startswith("bids:fmriprep:sub-01/func/") for s in side["Sources"])
    design = pd.read_csv(out / "sub-01" / "func" / "sub-01_task-flanker_run-1_design.tsv", sep="\t")
    assert len(design) == 146 and "constant" in design.columns and "trans_x" in design.columns
    assert not list(out.rglob(".*.tmp"))  # no temporary files left behind


def test_rerun_reuses_finished_runs(demo_results, caplog):
    root, out, _ = demo_results
    z = _map(out, "01", "congruentCorrect", "z", 1)
    before = z.stat().st_mtime_ns
    code = main([str(root), str(out), "participant", "--skip-bids-validation",
                 "--contrast", "IncongruentMinusCongruent=incongruent_correct - congruent_correct",
                 "--contrast", "congruent_correct", "--contrast", "incongruent_correct",
                 "--contrast", "errors=incongruent_incorrect"])
    assert code == 0
    assert z.stat().st_mtime_ns == before


def test_parallel_equals_serial(demo_small, tmp_path):
    root, _ = demo_small
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        assert main([str(root), str(out), "participant", "--skip-bids-validation", "-q",
                     "--participant-label", "sub-01", "--n-cpus", str(n)]) == 0
        outs.append(out)
    a = nib.load(_map(outs[0], "01", "congruentCorrect", "z")).get_fdata()
    b = nib.load(_map(outs[1], "01", "congruentCorrect", "z")).get_fdata()
    np.testing.assert_array_equal(a, b)


def test_interrupted_run_is_redone_on_rerun(demo_small, tmp_path):
    """A run whose completion record is missing (job killed mid-run) is recomputed;
    finished runs are reused."""
    root, _ = demo_small
    out = tmp_path / "out"
    args = [str(root), str(out), "participant", "--skip-bids-validation", "-q", "--participant-label", "02",
            "--contrast", "congruent_correct"]
    assert main(args) == 0
    z1, z2 = _map(out, "02", "congruentCorrect", "z", 1), _map(out, "02", "congruentCorrect", "z", 2)
    reference = nib.load(z2).get_fdata()
    (out / "sub-02" / "func" / "sub-02_task-flanker_run-2_design.json").unlink()
    z2.unlink()
    t1 = z1.stat().st_mtime_ns
    assert main(args) == 0
    assert z1.stat().st_mtime_ns == t1
    np.testing.assert_array_equal(nib.load(z2).get_fdata(), reference)


def test_changed_input_is_redone(demo_copy, tmp_path):
    out = tmp_path / "out"
    args = [str(demo_copy), str(out), "participant", "--skip-bids-validation", "-q", "--participant-label", "01",
            "--contrast", "congruent_correct"]
    assert main(args) == 0
    z1 = _map(out, "01", "congruentCorrect", "z", 1)
    before = z1.stat().st_mtime_ns
    events = demo_copy / "sub-01" / "func" / "sub-01_task-flanker_run-1_events.tsv"
    table = pd.read_csv(events, sep="\t")
    table["onset"] += 2.0
    table.to_csv(events, sep="\t", index=False)
    assert main(args) == 0
    assert z1.stat().st_mtime_ns != before
