"""Shared fixtures: a small simulated dataset (6 mm grid) and its participant-level outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bidsglm.cli import main
from bidsglm.demo import make_demo

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


def shared_path(*parts) -> Path:
    """A path in ../shared/data, or skip the test where that material is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared material not available: {path}")
    return path


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
