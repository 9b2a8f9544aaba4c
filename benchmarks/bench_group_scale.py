"""Group level against the number of maps, and the participant level on a Dask cluster.

Group: N subject effect maps (white noise plus a small mean, float32, MNI 2 mm grid in
nilearn's brain mask, 235,375 voxels; 200 distinct maps, hard-linked for the subjects
beyond, to save generation time and disk) are written as a participant level would
(subject maps, sidecars, brain masks, participants.tsv with an age column) into a
temporary OUTPUT_DIR, then ``bidsglm ... group --covariates age --permutations P``
(``--tfce``: with TFCE) runs in a fresh process per case, which reports its wall time and peak resident memory
(ru_maxrss). Modes: ``blocked`` (groupblocks.py, the default above
groupblocks.STREAM_ABOVE_BYTES), ``memory`` (the in-memory path, forced) and ``auto``.

Participant: the demo dataset (bidsglm.demo.make_demo) fitted with ``--n-cpus 2`` and on a
dask.distributed LocalCluster of 2 worker processes (1 thread each); runs per minute.

    python benchmarks/bench_group_scale.py group --subjects 100 500 --modes blocked memory
    python benchmarks/bench_group_scale.py group --subjects 2000 --modes blocked
    python benchmarks/bench_group_scale.py participant --subjects 4 --voxel-size 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TASK_SPACE = "task-scale_space-MNI152NLin2009cAsym"
POOL = 200  # distinct noise maps; subjects beyond share them (each with its own age)


def make_outputs(out: Path, n: int, voxel_size: int = 2, seed: int = 0) -> int:
    """A participant level's subject maps for N subjects; returns the voxels in the mask."""
    import pandas as pd
    from nilearn.datasets import load_mni152_brain_mask

    from bidsglm.images import nifti_bytes
    from bidsglm.outputs import atomic_write_bytes, atomic_write_json, ensure_dataset

    mask_img = load_mni152_brain_mask(resolution=voxel_size)
    mask = np.asanyarray(mask_img.dataobj) > 0
    affine = mask_img.affine
    ensure_dataset(out, {"raw": out.parent / "raw"})
    mask_bytes = nifti_bytes(mask.astype(np.float32), affine)
    rng = np.random.default_rng(seed)
    vol = np.zeros(mask.shape, np.float32)
    rows = []
    for s in range(1, n + 1):
        sub = f"{s:04d}"
        func = out / f"sub-{sub}" / "func"
        effect = func / f"sub-{sub}_{TASK_SPACE}_contrast-faces_stat-effect_statmap.nii.gz"
        if s <= POOL:
            vol[mask] = rng.normal(0.1, 1.0, int(mask.sum()))
            atomic_write_bytes(effect, nifti_bytes(vol, affine))
        else:  # to save time and disk: a hard link to an earlier subject's map (files read as many times)
            first = f"{(s - 1) % POOL + 1:04d}"
            func.mkdir(parents=True, exist_ok=True)
            os.link(out / f"sub-{first}" / "func" / effect.name.replace(sub, first), effect)
        atomic_write_json(effect.with_name(effect.name.replace(".nii.gz", ".json")),
                          {"Level": "subject", "Contrast": {"Name": "faces", "Label": "faces"}})
        atomic_write_bytes(func / f"sub-{sub}_{TASK_SPACE}_desc-brain_mask.nii.gz", mask_bytes)
        rows.append({"participant_id": f"sub-{sub}", "age": float(rng.uniform(20, 70))})
    pd.DataFrame(rows).to_csv(out / "participants.tsv", sep="\t", index=False)
    return int(mask.sum())


