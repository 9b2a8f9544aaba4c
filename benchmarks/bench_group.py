"""Group-level fit: bidsglm's OLS against nilearn's SecondLevelModel on the same maps.

Writes N subject effect maps (MNI 2 mm grid, nilearn's brain mask, float32
.nii.gz) to a temporary folder, then times for each tool: reading the maps,
fitting a one-sample model with a covariate and computing one t contrast
with all its outputs. Prints the wall times, their ratio and the largest
z difference. Then the mixed-effects estimator (--group-estimator mixed) on the
same maps with per-subject variance maps, against the OLS fit (the target is
at most 5x): the fits alone on arrays in memory, and with reading the maps.

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
    paths, variance_paths = [], []
    for i in range(n):
        variance = np.zeros(mask.shape, np.float32)
        variance[mask] = rng.uniform(0.1, 2.0) * rng.chisquare(100, mask.sum()) / 100
        vol = np.zeros(mask.shape, np.float32)
        vol[mask] = rng.normal(0.2, 0.7, mask.sum()) + rng.normal(size=mask.sum()) * np.sqrt(variance[mask])
        path = folder / f"sub-{i:02d}_effect.nii.gz"
        nib.save(nib.Nifti1Image(vol, mask_img.affine), str(path))
        paths.append(path)
        variance_paths.append(folder / f"sub-{i:02d}_variance.nii.gz")
        nib.save(nib.Nifti1Image(variance, mask_img.affine), str(variance_paths[-1]))
    return paths, variance_paths, mask, mask_img


def run_bidsglm(paths, mask, design):
    from bidsglm.groupmodels import fit_ols

    Y = np.stack([np.asanyarray(nib.load(str(p)).dataobj)[mask].astype(np.float64) for p in paths])
    fit = fit_ols(Y, design.to_numpy())
    res = fit.contrast(np.array([0.0, 1.0]))
    return {"z": res.z, "t": res.stat, "p": res.p, "effect": res.effect, "variance": res.variance}


def _read(paths, mask):
    return np.stack([np.asanyarray(nib.load(str(p)).dataobj)[mask].astype(np.float64) for p in paths])


def time_mixed(paths, variance_paths, mask, design, repeats=3):
    """Best of ``repeats``: OLS fit + contrast, mixed fit + contrast (arrays in memory),
    and the mixed estimator with reading effect and variance maps."""
    from bidsglm.groupmodels import fit_ols
    from bidsglm.mixedeffects import fit_mixed

    X = design.to_numpy()
    Y, V = _read(paths, mask), _read(variance_paths, mask)
    fit_mixed(Y[:, :100], V[:, :100], X)  # compile (or load the cached kernel) outside the timing
    c = np.array([0.0, 1.0])
    t_ols, t_mixed = np.inf, np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit_ols(Y, X).contrast(c).z
        t_ols = min(t_ols, time.perf_counter() - t0)
        t0 = time.perf_counter()
        fit = fit_mixed(Y, V, X)
        fit.contrast(c).z
        t_mixed = min(t_mixed, time.perf_counter() - t0)
    t0 = time.perf_counter()
    fit_mixed(_read(paths, mask), _read(variance_paths, mask), X).contrast(c).z
    t_read_mixed = time.perf_counter() - t0
    return t_ols, t_mixed, t_read_mixed, fit


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
        paths, variance_paths, mask, mask_img = make_maps(Path(tmp), args.subjects, args.voxel_size)
        age = np.linspace(-1, 1, args.subjects)
        design = pd.DataFrame({"mean": np.ones(args.subjects), "age": age})
        t0 = time.perf_counter()
        ours = run_bidsglm(paths, mask, design)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = run_nilearn(paths, mask_img, design)
        t_theirs = time.perf_counter() - t0
        t_ols, t_mixed, t_read_mixed, fit = time_mixed(paths, variance_paths, mask, design)
    z_ref = np.asanyarray(theirs["z_score"].dataobj)[mask]
    print(f"{args.subjects} maps x {int(mask.sum())} voxels ({args.voxel_size} mm)")
    print(f"nilearn SecondLevelModel: {t_theirs:7.2f} s")
    print(f"bidsglm fit_ols:          {t_ours:7.2f} s")
    print(f"ratio (nilearn / bidsglm): {t_theirs / t_ours:.1f}x")
    print(f"max |z difference|: {np.max(np.abs(ours['z'] - z_ref)):.2e}")
    print("mixed effects (REML) against OLS on the same arrays (fit + one t contrast, best of 3):")
    print(f"  OLS fit:   {t_ols:7.2f} s")
    print(f"  mixed fit: {t_mixed:7.2f} s  ({t_mixed / t_ols:.1f}x OLS; target <= 5x); "
          f"Newton steps per voxel: mean {fit.iterations.mean():.1f}, max {fit.iterations.max()}, "
          f"not converged: {int((~fit.converged).sum())}")
    print(f"  mixed with reading effect + variance maps: {t_read_mixed:7.2f} s "
          f"({t_read_mixed / t_ours:.1f}x bidsglm's OLS with reading)")


if __name__ == "__main__":
    main()
