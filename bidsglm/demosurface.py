"""Surface variants of the demo dataset (``bidsglm-demo DIR --surface cifti|gifti``).

The demo's flanker runs get fMRIPrep-style surface BOLD beside the volumes: the same two
responding regions, now as patches of the fsaverage5 mesh that nilearn ships (vertices within
15 mm of the blob centres on the pial surface; both are medial, so both hemispheres respond).

- ``gifti``: ``*_hemi-L|R_space-fsaverage5_bold.func.gii`` (10,242 vertices per hemisphere).
- ``cifti``: ``*_space-fsLR_den-91k_bold.dtseries.nii`` with the structure of fMRIPrep's file:
  left and right cortex on the fsLR 32k mesh without the medial wall (the mesh and mask bidsglm
  ships; patches within 15 mm of the blob centres on the midthickness), then a small block of
  subcortical voxels on a 2 mm grid (fMRIPrep's has 31,870; these carry no signal).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .demo import BLOBS, N_VOLUMES, RESPONDS, TASK, TR, _condition_regressors

PATCH_RADIUS_MM = 15.0
_SUBCORTICAL_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def _patches(kind: str) -> tuple[dict, int]:
    """blob name -> bool over both hemispheres' vertices (left then right), and the vertices per
    hemisphere: fsaverage5's pial surface (GIfTI), fsLR 32k's midthickness (CIFTI)."""
    from .surfaces import template_mesh

    space, surface = ("fsaverage5", "pial") if kind == "gifti" else ("fsLR", "midthickness")
    meshes = [template_mesh(space, hemi, surface)[0] for hemi in ("L", "R")]
    coords = np.vstack(meshes)
    return ({name: np.linalg.norm(coords - np.array(c), axis=1) <= PATCH_RADIUS_MM for name, c in BLOBS.items()},
            len(meshes[0]))


def _series(rng, events: pd.DataFrame, patches: dict, n: int, amplitude: float) -> np.ndarray:
    regs = _condition_regressors(events, N_VOLUMES)
    data = np.zeros((N_VOLUMES, n))
    for blob, prefixes in RESPONDS.items():
        course = sum(regs[c].to_numpy() / regs[c].max() for c in regs.columns if c.split("_")[0] in prefixes)
        data[:, patches[blob]] += amplitude / 100 * course[:, None]
    noise = rng.standard_normal((N_VOLUMES, n))
    for t in range(1, N_VOLUMES):  # AR(1) in time, rho 0.3
        noise[t] = 0.3 * noise[t - 1] + np.sqrt(1 - 0.09) * noise[t]
    return (800 * (1 + data + 0.01 * noise)).astype(np.float32)


def _cifti_models(n_vertex: int):
    """Brain models as fMRIPrep writes them: each cortex without its medial wall, then voxels."""
    from .surfaces import fslr_cortex_mask

    keep = {hemi: np.flatnonzero(fslr_cortex_mask(hemi)) for hemi in ("L", "R")}
    thalamus = np.zeros((8, 8, 8), bool)
    thalamus[2:6, 2:6, 2:5] = True
    models = (nib.cifti2.BrainModelAxis.from_surface(keep["L"], n_vertex, "CortexLeft")
              + nib.cifti2.BrainModelAxis.from_surface(keep["R"], n_vertex, "CortexRight")
              + nib.cifti2.BrainModelAxis.from_mask(thalamus, "ThalamusLeft", _SUBCORTICAL_AFFINE))
    return models, keep


def add_surface_runs(root: Path, kind: str, amplitude: float = 2.0, seed: int = 7) -> None:
    """Write surface BOLD (``kind``: 'gifti' or 'cifti') for every run of the demo in ``root``."""
    rng = np.random.default_rng(seed)
    patches, n_vertex = _patches(kind)
    deriv = Path(root) / "derivatives" / "fmriprep"
    for events_file in sorted(Path(root).glob(f"sub-*/func/*_task-{TASK}_run-*_events.tsv")):
        stem = events_file.name.removesuffix("_events.tsv")
        out = deriv / events_file.parent.relative_to(root)
        events = pd.read_csv(events_file, sep="\t")[["onset", "duration", "trial_type"]]
        if kind == "gifti":
            data = _series(rng, events, patches, 2 * n_vertex, amplitude)
            for hemi, part in (("L", data[:, :n_vertex]), ("R", data[:, n_vertex:])):
                darrays = [nib.gifti.GiftiDataArray(v, intent="NIFTI_INTENT_TIME_SERIES",
                                                    datatype="NIFTI_TYPE_FLOAT32") for v in part]
                nib.save(nib.gifti.GiftiImage(darrays=darrays),
                         out / f"{stem}_hemi-{hemi}_space-fsaverage5_bold.func.gii")
            sidecar = out / f"{stem}_space-fsaverage5_bold.json"
        else:
            models, keep = _cifti_models(n_vertex)
            n_voxels = len(models) - len(keep["L"]) - len(keep["R"])  # subcortical voxels: no signal
            cortex = {b: np.r_[p[:n_vertex][keep["L"]], p[n_vertex:][keep["R"]], np.zeros(n_voxels, bool)]
                      for b, p in patches.items()}
            data = _series(rng, events, cortex, len(models), amplitude)
            series = nib.cifti2.SeriesAxis(0, TR, N_VOLUMES, "SECOND")
            img = nib.Cifti2Image(data, header=(series, models))
            img.nifti_header.set_intent("ConnDenseSeries")
            nib.save(img, out / f"{stem}_space-fsLR_den-91k_bold.dtseries.nii")
            sidecar = out / f"{stem}_space-fsLR_den-91k_bold.json"
        sidecar.write_text(json.dumps({"RepetitionTime": TR, "TaskName": TASK}, indent=2) + "\n")