def run_group(out: Path, mode: str, permutations: int, n_cpus: int, tfce: bool) -> None:
    """Child process: the group level, then one JSON line with wall time and peak memory."""
    from bidsglm import groupblocks
    from bidsglm.cli import main

    if mode == "blocked":
        groupblocks.STREAM_ABOVE_BYTES = 0
    elif mode == "memory":
        groupblocks.STREAM_ABOVE_BYTES = float("inf")
    t0 = time.perf_counter()
    code = main([str(out.parent / "raw"), str(out), "group", "-q", "--covariates", "age", "--atlases", "none",
                 "--no-reports", "--permutations", str(permutations), "--random-seed", "1",
                 "--n-cpus", str(n_cpus), *(["--tfce"] if tfce else [])])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    print(json.dumps({"exit": code, "wall_s": round(wall, 1), "peak_gb": round(peak, 2)}))


def bench_group(args) -> None:
    print(f"{'maps':>6} {'voxels':>8} {'mode':>8} {'perms':>6} {'write maps':>10} {'group level':>12} "
          f"{'peak RSS':>9}")
    for n in args.subjects:
        with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
            out = Path(folder) / "glm"
            t0 = time.perf_counter()
            voxels = make_outputs(out, n, args.voxel_size)
            made = time.perf_counter() - t0
            for mode in args.modes:
                shutil.rmtree(out / "group", ignore_errors=True)
                child = subprocess.run([sys.executable, __file__, "_child", str(out), mode, str(args.permutations),
                                        str(args.n_cpus), str(int(args.tfce))], capture_output=True, text=True)
                lines = child.stdout.strip().splitlines()
                if child.returncode or not lines:
                    print(child.stdout, child.stderr, file=sys.stderr)
                    raise SystemExit(f"group level failed ({mode}, {n} maps)")
                res = json.loads(lines[-1])
                print(f"{n:>6} {voxels:>8} {mode + ('+tfce' if args.tfce else ''):>8} {args.permutations:>6} {made:>9.0f}s {res['wall_s']:>11.1f}s "
                      f"{res['peak_gb']:>7.2f}GB  exit {res['exit']}", flush=True)


def bench_participant(args) -> None:
    from distributed import LocalCluster

    from bidsglm.cli import main
    from bidsglm.demo import make_demo

    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        root = Path(folder) / "bids"
        make_demo(root, n_subjects=args.subjects[0], voxel_size=args.voxel_size, seed=3)
        n_runs = len(list(root.glob("derivatives/fmriprep/sub-*/func/*_desc-preproc_bold.nii.gz")))
        common = [str(root), None, "participant", "-q", "--skip-bids-validation", "--no-reports"]
        t0 = time.perf_counter()
        assert main([*common[:1], str(Path(folder) / "local"), *common[2:], "--n-cpus", "2"]) == 0
        local = time.perf_counter() - t0
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            t0 = time.perf_counter()
            assert main([*common[:1], str(Path(folder) / "dask"), *common[2:],
                         "--dask-scheduler", cluster.scheduler_address]) == 0
            remote = time.perf_counter() - t0
        print(f"{n_runs} runs at {args.voxel_size} mm: --n-cpus 2 {local:.1f} s ({60 * n_runs / local:.1f} runs/min); "
              f"LocalCluster 2 workers {remote:.1f} s ({60 * n_runs / remote:.1f} runs/min); "
              f"ratio {local / remote:.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _, _, out, mode, permutations, n_cpus, tfce = sys.argv
        run_group(Path(out), mode, int(permutations), int(n_cpus), tfce == "1")
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["group", "participant"])
    p.add_argument("--subjects", type=int, nargs="+", default=[100, 500, 2000])
    p.add_argument("--modes", nargs="+", default=["auto"], choices=["auto", "blocked", "memory"])
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--n-cpus", type=int, default=2)
    p.add_argument("--tfce", action="store_true", help="TFCE permutations too (group level)")
    p.add_argument("--voxel-size", type=int, default=2)
    p.add_argument("--tmp", default=None, help="where the temporary OUTPUT_DIR goes (needs ~1 MB per map)")
    args = p.parse_args()
    bench_group(args) if args.what == "group" else bench_participant(args)


if __name__ == "__main__":
    main()
