"""Simulated fMRIPrep outputs around real event files (../shared/data/events).

BOLD is noise on a small MNI-like grid (8 mm voxels) with an activation in a
blob that follows the first condition's HRF-convolved timing; confounds carry
fMRIPrep's column names (with n/a in the first row of derivative columns) and
a cosine basis like fMRIPrep's ``cosine*`` columns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

AFFINE = np.array([[-8.0, 0, 0, 72], [0, 8.0, 0, -104], [0, 0, 8.0, -56], [0, 0, 0, 1]])
SHAPE = (19, 23, 18)
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def brain_mask() -> np.ndarray:
    ijk = np.indices(SHAPE).reshape(3, -1).T
    centre = (np.array(SHAPE) - 1) / 2
    radius = np.array(SHAPE) / 2.3
    return (np.sum(((ijk - centre) / radius) ** 2, axis=1) <= 1).reshape(SHAPE)


def confounds(rng, n: int, tr: float) -> pd.DataFrame:
    table = {}
    for name in MOTION:
        walk = np.cumsum(rng.normal(0, 0.02, n))
        deriv = np.r_[np.nan, np.diff(walk)]
        table[name] = walk
        table[f"{name}_derivative1"] = deriv
        table[f"{name}_power2"] = walk**2
        table[f"{name}_derivative1_power2"] = deriv**2
    t = np.arange(n) * tr
    for k in range(1, int(2 * n * tr * 0.008) + 1):  # fMRIPrep: cosines below 1/128 Hz
        table[f"cosine{k - 1:02d}"] = np.sqrt(2 / n) * np.cos(np.pi * k * (t / tr + 0.5) / n)
    table["framewise_displacement"] = np.r_[np.nan, np.abs(rng.normal(0.1, 0.03, n - 1))]
    return pd.DataFrame(table)


def simulate_dataset(source: Path, root: Path, subjects: list[str], n_volumes: int, tr: float = 2.0,
                     runs: int | None = None, seed: int = 0, rename_trial_types: dict | None = None) -> Path:
    """Copy the raw files of ``subjects`` from ``source`` and write derivatives/fmriprep.

    ``rename_trial_types`` recodes trial_type values in the copied events."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dataset_description.json", "participants.tsv", "participants.json", "README"):
        if (source / name).exists():
            shutil.copy(source / name, root / name)
    for sidecar in source.glob("task-*_bold.json"):
        shutil.copy(sidecar, root / sidecar.name)
    fmriprep = root / "derivatives" / "fmriprep"
    fmriprep.mkdir(parents=True, exist_ok=True)
    (fmriprep / "dataset_description.json").write_text(json.dumps({
        "Name": "simulated fMRIPrep outputs", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "simulated"}]}))
    mask = brain_mask()
    blob = np.zeros(SHAPE, bool)
    blob[8:11, 9:13, 8:11] = True
    for sub in subjects:
        events_files = sorted((source / f"sub-{sub}").rglob("*_events.tsv"))
        if runs:
            events_files = events_files[:runs]
        for events in events_files:
            rel = events.relative_to(source).parent
            (root / rel).mkdir(parents=True, exist_ok=True)
            table = pd.read_csv(events, sep="\t", dtype={"trial_type": str}, keep_default_na=False)
            if rename_trial_types:
                table["trial_type"] = table["trial_type"].replace(rename_trial_types)
            table.to_csv(root / rel / events.name, sep="\t", index=False)
            sidecar = events.with_name(events.name.replace("_events.tsv", "_bold.json"))
            if sidecar.exists():
                shutil.copy(sidecar, root / rel / sidecar.name)
            prefix = events.name.replace("_events.tsv", "")
            out = fmriprep / rel
            out.mkdir(parents=True, exist_ok=True)
            table = pd.read_csv(root / rel / events.name, sep="\t")
            frame = np.arange(n_volumes) * tr
            first = table[table["trial_type"] == table["trial_type"].iloc[0]]
            box = np.zeros(n_volumes)
            for onset, dur in zip(first["onset"], first["duration"]):
                box[(frame >= onset) & (frame < onset + max(dur, tr))] = 1
            hrf = np.exp(-((np.arange(0, 30, tr) - 6) ** 2) / 8)
            signal = np.convolve(box, hrf)[:n_volumes]
            noise = rng.normal(0, 1, SHAPE + (n_volumes,))
            noise[..., 1:] += 0.3 * noise[..., :-1]
            data = 100 + noise + 1.5 * blob[..., None] * signal
            data = np.where(mask[..., None], data, 0).astype(np.float32)
            img = nib.Nifti1Image(data, AFFINE)
            img.header.set_zooms((8.0, 8.0, 8.0, tr))
            img.header.set_xyzt_units("mm", "sec")
            space = f"{prefix}_space-MNI152NLin2009cAsym"
            nib.save(img, out / f"{space}_desc-preproc_bold.nii.gz")
            (out / f"{space}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": tr}))
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), out / f"{space}_desc-brain_mask.nii.gz")
            confounds(rng, n_volumes, tr).to_csv(out / f"{prefix}_desc-confounds_timeseries.tsv", sep="\t",
                                                 index=False, na_rep="n/a")
    return root
