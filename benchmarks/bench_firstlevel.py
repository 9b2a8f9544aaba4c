"""One run, side by side: nilearn's FirstLevelModel against bidsglm's participant level.

Generates a realistic run (MNI 2 mm grid with nilearn's brain mask, 300
volumes, AR(1) noise with smooth spatial structure, real flanker timing,
fMRIPrep-style confounds) as a BIDS dataset, then runs each tool in its own
process (6 mm smoothing, cosine drift, AR(1), 3 contrasts) and prints wall
time, CPU time and peak memory (max RSS) with their ratios. Checks that the
z maps agree.

    python benchmarks/bench_firstlevel.py [--volumes 300] [--voxel-size 2] [--keep DIR] [--profile] [--with-reports]

With --with-reports bidsglm also writes its HTML report (the whole command as a user runs it).

With --keep, earlier outputs in DIR are deleted first (bidsglm would reuse them).

The full-size run needs about 8 GB of memory and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

CONTRASTS = {"congruent": "congruent_correct", "incongruent": "incongruent_correct",
             "difference": "incongruent_correct - congruent_correct"}
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def make_run(root: Path, n_vol: int, voxel: int, seed: int = 0) -> None:
    from nilearn.datasets import load_mni152_brain_mask

    from bidsglm.demo import _confounds, _events_dir

    rng = np.random.default_rng(seed)
    mask_img = load_mni152_brain_mask(resolution=voxel)
    mask = np.asanyarray(mask_img.dataobj) > 0
    shape = mask.shape
    ev = [pd.read_csv(_events_dir() / f"sub-01_task-flanker_run-{r}_events.tsv", sep="\t") for r in (1, 2)]
    ev[1]["onset"] += 146 * 2.0
    events = pd.concat(ev)[["onset", "duration", "trial_type"]]
    events = events[events["onset"] < n_vol * 2.0 - 10]
    bold = np.empty(shape + (n_vol,), np.float32)
    base = gaussian_filter(np.where(mask, 800.0, 60.0), 1.5).astype(np.float32)
    prev = np.zeros(shape, np.float32)
    for t in range(n_vol):  # AR(1) 0.3 in time, smooth in space
        white = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5) * 3.0
        prev = 0.3 * prev + 0.954 * white
        bold[..., t] = base * (1 + 0.01 * prev)
    sub = root / "sub-01" / "func"
    deriv = root / "derivatives" / "fmriprep" / "sub-01" / "func"
    sub.mkdir(parents=True)
    deriv.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.10.0"}))
    (root / "derivatives" / "fmriprep" / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    (root / "task-flanker_bold.json").write_text(json.dumps({"TaskName": "flanker", "RepetitionTime": 2.0}))
    events.to_csv(sub / "sub-01_task-flanker_run-1_events.tsv", sep="\t", index=False)
    prefix = deriv / "sub-01_task-flanker_run-1_space-MNI152NLin2009cAsym"
    img = nib.Nifti1Image(bold, mask_img.affine)
    img.header.set_zooms((voxel,) * 3 + (2.0,))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, f"{prefix}_desc-preproc_bold.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), mask_img.affine), f"{prefix}_desc-brain_mask.nii.gz")
    _confounds(rng, n_vol, outliers=False).to_csv(
        deriv / "sub-01_task-flanker_run-1_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")


NILEARN = textwrap.dedent("""
    import json, resource, sys, time
    import pandas as pd
    from nilearn.glm.first_level import FirstLevelModel
    root, out = sys.argv[1], sys.argv[2]
    d = root + "/derivatives/fmriprep/sub-01/func/sub-01_task-flanker_run-1_"
    t0, c0 = time.perf_counter(), time.process_time()
    conf = pd.read_csv(d + "desc-confounds_timeseries.tsv", sep="\\t")[%(motion)r]
    events = pd.read_csv(root + "/sub-01/func/sub-01_task-flanker_run-1_events.tsv", sep="\\t")
    model = FirstLevelModel(t_r=2.0, slice_time_ref=0.0, hrf_model="glover", drift_model="cosine",
                            high_pass=1 / 128, noise_model="ar1", smoothing_fwhm=6.0, minimize_memory=True,
                            mask_img=d + "space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz")
    model.fit(d + "space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz", events=events, confounds=conf)
    for name, expr in %(contrasts)r.items():
        maps = model.compute_contrast(expr, output_type="all")
        for kind in ("effect_size", "effect_variance", "z_score"):
            maps[kind].to_filename(f"{out}/{name}_{kind}.nii.gz")
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - t0 * 0 - c0,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""") % {"motion": MOTION, "contrasts": CONTRASTS}

BIDSGLM = textwrap.dedent("""
    import json, resource, sys, time
    t0, c0 = time.perf_counter(), time.process_time()
    from bidsglm.cli import main
    root, out, profile = sys.argv[1], sys.argv[2], "--profile" in sys.argv
    # nilearn draws no report; --with-reports times the whole command as a user runs it
    args = [root, out, "participant", "--skip-bids-validation", "-q"] + ([] if "--with-reports" in sys.argv else
                                                                          ["--no-reports"])
    for name, expr in %(contrasts)r.items():
        args += ["--contrast", f"{name}={expr}"]
    if profile:  # where the time goes: bidsglm's own functions by cumulative time
        import cProfile, io, pstats
        prof = cProfile.Profile()
        assert prof.runcall(main, args) == 0
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(r"bidsglm|nilearn/glm/__init__", 22)
        print(buf.getvalue(), file=sys.stderr)
    else:
        assert main(args) == 0
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""") % {"contrasts": CONTRASTS}


def run_tool(code: str, root: Path, out: Path, profile: bool = False, reports: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = ([sys.executable, "-c", code, str(root), str(out)] + (["--profile"] if profile else [])
           + (["--with-reports"] if reports else []))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    if profile:
        print(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volumes", type=int, default=300)
    p.add_argument("--voxel-size", type=int, default=2)
    p.add_argument("--keep", type=Path, help="folder for the data and outputs (default: temporary)")
    p.add_argument("--with-reports", action="store_true",
                   help="bidsglm also writes its HTML report (nilearn's side is unchanged: fit and maps)")
    p.add_argument("--profile", action="store_true",
                   help="also run bidsglm once more under cProfile and print where its time goes "
                        "(the inflating thread is not profiled; its time overlaps smoothing)")
    args = p.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bidsglm-bench-"))
    root = work / "bids"
    if not (root / "dataset_description.json").exists():
        t = time.perf_counter()
        make_run(root, args.volumes, args.voxel_size)
        print(f"generated {args.volumes} volumes at {args.voxel_size} mm in {time.perf_counter() - t:.0f} s")
    bold = next(root.rglob("*desc-preproc_bold.nii.gz"))
    mask = nib.load(next(root.rglob("*desc-brain_mask.nii.gz")))
    print(f"BOLD {nib.load(bold).shape}, {int(np.asanyarray(mask.dataobj).sum())} brain voxels, "
          f"{bold.stat().st_size / 1e6:.0f} MB compressed")
    for old in (work / "nilearn", work / "bidsglm"):
        shutil.rmtree(old, ignore_errors=True)
    ref = run_tool(NILEARN, root, work / "nilearn")
    ours = run_tool(BIDSGLM, root, work / "bidsglm", reports=args.with_reports)
    print(f"{'':10s} {'wall s':>8s} {'cpu s':>8s} {'peak MB':>8s}")
    for name, r in (("nilearn", ref), ("bidsglm", ours)):
        print(f"{name:10s} {r['wall']:8.1f} {r['cpu']:8.1f} {r['maxrss_mb']:8.0f}")
    print(f"{'ratio':10s} {ref['wall'] / ours['wall']:7.1f}x {ref['cpu'] / ours['cpu']:7.1f}x "
          f"{ref['maxrss_mb'] / ours['maxrss_mb']:7.1f}x  (nilearn / bidsglm)")
    m = np.asanyarray(mask.dataobj) > 0
    worst = 0.0
    for name in CONTRASTS:
        a = nib.load(work / "nilearn" / f"{name}_z_score.nii.gz").get_fdata()[m]
        b = nib.load(next((work / "bidsglm").rglob(f"*_run-1_*contrast-{name}_stat-z_statmap.nii.gz"))).get_fdata()[m]
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"max |z difference| over {len(CONTRASTS)} contrasts: {worst:.2e}")
    if args.profile:
        shutil.rmtree(work / "bidsglm-profile", ignore_errors=True)
        run_tool(BIDSGLM, root, work / "bidsglm-profile", profile=True)


if __name__ == "__main__":
    main()
