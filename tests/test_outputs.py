"""Atomic writes and concurrent jobs sharing OUTPUT_DIR."""

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from bidsglm import outputs
from bidsglm.errors import UsageError
from bidsglm.outputs import atomic_write_bytes, ensure_dataset


def _describe(out: str, i: int) -> None:
    links = {"raw": Path("/data/raw"), "fmriprep": Path("/data/raw/derivatives/fmriprep")}
    for _ in range(20):
        ensure_dataset(Path(out), links)


def test_concurrent_jobs_keep_dataset_description_valid(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_describe, args=(str(tmp_path), i)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "a" / "map.nii.gz"
    atomic_write_bytes(target, b"old")

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"  # the finished file is untouched
    assert [p.name for p in target.parent.iterdir()] == ["map.nii.gz"]  # no temporary left


def test_refuses_foreign_output_dataset(tmp_path):
    (tmp_path / "dataset_description.json").write_text(json.dumps(
        {"Name": "fmriprep", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]}))
    with pytest.raises(UsageError, match="another dataset"):
        ensure_dataset(tmp_path, {"raw": Path("/x")})
