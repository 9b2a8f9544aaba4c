"""Permutation inference: the batched Freedman-Lane algebra against refitting the
model, FWE p-values against nilearn within Monte Carlo error, ground truth on
simulated maps, bounded memory, and (slow) the family-wise error rate under the null."""

from __future__ import annotations

import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from bidsglm.errors import ModelError
from bidsglm.groupmodels import anova_design, fit_ols
from bidsglm.permutation import (
    PERMUTE,
    SIGN_FLIP,
    PermutationOptions,
    _batch_rows,
    all_permutations,
    all_sign_flips,
    null_residuals,
    permutation_design,
    random_rearrangements,
    run_permutations,
    statistics_from_projections,
)

RNG = np.random.default_rng(20261122)


def _anova(n_subjects=8, conditions=("a", "b", "c")):
    subjects = [f"{i:02d}" for i in range(n_subjects)]
    design = anova_design([(s, c) for s in subjects for c in conditions], list(conditions)).to_numpy()
    return design, np.repeat(np.arange(n_subjects), len(conditions))


def _designs():
    n = 14
    age = RNG.standard_normal(n)
    group = np.r_[np.ones(7), np.zeros(7)]
    anova, blocks = _anova()
    pad = [0.0] * 8
    return {
        "one-sample": (np.ones((n, 1)), [[1.0]], False, None),
        "mean with covariate": (np.column_stack([np.ones(n), age]), [[1.0, 0]], False, None),
        "covariate": (np.column_stack([np.ones(n), age]), [[0, 1.0]], False, None),
        "two groups": (np.column_stack([group, 1 - group]), [[1.0, -1]], False, None),
        "F on both columns": (np.column_stack([np.ones(n), age]), [[1.0, 0], [0, 1]], True, None),
        "anova t": (anova, [[1.0, -1, 0] + pad], False, blocks),
        "anova F": (anova, [[1.0, -1, 0] + pad, [0, 1.0, -1] + pad], True, blocks),
    }


def _refit_statistic(Y, X, c, f_test, design, rearrangement):
    """Freedman-Lane by definition: rearrange the null model's residuals, add its
    fit back, refit the full model and compute the statistic."""
    E = null_residuals(Y, design)
    fitted = Y - E
    moved = rearrangement[:, None] * E if design.scheme == SIGN_FLIP else E[rearrangement]
    return fit_ols(moved + fitted, X).contrast(np.array(c), f_test=f_test).stat


@pytest.mark.parametrize("name", list(_designs()))
def test_batched_statistics_equal_refitting_the_model(name):
    X, c, f_test, blocks = _designs()[name]
    c = np.array(c)
    Y = RNG.standard_normal((X.shape[0], 40)) + 0.4
    design = permutation_design(X, c, f_test, blocks)
    E = null_residuals(Y, design)
    ss = np.einsum("nv,nv->v", E, E)
    observed = statistics_from_projections((design.basis @ E)[None], ss, design.k, design.dof, f_test)[0]
    np.testing.assert_allclose(observed, fit_ols(Y, X).contrast(c, f_test=f_test).stat, rtol=1e-10)
    moves = random_rearrangements(design, 6, RNG)
    Q = (_batch_rows(design, moves) @ E).reshape(6, design.basis.shape[0], -1)
    batched = statistics_from_projections(Q, ss, design.k, design.dof, f_test)
    for j in range(6):
        np.testing.assert_allclose(batched[j], _refit_statistic(Y, X, c, f_test, design, moves[j]),
                                   rtol=1e-9, atol=1e-12)


def _anova_case(contrast_rows, n_subjects=8, n_conditions=5, voxels=1300, seed=5):
    """A repeated-measures design large enough for the level kernel (contrast rows
    c0 - c1, c1 - c2, ...), with null data plus subject and condition effects the null
    model must absorb."""
    rng = np.random.default_rng(seed)
    X, blocks = _anova(n_subjects, tuple(f"c{i}" for i in range(n_conditions)))
    c = np.zeros((contrast_rows, X.shape[1]))
    for r in range(contrast_rows):
        c[r, r], c[r, r + 1] = 1.0, -1.0
    Y = rng.standard_normal((len(X), voxels)) + np.repeat(rng.standard_normal(n_subjects), n_conditions)[:, None]
    Y += np.tile(np.arange(n_conditions) * 0.3, n_subjects)[:, None]
    return X, c, blocks, Y


@pytest.mark.parametrize("contrast_rows, all_rows", [(1, False), (2, False), (4, False), (1, True)],
                         ids=["t", "F", "F on every condition", "t, every row explicit"])
