"""End to end on real 3 x 3 timing (OpenNeuro ds000117, famous / unfamiliar / scrambled
faces x initial / immediate / delayed repetition): BOLD simulated with known condition
responses, the participant level fits every condition, and the group level's
repeated-measures ANOVA must find the interaction and the faces effect where they were
put, and nothing beyond the nominal rate where they were not."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd

from bidsglm.cli import main
from conftest import shared_path

TR, N_VOLUMES = 2.0, 210
SHAPE = (18, 12, 10)
AFFINE = np.array([[-6.0, 0, 0, 54], [0, 6.0, 0, -40], [0, 0, 6.0, -20], [0, 0, 0, 1]])
CONDITIONS = [f"{r}{f}" for r in ("Ini", "Imm", "Del") for f in ("FF", "UF", "SF")]


def responses(region: str) -> dict:
    """Percent signal change per condition. faces: a main effect of face type only;
    interaction: repetition x face type, no main effect; null: every condition alike."""
    if region == "faces":
        return {c: (0.5 if c.endswith("SF") else 2.0) for c in CONDITIONS}
    if region == "interaction":
        shift = {"IniFF": 1, "DelSF": 1, "IniSF": -1, "DelFF": -1}
        return {c: 1.0 + shift.get(c, 0) for c in CONDITIONS}
    return {c: 1.0 for c in CONDITIONS}


def regions() -> dict:
    x = np.indices(SHAPE)[0]
    return {"faces": x < 6, "interaction": (x >= 6) & (x < 12), "null": x >= 12}


def _save(data, path, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data.astype(dtype), AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        img.header.set_zooms((6.0, 6.0, 6.0, TR))
    nib.save(img, str(path))


def write_dataset(root, events_root, n_subjects=8, seed=0):
    from nilearn.glm.first_level import make_first_level_design_matrix

    rng = np.random.default_rng(seed)
    masks = regions()
    frame_times = np.arange(N_VOLUMES) * TR
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    deriv = root / "derivatives" / "fmriprep"
    for s in range(1, n_subjects + 1):
        sub = f"{s:02d}"
        gain = rng.normal(1.0, 0.15)  # subjects respond more or less strongly
        for run in (1, 2):
            stem = f"sub-{sub}_ses-mri_task-facerecognition_run-{run:02d}"
            source = events_root / f"sub-{sub}" / "ses-mri" / "func" / f"{stem}_events.tsv"
            events = pd.read_csv(source, sep="\t", na_values="n/a")
            raw = root / f"sub-{sub}" / "ses-mri" / "func"
            raw.mkdir(parents=True, exist_ok=True)
            (raw / f"{stem}_events.tsv").write_bytes(source.read_bytes())
            _save(np.zeros(SHAPE + (N_VOLUMES,)), raw / f"{stem}_bold.nii.gz", np.int16)
            design = make_first_level_design_matrix(
                frame_times, events[["onset", "duration", "trial_type"]], hrf_model="glover", drift_model=None)
            signal = np.zeros(SHAPE + (N_VOLUMES,))
            for name, region in masks.items():
                # unscaled regressors: each condition's true beta is exactly gain x amp
                course = sum(amp * design[c].to_numpy()
                             for c, amp in responses(name).items() if c in design)
                signal[region] += gain * course
            bold = 1000.0 * (1 + signal / 100) + rng.normal(0, 10.0, signal.shape)
            out = deriv / f"sub-{sub}" / "ses-mri" / "func"
            prefix = f"{stem}_space-MNI152NLin2009cAsym"
            _save(bold, out / f"{prefix}_desc-preproc_bold.nii.gz")
            _save(np.ones(SHAPE), out / f"{prefix}_desc-brain_mask.nii.gz", np.uint8)
            fd = np.abs(rng.normal(0.1, 0.03, N_VOLUMES))
            pd.DataFrame({"framewise_displacement": np.r_[np.nan, fd[1:]],
                          **{k: rng.normal(0, 0.01, N_VOLUMES) for k in
                             ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")}}).to_csv(
                out / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
    (root / "task-facerecognition_bold.json").write_text(json.dumps({"RepetitionTime": TR,
                                                                     "TaskName": "facerecognition"}))
    pd.DataFrame({"participant_id": [f"sub-{s:02d}" for s in range(1, n_subjects + 1)]}).to_csv(
        root / "participants.tsv", sep="\t", index=False)
    for folder, kind in ((deriv, "derivative"), (root, "raw")):
        (folder / "dataset_description.json").write_text(json.dumps(
            {"Name": "simulated on ds000117 timing", "BIDSVersion": "1.10.0", "DatasetType": kind}))


INTERACTION = ("interaction=IniFF - IniSF - DelFF + DelSF;ImmFF - ImmSF - DelFF + DelSF;"
               "IniUF - IniSF - DelUF + DelSF;ImmUF - ImmSF - DelUF + DelSF")
FACES = "faces=IniFF + ImmFF + DelFF + IniUF + ImmUF + DelUF - 2*IniSF - 2*ImmSF - 2*DelSF"


def test_three_by_three_anova_on_real_timing(tmp_path):
    events_root = shared_path("events", "ds000117")
    bids, out = tmp_path / "bids", tmp_path / "out"
    write_dataset(bids, events_root)
    assert main([str(bids), str(out), "participant", "-q", "--skip-bids-validation",
                 "--smoothing-fwhm", "0"]) == 0
    assert main([str(bids), str(out), "group", "-q", "--group-model", "anova", "--atlases", "none",
                 "--group-f-contrast", INTERACTION, "--group-contrast", FACES]) == 0
    g = out / "group"
    prefix = "task-facerecognition_space-MNI152NLin2009cAsym"
    p_int = np.asanyarray(nib.load(str(g / f"{prefix}_contrast-interaction_stat-p_statmap.nii.gz")).dataobj)
    p_faces = np.asanyarray(nib.load(str(g / f"{prefix}_contrast-faces_stat-p_statmap.nii.gz")).dataobj)
    masks = regions()
    # where the effects were put, they are found
    assert np.mean(p_int[masks["interaction"]] < 0.001) > 0.8
    assert np.mean(p_faces[masks["faces"]] < 0.001) > 0.8
    # where they were not, the rate of p < 0.05 is near nominal. Bounds are wider than the
    # binomial sd (0.008 for 720 voxels): conditions have 5 to 16 trials per run, so their
    # estimates have unequal variances and sphericity holds only approximately (seeds 0-2
    # gave 0.019 to 0.071)
    for effect, p, where in (("interaction", p_int, "faces"), ("interaction", p_int, "null"),
                             ("faces", p_faces, "interaction"), ("faces", p_faces, "null")):
        rate = np.mean(p[masks[where]] < 0.05)
        assert 0.01 < rate < 0.1, (effect, where, rate)
    side = json.loads((g / f"{prefix}_contrast-interaction_stat-F_statmap.json").read_text())
    assert side["DegreesOfFreedom"] == [4, 8 * 9 - (9 + 8 - 1)]
    assert "sphericity" in side["Assumptions"]
