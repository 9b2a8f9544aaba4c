"""Figures of surface maps: values per vertex drawn on a template mesh, with numpy alone.

As the volume figures (figures.py), a surface figure is drawn once at the size it is shown
and embedded as a PNG: a small triangle rasteriser projects each hemisphere orthographically,
keeps the triangle nearest the viewer at every pixel (a z-buffer) and colours the pixel with
the value of the triangle's nearest vertex (a value of the map, never an interpolation of it)
over a grey background: sulcal depth where given (sulci darker), shaded by the angle between
the surface and the line of sight. Four views: the lateral views of the left and right
hemispheres above their medial views, anterior towards the outside for the lateral views.
What depends on the mesh alone (which vertex each pixel shows, the grey) is computed once per
mesh and view and shared by every map drawn on it.

Colour scale and thresholds are those of the volume figures: STAT_LUT on [-vmax, vmax] (or
[0, vmax] for one-sided maps); ``threshold=None`` draws every value, transparent at 0 and
opaque from |value| 2; a threshold draws only the vertices at or above it.

This module knows nothing of GIfTI or CIFTI: it takes (coordinates, faces, values) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .figures import PANEL_GAP, STAT_LUT, png_uri

PANEL_WIDTH = 240  # display pixels across the widest hemisphere view (anterior-posterior)
# (hemisphere, view) in figure order: lateral views on top, medial below; left hemisphere left
VIEWS = (("L", "lateral"), ("R", "lateral"), ("L", "medial"), ("R", "medial"))
_GYRUS_GREY, _SULCUS_GREY, _NO_SULC_GREY = 205.0, 140.0, 190.0


@dataclass
class Hemisphere:
    """One hemisphere to draw: its mesh, a value per vertex (NaN: no data, drawn as background)
    and optionally sulcal depth per vertex (positive in sulci, as FreeSurfer's ``sulc``)."""

    coords: np.ndarray  # (n, 3) mm, RAS
    faces: np.ndarray  # (m, 3) vertex indices
    values: np.ndarray  # (n,)
    sulc: np.ndarray | None = None


@dataclass
class SurfaceFigure:
    uri: str
    n_shown: int  # vertices at or above the threshold (non-zero where there is none)
    image: np.ndarray  # (H, W, 3) uint8, for tests


def view_axes(hemi: str, view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors (image right, image up, towards the viewer) in RAS mm for a view: the viewer
    of a left lateral view stands on the left (-x), so anterior (+y) points to the image's left."""
    toward = np.array([-1.0, 0, 0]) if (hemi == "L") == (view == "lateral") else np.array([1.0, 0, 0])
    up = np.array([0.0, 0, 1])
    right = np.cross(-toward, up)  # forward x up
    return right, up, toward


def rasterise(px: np.ndarray, py: np.ndarray, depth: np.ndarray, faces: np.ndarray,
              shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel of an image of ``shape``, the triangle that covers its centre nearest the
    viewer (larger ``depth`` is nearer) and that triangle's barycentric weights there.

    px, py: vertex positions in pixels (column, row; pixel (r, c) has its centre at c + 0.5,
    r + 0.5). Returns (H, W) int triangle index (-1: no triangle) and (H, W, 3) weights."""
    h, w = shape
    f = np.asarray(faces, dtype=np.int64)
    x, y, z = px[f], py[f], depth[f]
    c0 = np.ceil(x.min(axis=1) - 0.5).astype(np.int64)
    c1 = np.floor(x.max(axis=1) - 0.5).astype(np.int64)
    r0 = np.ceil(y.min(axis=1) - 0.5).astype(np.int64)
    r1 = np.floor(y.max(axis=1) - 0.5).astype(np.int64)
    span = np.maximum(c1 - c0, r1 - r0) + 1
    det = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    drawable = (span >= 1) & (np.abs(det) > 1e-12)
    pix_all, depth_all, tri_all, wts_all = [], [], [], []
    # triangles in groups of similar size: each group tests a k x k window of pixels per triangle
    size_class = np.ceil(np.log2(np.maximum(span, 1))).astype(np.int64)
    for cls in np.unique(size_class[drawable]):
        tri = np.flatnonzero(drawable & (size_class == cls))
        k = int(2 ** cls)
        dc, dr = np.meshgrid(np.arange(k), np.arange(k))
        cols = c0[tri, None] + dc.ravel()[None, :]
        rows = r0[tri, None] + dr.ravel()[None, :]
        ok = (cols <= c1[tri, None]) & (rows <= r1[tri, None]) & (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        t_idx = np.broadcast_to(tri[:, None], cols.shape)[ok]
        cx, cy = cols[ok] + 0.5, rows[ok] + 0.5
        xa, ya = x[t_idx, 0], y[t_idx, 0]
        d = det[t_idx]
        wb = ((cx - xa) * (y[t_idx, 2] - ya) - (x[t_idx, 2] - xa) * (cy - ya)) / d
        wc = ((x[t_idx, 1] - xa) * (cy - ya) - (cx - xa) * (y[t_idx, 1] - ya)) / d
        wa = 1.0 - wb - wc
        inside = (wa >= -1e-9) & (wb >= -1e-9) & (wc >= -1e-9)
        weights = np.stack([wa, wb, wc], axis=1)[inside]
        t_in = t_idx[inside]
        pix_all.append(rows[ok][inside] * w + cols[ok][inside])
        depth_all.append((weights * z[t_in]).sum(axis=1))
        tri_all.append(t_in)
        wts_all.append(weights)
    triangle = np.full(h * w, -1, dtype=np.int64)
    bary = np.zeros((h * w, 3))
    if pix_all:
        pix, dep = np.concatenate(pix_all), np.concatenate(depth_all)
        tris, wts = np.concatenate(tri_all), np.concatenate(wts_all)
        order = np.lexsort((tris, -dep, pix))  # per pixel: nearest first (ties: lower triangle index)
        pix, tris, wts = pix[order], tris[order], wts[order]
        first = np.r_[True, pix[1:] != pix[:-1]]
        triangle[pix[first]] = tris[first]
        bary[pix[first]] = wts[first]
    return triangle.reshape(h, w), bary.reshape(h, w, 3)


def _extent(hemi: Hemisphere) -> tuple[float, float]:
    """(anterior-posterior, inferior-superior) size in mm."""
    c = np.asarray(hemi.coords, float)
    return float(np.ptp(c[:, 1])), float(np.ptp(c[:, 2]))


_GEOMETRY_CACHE: dict = {}  # (mesh fingerprint, view, scale, shape) -> drawn vertex per pixel and grey


def _fingerprint(*arrays) -> str:
    import hashlib

    digest = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a) if a is not None else np.zeros(0)
        digest.update(repr((a.shape, a.dtype.str)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def view_geometry(hemi: Hemisphere, side: str, view: str, scale: float,
                  shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The part of a view that depends on the mesh alone: (H, W) the vertex drawn at each pixel (-1:
    background; the nearest vertex of the triangle nearest the viewer) and the shaded grey of the drawn
    pixels. Every map on the same mesh shares it: computed once per process (a figure is then a few
    lookups)."""
    key = (_fingerprint(hemi.coords, hemi.faces, hemi.sulc), side, view, float(scale), tuple(shape))
    if key in _GEOMETRY_CACHE:
        return _GEOMETRY_CACHE[key]
    coords = np.asarray(hemi.coords, np.float64)
    faces = np.asarray(hemi.faces, np.int64)
    right, up, toward = view_axes(side, view)
    u, v, depth = coords @ right, coords @ up, coords @ toward
    h, w = shape
    px = (u - (u.min() + u.max()) / 2) * scale + w / 2
    py = ((v.min() + v.max()) / 2 - v) * scale + h / 2
    triangle, bary = rasterise(px, py, depth, faces, shape)
    drawn = triangle >= 0
    tri = triangle[drawn]
    vertex = np.full((h, w), -1, dtype=np.int64)
    vertex[drawn] = faces[tri, np.argmax(bary[drawn], axis=1)]
    # grey background: sulcal depth (or one grey), shaded by the facing of the triangle
    normals = np.cross(coords[faces[:, 1]] - coords[faces[:, 0]], coords[faces[:, 2]] - coords[faces[:, 0]])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    facing = np.abs(normals[tri] @ toward)
    if hemi.sulc is not None:
        sulc = np.nan_to_num(np.asarray(hemi.sulc, np.float64))
        spread = float(np.std(sulc)) or 1.0
        depth_grey = _GYRUS_GREY + (_SULCUS_GREY - _GYRUS_GREY) * (np.tanh(2 * sulc / spread) + 1) / 2
        grey = depth_grey[vertex[drawn]]
    else:
        grey = np.full(tri.size, _NO_SULC_GREY)
    out = (vertex, grey * (0.55 + 0.45 * facing))
    if len(_GEOMETRY_CACHE) > 32:
        _GEOMETRY_CACHE.clear()
    _GEOMETRY_CACHE[key] = out
    return out


def render_view(hemi: Hemisphere, side: str, view: str, scale: float, shape: tuple[int, int], *,
                vmax: float, threshold: float | None, symmetric: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One view of one hemisphere, centred in an image of ``shape`` at ``scale`` pixels per mm.
    Returns (H, W, 3) uint8 and (H, W) the vertex drawn at each pixel (-1: background)."""
    vertex, grey = view_geometry(hemi, side, view, scale, shape)
    drawn = vertex >= 0
    base = grey[:, None] * np.ones(3)
    values = np.asarray(hemi.values, np.float64)[vertex[drawn]]
    values = np.where(np.isfinite(values), values, 0.0)
    if not symmetric:
        values = np.clip(values, 0, None)
    lut = STAT_LUT if symmetric else STAT_LUT[len(STAT_LUT) // 2:]
    cmin = -vmax if symmetric else 0.0
    idx = np.clip((values - cmin) / max(vmax - cmin, 1e-12), 0, 1) * (len(lut) - 1)
    colours = lut[np.round(idx).astype(int)].astype(np.float64)
    if threshold is None:
        alpha = np.clip(np.abs(values) / 2.0, 0, 1)
    else:
        alpha = ((np.abs(values) >= threshold) & (values != 0)).astype(np.float64)
    image = np.full(vertex.shape + (3,), 255, np.uint8)
    image[drawn] = (base * (1 - alpha[:, None]) + colours * alpha[:, None]).round().astype(np.uint8)
    return image, vertex


def surface_figure(hemispheres: dict[str, Hemisphere], *, vmax: float, threshold: float | None,
                   symmetric: bool = True, panel_width: int = PANEL_WIDTH) -> SurfaceFigure:
    """Lateral (top) and medial (bottom) views of the left and right hemispheres, one scale (pixels
    per mm) for all four, as one PNG. ``hemispheres``: 'L' and/or 'R'."""
    sizes = [_extent(h) for h in hemispheres.values()]
    scale = (panel_width - 4) / max(max(s[0] for s in sizes), 1e-6)
    height = int(np.ceil(max(s[1] for s in sizes) * scale)) + 4
    panels = {}
    for side, view in VIEWS:
        if side in hemispheres:
            panels[side, view] = render_view(hemispheres[side], side, view, scale, (height, panel_width),
                                             vmax=vmax, threshold=threshold, symmetric=symmetric)[0]
        else:
            panels[side, view] = np.full((height, panel_width, 3), 255, np.uint8)
    gap_v = np.full((height, PANEL_GAP, 3), 255, np.uint8)
    rows = [np.concatenate([panels["L", view], gap_v, panels["R", view]], axis=1) for view in ("lateral", "medial")]
    image = np.concatenate([rows[0], np.full((PANEL_GAP, rows[0].shape[1], 3), 255, np.uint8), rows[1]])
    shown = 0
    for h in hemispheres.values():
        values = np.nan_to_num(np.asarray(h.values, np.float64))
        if not symmetric:
            values = np.clip(values, 0, None)
        shown += int(np.count_nonzero((values != 0) & (np.abs(values) >= (threshold or 0))))
    return SurfaceFigure(png_uri(image), shown, image)