def test_level_kernel_equals_refitting_the_model(contrast_rows, all_rows):
    """The ANOVA's level sums (float32 kernel) against refitting the model in float64 on the
    same permutations, and against the dense-product kernel (the former formulation): maps
    and maxima agree to float32 rounding (1e-5 relative). Balanced designs take the total
    sum of squares from the level sums (level_scale); the explicit-rows path is checked too."""
    from dataclasses import replace

    from bidsglm import clusterkernels as ck
    from bidsglm.permutation import _batch_statistics, residuals_and_observed

    f_test = contrast_rows > 1
    X, c, blocks, Y = _anova_case(contrast_rows)
    design = permutation_design(X, c, f_test, blocks)
    assert design.levels is not None and design.level_weights.shape[1] == 5  # one level per condition
    assert design.level_scale == pytest.approx(1 / 8)  # balanced: ||U' P E||^2 = ||level sums||^2 / subjects
    if all_rows:
        design = replace(design, level_scale=0.0)
    dense = replace(design, levels=None, level_weights=None)
    E, ss, observed = residuals_and_observed(Y, design)
    moves = random_rearrangements(design, 12, RNG)
    results = {}
    for name, d, width in [("levels", design, ck.LEVEL_TILE), ("dense", dense, ck.TILE)]:
        tiles, ss_tiles = ck.tile_residuals(E, ss.astype(np.float32), width)
        with_maps = _batch_statistics(d, moves, tiles, ss_tiles, True, True, Y.shape[1])
        maxima_only = _batch_statistics(d, moves, tiles, ss_tiles, True, False, Y.shape[1])[1]
        results[name] = with_maps[0], with_maps[1], maxima_only
    maps, maxima, maxima_only = results["levels"]
    for j, move in enumerate(moves):
        reference = _refit_statistic(Y, X, c, f_test, design, move)
        scale = np.abs(reference).max()
        np.testing.assert_allclose(maps[j], reference, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(maxima[j], np.abs(reference).max(), rtol=1e-5)
        np.testing.assert_allclose(maxima_only[j], np.abs(reference).max(), rtol=1e-5)
    for got, former in zip(results["levels"], results["dense"]):
        np.testing.assert_allclose(got, former, rtol=1e-5, atol=1e-5 * np.abs(former).max())


def test_level_kernel_gives_the_dense_kernels_null_and_p_values():
    """A whole run through the level kernel and through the dense product, same seed: the same
    maximum-statistic null (to float32 rounding) and the same FWE p-values."""
    from dataclasses import replace

    X, c, blocks, Y = _anova_case(1, voxels=700, seed=6)
    Y[:, :40] += np.tile([3.0, 0, 0, 0, 0], 8)[:, None]  # an effect of a - b in 40 voxels
    design = permutation_design(X, c, False, blocks)
    mask = np.ones((7, 10, 10), bool)
    options = PermutationOptions(500, seed=3, clusters=False)
    ours = run_permutations(Y, design, mask, options)
    former = run_permutations(Y, replace(design, levels=None, level_weights=None), mask, options)
    np.testing.assert_allclose(ours.null_max_stat, former.null_max_stat, rtol=1e-5)
    np.testing.assert_array_equal(ours.p_voxel, former.p_voxel)
    assert (ours.p_voxel[:40] < 0.05).mean() > 0.5 and ours.p_voxel[40:].min() > 0.05  # p-values of both kinds


def test_level_structure_only_where_it_saves_work():
    designs = _designs()
    for name in ("covariate", "two groups"):  # continuous values, or a single row
        X, c, f, b = designs[name]
        assert permutation_design(X, np.array(c), f, b).levels is None
    X, c, blocks, _ = _anova_case(1)
    d = permutation_design(X, c, False, blocks)
    assert d.basis.shape[0] == 4 and sorted(set(d.levels.tolist())) == list(range(5))
    # each input's level is its condition
    assert all(len(set(d.levels[i::5].tolist())) == 1 for i in range(5))


def test_rearrangement_schemes():
    designs = _designs()
    scheme = {name: permutation_design(X, np.array(c), f, b).scheme for name, (X, c, f, b) in designs.items()}
    assert scheme == {"one-sample": SIGN_FLIP, "mean with covariate": SIGN_FLIP, "covariate": PERMUTE,
                      "two groups": PERMUTE, "F on both columns": SIGN_FLIP, "anova t": PERMUTE,
                      "anova F": PERMUTE}
    X, c, f, blocks = designs["anova t"]
    d = permutation_design(X, np.array(c), f, blocks)
    # subject columns stay in place: one effect row and one row for the third condition
    assert d.basis.shape == (2, X.shape[0]) and "within subjects" in d.describe()
    between_subjects = np.zeros((1, X.shape[1]))
    between_subjects[0, 3], between_subjects[0, 4] = 1, -1
    with pytest.raises(ModelError, match="within subjects"):
        permutation_design(X, between_subjects, False, blocks)


def test_rearrangements_stay_within_blocks_and_enumerate_all():
    _, blocks = _anova(5)
    d = permutation_design(*_designs()["anova t"][:1], np.array(_designs()["anova t"][1]), False,
                           _designs()["anova t"][3])
    moves = random_rearrangements(d, 200, RNG)
    assert all(np.array_equal(np.sort(m), np.arange(len(m))) for m in moves)
    assert (d.blocks[moves] == d.blocks[None, :]).all()
    assert len({tuple(m) for m in all_permutations(blocks)}) == 6 ** 5 - 1
    flips = all_sign_flips(6)
    assert len({tuple(f) for f in flips}) == 63 and not (flips == 1).all(axis=1).any()


def _smooth_null_maps(n, shape, rng, fwhm_vox=1.5):
    sigma = fwhm_vox / 2.3548
    maps = [ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(n)]
    return np.stack(maps)


def _blob(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.array(centre), axis=-1) <= radius


def test_one_sample_fwe_p_match_nilearn_within_monte_carlo_error():
    """10 subjects: our p-values use all 1024 sign flips (exact); nilearn draws 2000 at
    random. Each of its p-values is a binomial estimate of the exact one, so they
    must agree within 4.5 binomial standard errors (plus 2/n for its +1 and clipping)."""
    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols

    rng = np.random.default_rng(0)
    shape = (12, 12, 10)
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    maps = _smooth_null_maps(10, shape, rng) * 3
    maps[:, _blob(shape, (5, 5, 5), 2.5)] += 1.5
    Y = maps[:, mask]
    design = permutation_design(np.ones((10, 1)), np.array([[1.0]]))
    ours = run_permutations(Y, design, mask, PermutationOptions(2000, seed=1, cluster_forming_p=0.01))
    assert ours.exhaustive and ours.n_rearrangements == 1024
    masker = NiftiMasker(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4))).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = permuted_ols(np.ones((10, 1)), Y, model_intercept=False, n_perm=2000, two_sided_test=True,
                              random_state=3, masker=masker, threshold=0.01, output_type="dict", verbose=0)
    np.testing.assert_allclose(ours.stat, theirs["t"][0], rtol=1e-6)
    n = 2000
    for our_p, their_logp in [(ours.p_voxel, theirs["logp_max_t"][0]),
                              (ours.p_cluster_size, theirs["logp_max_size"][0]),
                              (ours.p_cluster_mass, theirs["logp_max_mass"][0])]:
        their_p = 10 ** -their_logp
        bound = 4.5 * np.sqrt(our_p * (1 - our_p) / n) + 2 / n
        assert np.all(np.abs(their_p - our_p) <= bound)
        assert our_p.min() < 0.05 and (our_p > 0.5).any()  # the test has both kinds of voxels


