"""Cluster and TFCE kernels against direct per-threshold computations with scipy and nilearn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bidsglm.clusterkernels import (
    TFCE_MAX_STEPS,
    cluster_roots,
    max_cluster_size_mass,
    neighbour_table,
    tfce_map,
    tfce_max,
)

FACES = ndimage.generate_binary_structure(3, 1)


def _smooth_map(seed, shape=(13, 11, 9), scale=4.0):
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.47
    volume = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2) * scale
    return mask, volume


def reference_tfce(volume, mask, two_sided, E=0.5, H=2.0, dh=0.1):
    """Direct definition: label the map at every height h = dh, 2 dh, ... and add
    extent^E * h^H * dh to every voxel of each cluster."""
    out = np.zeros(volume.shape)
    for sign in (1, -1) if two_sided else (1,):
        signed = np.where(mask, sign * volume, 0.0)
        step = 1
        while step * dh <= signed.max():
            labels, _ = ndimage.label(signed >= step * dh, FACES)
            sizes = np.bincount(labels.ravel()).astype(float)
            sizes[0] = 0
            out += sign * sizes[labels] ** E * (step * dh) ** H * dh
            step += 1
    return out[mask]


def test_neighbour_table_points_at_face_neighbours():
    mask, _ = _smooth_map(0)
    table = neighbour_table(mask)
    ijk = np.argwhere(mask)
    index = {tuple(v): i for i, v in enumerate(ijk)}
    for i in range(0, len(ijk), 7):
        expected = {index.get(tuple(ijk[i] + off), -1)
                    for off in [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (1, 0, 0), (0, 1, 0), (0, 0, 1)]}
        assert set(table[i]) == expected
    assert all(j < i for i, row in enumerate(table) for j in row[:3] if j >= 0)  # earlier in C order


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("two_sided", [True, False])
def test_tfce_equals_per_threshold_labelling(seed, two_sided):
    mask, volume = _smooth_map(seed)
    values = volume[mask]
    ours = tfce_map(values, neighbour_table(mask), two_sided)
    ref = reference_tfce(volume, mask, two_sided)
    assert np.abs(ref).max() > 1  # the maps have clusters at many heights
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert tfce_max(values, neighbour_table(mask), two_sided) == pytest.approx(np.abs(ref).max(), rel=1e-6)


def test_tfce_other_exponents_and_step():
    mask, volume = _smooth_map(3)
    ours = tfce_map(volume[mask], neighbour_table(mask), True, 0.66, 1.5, 0.05)
    np.testing.assert_allclose(ours, reference_tfce(volume, mask, True, 0.66, 1.5, 0.05), rtol=1e-6, atol=1e-6)


def test_tfce_matches_nilearn_with_its_steps():
    """nilearn (like fslmaths) uses 100 steps up to the map's maximum and no dh
    factor: the same sum with dh = max / 100, divided by dh."""
    from nilearn.mass_univariate._utils import calculate_tfce

    mask, volume = _smooth_map(4)
    volume = np.where(mask, volume, 0.0)
    dh = np.abs(volume).max() / 100
    theirs = calculate_tfce(volume[..., None], FACES, two_sided_test=True)[..., 0][mask]
    ours = tfce_map(volume[mask], neighbour_table(mask), True, 0.5, 2.0, dh * (1 + 1e-12)) / dh
    top = np.argmax(np.abs(volume[mask]))  # the peak sits exactly on nilearn's last step
    keep = np.ones(mask.sum(), bool)
    keep[top] = False
    np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-6, atol=1e-6)


def test_tfce_steps_are_bounded_whatever_the_range():
    """A t of 1 degree of freedom reaches 1e4..1e15 (a permuted map of 2 subjects): dh 0.1 would
    need 1e16 steps (the kernel ran out of memory). Beyond 1,000 the map is integrated with
    TFCE_MAX_STEPS steps of peak / TFCE_MAX_STEPS, which is the direct definition at that step."""
    mask, volume = _smooth_map(7)
    for peak in (3e4, 1e15):
        big = volume * (peak / np.abs(volume[mask]).max())
        dh = peak / TFCE_MAX_STEPS
        ours = tfce_map(big[mask], neighbour_table(mask), True)
        ref = reference_tfce(big, mask, True, dh=dh)
        keep = np.abs(big[mask]) < np.abs(big[mask]).max()  # the peak sits exactly on the last step (rounding either way)
        np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-6, atol=0)
        assert tfce_max(big[mask], neighbour_table(mask), True) == pytest.approx(np.abs(ours).max(), rel=1e-12)
        assert np.abs(ours).max() == pytest.approx(np.abs(ref).max(), rel=1e-3)
    # +inf is the top step, NaN below every height: finite output, no crash
    values = volume[mask] * 1e3
    values[:3] = [np.inf, np.nan, -np.inf]
    out = tfce_map(values, neighbour_table(mask), True)
    assert np.isfinite(out).all() and out[0] > 0 and out[1] == 0 and out[2] < 0


@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("threshold", [0.5, 1.5])
def test_clusters_equal_scipy_labels(two_sided, threshold):
    mask, volume = _smooth_map(5)
    values = volume[mask]
    roots = cluster_roots(values, neighbour_table(mask), threshold, two_sided)
    full = np.where(mask, volume, 0.0)
    expected = []
    for sign in (1, -1) if two_sided else (1,):
        labels, n = ndimage.label(sign * full > threshold, FACES)
        expected += [frozenset(np.flatnonzero(labels[mask] == i)) for i in range(1, n + 1)]
    found = [frozenset(np.flatnonzero(roots == r)) for r in np.unique(roots[roots >= 0])]
    assert sorted(map(sorted, found)) == sorted(map(sorted, expected)) and len(expected) > 1


@pytest.mark.parametrize("two_sided", [True, False])
def test_max_cluster_size_and_mass_equal_nilearn(two_sided):
    from nilearn.mass_univariate._utils import calculate_cluster_measures

    mask, volume = _smooth_map(6)
    full = np.where(mask, volume, 0.0)
    size, mass = max_cluster_size_mass(volume[mask], neighbour_table(mask), 1.0, two_sided)
    sizes, masses = calculate_cluster_measures(full[..., None], 1.0, FACES, two_sided_test=two_sided)
    assert size == sizes[0] and size > 1
    assert mass == pytest.approx(masses[0], rel=1e-12)
