"""A whole study, end to end: bidsglm's participant and group levels against the nilearn way.

Generates a flanker study as fMRIPrep would leave it (26 subjects x 2 runs of 150
volumes on the MNI 2 mm grid with nilearn's brain mask, TR 2 s, float32
``.nii.gz``): each subject's real flanker timing from the packaged demo (8 subjects'
files, reused with jittered onsets and shuffled trial order beyond the 8th), smooth
AR(1) noise and activation blobs whose amplitudes differ by subject. To save
generation time the runs share one pool of noise volumes, each run taking it from
its own starting volume, with its own sign and scaling, so every subject's maps
differ. As in fMRIPrep's template-space outputs, voxels far from the brain (beyond 5
voxels of the mask, more than the smoothing kernel reaches) are 0, and intensities are
stored to 1/8 (noise is about 24): both keep the study about 5 GB on disk at full size.
Then, each stage in its own process:

    bidsglm participant   --n-cpus 2, contrast incongruent - congruent (correct trials),
                          6 mm, cosine drift, AR(1), six motion confounds, reports on
    bidsglm group         one-sample t-test, --permutations 10000 --tfce (voxel,
                          cluster size and mass, TFCE), --n-cpus 2, reports on

and the same study the way the seed notebooks do it with nilearn (0.14): per run a
FirstLevelModel (same settings) and its contrast, compute_fixed_effects over the
subject's runs, SecondLevelModel (intercept) and non_parametric_inference
(two-sided, TFCE and clusters at p < 0.001, n_jobs 2). nilearn is measured on a
sample and extrapolated, which the output says: the first level on
--nilearn-sample subjects (one at a time, as the notebooks loop) scaled to all
subjects; the group fit on every subject's effect map (bidsglm's subject maps, the
same quantity: nilearn's time does not depend on the values); the permutations
with 1 and with --nilearn-permutations permutations, the difference giving the cost
of one permutation, scaled to --permutations. nilearn writes no reports.

Wall time, CPU time (the process and the children it waited for) and peak memory
(largest resident set of the stage's processes, from wait4; at least the benchmark's own,
about 150 MB, which a forked child starts from) are printed per stage.
The machine's load average is printed too: wall times under load are not
comparable with an idle machine's; CPU times are steadier.

    python benchmarks/bench_study.py                      # full size: ~5 GB written, under an hour
    python benchmarks/bench_study.py --subjects 3 --volumes 40 --voxel-size 4 --permutations 100 \\
        --nilearn-sample 1 --nilearn-permutations 3        # toy size: under a minute
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
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
from scipy import ndimage
from scipy.ndimage import gaussian_filter

TR = 2.0
TASK = "flanker"
SPACE = "MNI152NLin2009cAsym"
CONTRAST = ("incongruentMinusCongruent", "incongruent_correct - congruent_correct")
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
# activation blobs (MNI mm, radius mm): percent signal change for congruent, extra for incongruent
BLOBS = [((0, 20, 40), 10, 0.6, 0.5), ((-40, -50, 45), 10, 0.5, 0.3), ((40, -50, 45), 10, 0.5, 0.3),
         ((0, -85, 0), 14, 1.0, 0.0)]


# --- generating the study ------------------------------------------------------------------

def _events(subject: int, run: int, n_vol: int, rng) -> pd.DataFrame:
    """Real flanker timing of packaged subject (subject % 8) + 1; beyond the eighth subject
    the onsets are jittered (+-1 s) and the trial order shuffled, so designs differ."""
    from bidsglm.demo import _events_dir

    source = _events_dir() / f"sub-{subject % 8 + 1:02d}_task-{TASK}_run-{run}_events.tsv"
    events = pd.read_csv(source, sep="\t")[["onset", "duration", "trial_type"]]
    if subject >= 8:
        events["onset"] = np.maximum(events["onset"] + rng.uniform(-1, 1, len(events)), 0).round(2)
        events["trial_type"] = rng.permutation(events["trial_type"].to_numpy())
    return events[events["onset"] < n_vol * TR - 12].reset_index(drop=True)


def _blob_maps(mask_img) -> tuple[np.ndarray, np.ndarray]:
    """(congruent, incongruent - congruent) percent signal change maps, smooth blobs."""
    shape = mask_img.shape
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ mask_img.affine[:3, :3].T + mask_img.affine[:3, 3]
    base, extra = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for centre, radius, amp, diff in BLOBS:
        weight = np.exp(-np.sum((xyz - centre) ** 2, axis=1) / (2 * (radius / 2) ** 2)).reshape(shape)
        base += amp * weight
        extra += diff * weight
    return base, extra


def _noise_pool(shape, mask, n_vol: int, rng) -> np.ndarray:
    """(n_vol, X, Y, Z) smooth AR(1) noise (0.3), shared by every run."""
    pool = np.empty((n_vol,) + shape, np.float32)
    prev = np.zeros(shape, np.float32)
    for t in range(n_vol):
        white = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5) * 3.0
        prev = 0.3 * prev + 0.954 * white
        pool[t] = prev
    return pool


def _regressors(events: pd.DataFrame, n_vol: int) -> dict[str, np.ndarray]:
    from nilearn.glm.first_level import make_first_level_design_matrix

    frames = np.arange(n_vol) * TR
    dm = make_first_level_design_matrix(frames, events, hrf_model="glover", drift_model=None)
    return {c: dm[c].to_numpy(np.float32) for c in ("congruent_correct", "incongruent_correct") if c in dm}


def _save_gz(img, path: Path) -> None:
    """Write a .nii.gz with ISA-L (level 1): zlib would make generation the slowest step."""
    from isal import igzip

    with igzip.open(path, "wb", compresslevel=1) as f:
        f.write(img.to_bytes())


def make_study(root: Path, n_subjects: int, n_vol: int, voxel: int, seed: int = 0) -> None:
    from nilearn.datasets import load_mni152_brain_mask

    from bidsglm.demo import _confounds

    rng = np.random.default_rng(seed)
    mask_img = load_mni152_brain_mask(resolution=voxel)
    mask = np.asanyarray(mask_img.dataobj) > 0
    shape = mask.shape
    head = ndimage.binary_dilation(mask, iterations=5)
    base = (gaussian_filter(np.where(mask, 800.0, 60.0), 1.5) * head).astype(np.float32)
    congruent, difference = _blob_maps(mask_img)
    pool = _noise_pool(shape, mask, n_vol, rng)
    deriv_root = root / "derivatives" / "fmriprep"
    deriv_root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "study", "BIDSVersion": "1.10.0"}))
    (deriv_root / "dataset_description.json").write_text(
        json.dumps({"Name": "study", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    (root / f"task-{TASK}_bold.json").write_text(json.dumps({"TaskName": TASK, "RepetitionTime": TR}))
    pd.DataFrame({"participant_id": [f"sub-{s + 1:02d}" for s in range(n_subjects)]}).to_csv(
        root / "participants.tsv", sep="\t", index=False)
    mask_out = nib.Nifti1Image(mask.astype(np.uint8), mask_img.affine)
    for s in range(n_subjects):
        sub = f"sub-{s + 1:02d}"
        gain = rng.uniform(0.5, 1.5)  # subject's activation amplitude
        for run in (1, 2):
            events = _events(s, run, n_vol, rng)
            func = root / sub / "func"
            deriv = deriv_root / sub / "func"
            func.mkdir(parents=True, exist_ok=True)
            deriv.mkdir(parents=True, exist_ok=True)
            events.to_csv(func / f"{sub}_task-{TASK}_run-{run}_events.tsv", sep="\t", index=False)
            start = int(rng.integers(n_vol))
            noise_scale = rng.uniform(0.8, 1.2) * rng.choice([-1.0, 1.0])
            reg = _regressors(events, n_vol)
            bold = np.empty(shape + (n_vol,), np.float32)
            for t in range(n_vol):
                signal = noise_scale * pool[(start + t) % n_vol]
                signal += 100 * gain * (congruent * reg.get("congruent_correct", np.zeros(n_vol))[t]
                                        + (congruent + difference)
                                        * reg.get("incongruent_correct", np.zeros(n_vol))[t])
                bold[..., t] = np.round(base * (1 + 0.01 * signal) * 8) / 8
            prefix = deriv / f"{sub}_task-{TASK}_run-{run}_space-{SPACE}"
            img = nib.Nifti1Image(bold, mask_img.affine)
            img.header.set_zooms((voxel,) * 3 + (TR,))
            img.header.set_xyzt_units("mm", "sec")
            _save_gz(img, Path(f"{prefix}_desc-preproc_bold.nii.gz"))
            nib.save(mask_out, f"{prefix}_desc-brain_mask.nii.gz")
            _confounds(rng, n_vol, outliers=False).to_csv(
                deriv / f"{sub}_task-{TASK}_run-{run}_desc-confounds_timeseries.tsv", sep="\t", index=False,
                na_rep="n/a")


# --- running stages --------------------------------------------------------------------------

def run_stage(args: list[str]) -> dict:
    """Run a command; its wall time, CPU time and peak memory (wait4: the process and the
    children it waited for; peak = the largest of them) and its last stdout line."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(args, stdout=out_file, stderr=err_file, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child (Popen.wait would reap it)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:6])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
            "out": json.loads(last) if last.startswith("{") else {}}


