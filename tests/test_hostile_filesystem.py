"""Hostile file systems and processes (issue 14): writes stay inside OUTPUT_DIR and out of every
input dataset (symbolic links resolved), the user's environment gets exit 73 (cannot create
output) or 64 (usage), interrupts exit 130/143, and a failed or interrupted invocation leaves
OUTPUT_DIR exactly as it was. Every case checks the exit code, one error line without a
traceback, BIDS_DIR (with fMRIPrep's derivatives) byte-identical, and nothing new in OUTPUT_DIR."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bidsglm import outputs
from bidsglm.cli import main
from bidsglm.errors import OutputError, UsageError
from bidsglm.outputs import OutputSession, atomic_write_bytes, output_session

from conftest import write_participant_outputs

FMRIPREP = ("derivatives", "fmriprep")
BOLD = "sub-02_task-flanker_run-2_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
PARTICIPANT = ("participant", "--skip-bids-validation", "-q", "--contrast", "congruent_correct")


def tree(root: Path) -> dict:
    """Every file and link under ``root`` (hidden ones too) with its content hash or link target."""
    if not os.path.lexists(root):
        return {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line(err: str, *fragments) -> None:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    assert len(errors) == 1, err
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])


@pytest.fixture
def bids(demo_copy):
    """A writable copy of the demo and the hashes of all its files (fMRIPrep's included)."""
    return demo_copy, tree(demo_copy)


@pytest.fixture(scope="module")
def earlier_results(demo_small, tmp_path_factory):
    """OUTPUT_DIR as a complete earlier participant-level run left it."""
    root, _ = demo_small
    out = tmp_path_factory.mktemp("earlier") / "glm"
    assert main([str(root), str(out), *PARTICIPANT]) == 0
    return out


# --- writes only inside OUTPUT_DIR, never into an input dataset ---------------------------

@pytest.mark.parametrize("link", ["subject", "func"])
def test_symlinked_output_folder_into_the_inputs_is_refused(capsys, bids, tmp_path, link):
    root, before = bids
    out = tmp_path / "out"
    if link == "subject":  # OUTPUT_DIR/sub-01 -> BIDS_DIR/sub-01
        out.mkdir()
        (out / "sub-01").symlink_to(root / "sub-01")
    else:  # OUTPUT_DIR/sub-01/func -> fMRIPrep's sub-01/func
        (out / "sub-01").mkdir(parents=True)
        (out / "sub-01" / "func").symlink_to(root.joinpath(*FMRIPREP, "sub-01", "func"))
    listing = tree(out)
    code, err = run_cli(capsys, root, out, *PARTICIPANT)
    assert code == 73
    assert_one_line(err, "refusing to write into the input dataset")
    assert tree(root) == before
    assert tree(out) == listing


def test_symlinked_folder_leading_out_of_output_dir_is_refused(capsys, bids, tmp_path):
    root, before = bids
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub-01").symlink_to(elsewhere)
    code, err = run_cli(capsys, root, out, *PARTICIPANT)
    assert code == 73
    assert_one_line(err, "refusing to write outside OUTPUT_DIR")
    assert tree(root) == before and tree(elsewhere) == {}
    assert [p.name for p in out.iterdir()] == ["sub-01"]


@pytest.mark.parametrize("layout", ["same", "inside-through-link", "contains-bids", "derivatives-inside"])
def test_output_dir_overlapping_an_input_dataset_is_a_usage_error(capsys, bids, tmp_path, layout):
    root, before = bids
    extra = []
    if layout == "same":
        out = root
    elif layout == "inside-through-link":  # OUTPUT_DIR itself a symlink into BIDS_DIR
        out = tmp_path / "out"
        out.symlink_to(root / "derivatives")
    elif layout == "contains-bids":
        out = root.parent
    else:  # the fMRIPrep dataset given with --derivatives lies inside OUTPUT_DIR
        out = tmp_path / "out"
        shutil.copytree(root.joinpath(*FMRIPREP), out / "fmriprep")
        extra = ["--derivatives", out / "fmriprep"]
    listing = tree(out)
    code, err = run_cli(capsys, root, out, *PARTICIPANT, *extra)
    assert code == 64
    assert_one_line(err, "input dataset")
    assert tree(root) == before
    assert tree(out) == listing


def test_symlinked_target_file_is_replaced_not_written_through(capsys, bids, earlier_results, tmp_path):
    """OUTPUT_DIR/.bidsignore -> BIDS_DIR/.bidsignore: the rename replaces the link."""
    root, _ = bids
    (root / ".bidsignore").write_text("extra/\n")
    before = tree(root)
    out = tmp_path / "glm"
    shutil.copytree(earlier_results, out, symlinks=True)
    (out / ".bidsignore").unlink()
    (out / ".bidsignore").symlink_to(root / ".bidsignore")
    code, err = run_cli(capsys, root, out, *PARTICIPANT)
    assert code == 0, err
    assert tree(root) == before
    assert not (out / ".bidsignore").is_symlink()
    assert (out / ".bidsignore").read_text() == outputs.BIDSIGNORE


def test_guard_at_the_write_primitive(tmp_path):
    """The last line of defence: with an active session every write is checked, also one the
    level's up-front checks did not foresee; a symlinked file name is replaced, not followed."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "sub-01").mkdir(parents=True)
    (raw / "keep.json").write_text("{}")
    with pytest.raises(OutputError, match="input dataset"):
        with output_session(out, [raw]):
            (out / "sub-01").symlink_to(raw / "sub-01")
            atomic_write_bytes(out / "sub-01" / "x.nii.gz", b"data")
    assert list((raw / "sub-01").iterdir()) == []
    assert [p.name for p in out.iterdir()] == ["sub-01"]  # the link, not made by the session, stays
    (out / "sub-01").unlink()
    out.rmdir()
    with pytest.raises(OutputError, match="outside OUTPUT_DIR"):
        with output_session(out, [raw]):
            atomic_write_bytes(out / ".." / "escaped.txt", b"data")
    assert not (tmp_path / "escaped.txt").exists()
    out.mkdir()
    (out / "keep.json").symlink_to(raw / "keep.json")
    with output_session(out, [raw]):
        atomic_write_bytes(out / "keep.json", b'{"new": 1}')
    assert (raw / "keep.json").read_text() == "{}"
    assert not (out / "keep.json").is_symlink() and (out / "keep.json").read_text() == '{"new": 1}'


# --- cannot create output: exit 73, checked before any work -----------------------------------

@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_output_dir_not_writable(capsys, bids, tmp_path):
    root, before = bids
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        for out in (parent, parent / "glm"):
            code, err = run_cli(capsys, root, out, *PARTICIPANT)
            assert code == 73
            assert_one_line(err, "permission denied", "--user $(id -u):$(id -g)")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
    assert tree(root) == before


def test_unwritable_output_dir_is_found_before_validation(capsys, bids, tmp_path, monkeypatch):
    """As root (containers) permissions are not enforced: simulate the refusal of the first write."""
    import bidsglm.validation

    root, before = bids

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    def validate(*args):
        raise AssertionError("validation ran before the output check")

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", refused)
    monkeypatch.setattr(bidsglm.validation, "validate_dataset", validate)
    out = tmp_path / "glm"
    code, err = run_cli(capsys, root, out, "participant", "-q")
    assert code == 73
    assert_one_line(err, str(out), "permission denied", "--user $(id -u):$(id -g)")
    assert not os.path.lexists(out) and tree(root) == before


def test_output_dir_is_a_file(capsys, bids, tmp_path):
    root, before = bids
    out = tmp_path / "glm"
    out.write_text("not a folder")
    code, err = run_cli(capsys, root, out, *PARTICIPANT)
    assert code == 73
    assert_one_line(err, "not a folder")
    assert out.read_text() == "not a folder" and tree(root) == before


def test_output_dir_name_too_long(capsys, bids, tmp_path):
    root, before = bids
    out = tmp_path / ("x" * 300)
    code, err = run_cli(capsys, root, out, *PARTICIPANT)
    assert code == 73
    assert_one_line(err, "name too long")
    assert list(tmp_path.iterdir()) == [root.parent / "bids"] or not os.path.lexists(out)
    assert tree(root) == before


def test_file_name_too_long_is_refused_before_fitting(capsys, bids, tmp_path, monkeypatch):
    import bidsglm.runner

    root, before = bids
    monkeypatch.setattr(bidsglm.runner, "fit_run", lambda *a: pytest.fail("fitted"))
    out = tmp_path / "glm"
    code, err = run_cli(capsys, root, out, *PARTICIPANT[:-1], "a" * 240 + "=congruent_correct")
    assert code == 73
    assert_one_line(err, "file name too long", "use shorter contrast names")
    assert not os.path.lexists(out) and tree(root) == before


def test_disk_full_midway_rolls_back_and_exits_73(capsys, bids, earlier_results, tmp_path, monkeypatch):
    """ENOSPC on the tenth file: exit 73 naming the file; the earlier results are as they were."""
    root, before = bids
    out = tmp_path / "glm"
    shutil.copytree(earlier_results, out, symlinks=True)
    listing = tree(out)
    real, calls = outputs._write_temporary, []

    def fills_up(path, data, folder):
        calls.append(path)
        if len(calls) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, folder)

    monkeypatch.setattr(outputs, "_write_temporary", fills_up)
    code, err = run_cli(capsys, root, out, *PARTICIPANT[:-1], "incongruent_correct")  # a new model
    assert code == 73
    assert_one_line(err, str(calls[-1].name), "no space left")
    assert tree(out) == listing
    assert tree(root) == before


def test_missing_bids_dir_is_a_usage_error(capsys, tmp_path):
    code, err = run_cli(capsys, tmp_path / "nope", tmp_path / "out", *PARTICIPANT)
    assert code == 64
    assert_one_line(err, "BIDS_DIR does not exist")
    assert not (tmp_path / "out").exists()


def test_derivatives_must_be_a_dataset_not_a_whole_file_system(capsys, bids, tmp_path):
    root, before = bids
    t0 = time.perf_counter()
    code, err = run_cli(capsys, root, tmp_path / "out", *PARTICIPANT, "--derivatives", "/")
    assert code == 64
    assert_one_line(err, "no dataset_description.json")
    assert time.perf_counter() - t0 < 30  # refused, not walked (generous: a loaded machine)
    assert not (tmp_path / "out").exists() and tree(root) == before


@pytest.mark.parametrize("errno_, filename, code", [
    (errno.EACCES, "OUT/sub-01/func/x.nii.gz", 73),
    (errno.EACCES, "BIDS/sub-01/func/x_events.tsv", 65),
    (errno.ENOSPC, None, 73),
    (errno.EIO, None, 70),
])
def test_stray_os_errors_are_mapped(capsys, tmp_path, monkeypatch, errno_, filename, code):
    """An OSError that no typed error caught: writing under OUTPUT_DIR 73, reading an input 65."""
    import bidsglm.cli

    out, raw = tmp_path / "out", tmp_path / "bids"
    name = filename and filename.replace("OUT", str(out)).replace("BIDS", str(raw))

    def fails(args):
        raise OSError(errno_, os.strerror(errno_), name)

    monkeypatch.setattr(bidsglm.cli, "run", fails)
    got, err = run_cli(capsys, raw, out, "group")
    assert got == code
    assert_one_line(err, *([name] if name else []))


# --- nothing partial: a failed invocation leaves OUTPUT_DIR as it was -----------------------

def _truncate(path: Path) -> None:
    """Keep the header and the first volumes: the failure is found only while reading."""
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))


@pytest.mark.parametrize("n_cpus", ["1", "2"])
def test_truncated_bold_leaves_no_output(capsys, bids, tmp_path, n_cpus):
    root, _ = bids
    _truncate(root.joinpath(*FMRIPREP, "sub-02", "func", BOLD))
    before = tree(root)
    out = tmp_path / "glm"
    code, err = run_cli(capsys, root, out, *PARTICIPANT, "--n-cpus", n_cpus)
    assert code == 65
    assert_one_line(err, BOLD, "truncated")
    assert not os.path.lexists(out)  # OUTPUT_DIR was created by this run: gone with it
    assert tree(root) == before


def test_failed_rerun_restores_earlier_results(capsys, bids, earlier_results, tmp_path):
    """A rerun with another model replaces files, then fails: every earlier file is back,
    with its earlier content, and nothing new is left (dataset files included)."""
    root, _ = bids
    _truncate(root.joinpath(*FMRIPREP, "sub-02", "func", BOLD))
    before = tree(root)
    out = tmp_path / "glm"
    shutil.copytree(earlier_results, out, symlinks=True)
    (out / "README.md").unlink()  # would be written anew (at the end, which is not reached)
    listing = tree(out)
    code, err = run_cli(capsys, root, out, *PARTICIPANT, "--smoothing-fwhm", "4")
    assert code == 65
    assert_one_line(err, BOLD)
    assert tree(out) == listing
    assert tree(root) == before


def test_failed_group_level_leaves_nothing(capsys, tmp_path):
    out = tmp_path / "glm"
    write_participant_outputs(out, n_subjects=4)
    # found when the second model reads its maps: the exclusions table and the first model's
    # maps are written by then
    broken = next(out.glob("sub-03/func/sub-03_task-loc_space-*_contrast-houses_stat-effect_statmap.nii.gz"))
    broken.write_bytes(broken.read_bytes()[:200])
    listing = tree(out)
    code, err = run_cli(capsys, tmp_path / "raw", out, "group", "-q", "--atlases", "none")
    assert code == 65
    assert_one_line(err, "sub-03")
    assert tree(out) == listing
    assert not (out / "group").exists()


# --- interrupts: exit 130 (SIGINT) or 143 (SIGTERM), one line, nothing partial ------------------

@pytest.fixture(scope="module")
def group_inputs(tmp_path_factory):
    """Five contrasts of 13 subjects: 500 of the 8192 sign flips with TFCE take about 4 s per
    model on an idle machine (longer under load), so a signal sent 0.5 s after the first model
    lands in the next."""
    out = tmp_path_factory.mktemp("perm") / "glm"
    write_participant_outputs(out, n_subjects=13, contrasts=("faces", "houses", "chairs", "tools", "words"))
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_permutations(group_inputs, tmp_path, signum):
    """The signal lands while numba kernels permute (exit 70 "CPUDispatcher ... returned a result
    with an exception set", or a crash, before), after the exclusions table and perhaps a first
    model's maps were written: those are removed again."""
    out = tmp_path / "glm"
    shutil.copytree(group_inputs, out)
    listing = tree(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bidsglm", str(tmp_path / "raw"), str(out), "group", "--atlases", "none",
         "--permutations", "500", "--tfce", "--no-reports"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = ""
    # SIGINT while the first model permutes; SIGTERM once a first model's maps are written
    awaited = "group level:" if signum == signal.SIGINT else "contrast(s) written"
    while awaited not in err:
        line = proc.stderr.readline()
        if not line:
            break
        err += line
    time.sleep(0.5)
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=60)
    err += rest
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), err
    assert "Traceback" not in err and "CPUDispatcher" not in err
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    assert len(errors) == 1 and "interrupted" in errors[0], err
    assert tree(out) == listing


def test_session_rolls_back_on_keyboard_interrupt(tmp_path):
    out = tmp_path / "out"
    atomic_write_bytes(out / "old.txt", b"old")
    with pytest.raises(KeyboardInterrupt):
        with output_session(out):
            atomic_write_bytes(out / "old.txt", b"new")
            atomic_write_bytes(out / "sub-01" / "func" / "new.txt", b"new")
            raise KeyboardInterrupt
    assert tree(out) == {"old.txt": hashlib.sha256(b"old").hexdigest()}


def test_overlap_check_names_resolved_paths(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (tmp_path / "link").symlink_to(raw)
    with pytest.raises(UsageError, match="resolves to"):
        OutputSession(tmp_path / "link" / "out", [raw])


MODEL = {
    "Name": "hostile", "BIDSModelVersion": "1.0.0",
    "Nodes": [
        {"Level": "Run", "Name": "runs", "GroupBy": ["run", "subject"],
         "Transformations": {"Transformer": "pybids-transforms-v1",
                             "Instructions": [{"Name": "Factor", "Input": ["trial_type"]}]},
         "Model": {"Type": "glm", "X": [1, "trial_type.congruent_correct", "trans_*"],
                   "HRF": {"Variables": ["trial_type.congruent_correct"], "Model": "glover"},
                   "Options": {"HighPassFilterCutoffHz": 0.01}},
         "Contrasts": [{"Name": "congruent", "ConditionList": ["trial_type.congruent_correct"],
                        "Weights": [1], "Test": "t"}]},
        {"Level": "Subject", "Name": "subjects", "GroupBy": ["subject", "contrast"],
         "Model": {"Type": "meta", "X": [1]}, "DummyContrasts": {"Test": "t"}},
    ],
    "Edges": [{"Source": "runs", "Destination": "subjects"}],
}


def test_stats_model_node_folder_linked_into_the_inputs(capsys, bids, tmp_path, monkeypatch):
    """A BIDS Stats Model writes under OUTPUT_DIR/node-<Name>/: a Subject node's folder linked to
    fMRIPrep's dataset is refused before any run is fitted."""
    import bidsglm.modelrunner

    root, _ = bids
    model = tmp_path / "model.json"
    model.write_text(json.dumps(MODEL))
    before = tree(root)
    out = tmp_path / "glm"
    out.mkdir()
    (out / "node-subjects").symlink_to(root.joinpath(*FMRIPREP))
    monkeypatch.setattr(bidsglm.modelrunner, "fit_run", lambda *a: pytest.fail("fitted"))
    code, err = run_cli(capsys, root, out, "participant", "--model", model, "--skip-bids-validation", "-q")
    assert code == 73
    assert_one_line(err, "refusing to write into the input dataset")
    assert tree(root) == before
    assert [p.name for p in out.iterdir()] == ["node-subjects"]


def test_output_dir_inside_a_linked_derivatives_dataset(capsys, demo_copy, tmp_path):
    """BIDS_DIR/derivatives/fmriprep is a link to /elsewhere/fmriprep, and OUTPUT_DIR lies in
    there: refused before anything is written (not even OUTPUT_DIR is created)."""
    elsewhere = tmp_path / "elsewhere" / "fmriprep"
    shutil.move(demo_copy.joinpath(*FMRIPREP), elsewhere)
    demo_copy.joinpath(*FMRIPREP).symlink_to(elsewhere)
    before = {**tree(demo_copy), **tree(elsewhere)}
    out = elsewhere / "glm"
    code, err = run_cli(capsys, demo_copy, out, *PARTICIPANT)
    assert code == 64
    assert_one_line(err, "is inside the input dataset", str(elsewhere))
    assert {**tree(demo_copy), **tree(elsewhere)} == before
    assert not os.path.lexists(out)


def test_derivatives_folders_are_inputs_before_any_work(tmp_path):
    from bidsglm.discovery import input_datasets

    raw = tmp_path / "raw"
    (raw / "derivatives" / "fmriprep").mkdir(parents=True)
    (raw / "derivatives" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    folders = {p.resolve() for p in input_datasets(raw, [tmp_path / "given"])}
    assert folders == {raw, raw / "derivatives" / "fmriprep", tmp_path / "elsewhere", tmp_path / "given"}


def test_interrupt_in_the_reports_keeps_the_maps(capsys, bids, tmp_path, monkeypatch):
    """The level and the reports are separate steps: maps that were completed are kept."""
    import bidsglm.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    root, before = bids
    monkeypatch.setattr(bidsglm.cli, "write_reports", interrupted)
    out = tmp_path / "glm"
    code, err = run_cli(capsys, root, out, *PARTICIPANT)
    assert code == 130
    assert_one_line(err, "while writing the reports", "--reports-only")
    assert list(out.rglob("*_stat-z_statmap.nii.gz")) and (out / "dataset_description.json").is_file()
    assert not list(out.glob(outputs.SESSION_PREFIX + "*"))
    assert tree(root) == before


@pytest.fixture(scope="module")
def demo_4mm(tmp_path_factory):
    """Two subjects on the 4 mm grid: a run takes a second or more to read, smooth and fit, so a
    Ctrl-C sent just after a worker starts one lands while the workers are busy."""
    from bidsglm.demo import make_demo

    root = tmp_path_factory.mktemp("demo4") / "bids"
    make_demo(root, n_subjects=2, voxel_size=4, seed=3)
    return root


def test_ctrl_c_with_worker_processes(demo_4mm, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: bidsglm and its joblib workers
    (--n-cpus 2) while runs are being fitted and written. Exit 130; the workers' files are gone."""
    root = tmp_path / "bids"
    shutil.copytree(demo_4mm, root)
    before = tree(root)
    out = tmp_path / "glm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bidsglm", str(root), str(out), "participant", "--skip-bids-validation",
         "--n-cpus", "2", "--contrast", "congruent_correct", "--no-reports"],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = ""
    while "fitting" not in err:  # a worker has started on a run
        line = proc.stderr.readline()
        if not line:
            break
        err += line
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err += rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    assert len(errors) == 1 and "interrupted" in errors[0], err
    assert not os.path.lexists(out)
    assert tree(root) == before