def test_ground_truth_blob_found_and_nothing_else():
    rng = np.random.default_rng(1)
    shape = (16, 16, 12)
    mask = np.ones(shape, bool)
    blob = _blob(shape, (8, 8, 6), 2.5)
    maps = _smooth_null_maps(16, shape, rng)
    maps[:, blob] += 1.2
    age = rng.standard_normal(16)
    X = np.column_stack([np.ones(16), age - age.mean()])
    design = permutation_design(X, np.array([[1.0, 0.0]]))
    res = run_permutations(maps[:, mask], design, mask, PermutationOptions(400, seed=2, tfce=True))
    inside, outside = blob[mask], ~blob[mask]
    for p in (res.p_voxel, res.p_cluster_size, res.p_tfce):
        assert (p[inside] < 0.05).mean() > 0.5
        assert (p[outside] < 0.05).sum() <= 0.02 * outside.sum()
    assert res.scheme == "sign flipping of Freedman-Lane residuals"


def test_batches_hold_bounded_memory():
    """100 subjects x 230k voxels: memory during the run is the float32 residuals
    plus one batch, whatever the number of permutations."""
    rng = np.random.default_rng(3)
    shape = (60, 64, 60)
    mask = np.ones(shape, bool)
    Y = rng.standard_normal((100, mask.sum())).astype(np.float32)
    design = permutation_design(np.ones((100, 1)), np.array([[1.0]]))
    peaks = []
    for n_perm in (20, 80):
        tracemalloc.start()
        run_permutations(Y, design, mask, PermutationOptions(n_perm, seed=0, batch_bytes=16 * 2**20))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    residuals = Y.nbytes
    assert max(peaks) < residuals + 200 * 2**20
    assert abs(peaks[1] - peaks[0]) < 20 * 2**20


