"""benchmarks/bench_study.py: the generated study is what the benchmark claims (every run's
data and design differ, fMRIPrep layout), and (slow) the whole benchmark runs at toy size."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_study.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_study_has_distinct_runs_in_fmriprep_layout(tmp_path):
    bench = _bench()
    bench.make_study(tmp_path, n_subjects=2, n_vol=40, voxel=4)
    deriv = tmp_path / "derivatives" / "fmriprep"
    bolds = sorted(deriv.glob("sub-*/func/*_desc-preproc_bold.nii.gz"))
    assert len(bolds) == 4 and len(list(deriv.glob("sub-*/func/*_desc-confounds_timeseries.tsv"))) == 4
    mask = np.asanyarray(nib.load(next(deriv.glob("sub-01/func/*_desc-brain_mask.nii.gz"))).dataobj) > 0
    data = [np.asanyarray(nib.load(b).dataobj)[mask] for b in bolds]
    assert all(d.shape == (mask.sum(), 40) and d.dtype == np.float32 for d in data)
    for i in range(len(data)):
        for j in range(i):
            assert np.abs(data[i] - data[j]).mean() > 1.0  # no two runs share their values
    events = pd.read_csv(tmp_path / "sub-01/func/sub-01_task-flanker_run-1_events.tsv", sep="\t")
    assert set(events["trial_type"]) >= {"congruent_correct", "incongruent_correct"}
    # beyond the 8 packaged subjects the timing is reused, jittered and shuffled
    rng = np.random.default_rng(0)
    first, ninth = bench._events(0, 1, 150, rng), bench._events(8, 1, 150, rng)
    assert not first["onset"].equals(ninth["onset"]) and len(first) == len(ninth)


@pytest.mark.slow
def test_benchmark_runs_at_toy_size(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--subjects", "3", "--volumes", "30", "--voxel-size", "4",
                           "--permutations", "20", "--nilearn-sample", "1", "--nilearn-permutations", "2",
                           "--keep", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("bidsglm participant", "bidsglm group", "nilearn first level", "nilearn whole study", "ratio"):
        assert row in proc.stdout
    assert "measured on 1 subject" in proc.stdout  # extrapolation is said
    assert len(list((tmp_path / "bidsglm" / "group").glob("*stat-tfce_statmap.nii.gz"))) == 1
