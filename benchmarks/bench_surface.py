"""Surfaces: a 91k-grayordinate CIFTI run against nilearn, and the surface TFCE kernel against the volume one.

1. participant level. A CIFTI dtseries with the structure of fMRIPrep's fsLR den-91k file (both cortices
   on the real fsLR 32k mesh without the medial wall, as vertex subsets; subcortical voxels on the MNI
   2 mm grid; 91,282 grayordinates in all), 300 volumes of AR(1) noise with a responding patch, real
   flanker timing and fMRIPrep-style confounds. bidsglm's participant level (the whole command: read,
   design, AR(1) fit, 3 contrasts, dscalar maps) is timed in its own process against nilearn on the same
   data matrix (nilearn's design matrix, mean scaling, run_glm with AR(1), compute_contrast; reading the
   dtseries with nibabel included), and the z maps are compared.
2. kernels. Largest TFCE (E 1 on the surface, 0.5 in the volume, H 2, dh 0.1) and largest cluster size and
   mass per map, on the 91k grayordinate graph against a volume mask of the same element count
   (face connectivity), smooth maps of the same value spread; time per map and their ratio.

    python benchmarks/bench_surface.py [--volumes 300] [--maps 40] [--only run kernels]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

GRAYORDINATES = 91282
CONTRASTS = {"congruent": "congruent_correct", "incongruent": "incongruent_correct",
             "difference": "incongruent_correct - congruent_correct"}
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def brain_models():
    """fsLR 32k cortices without BrainSpace's medial wall, then subcortical voxels of nilearn's 2 mm MNI
    brain mask nearest the brain's centre (left and right 'thalamus') up to 91,282 grayordinates."""
    from nilearn.datasets import load_mni152_brain_mask

    from bidsglm import surfaces

    parts = [nib.cifti2.BrainModelAxis.from_surface(np.flatnonzero(surfaces.fslr_cortex_mask(h)), 32492, name)
             for h, name in (("L", "CortexLeft"), ("R", "CortexRight"))]
    mask_img = load_mni152_brain_mask(resolution=2)
    mask = np.asanyarray(mask_img.dataobj) > 0
    ijk = np.argwhere(mask)
    xyz = nib.affines.apply_affine(mask_img.affine, ijk)
    n_voxels = GRAYORDINATES - sum(len(p) for p in parts)
    chosen = ijk[np.argsort(np.linalg.norm(xyz - np.array([0.0, -15.0, 5.0]), axis=1), kind="stable")[:n_voxels]]
    left_side = nib.affines.apply_affine(mask_img.affine, chosen)[:, 0] < 0
    for side, name in ((left_side, "ThalamusLeft"), (~left_side, "ThalamusRight")):
        vol = np.zeros(mask.shape, bool)
        vol[tuple(chosen[side].T)] = True
        parts.append(nib.cifti2.BrainModelAxis.from_mask(vol, name, mask_img.affine))
    models = parts[0]
    for p in parts[1:]:
        models = models + p
    assert len(models) == GRAYORDINATES
    return models