def bidsglm_participant(root: Path, out: Path, cpus: int) -> dict:
    return run_stage([sys.executable, "-m", "bidsglm", str(root), str(out), "participant", "--skip-bids-validation",
                      "-q", "--n-cpus", str(cpus), "--contrast", f"{CONTRAST[0]}={CONTRAST[1]}"])


def bidsglm_group(root: Path, out: Path, cpus: int, permutations: int) -> dict:
    return run_stage([sys.executable, "-m", "bidsglm", str(root), str(out), "group", "-q", "--n-cpus", str(cpus),
                      "--permutations", str(permutations), "--tfce", "--random-seed", "1"])


NILEARN_FIRST = textwrap.dedent("""
    import json, sys, time, warnings
    import pandas as pd
    from nilearn.glm import compute_fixed_effects
    from nilearn.glm.first_level import FirstLevelModel
    warnings.simplefilter("ignore")
    root, out, subjects = sys.argv[1], sys.argv[2], sys.argv[3:]
    t0 = time.perf_counter()
    for sub in subjects:
        effects, variances = [], []
        for run in (1, 2):
            d = f"{root}/derivatives/fmriprep/{sub}/func/{sub}_task-%(task)s_run-{run}_"
            conf = pd.read_csv(d + "desc-confounds_timeseries.tsv", sep="\\t")[%(motion)r]
            events = pd.read_csv(f"{root}/{sub}/func/{sub}_task-%(task)s_run-{run}_events.tsv", sep="\\t")
            model = FirstLevelModel(t_r=%(tr)r, slice_time_ref=0.0, hrf_model="glover", drift_model="cosine",
                                    high_pass=1 / 128, noise_model="ar1", smoothing_fwhm=6.0, minimize_memory=True,
                                    mask_img=d + "space-%(space)s_desc-brain_mask.nii.gz")
            model.fit(d + "space-%(space)s_desc-preproc_bold.nii.gz", events=events, confounds=conf)
            maps = model.compute_contrast(%(expr)r, output_type="all")
            effects.append(maps["effect_size"])
            variances.append(maps["effect_variance"])
        fixed = compute_fixed_effects(effects, variances, model.masker_)
        fixed[0].to_filename(f"{out}/{sub}_effect.nii.gz")
    print(json.dumps({"seconds": time.perf_counter() - t0}))
""") % {"task": TASK, "motion": MOTION, "tr": TR, "space": SPACE, "expr": CONTRAST[1]}

