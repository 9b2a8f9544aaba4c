"""Permutation inference: bidsglm against nilearn's non_parametric_inference, same maps.

Writes smooth subject maps on nilearn's 2 mm MNI brain mask (about 235k voxels;
shipped with nilearn, nothing downloaded) and times both tools on:

    voxel    one-sample (16 maps), max-t
    cluster  one-sample, max-t + cluster size and mass (cluster-forming p 0.001)
    tfce     one-sample, max-t + TFCE
    anova    3 x 3 repeated measures (144 maps, 9 condition + 16 subject columns), t contrast

Each tool runs once with a single permutation (start-up: reading the maps, the
observed statistics) and once with P permutations; the per-permutation cost is
the difference divided by P - 1, and the time for 10,000 permutations is
start-up + 10,000 x that. nilearn runs with fewer permutations where it is slow (TFCE:
about 1.7 s each); the ratios compare the extrapolated 10,000-permutation times.
Both use the same number of workers (--jobs). CPU time is measured too (bidsglm: its
process, numba threads included; nilearn: its process plus its workers, run with joblib's
multiprocessing backend so that they are reaped and counted), with the same
extrapolation: on a machine shared with other jobs wall times stretch with the load
(printed), CPU times much less.

    python benchmarks/bench_permutation.py [--jobs 2] [--only voxel cluster tfce anova]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

TARGET = 10_000
# permutations timed per tool and case: (nilearn, bidsglm)
COUNTS = {"voxel": (500, 10_000), "cluster": (200, 10_000), "tfce": (5, 1_000), "anova": (100, 2_000)}
TARGET_RATIO = {"voxel": 10, "cluster": 5, "tfce": 50, "anova": 30}


def make_maps(folder: Path, n: int, seed: int = 0):
    from nilearn.datasets import load_mni152_brain_mask

    mask_img = load_mni152_brain_mask(resolution=2)
    mask = np.asanyarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        vol = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.7).astype(np.float32) * 4
        vol[~mask] = 0
        path = folder / f"map-{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, mask_img.affine), str(path))
        paths.append(path)
    return paths, mask, mask_img


def _cpu_with_children() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_nilearn(paths, mask_img, design, contrast, n_perm, jobs, threshold=None, tfce=False):
    """(wall, CPU) seconds; the workers are processes that end with the call (counted in CPU)."""
    import joblib
    from nilearn.glm.second_level import non_parametric_inference

    t0, c0 = time.perf_counter(), _cpu_with_children()
    with warnings.catch_warnings(), joblib.parallel_config(backend="multiprocessing"):
        warnings.simplefilter("ignore")
        non_parametric_inference([str(p) for p in paths], design_matrix=design, second_level_contrast=contrast,
                                 mask=mask_img, n_perm=n_perm, two_sided_test=True, random_state=0,
                                 n_jobs=jobs, threshold=threshold, tfce=tfce, verbose=0)
    return time.perf_counter() - t0, _cpu_with_children() - c0


def time_bidsglm(paths, mask, design, contrast, n_perm, blocks=None, tfce=False, clusters=True):
    from bidsglm.permutation import PermutationOptions, permutation_design, run_permutations

    t0, c0 = time.perf_counter(), time.process_time()
    Y = np.stack([np.asanyarray(nib.load(str(p)).dataobj)[mask] for p in paths])
    d = permutation_design(design.to_numpy(), np.atleast_2d(contrast), False, blocks)
    run_permutations(Y, d, mask, PermutationOptions(n_perm, seed=0, tfce=tfce, clusters=clusters))
    return time.perf_counter() - t0, time.process_time() - c0


def extrapolate(t_one: float, t_run: float, n: int) -> tuple[float, float]:
    per = max(t_run - t_one, 0.0) / (n - 1)
    t_zero = t_one - per
    return per, t_zero + TARGET * per


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="workers for both tools (default: 2)")
    p.add_argument("--only", nargs="+", choices=list(COUNTS), default=list(COUNTS))
    args = p.parse_args()
    import numba

    numba.set_num_threads(min(args.jobs, numba.config.NUMBA_NUM_THREADS))
    logger_off()
    with tempfile.TemporaryDirectory() as tmp:
        paths, mask, mask_img = make_maps(Path(tmp), 144)
        print(f"{int(mask.sum())} voxels (2 mm MNI mask), {args.jobs} worker(s); times for {TARGET} "
              "permutations are start-up + 10,000 x the measured cost per permutation")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        for case in args.only:
            n_nl, n_ours = COUNTS[case]
            if case == "anova":
                subjects, conditions = 16, [f"c{i}" for i in range(9)]
                from bidsglm.groupmodels import anova_design

                design = anova_design([(f"{s:02d}", c) for s in range(subjects) for c in conditions], conditions)
                design.columns = [c.replace("-", "") for c in design.columns]  # nilearn wants plain names
                contrast = np.zeros(design.shape[1])
                contrast[:2] = 1, -1
                inputs, blocks = paths[: len(design)], np.repeat(np.arange(subjects), len(conditions))
            else:
                design = pd.DataFrame({"intercept": np.ones(16)})
                contrast, inputs, blocks = np.array([1.0]), paths[:16], None
            threshold = 0.001 if case == "cluster" else None
            tfce = case == "tfce"
            (nl0, nl0_cpu) = time_nilearn(inputs, mask_img, design, contrast, 1, args.jobs, threshold, tfce)
            (nl, nl_cpu) = time_nilearn(inputs, mask_img, design, contrast, n_nl, args.jobs, threshold, tfce)
            clusters = case == "cluster"  # what nilearn computes in each case
            us0, us0_cpu = time_bidsglm(inputs, mask, design, contrast, 1, blocks, tfce, clusters)
            us, us_cpu = time_bidsglm(inputs, mask, design, contrast, n_ours, blocks, tfce, clusters)
            nl_per, nl_total = extrapolate(nl0, nl, n_nl)
            us_per, us_total = extrapolate(us0, us, n_ours)
            nl_per_cpu, nl_total_cpu = extrapolate(nl0_cpu, nl_cpu, n_nl)
            us_per_cpu, us_total_cpu = extrapolate(us0_cpu, us_cpu, n_ours)
            nl0, us0 = nl0 - nl_per, us0 - us_per
            print(f"{case:8s} {len(inputs):4d} maps | nilearn: start {nl0:6.1f} s, {1000 * nl_per:8.2f} ms/perm "
                  f"({n_nl} run) -> {nl_total:8.0f} s | bidsglm: start {us0:5.1f} s, {1000 * us_per:7.3f} ms/perm "
                  f"({n_ours} run) -> {us_total:6.1f} s | ratio {nl_total / us_total:6.1f}x "
                  f"(target {TARGET_RATIO[case]}x)", flush=True)
            print(f"{'':8s} CPU time | nilearn: {1000 * nl_per_cpu:8.2f} ms/perm -> {nl_total_cpu:8.0f} s | "
                  f"bidsglm: {1000 * us_per_cpu:7.3f} ms/perm -> {us_total_cpu:6.1f} s | ratio "
                  f"{nl_total_cpu / us_total_cpu:6.1f}x | load average now {os.getloadavg()[0]:.1f}", flush=True)


def logger_off():
    import logging

    logging.getLogger("bidsglm").setLevel(logging.WARNING)


if __name__ == "__main__":
    main()