def _null_fwe_rejections(replications, design_X, contrast, n_perm, seed, nuisance, blocks=None):
    rng = np.random.default_rng(seed)
    shape = (10, 10, 8)
    mask = np.ones(shape, bool)
    rejected = np.zeros(4, int)
    design = permutation_design(design_X, contrast, False, blocks)
    for r in range(replications):
        maps = _smooth_null_maps(design_X.shape[0], shape, rng, fwhm_vox=2.0)
        maps += nuisance[:, None, None, None]  # effects the null model must absorb
        res = run_permutations(maps[:, mask], design, mask,
                               PermutationOptions(n_perm, seed=r, tfce=True, cluster_forming_p=0.01))
        for i, p in enumerate((res.p_voxel, res.p_cluster_size, res.p_cluster_mass, res.p_tfce)):
            rejected[i] += p.min() < 0.05
    return rejected


@pytest.mark.slow
@pytest.mark.parametrize("which", ["one-sample", "covariates", "anova"])
def test_family_wise_error_rate_under_the_null(which):
    """Smooth noise, no effect of interest (but nuisance effects the null model must
    absorb): the share of replications with any FWE-significant voxel must lie in the
    99 % binomial interval around 0.05 for voxel, cluster size, cluster mass and TFCE.
    Seeded; counts seen: one-sample 7 8 13 10, covariates 8 6 12 9, anova 15 12 13 13 of 300."""
    n = 12
    rng = np.random.default_rng(7)
    blocks = None
    if which == "one-sample":
        X, c = np.ones((n, 1)), np.array([[1.0]])
        nuisance = np.zeros(n)
    elif which == "covariates":
        X = np.column_stack([np.ones(n), rng.standard_normal(n), rng.standard_normal(n)])
        c = np.array([[0.0, 1.0, 0.0]])
        nuisance = 2.0 + 1.5 * X[:, 2]
    else:  # 3 conditions x 8 subjects, testing a - b; subject means and condition c differ
        X, blocks = _anova(8)
        c = np.zeros((1, X.shape[1]))
        c[0, :2] = 1, -1
        nuisance = np.repeat(rng.standard_normal(8) * 2, 3) + np.tile([0, 0, 1.0], 8)
    replications = 300
    rejected = _null_fwe_rejections(replications, X, c, 200, seed=11, nuisance=nuisance, blocks=blocks)
    low, high = stats.binom.interval(0.99, replications, 0.05)
    assert np.all((rejected >= low) & (rejected <= high)), rejected


def test_large_designs_are_sampled_not_enumerated():
    """(9!)^16 within-subject permutations overflow 64-bit integers: they must count as
    many (random draws), not wrap around to a small number to enumerate."""
    from bidsglm.permutation import count_rearrangements

    X, blocks = _anova(16, tuple(f"c{i}" for i in range(9)))
    c = np.zeros((1, X.shape[1]))
    c[0, :2] = 1, -1
    d = permutation_design(X, c, False, blocks)
    assert count_rearrangements(d) > 1e80
    res = run_permutations(RNG.standard_normal((len(X), 30)), d, np.ones((30, 1, 1), bool),
                           PermutationOptions(20, seed=0))
    assert not res.exhaustive and res.n_rearrangements == 21


def test_tfce_with_two_subjects_runs_and_cannot_reach_significance():
    """A one-sample test of 2 subjects has 1 degree of freedom: its t reaches 1e4 and more (a
    permuted map of two near-opposite values, 1e15), which made the TFCE kernel run out of
    memory. It runs (TFCE's steps are bounded); the 4 sign flips are all used, so no FWE p is
    below 1/4, as the group level warns."""
    rng = np.random.default_rng(3)
    shape = (10, 10, 8)
    mask = np.ones(shape, bool)
    maps = _smooth_null_maps(2, shape, rng)
    maps[1] = maps[0] * (1 + 1e-6 * rng.standard_normal(maps[0].shape))  # near-identical: |t| up to 1e7
    maps[1, :5] = -maps[0, :5]  # near-zero mean in part of the map: rearrangements give extreme t
    design = permutation_design(np.ones((2, 1)), np.array([[1.0]]))
    res = run_permutations(maps[:, mask], design, mask, PermutationOptions(100, seed=0, tfce=True))
    assert res.exhaustive and res.n_rearrangements == 4
    assert np.abs(res.stat).max() > 1e4
    assert np.isfinite(res.tfce).all() and np.isfinite(res.null_max_tfce).all()
    # the flips (+, -) give |t| ~ 1e15 where the maps are opposite: their TFCE is counted, not lost
    # (the kernel's allocation failed there, and batch_maxima returned 0 for those maps)
    assert res.null_max_stat.max() > 1e12 and res.null_max_tfce.max() > 1e30
    assert res.p_tfce.min() >= 0.25 and res.p_voxel.min() >= 0.25
