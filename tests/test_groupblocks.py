"""Group level in voxel blocks (bidsglm/groupblocks.py): the same maps and p-values as the
in-memory path, with blocks small enough that there are many of them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from bidsglm import groupblocks
from bidsglm.cli import main
from bidsglm.errors import DataError
from bidsglm.groupmodels import fit_ols
from bidsglm.permutation import PermutationOptions, permutation_design, run_permutations
from conftest import write_participant_outputs


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("blocks") / "glm"
    write_participant_outputs(out)
    return out


def _copy(synthetic, where: Path) -> Path:
    dst = where / "glm"
    shutil.copytree(synthetic, dst)
    return dst


def _maps(group_dir: Path) -> dict:
    return {p.name: np.asanyarray(nib.load(str(p)).dataobj).astype(np.float64)
            for p in sorted(group_dir.glob("*.nii.gz"))}


def test_blocked_group_level_equals_in_memory(synthetic, tmp_path, monkeypatch):
    """One-sample model with a covariate, cluster, TFCE and voxel-level permutations: every map
    (statistics, FWE p-values, TFCE) and table equals the in-memory run's; 49 blocks of 1,000
    voxels (tiles of 2,048 cut across); no temporary file is left in OUTPUT_DIR."""
    options = ("group", "-q", "--permutations", "60", "--covariates", "age", "--random-seed", "3",
               "--tfce", "--atlases", "none")
    memory = _copy(synthetic, tmp_path / "memory")
    assert main([str(memory.parent / "raw"), str(memory), *options]) == 0

    blocked = _copy(synthetic, tmp_path / "blocked")
    calls = []
    real = groupblocks.fit_in_blocks

    def spy(*args, **kwargs):
        calls.append(groupblocks.block_voxels(len(args[0]), int(args[2].sum())))
        return real(*args, **kwargs)

    monkeypatch.setattr(groupblocks, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(groupblocks, "BLOCK_BYTES", 8 * 8 * 1000)  # 8 maps x 1,000 voxels
    monkeypatch.setattr(groupblocks, "fit_in_blocks", spy)
    assert main([str(blocked.parent / "raw"), str(blocked), *options]) == 0
    assert calls == [1000, 1000]  # both contrasts' models (faces, houses) fitted in blocks

    expected, got = _maps(memory / "group"), _maps(blocked / "group")
    assert set(got) == set(expected) and any("tfceFWE" in n for n in got)
    for name, data in expected.items():
        np.testing.assert_allclose(got[name], data, rtol=1e-5, atol=1e-6, err_msg=name)
    for table in (memory / "group").glob("*.tsv"):
        assert (blocked / "group" / table.name).read_text() == table.read_text(), table.name
    assert not list(blocked.rglob(".bidsglm-*")), "temporary files left behind"


def _arrays(seed=0, n=16, v=5000):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Y = rng.normal(size=(n, v)) + 0.8
    Y[:, :300] += 5.0 * X[:, 1:2]  # an effect of the covariate
    return X, Y.astype(np.float32).astype(np.float64)  # maps are float32 on disk


def _run_blocked(tmp_path, X, Y, designs=(), options=None, block_bytes=None):
    maps = [SimpleNamespace(effect=Path(f"map{i}.nii.gz"), row=i) for i in range(len(Y))]
    mask = np.ones(Y.shape[1], dtype=bool)

    def permute(design, final_mask, prepared):
        return run_permutations(None, design, final_mask.reshape(-1, 1, 1), options, prepared=prepared)

    return groupblocks.fit_in_blocks(maps, lambda m: Y[m.row], mask, X, "test model", tmp_path,
                                     list(designs), options, permute,
                                     block_bytes=block_bytes or 8 * len(Y) * 333)


@pytest.mark.parametrize("two_sided", [True, False])
def test_voxel_level_null_tracked_across_blocks(tmp_path, two_sided):
    """Voxel-level (max-t) permutations block by block: each rearrangement's maximum over the
    blocks is the in-memory run's maximum over the whole map, so the null distribution and the
    FWE p-values are the same (float32 kernels: to rounding)."""
    X, Y = _arrays()
    design = permutation_design(X, np.array([[0.0, 1.0]]))
    options = PermutationOptions(200, seed=11, two_sided=two_sided, clusters=False)
    mask3d = np.ones((Y.shape[1], 1, 1), dtype=bool)
    expected = run_permutations(Y, design, mask3d, options)
    blocked = _run_blocked(tmp_path, X, Y, [design], options)
    got = blocked.permuted[0]
    np.testing.assert_allclose(got.null_max_stat, expected.null_max_stat, rtol=1e-5)
    np.testing.assert_allclose(got.stat, expected.stat, rtol=1e-10)
    np.testing.assert_allclose(got.p_voxel, expected.p_voxel, atol=1 / 201 + 1e-12)
    assert np.mean(got.p_voxel == expected.p_voxel) > 0.99
    assert got.n_rearrangements == 201 and (got.p_voxel[:300] < 0.05).mean() > 0.9


def test_blocked_fit_equals_ols_and_leaves_out_bad_voxels(tmp_path, caplog):
    """Non-finite voxels and voxels without error variance leave the mask with a warning, as in
    memory; the fit of the rest is statsmodels-free plain OLS on the whole array."""
    X, Y = _arrays(v=2000)
    Y[3, 10] = np.nan
    Y[:, 1500] = 4.0  # constant: the model fits it exactly
    with caplog.at_level(logging.WARNING, logger="bidsglm"):
        done = _run_blocked(tmp_path, X, Y)
    expected_keep = np.ones(2000, bool)
    expected_keep[[10, 1500]] = False
    np.testing.assert_array_equal(done.mask, expected_keep)
    reference = fit_ols(Y[:, expected_keep], X)
    np.testing.assert_allclose(done.fit.beta, reference.beta, rtol=1e-12)
    np.testing.assert_allclose(done.fit.dispersion, reference.dispersion, rtol=1e-12)
    res, ref = done.fit.contrast(np.array([0.0, 1.0])), reference.contrast(np.array([0.0, 1.0]))
    np.testing.assert_allclose(res.stat, ref.stat, rtol=1e-12)
    assert "non-finite in map3.nii.gz" in caplog.text and "(zero variance)" in caplog.text
    assert list(tmp_path.iterdir()) == []  # the block file is removed


def test_broken_map_is_refused_by_name(tmp_path):
    X, Y = _arrays(v=1000)
    Y[5, :700] = np.inf
    Y[7, :200] = np.nan
    with pytest.raises(DataError, match="non-finite") as exc:
        _run_blocked(tmp_path, X, Y)
    assert exc.value.path == Path("map5.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_block_width_is_bounded_by_the_block_bytes():
    assert groupblocks.block_voxels(2000, 235_000, 64 * 2**20) == 4096  # whole tiles of 2,048
    assert groupblocks.block_voxels(100, 235_000, 64 * 2**20) == 81_920
    assert groupblocks.block_voxels(10, 500, 64 * 2**20) == 500
    assert groupblocks.block_voxels(10**6, 100, 8) == 1


def test_interrupt_in_blocked_fit_leaves_output_dir_as_before(synthetic, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the second model's maps are in the block file: exit 130; neither the
    first model's files nor the block file are left."""
    out = _copy(synthetic, tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    real = groupblocks.BlockStore.read_block
    reads = []

    def interrupt_later(self, j):
        reads.append(j)
        if len(reads) > len(self.starts) + 3:  # the first model done, the second one started
            assert list(out.glob(".bidsglm-session-*/tmp/.bidsglm-blocks-*/maps.f32"))
            raise KeyboardInterrupt
        return real(self, j)

    monkeypatch.setattr(groupblocks, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(groupblocks, "BLOCK_BYTES", 8 * 8 * 5000)
    monkeypatch.setattr(groupblocks.BlockStore, "read_block", interrupt_later)
    assert main([str(out.parent / "raw"), str(out), "group", "-q", "--atlases", "none"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize("n, covariate_only", [(1100, False), (200, True)])
def test_rearrangements_of_thousands_of_inputs_are_counted(n, covariate_only):
    """2^1100 sign flips or 200! permutations overflow a float: counted as infinite (random
    rearrangements), not an internal error."""
    from bidsglm.permutation import PERMUTE, SIGN_FLIP, count_rearrangements

    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    c = np.array([[0.0, 1.0]]) if covariate_only else np.array([[1.0, 0.0]])
    design = permutation_design(X, c)
    assert design.scheme == (PERMUTE if covariate_only else SIGN_FLIP)
    assert count_rearrangements(design) == float("inf")
