"""Participant level on a Dask cluster (--dask-scheduler): a LocalCluster with two small worker
processes gives the local run's files, byte for byte; a failing run refuses as locally and
leaves nothing; finished runs are not sent again."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest

from bidsglm.cli import main

distributed = pytest.importorskip("distributed")

RUN1_BOLD = ("derivatives/fmriprep/sub-01/func/"
             "sub-01_task-flanker_run-1_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz")
CONTRAST = ("--contrast", "IncongruentMinusCongruent=incongruent_correct - congruent_correct")


@pytest.fixture(scope="module")
def scheduler():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  memory_limit="1GiB") as cluster:
        yield cluster.scheduler_address


def _participant(bids, out, *options):
    return main([str(bids), str(out), "participant", "--skip-bids-validation", "-q", *CONTRAST, *options])


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_dask_run_writes_the_local_files(demo_small, scheduler, tmp_path, capsys):
    """Every file (maps, sidecars, designs, masks, fixed effects, dataset files) is the local
    run's byte for byte; a rerun sends nothing (every run already done) and changes nothing."""
    root, _ = demo_small
    local, remote = tmp_path / "local", tmp_path / "dask"
    assert _participant(root, local, "--n-cpus", "2") == 0
    assert _participant(root, remote, "--dask-scheduler", scheduler) == 0
    expected, got = _files(local), _files(remote)
    assert len(expected) > 40 and any(n.endswith("_stat-z_statmap.nii.gz") for n in expected)
    assert sorted(got) == sorted(expected)
    for name, data in expected.items():
        assert got[name] == data, name
    z = next(remote.rglob("*_run-1_*contrast-*_stat-z_statmap.nii.gz"))
    before = z.stat().st_mtime_ns
    capsys.readouterr()
    assert main([str(root), str(remote), "participant", "--skip-bids-validation", *CONTRAST,
                 "--dask-scheduler", scheduler]) == 0
    err = capsys.readouterr().err
    assert "sent to the Dask cluster" not in err and err.count("already done") == 4, err
    assert z.stat().st_mtime_ns == before


def test_failing_run_on_dask_refuses_and_leaves_nothing(demo_copy, scheduler, tmp_path, capsys):
    """A run that fails on a worker (constant BOLD, found only when fitted): exit 65, one line
    naming the file, as locally; OUTPUT_DIR is not left behind (no partial maps of other runs)."""
    path = demo_copy / RUN1_BOLD
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine, img.header), str(path))
    out = tmp_path / "out"
    assert _participant(demo_copy, out, "--dask-scheduler", scheduler) == 65
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "constant in time" in err[0] and RUN1_BOLD.rsplit("/", 1)[1] in err[0], err
    assert not out.exists()
    local = tmp_path / "local"
    assert _participant(demo_copy, local) == 65 and not local.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].split("ERROR: ")[1] == err[0].split("ERROR: ")[1]


def test_dask_option_usage_errors(demo_small, tmp_path, capsys, monkeypatch):
    import bidsglm.runner

    root, _ = demo_small
    monkeypatch.setattr(bidsglm.runner, "DASK_CONNECT_TIMEOUT_S", 2)
    assert _participant(root, tmp_path / "a", "--dask-scheduler", "tcp://127.0.0.1:9") == 64
    assert "cannot connect to a Dask scheduler" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if dask were not installed
    assert _participant(root, tmp_path / "b", "--dask-scheduler", "tcp://127.0.0.1:9") == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'bidsglm[dask]'" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_threaded_workers_in_this_process_give_the_same_files(demo_small, tmp_path):
    """Workers as threads of this very process (LocalCluster(processes=False)) share its output
    session: runs are staged inside OUTPUT_DIR's journal folder, and the files are the same."""
    root, _ = demo_small
    local, remote = tmp_path / "local", tmp_path / "dask"
    assert _participant(root, local, "--participant-label", "01") == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=":0") as cluster:
        assert _participant(root, remote, "--participant-label", "01",
                            "--dask-scheduler", cluster.scheduler_address) == 0
    assert _files(remote) == _files(local)


def test_interrupt_while_runs_come_back_leaves_nothing(demo_small, scheduler, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the first run's files are written here: exit 130, OUTPUT_DIR not left
    behind, whatever the workers still do."""
    import bidsglm.runner

    root, _ = demo_small
    real = bidsglm.runner._write_staged
    written = []

    def interrupt_second(*args):
        if written:
            raise KeyboardInterrupt
        written.append(real(*args))
        return written[-1]

    monkeypatch.setattr(bidsglm.runner, "_write_staged", interrupt_second)
    out = tmp_path / "out"
    assert _participant(root, out, "--dask-scheduler", scheduler) == 130
    assert "interrupted" in capsys.readouterr().err
    assert written and not out.exists()