def make_run(root: Path, n_vol: int, seed: int = 0) -> None:
    from bidsglm.demo import _confounds, _events_dir

    rng = np.random.default_rng(seed)
    models = brain_models()
    ev = [pd.read_csv(_events_dir() / f"sub-01_task-flanker_run-{r}_events.tsv", sep="\t") for r in (1, 2)]
    ev[1]["onset"] += 146 * 2.0
    events = pd.concat(ev)[["onset", "duration", "trial_type"]]
    events = events[events["onset"] < n_vol * 2.0 - 10]
    data = np.empty((n_vol, GRAYORDINATES), np.float32)
    prev = np.zeros(GRAYORDINATES, np.float32)
    for t in range(n_vol):  # AR(1) 0.3 in time
        prev = 0.3 * prev + 0.954 * rng.standard_normal(GRAYORDINATES, dtype=np.float32)
        data[t] = 800 * (1 + 0.01 * prev)
    frame = np.arange(n_vol) * 2.0
    box = np.zeros(n_vol)
    for onset in events.query("trial_type == 'incongruent_correct'")["onset"]:
        box[(frame >= onset) & (frame < onset + 2)] = 1
    data[:, 1000:1200] += (8 * np.convolve(box, np.exp(-((np.arange(0, 30, 2.0) - 6) ** 2) / 8))[:n_vol])[:, None]
    sub, deriv = root / "sub-01" / "func", root / "derivatives" / "fmriprep" / "sub-01" / "func"
    sub.mkdir(parents=True)
    deriv.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.10.0"}))
    (root / "derivatives" / "fmriprep" / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    (root / "task-flanker_bold.json").write_text(json.dumps({"TaskName": "flanker", "RepetitionTime": 2.0}))
    events.to_csv(sub / "sub-01_task-flanker_run-1_events.tsv", sep="\t", index=False)
    img = nib.Cifti2Image(data, header=(nib.cifti2.SeriesAxis(0, 2.0, n_vol, "SECOND"), models))
    img.nifti_header.set_intent("ConnDenseSeries")
    stem = deriv / "sub-01_task-flanker_run-1_space-fsLR_den-91k_bold"
    nib.save(img, f"{stem}.dtseries.nii")
    Path(f"{stem}.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    _confounds(rng, n_vol, outliers=False).to_csv(
        deriv / "sub-01_task-flanker_run-1_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")


NILEARN = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np, pandas as pd, nibabel as nib
    from nilearn.glm.contrasts import compute_contrast
    from nilearn.glm.first_level import make_first_level_design_matrix, mean_scaling, run_glm
    root, out = sys.argv[1], sys.argv[2]
    d = root + "/derivatives/fmriprep/sub-01/func/sub-01_task-flanker_run-1_"
    t0, c0 = time.perf_counter(), time.process_time()
    Y = np.asarray(nib.load(d + "space-fsLR_den-91k_bold.dtseries.nii").get_fdata(dtype=np.float32))
    conf = pd.read_csv(d + "desc-confounds_timeseries.tsv", sep="\\t")[%(motion)r]
    events = pd.read_csv(root + "/sub-01/func/sub-01_task-flanker_run-1_events.tsv", sep="\\t")
    X = make_first_level_design_matrix(np.arange(Y.shape[0]) * 2.0, events, hrf_model="glover",
                                       drift_model="cosine", high_pass=1 / 128, add_regs=conf.to_numpy(),
                                       add_reg_names=list(conf.columns))
    Ys, _ = mean_scaling(Y)
    labels, results = run_glm(Ys, X.to_numpy(), noise_model="ar1", n_jobs=1)
    for name, expr in %(contrasts)r.items():
        terms = expr.replace(" ", "").replace("-", "+-").split("+")
        con = np.zeros(X.shape[1])
        for term in filter(None, terms):
            con[list(X.columns).index(term.lstrip("-"))] += -1 if term.startswith("-") else 1
        np.save(f"{out}/{name}_z.npy", compute_contrast(labels, results, con, stat_type="t").z_score())
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""") % {"motion": MOTION, "contrasts": CONTRASTS}

BIDSGLM = textwrap.dedent("""
    import json, resource, sys, time
    t0, c0 = time.perf_counter(), time.process_time()
    from bidsglm.cli import main
    root, out = sys.argv[1], sys.argv[2]
    args = [root, out, "participant", "--space", "fsLR", "--skip-bids-validation", "-q", "--no-reports"]
    for name, expr in %(contrasts)r.items():
        args += ["--contrast", f"{name}={expr}"]
    assert main(args) == 0
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""") % {"contrasts": CONTRASTS}


def run_tool(code: str, root: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(out)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_run(n_vol: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bidsglm-bench-surface-"))
    root = work / "bids"
    t = time.perf_counter()
    make_run(root, n_vol)
    print(f"generated a CIFTI run of {n_vol} volumes x {GRAYORDINATES} grayordinates in "
          f"{time.perf_counter() - t:.0f} s")
    ref = run_tool(NILEARN, root, work / "nilearn")
    ours = run_tool(BIDSGLM, root, work / "bidsglm")
    print(f"{'':10s} {'wall s':>8s} {'cpu s':>8s} {'peak MB':>8s}")
    for name, r in (("nilearn", ref), ("bidsglm", ours)):
        print(f"{name:10s} {r['wall']:8.1f} {r['cpu']:8.1f} {r['maxrss_mb']:8.0f}")
    print(f"{'ratio':10s} {ref['wall'] / ours['wall']:7.1f}x {ref['cpu'] / ours['cpu']:7.1f}x "
          f"{ref['maxrss_mb'] / ours['maxrss_mb']:7.1f}x  (nilearn / bidsglm)")
    for name in CONTRASTS:  # a few elements whose AR(1) coefficient falls on a bin edge may differ more
        a = np.load(work / "nilearn" / f"{name}_z.npy")
        path = next((work / "bidsglm").rglob(f"*_run-1_*contrast-{name}_stat-z_statmap.dscalar.nii"))
        diff = np.abs(a - nib.load(path).get_fdata()[0])
        print(f"contrast {name}: |z difference| 99.9th percentile {np.percentile(diff, 99.9):.1e}, "
              f"max {diff.max():.1e}, elements above 1e-4: {int((diff > 1e-4).sum())} of {diff.size}")


def bench_kernels(n_maps: int) -> None:
    import scipy.sparse as sp
    from scipy import ndimage

    from bidsglm import clusterkernels as ck
    from bidsglm import surfaces

    geom = surfaces.Geometry("cifti", GRAYORDINATES, brain_models=brain_models())
    mesh = surfaces.geometry_mesh(geom)
    surface_table = mesh.neighbours
    # a volume mask of the same element count: the most central voxels of a box
    shape = (70, 84, 70)
    centre = (np.array(shape) - 1) / 2
    distance = np.linalg.norm((np.indices(shape).reshape(3, -1).T - centre) * [1.0, 0.85, 1.1], axis=1)
    mask = np.zeros(int(np.prod(shape)), bool)
    mask[np.argsort(distance, kind="stable")[:GRAYORDINATES]] = True
    mask = mask.reshape(shape)
    volume_table = ck.neighbour_table(mask, 6)
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(GRAYORDINATES), surface_table.shape[1])
    cols = surface_table.ravel()
    keep = cols >= 0
    graph = sp.csr_matrix((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(GRAYORDINATES,) * 2)
    walk = sp.diags(1.0 / (np.asarray(graph.sum(1)).ravel() + 1)) @ (graph + sp.identity(GRAYORDINATES))

    def surface_map():
        x = rng.standard_normal(GRAYORDINATES)
        for _ in range(6):
            x = walk @ x
        return x / x.std() * 1.5

    def volume_map():
        v = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)[mask]
        return v / v.std() * 1.5

    threshold = 3.1
    print(f"kernels: {GRAYORDINATES} elements; surface graph width {surface_table.shape[1]}, volume 6")
    print(f"{'per map (ms)':22s} {'surface':>9s} {'volume':>9s} {'ratio':>7s}")
    maps = {"surface": [surface_map() for _ in range(n_maps)], "volume": [volume_map() for _ in range(n_maps)]}
    tables = {"surface": surface_table, "volume": volume_table}
    timings = {}
    for what, fn in (("TFCE (max)", lambda v, t, e: ck.tfce_max(v, t, True, e, 2.0, 0.1)),
                     ("cluster size and mass", lambda v, t, e: ck.max_cluster_size_mass(v, t, threshold, True))):
        for kind in ("surface", "volume"):
            extent = surfaces.SURFACE_TFCE_E if kind == "surface" else 0.5
            fn(maps[kind][0], tables[kind], extent)  # compile / warm up
            t = time.perf_counter()
            for v in maps[kind]:
                fn(v, tables[kind], extent)
            timings[kind] = (time.perf_counter() - t) / n_maps * 1e3
        print(f"{what:22s} {timings['surface']:9.2f} {timings['volume']:9.2f} "
              f"{timings['surface'] / timings['volume']:6.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volumes", type=int, default=300)
    p.add_argument("--maps", type=int, default=40)
    p.add_argument("--only", nargs="+", choices=["run", "kernels"], default=["run", "kernels"])
    args = p.parse_args()
    if "kernels" in args.only:
        bench_kernels(args.maps)
    if "run" in args.only:
        bench_run(args.volumes)


if __name__ == "__main__":
    main()