NILEARN_GROUP = textwrap.dedent("""
    import json, sys, time, warnings
    import pandas as pd
    from nilearn.glm.second_level import SecondLevelModel, non_parametric_inference
    warnings.simplefilter("ignore")
    mask, n_perm, jobs, maps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    design = pd.DataFrame({"intercept": [1.0] * len(maps)})
    t0 = time.perf_counter()
    if n_perm == 0:
        model = SecondLevelModel(mask_img=mask).fit(maps, design_matrix=design)
        model.compute_contrast("intercept", output_type="all")
    else:
        non_parametric_inference(maps, design_matrix=design, second_level_contrast="intercept", mask=mask,
                                 n_perm=n_perm, two_sided_test=True, random_state=0, n_jobs=jobs,
                                 threshold=0.001, tfce=True, verbose=0)
    print(json.dumps({"seconds": time.perf_counter() - t0}))
""")


def nilearn_first_level(root: Path, out: Path, subjects: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return run_stage([sys.executable, "-c", NILEARN_FIRST, str(root), str(out)] + subjects)


def nilearn_group(mask: Path, maps: list[Path], n_perm: int, jobs: int) -> dict:
    return run_stage([sys.executable, "-c", NILEARN_GROUP, str(mask), str(n_perm), str(jobs)] + [str(m) for m in maps])


def subject_effect_maps(out: Path) -> list[Path]:
    maps = sorted(p for p in out.glob(f"sub-*/**/sub-*_task-{TASK}_*contrast-{CONTRAST[0]}_stat-effect_statmap.nii.gz")
                  if "_run-" not in p.name)
    return maps


# --- the report ---------------------------------------------------------------------------------

def _row(name: str, r: dict, note: str = "") -> str:
    return f"{name:44s} {r['wall']:9.1f} {r['cpu']:9.1f} {r['peak_mb']:8.0f}  {note}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=26)
    p.add_argument("--volumes", type=int, default=150)
    p.add_argument("--voxel-size", type=int, default=2, help="MNI grid (nilearn's brain mask): 2 mm, or 3/4 to try")
    p.add_argument("--permutations", type=int, default=10_000)
    p.add_argument("--n-cpus", type=int, default=2, help="bidsglm --n-cpus and nilearn's n_jobs (default: 2)")
    p.add_argument("--nilearn-sample", type=int, default=2, help="subjects fitted by nilearn (default: 2)")
    p.add_argument("--nilearn-permutations", type=int, default=5,
                   help="permutations run by nilearn to measure one permutation's cost (default: 5)")
    p.add_argument("--keep", type=Path, help="folder for the study and outputs (default: temporary, removed)")
    p.add_argument("--skip-nilearn", action="store_true")
    args = p.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bidsglm-study-"))
    root, out = work / "bids", work / "bidsglm"
    try:
        if not (root / "dataset_description.json").exists():
            t = time.perf_counter()
            # in a process of its own: a child forked later from a process that once held the
            # generated volumes would inherit that high-water mark in its ru_maxrss (Linux)
            maker = multiprocessing.get_context("spawn").Process(
                target=make_study, args=(root, args.subjects, args.volumes, args.voxel_size))
            maker.start()
            maker.join()
            if maker.exitcode:
                raise SystemExit(f"generating the study failed ({maker.exitcode})")
            print(f"generated {args.subjects} subjects x 2 runs x {args.volumes} volumes at {args.voxel_size} mm "
                  f"in {time.perf_counter() - t:.0f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        report(args, root, out, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def report(args, root: Path, out: Path, work: Path) -> None:
    mask_path = next(root.rglob("*desc-brain_mask.nii.gz"))
    n_vox = int((np.asanyarray(nib.load(mask_path).dataobj) > 0).sum())
    load_before = os.getloadavg()
    print(f"{args.subjects} subjects x 2 runs x {args.volumes} volumes, {n_vox} brain voxels; "
          f"{args.n_cpus} CPUs; {args.permutations} permutations with TFCE; load average "
          f"{load_before[0]:.1f} (1 min) on {os.cpu_count()} cores", flush=True)
    header = f"{'stage':44s} {'wall s':>9s} {'CPU s':>9s} {'peak MB':>8s}"
    print(header)
    part = bidsglm_participant(root, out, args.n_cpus)
    print(_row("bidsglm participant (fit + reports)", part), flush=True)
    group = bidsglm_group(root, out, args.n_cpus, args.permutations)
    print(_row("bidsglm group (one-sample, TFCE, reports)", group), flush=True)
    ours = {"wall": part["wall"] + group["wall"], "cpu": part["cpu"] + group["cpu"],
            "peak_mb": max(part["peak_mb"], group["peak_mb"])}
    print(_row("bidsglm whole study", ours), flush=True)
    if args.skip_nilearn:
        return
    subjects = [f"sub-{s + 1:02d}" for s in range(min(args.nilearn_sample, args.subjects))]
    scale_first = args.subjects / len(subjects)
    first = nilearn_first_level(root, work / "nilearn", subjects)
    first_all = _scaled(first, scale_first)
    print(_row(f"nilearn first level + fixed effects", first_all,
               f"measured on {len(subjects)} subject(s): {first['wall']:.1f} s wall, x {scale_first:.1f}"), flush=True)
    maps = subject_effect_maps(out)
    fit = nilearn_group(mask_path, maps, 0, args.n_cpus)
    print(_row(f"nilearn SecondLevelModel ({len(maps)} maps)", fit), flush=True)
    one = nilearn_group(mask_path, maps, 1, args.n_cpus)
    some = nilearn_group(mask_path, maps, args.nilearn_permutations, args.n_cpus)
    per = {key: max(some[key] - one[key], 0.0) / (args.nilearn_permutations - 1) for key in ("wall", "cpu")}
    perms = {key: one[key] - per[key] + args.permutations * per[key] for key in ("wall", "cpu")}
    perms["peak_mb"] = max(one["peak_mb"], some["peak_mb"])
    print(_row("nilearn non_parametric_inference (TFCE)", perms,
               f"start-up + {args.permutations} x {per['wall']:.2f} s (measured with 1 and "
               f"{args.nilearn_permutations})"), flush=True)
    theirs = {key: first_all[key] + fit[key] + perms[key] for key in ("wall", "cpu")}
    theirs["peak_mb"] = max(first["peak_mb"], fit["peak_mb"], perms["peak_mb"])
    print(_row("nilearn whole study (extrapolated)", theirs), flush=True)
    print(f"{'ratio (nilearn / bidsglm)':44s} {theirs['wall'] / ours['wall']:8.1f}x {theirs['cpu'] / ours['cpu']:8.1f}x")
    load_after = os.getloadavg()
    print(f"load average at the end {load_after[0]:.1f} (1 min), {load_after[2]:.1f} (15 min)")


def _scaled(r: dict, factor: float) -> dict:
    return {"wall": r["wall"] * factor, "cpu": r["cpu"] * factor, "peak_mb": r["peak_mb"]}


if __name__ == "__main__":
    main()
