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


# --- outputs that travel (issue 16) -----------------------------------------------------

def _description(out: Path) -> dict:
    return json.loads((out / "dataset_description.json").read_text())


def test_side_by_side_sources_are_linked_relatively(tmp_path):
    raw = tmp_path / "site" / "raw"
    (raw / "derivatives" / "fmriprep").mkdir(parents=True)
    (raw / "dataset_description.json").write_text("{}")
    ensure_dataset(tmp_path / "site" / "out", {"raw": raw, "fmriprep": raw / "derivatives" / "fmriprep"})
    desc = _description(tmp_path / "site" / "out")
    assert desc["DatasetLinks"] == {"raw": "../raw", "fmriprep": "../raw/derivatives/fmriprep"}
    assert desc["SourceDatasets"] == [{"URL": "../raw"}, {"URL": "../raw/derivatives/fmriprep"}]
    # the links still lead to the sources once both folders move together
    (tmp_path / "site").rename(tmp_path / "elsewhere")
    moved = tmp_path / "elsewhere" / "out"
    assert (moved / desc["DatasetLinks"]["raw"] / "dataset_description.json").is_file()
    assert (moved / desc["DatasetLinks"]["fmriprep"]).is_dir()


def test_distant_sources_are_named_by_their_doi(tmp_path):
    raw = tmp_path / "a" / "b" / "raw"
    raw.mkdir(parents=True)
    (raw / "dataset_description.json").write_text(json.dumps(
        {"Name": "Flanker task", "BIDSVersion": "1.8.0", "DatasetDOI": "doi:10.18112/openneuro.ds000102.v1.0.1"}))
    prep = tmp_path / "a" / "c" / "fmriprep"  # no description: nothing but its location is known
    out = tmp_path / "x" / "out"
    ensure_dataset(out, {"raw": raw, "fmriprep": prep})
    desc = _description(out)
    assert desc["DatasetLinks"]["raw"] == "doi:10.18112/openneuro.ds000102.v1.0.1"
    assert desc["SourceDatasets"][0] == {"Name": "Flanker task", "DOI": "doi:10.18112/openneuro.ds000102.v1.0.1"}
    assert desc["DatasetLinks"]["fmriprep"] == prep.absolute().as_uri()


def test_container_mounts_are_not_linked_relatively():
    """/data and /out inside a container share only the filesystem root: '../data' would mean
    nothing on the host, so such a source is not linked relatively."""
    from bidsglm.outputs import source_link

    assert source_link(Path("/data"), Path("/out")) == "file:///data"
    assert source_link(Path("/data/derivatives/fmriprep"), Path("/out")) == "file:///data/derivatives/fmriprep"
    assert source_link(Path("/work/raw"), Path("/work/out")) == "../raw"


def test_masks_are_gzipped_without_a_time_stamp(demo_results):
    import gzip
    import struct

    _, out, _ = demo_results
    masks = sorted(out.rglob("*_mask.nii.gz"))
    assert masks
    for path in masks + sorted(out.rglob("*_statmap.nii.gz"))[:3]:
        header = path.read_bytes()[:10]
        assert header[:2] == b"\x1f\x8b" and struct.unpack("<I", header[4:8])[0] == 0, path.name
        gzip.decompress(path.read_bytes())  # and still valid gzip


def test_validator_checks_everything_but_the_statistical_maps(demo_results, tmp_path):
    """.bidsignore hides only names the schema cannot describe (statmaps, designs, reports,
    the group level), so the validator checks dataset_description.json, README.md and every
    brain mask: exactly those files are counted, and none is an error."""
    import os
    import shutil
    import subprocess

    from bidsglm.validation import validator_command

    if validator_command() is None:
        pytest.skip("bids-validator-deno not installed")
    _, out, _ = demo_results
    work = tmp_path / "out"
    shutil.copytree(out, work)
    proc = subprocess.run([validator_command(), "--format", "json", str(work)], capture_output=True, text=True,
                          env={**os.environ, "DENO_DIR": str(tmp_path / "deno")})
    report = json.loads(proc.stdout)
    issues = report["issues"]["issues"]
    assert [i for i in issues if i["severity"] == "error"] == []
    assert not [i for i in issues if i["code"] == "GZIP_HEADER_MTIME"]
    checked = ["dataset_description.json", "README.md"] + sorted(work.rglob("*_mask.nii.gz"))
    assert len(checked) > 2
    assert report["summary"]["totalFiles"] == len(checked)
    # the masks are looked at: their missing recommended sidecar fields are reported
    warned = {i.get("location", "") for i in issues}
    assert any(loc.endswith("_desc-brain_mask.nii.gz") for loc in warned)
