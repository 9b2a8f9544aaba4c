"""Thresholds and cluster tables against nilearn and scipy on maps with known clusters."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from bidsglm.inference import (
    clusters_table,
    fdr_threshold,
    find_clusters,
    height_threshold,
    threshold_map,
)

SHAPE = (30, 34, 28)
AFFINE = np.array([[-3.0, 0, 0, 45], [0, 3.0, 0, -60], [0, 0, 3.0, -30], [0, 0, 0, 1]])


def _z_map(seed=0):
    """Smooth noise plus two positive blobs and one negative blob of known centre."""
    rng = np.random.default_rng(seed)
    z = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.0) * 2.5
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0)
    for centre, amp in (((8, 10, 10), 8.0), ((20, 22, 14), 7.0), ((15, 8, 20), -7.5)):
        z += amp * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * 2.0**2))
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    return z, mask


def _nilearn_threshold(z, mask, **kw):
    from nilearn.glm import threshold_stats_img

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img, th = threshold_stats_img(nib.Nifti1Image(z.astype(np.float64), AFFINE),
                                      mask_img=nib.Nifti1Image(mask.astype(np.uint8), AFFINE), **kw)
    return np.asanyarray(img.dataobj), th


@pytest.mark.parametrize("control,alpha", [("fpr", 0.001), ("fdr", 0.05), ("bonferroni", 0.05)])
@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("extent", [0, 10])
def test_threshold_matches_nilearn(control, alpha, two_sided, extent):
    z, mask = _z_map()
    th = height_threshold(z[mask], control, alpha, two_sided)
    ours = threshold_map(z, mask, th, extent, two_sided)
    ref, ref_th = _nilearn_threshold(z, mask, alpha=alpha, height_control=control,
                                     cluster_threshold=extent, two_sided=two_sided)
    assert th == pytest.approx(ref_th, rel=1e-12)
    assert np.array_equal(ours != 0, ref != 0)
    np.testing.assert_allclose(ours[ours != 0], ref[ref != 0], rtol=1e-12)
    assert (ours != 0).sum() > 20  # the blobs survive: the comparison is not of two empty maps


def test_fdr_matches_benjamini_hochberg_in_scipy():
    z, mask = _z_map(seed=3)
    values = z[mask]
    th = fdr_threshold(values, 0.05)
    q = stats.false_discovery_control(stats.norm.sf(values), method="bh")
    assert np.array_equal(values >= th, q <= 0.05)
    assert (values >= th).sum() > 0
    assert fdr_threshold(np.zeros(100), 0.05) == np.inf


def test_clusters_match_nilearn_table_and_known_peaks():
    from nilearn.reporting import get_clusters_table

    z, mask = _z_map()
    th = height_threshold(z[mask], "fpr", 0.001, True)
    kept = threshold_map(z, mask, th, 5, True)
    clusters = find_clusters(kept, AFFINE)
    table = clusters_table(clusters, AFFINE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_clusters_table(nib.Nifti1Image(kept, AFFINE), stat_threshold=th, cluster_threshold=5,
                                 two_sided=True)
    main = table[~table["cluster_id"].str.contains("[a-z]")]
    ref_main = ref[~ref["Cluster ID"].astype(str).str.contains("[a-z]")]
    assert len(main) == len(ref_main) == 3
    ours = np.array(sorted(zip(main["x"], main["y"], main["z"], main["peak_z"], main["cluster_size_mm3"])),
                    dtype=float)
    theirs = np.array(sorted(zip(ref_main["X"], ref_main["Y"], ref_main["Z"], ref_main["Peak Stat"],
                                 ref_main["Cluster Size (mm3)"])), dtype=float)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    # ground truth: each peak lies within one voxel of the simulated blob centre
    centres = [nib.affines.apply_affine(AFFINE, c) for c in ((8, 10, 10), (20, 22, 14), (15, 8, 20))]
    for _, row in main.iterrows():
        assert min(np.linalg.norm(np.array([row.x, row.y, row.z]) - c) for c in centres) <= 3 * np.sqrt(3)
    assert (main["peak_z"] < 0).sum() == 1  # the negative blob is its own cluster
    assert table["cluster_size_voxels"].iloc[0] == clusters[0].size


def test_subpeaks_are_at_least_8mm_apart():
    z = np.zeros((20, 20, 20))
    grid = np.indices(z.shape).transpose(1, 2, 3, 0)
    for centre in ((3, 10, 10), (9, 10, 10), (15, 10, 10)):  # 18 mm apart on a 3 mm grid
        z += 5 * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * 2.0**2))
    kept = threshold_map(z, np.ones(z.shape, bool), 1.0, 0, False)
    clusters = find_clusters(kept, AFFINE)
    assert len(clusters) == 1 and len(clusters[0].peaks) == 3
    mm = nib.affines.apply_affine(AFFINE, clusters[0].peaks)
    dists = np.linalg.norm(mm[:, None] - mm[None], axis=-1)
    assert dists[np.triu_indices(3, 1)].min() >= 8
    table = clusters_table(clusters, AFFINE)
    assert list(table["cluster_id"]) == ["1", "1a", "1b"]
    assert table["cluster_size_voxels"].isna().sum() == 2  # sizes on the cluster row only
