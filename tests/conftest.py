"""Shared fixtures: a small simulated dataset (6 mm grid) and its participant-level outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bidsglm.cli import main
from bidsglm.demo import make_demo

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


def installed_tool(name: str) -> str:
    """A command-line tool of the test environment (its venv first), or skip the test."""
    import sys

    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install .[test])")
    return found


def shared_path(*parts) -> Path:
    """A path in ../shared/data, or skip the test where that material is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared material not available: {path}")
    return path


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one test worker per usable core, at most four. Each
    worker holds its own imports and session fixtures, and several tests start threads or
    processes of their own, so more workers would add memory, not speed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


# Modules with the longest tests (pytest --durations), in that order, run first: with
# `--dist loadfile` each worker takes the next module when it is free, so the short modules
# fill in at the end instead of one worker running test_surfaces alone. Order only.
LONG_MODULES = ("test_modelrunner.py", "test_hostile_filesystem.py", "test_surfaces.py", "test_demo.py",
                "test_group_statistics.py", "test_hostile_surfaces.py", "test_model_corpus.py", "test_group.py",
                "test_packaging.py", "test_hostile_data.py", "test_group_facerecognition.py", "test_reports.py")


def pytest_configure(config):
    """In the controller of a parallel run (-n), compile numba's kernels into their cache in the
    background while the workers collect: on a fresh clone each worker would otherwise compile
    the same kernels itself (what the container image does at build time; bidsglm.caches)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        import subprocess
        import sys

        config.kernel_warmup = subprocess.Popen([sys.executable, "-m", "bidsglm.caches"],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_unconfigure(config):
    warmup = getattr(config, "kernel_warmup", None)
    if warmup is not None:
        warmup.kill()
        warmup.wait()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def _no_reports_by_default():
    """Drawing reports takes seconds per subject, so the CLI writes none in tests
    unless a test asks for them with the ``with_reports`` fixture."""
    import bidsglm.cli

    real = bidsglm.cli.write_reports
    patch = pytest.MonkeyPatch()
    patch.setattr(bidsglm.cli, "write_reports", lambda *args, **kwargs: None)
    yield real
    patch.undo()


@pytest.fixture
def with_reports(monkeypatch, _no_reports_by_default):
    import bidsglm.cli

    monkeypatch.setattr(bidsglm.cli, "write_reports", _no_reports_by_default)


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """Two subjects x two runs on a 6 mm grid, with the ground truth."""
    root = tmp_path_factory.mktemp("demo") / "bids"
    truth = make_demo(root, n_subjects=2, voxel_size=6, seed=7)
    return root, truth


@pytest.fixture(scope="session")
def demo_results(demo_small, tmp_path_factory):
    """Participant level run once on the small demo with an explicit contrast."""
    root, truth = demo_small
    out = tmp_path_factory.mktemp("out") / "glm"
    code = main([str(root), str(out), "participant", "--skip-bids-validation", "-q",
                 "--contrast", "IncongruentMinusCongruent=incongruent_correct - congruent_correct",
                 "--contrast", "congruent_correct",
                 "--contrast", "incongruent_correct",
                 "--contrast", "errors=incongruent_incorrect"])
    assert code == 0
    return root, out, truth


@pytest.fixture
def demo_copy(demo_small, tmp_path):
    """A private, writable copy of the small demo dataset (for breaking it)."""
    root, _ = demo_small
    dst = tmp_path / "bids"
    shutil.copytree(root, dst)
    return dst


# --- synthetic participant-level outputs for group-level tests ------------------

GROUP_AFFINE = np.array([[-4.0, 0, 0, 78], [0, 4.0, 0, -112], [0, 0, 4.0, -70], [0, 0, 0, 1]])
GROUP_SHAPE = (40, 48, 40)
BLOB_CENTRE_MM = (-40.0, -60.0, -12.0)  # left fusiform / inferior temporal cortex


def group_blob(radius_mm: float = 10.0) -> np.ndarray:
    ijk = np.indices(GROUP_SHAPE).reshape(3, -1).T
    xyz = ijk @ GROUP_AFFINE[:3, :3].T + GROUP_AFFINE[:3, 3]
    return (np.linalg.norm(xyz - BLOB_CENTRE_MM, axis=1) <= radius_mm).reshape(GROUP_SHAPE)


def write_participant_outputs(out: Path, n_subjects: int = 8, seed: int = 0, effect: float = 2.5,
                              contrasts=("faces", "houses")):
    """What the participant level writes, for a group level to read: per subject two runs
    (effect and variance maps, masks, _design.json with dof and mean FD), subject fixed
    effects, participants.tsv. The first contrast has ``effect`` in group_blob(); the
    others are null. sub-03's run 2 has a mean FD of 0.9 mm, every other run 0.1 mm."""
    from bidsglm.design import contrast_labels
    from bidsglm.fixedeffects import fixed_effects
    from bidsglm.images import nifti_bytes
    from bidsglm.outputs import atomic_write_bytes, atomic_write_json, ensure_dataset, statmap_path

    rng = np.random.default_rng(seed)
    ensure_dataset(out, {"raw": out.parent / "raw"})
    labels = contrast_labels(list(contrasts))
    mask = np.zeros(GROUP_SHAPE, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    blob = group_blob()
    space = {"space": "MNI152NLin2009cAsym"}
    rows = []
    for s in range(1, n_subjects + 1):
        sub = f"{s:02d}"
        base = {"sub": sub, "task": "loc"}
        subject_true = {name: (effect * blob if i == 0 else 0.0) + rng.normal(0, 0.7, GROUP_SHAPE)
                        for i, name in enumerate(contrasts)}
        run_maps = {}
        for run in (1, 2):
            ent = {**base, "run": str(run), **space}
            func = out / f"sub-{sub}" / "func"
            for name in contrasts:
                eff = subject_true[name] + rng.normal(0, 0.5, GROUP_SHAPE)
                var = np.full(GROUP_SHAPE, 0.25) * (1 + 0.2 * run)
                run_maps.setdefault(name, []).append((eff, var))
                for stat, vol in (("effect", eff), ("variance", var)):
                    atomic_write_bytes(statmap_path(out, ent, labels[name], stat), nifti_bytes(vol * mask, GROUP_AFFINE))
            prefix = f"sub-{sub}_task-loc_run-{run}"
            atomic_write_bytes(func / f"{prefix}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
                               nifti_bytes(mask.astype(np.float32), GROUP_AFFINE))
            atomic_write_json(func / f"{prefix}_design.json", {
                "DegreesOfFreedom": 150.0, "Contrasts": labels,
                "FramewiseDisplacementMean": 0.9 if (s == 3 and run == 2) else 0.1,
                "Mask": f"sub-{sub}/func/{prefix}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"})
        for name in contrasts:
            effects = np.array([e[mask] for e, _ in run_maps[name]])
            variances = np.array([v[mask] for _, v in run_maps[name]])
            res = fixed_effects(effects, variances, [150.0, 150.0])
            for stat, values in (("effect", res.effect), ("variance", res.variance)):
                vol = np.zeros(GROUP_SHAPE)
                vol[mask] = values
                path = statmap_path(out, {**base, **space}, labels[name], stat)
                atomic_write_bytes(path, nifti_bytes(vol, GROUP_AFFINE))
                atomic_write_json(path.with_name(path.name.replace(".nii.gz", ".json")),
                                  {"Level": "subject", "Contrast": {"Name": name, "Label": labels[name]}})
        atomic_write_bytes(out / f"sub-{sub}" / "func" / f"sub-{sub}_task-loc_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
                           nifti_bytes(mask.astype(np.float32), GROUP_AFFINE))
        rows.append({"participant_id": f"sub-{sub}", "age": 20 + 3 * s, "sex": "MF"[s % 2],
                     "group": "patient" if s <= n_subjects // 2 else "control", "site": "A"})
    pd.DataFrame(rows).to_csv(out / "participants.tsv", sep="\t", index=False)
    return mask, blob
