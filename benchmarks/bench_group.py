"""Group-level fit: bidsglm's OLS against nilearn's SecondLevelModel on the same maps.

Writes N subject effect maps (MNI 2 mm grid, nilearn's brain mask, float32
.nii.gz) to a temporary folder, then times for each tool: reading the maps,
fitting a one-sample model with a covariate and computing one t contrast
with all its outputs. Prints the wall times, their ratio and the largest
z difference.

    python benchmarks/bench_group.py [--subjects 40] [--voxel-size 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd


def make_maps(folder: Path, n: int, voxel_size: int):
    from nilearn.datasets import load_mni152_brain_mask

    mask_img = load_mni152_brain_mask(resolution=voxel_size)
    mask = np.asanyarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        vol = np.zeros(mask.shape, np.float32)
        vol[mask] = rng.normal(0.2, 1.0, mask.sum())
        path = folder / f"sub-{i:02d}_effect.nii.gz"
        nib.save(nib.Nifti1Image(vol, mask_img.affine), str(path))
        paths.append(path)
    return paths, mask, mask_img


def run_bidsglm(paths, mask, design):
    from bidsglm.groupmodels import fit_ols

    Y = np.stack([np.asanyarray(nib.load(str(p)).dataobj)[mask].astype(np.float64) for p in paths])
    fit = fit_ols(Y, design.to_numpy())
    res = fit.contrast(np.array([0.0, 1.0]))
    return {"z": res.z, "t": res.stat, "p": res.p, "effect": res.effect, "variance": res.variance}


def run_nilearn(paths, mask_img, design):
    from nilearn.glm.second_level import SecondLevelModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SecondLevelModel(mask_img=mask_img).fit([str(p) for p in paths], design_matrix=design)
        return model.compute_contrast([0.0, 1.0], output_type="all")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--voxel-size", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths, mask, mask_img = make_maps(Path(tmp), args.subjects, args.voxel_size)
        age = np.linspace(-1, 1, args.subjects)
        design = pd.DataFrame({"mean": np.ones(args.subjects), "age": age})
        t0 = time.perf_counter()
        ours = run_bidsglm(paths, mask, design)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = run_nilearn(paths, mask_img, design)
        t_theirs = time.perf_counter() - t0
    z_ref = np.asanyarray(theirs["z_score"].dataobj)[mask]
    print(f"{args.subjects} maps x {int(mask.sum())} voxels ({args.voxel_size} mm)")
    print(f"nilearn SecondLevelModel: {t_theirs:7.2f} s")
    print(f"bidsglm fit_ols:          {t_ours:7.2f} s")
    print(f"ratio (nilearn / bidsglm): {t_theirs / t_ours:.1f}x")
    print(f"max |z difference|: {np.max(np.abs(ours['z'] - z_ref)):.2e}")


if __name__ == "__main__":
    main()
