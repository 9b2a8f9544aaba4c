"""Cluster connectivity 6, 18 and 26: the union-find kernels, TFCE, cluster tables and extent
thresholds against scipy.ndimage.label with the matching structuring element."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bidsglm import clusterkernels as ck
from bidsglm.inference import find_clusters, threshold_map

RANKS = {6: 1, 18: 2, 26: 3}


def _smooth_map(seed=0, shape=(14, 13, 12)):
    rng = np.random.default_rng(seed)
    values = ndimage.gaussian_filter(rng.normal(size=shape), 0.8)
    values /= values.std()
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    mask[5:8, :, 4] = False  # holes in the mask
    return values, mask


def _partition(labels: np.ndarray) -> set:
    """Clusters as a set of frozensets of voxel indices (label numbering does not matter)."""
    groups = {}
    for i, lab in enumerate(labels):
        if lab >= 0:
            groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_offsets_are_the_structure_and_earlier_first(connectivity):
    offsets = ck.neighbour_offsets(connectivity)
    structure = ndimage.generate_binary_structure(3, RANKS[connectivity])
    expected = {tuple(o) for o in np.argwhere(structure) - 1 if any(o)}
    assert {tuple(o) for o in offsets} == expected and len(offsets) == connectivity
    half = len(offsets) // 2
    flat = offsets @ np.array([10000, 100, 1])  # C-order position change in a large grid
    assert np.all(flat[:half] < 0) and np.all(flat[half:] > 0)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("two_sided", [True, False])
def test_cluster_kernel_matches_ndimage_label(connectivity, two_sided):
    values, mask = _smooth_map(connectivity)
    stat = values[mask]
    table = ck.neighbour_table(mask, connectivity)
    threshold = 0.8
    roots = ck.cluster_roots(stat, table, threshold, two_sided)
    structure = ndimage.generate_binary_structure(3, RANKS[connectivity])
    expected = set()
    index = np.full(mask.shape, -1)
    index[mask] = np.arange(mask.sum())
    for sign in (1, -1) if two_sided else (1,):
        labels, n = ndimage.label((sign * values > threshold) & mask, structure)
        for i in range(1, n + 1):
            expected.add(frozenset(index[labels == i].tolist()))
    assert _partition(roots) == expected
    sizes = sorted(len(c) for c in expected)
    best_size, _ = ck.max_cluster_size_mass(stat, table, threshold, two_sided)
    assert best_size == sizes[-1]
    if connectivity > 6:  # more neighbours, fewer and larger clusters than faces alone
        faces = _partition(ck.cluster_roots(stat, ck.neighbour_table(mask, 6), threshold, two_sided))
        assert len(expected) < len(faces)


def _tfce_reference(values, mask, connectivity, E=0.5, H=2.0, dh=0.1):
    """TFCE by labelling every height with scipy (positive part)."""
    structure = ndimage.generate_binary_structure(3, RANKS[connectivity])
    out = np.zeros(values.shape)
    v = np.where(mask, values, 0.0)
    for step in range(1, int(np.floor(v.max() / dh)) + 1):
        h = step * dh
        labels, _ = ndimage.label(v >= h, structure)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        out += sizes[labels] ** E * h**H * dh
    return out[mask]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_tfce_matches_per_height_labelling(connectivity):
    values, mask = _smooth_map(3)
    ours = ck.tfce_map(values[mask], ck.neighbour_table(mask, connectivity), False)
    np.testing.assert_allclose(ours, _tfce_reference(values, mask, connectivity), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_cluster_tables_and_extents_use_the_connectivity(connectivity):
    values, mask = _smooth_map(4)
    structure = ndimage.generate_binary_structure(3, RANKS[connectivity])
    kept = threshold_map(values, mask, 1.0, 0, True, connectivity)
    clusters = find_clusters(kept, np.eye(4), connectivity=connectivity)
    expected = []
    for sign in (1, -1):
        labels, n = ndimage.label(sign * kept > 0, structure)
        expected += list(np.bincount(labels.ravel())[1:])
    assert sorted(c.size for c in clusters) == sorted(expected)
    extent = 5
    big = threshold_map(values, mask, 1.0, extent, True, connectivity)
    for sign in (1, -1):
        labels, n = ndimage.label(sign * kept > 0, structure)
        sizes = np.bincount(labels.ravel())
        keep = np.isin(labels, np.flatnonzero(sizes >= extent)) & (labels > 0)
        np.testing.assert_array_equal(sign * big > 0, keep)
