"""Surface figures: the numpy rasteriser and the four-view figure (bidsglm/surfacefigures.py).

Checked on known patterns: a flat square of two triangles (exact coverage and nearest-surface
selection), and fsaverage5's inflated hemispheres with values equal to a coordinate (the image's
left-right order follows anterior-posterior as each view should show it, the z-buffer keeps the
surface facing the viewer), thresholds (vertices below them keep the grey background) and
determinism (the same bytes on every call).
"""

from __future__ import annotations

import numpy as np
import pytest

from bidsglm.figures import STAT_LUT
from bidsglm.surfacefigures import Hemisphere, VIEWS, rasterise, render_view, surface_figure, view_axes


def fsaverage5(hemi: str, surface: str = "inflated"):
    from bidsglm.surfaces import template_mesh

    return template_mesh("fsaverage5", hemi, surface)


def test_rasterise_covers_exactly_the_pixels_inside_and_keeps_the_nearest_triangle():
    # two overlapping squares of two triangles each: (0..10)^2 at depth 0 and (5..15)^2 at depth 1
    px = np.array([0, 10, 0, 10, 5, 15, 5, 15], float)
    py = np.array([0, 0, 10, 10, 5, 5, 15, 15], float)
    depth = np.array([0, 0, 0, 0, 1, 1, 1, 1], float)
    faces = np.array([[0, 1, 2], [1, 3, 2], [4, 5, 6], [5, 7, 6]])
    triangle, bary = rasterise(px, py, depth, faces, (20, 20))
    covered = triangle >= 0
    rows, cols = np.mgrid[0:20, 0:20] + 0.5
    inside_a = (rows < 10) & (cols < 10)
    inside_b = (rows > 5) & (rows < 15) & (cols > 5) & (cols < 15)
    np.testing.assert_array_equal(covered, inside_a | inside_b)
    assert np.isin(triangle[inside_b], [2, 3]).all()  # the nearer square hides the other where they overlap
    assert np.isin(triangle[inside_a & ~inside_b], [0, 1]).all()
    np.testing.assert_allclose(bary[covered].sum(axis=1), 1.0)


def test_view_axes_put_anterior_towards_the_outside_on_lateral_views():
    assert view_axes("L", "lateral")[0] @ [0, 1, 0] == -1  # left lateral: anterior on the image's left
    assert view_axes("R", "lateral")[0] @ [0, 1, 0] == 1
    assert view_axes("L", "medial")[0] @ [0, 1, 0] == 1
    assert view_axes("R", "medial")[0] @ [0, 1, 0] == -1
    for hemi, view in VIEWS:
        right, up, toward = view_axes(hemi, view)
        assert np.allclose(np.cross(right, up), toward)  # a right-handed camera (not a mirror image)


@pytest.mark.parametrize("hemi", ["L", "R"])
def test_values_of_a_coordinate_appear_in_the_expected_order(hemi):
    coords, faces = fsaverage5(hemi)
    y = coords[:, 1]
    h = Hemisphere(coords, faces, y)
    for view in ("lateral", "medial"):
        _, vertex = render_view(h, hemi, view, 1.0, (160, 240), vmax=100, threshold=None)
        drawn = vertex >= 0
        cols = np.nonzero(drawn)[1]
        col_y = np.bincount(cols, weights=y[vertex[drawn]]) / np.maximum(np.bincount(cols), 1)
        used = np.bincount(cols) > 20
        rho = np.corrcoef(np.flatnonzero(used), col_y[used])[0, 1]
        anterior_left = (hemi == "L") == (view == "lateral")
        assert (rho < -0.98) if anterior_left else (rho > 0.98), (view, rho)


@pytest.mark.parametrize("hemi", ["L", "R"])
def test_the_surface_facing_the_viewer_is_drawn(hemi):
    """values = x: a lateral view shows the outer surface (|x| large), a medial view the inner one."""
    coords, faces = fsaverage5(hemi)
    x = coords[:, 0]
    h = Hemisphere(coords, faces, x)
    seen = {}
    for view in ("lateral", "medial"):
        _, vertex = render_view(h, hemi, view, 1.0, (160, 240), vmax=100, threshold=None)
        seen[view] = x[vertex[vertex >= 0]]
    outward = -1 if hemi == "L" else 1
    assert outward * np.median(seen["lateral"]) > outward * np.median(seen["medial"]) + 20
    # per pixel, the drawn vertex is on the near side: at most a few vertices nearer than it project there
    _, vertex = render_view(h, hemi, "lateral", 1.0, (160, 240), vmax=100, threshold=None)
    drawn_x = np.median(outward * x[vertex[vertex >= 0]])
    assert drawn_x > np.percentile(outward * x, 60)


def test_thresholded_vertices_are_not_coloured():
    coords, faces = fsaverage5("L")
    values = np.where(coords[:, 1] > 0, 5.0, 2.0)  # anterior above the threshold, posterior below
    h = Hemisphere(coords, faces, values)
    image, vertex = render_view(h, "L", "lateral", 1.0, (160, 240), vmax=6.0, threshold=3.0)
    drawn = vertex >= 0
    below = drawn & (values[np.maximum(vertex, 0)] < 3)
    above = drawn & (values[np.maximum(vertex, 0)] >= 3)
    grey = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
    assert below.sum() > 1000 and above.sum() > 1000
    assert grey[below].all()  # background only
    expected = STAT_LUT[int(round((5.0 + 6.0) / 12.0 * 255))]
    assert (image[above] == expected).all()  # exactly the scale's colour for z = 5 (no shading on colours)
    assert (image[~drawn] == 255).all()
    # without a threshold the same values are drawn (2.0 is opaque from |z| = 2)
    image, _ = render_view(h, "L", "lateral", 1.0, (160, 240), vmax=6.0, threshold=None)
    assert not ((image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2]))[below].any()


def test_one_sided_maps_use_the_positive_half_of_the_scale():
    coords, faces = fsaverage5("R")
    values = np.where(coords[:, 1] > 0, -4.0, 4.0)
    image, vertex = render_view(Hemisphere(coords, faces, values), "R", "lateral", 1.0, (160, 240), vmax=4.0,
                                threshold=1.0, symmetric=False)
    negative = (vertex >= 0) & (values[np.maximum(vertex, 0)] < 0)
    assert (image[negative][:, 0] == image[negative][:, 1]).all()  # negative values are not drawn
    positive = (vertex >= 0) & (values[np.maximum(vertex, 0)] > 0)
    assert (image[positive] == STAT_LUT[-1]).all()


def test_surface_figure_is_identical_between_runs_and_counts_vertices():
    from bidsglm.surfaces import template_sulcal_depth

    hemis = {}
    for hemi in "LR":
        coords, faces = fsaverage5(hemi)
        values = np.sin(coords[:, 1] / 10) * 4
        hemis[hemi] = Hemisphere(coords, faces, values, template_sulcal_depth("fsaverage5", hemi))
    a = surface_figure(hemis, vmax=4.0, threshold=3.0)
    b = surface_figure(hemis, vmax=4.0, threshold=3.0)
    assert a.uri == b.uri and a.uri.startswith("data:image/png;base64,")
    expected = sum(int((np.abs(h.values) >= 3).sum()) for h in hemis.values())
    assert a.n_shown == expected
    h, w, _ = a.image.shape
    assert w > 400 and h > 250
    # four panels: something drawn in each quadrant
    for rows in (slice(0, h // 2), slice(h // 2, h)):
        for cols in (slice(0, w // 2), slice(w // 2, w)):
            assert (a.image[rows, cols] != 255).any(axis=2).mean() > 0.3


def test_missing_values_and_one_hemisphere_are_drawn_as_background():
    coords, faces = fsaverage5("L")
    values = np.full(len(coords), np.nan)
    fig = surface_figure({"L": Hemisphere(coords, faces, values)}, vmax=1.0, threshold=None)
    img = fig.image
    assert fig.n_shown == 0
    drawn = (img != 255).any(axis=2)
    assert ((img[..., 0] == img[..., 1]) & (img[..., 1] == img[..., 2]))[drawn].all()
    assert not drawn[:, img.shape[1] // 2 + 10:].any()  # no right hemisphere
