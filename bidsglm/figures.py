"""Figures of the HTML reports: images built with numpy and embedded as PNG data URIs.

Embedding the PNGs keeps a report one self-contained file that opens offline.
Every figure is drawn once, at the size it is shown (one screen pixel per
display pixel), without matplotlib or nilearn's plotting: a brain figure is a
few array lookups and a PNG encode (milliseconds), so reports cost little
beside the fit. Text (titles, column names, colour scales, coordinates) is
HTML around the images, where it stays sharp and readable at any zoom.

Brain figures: a glass brain (signed maximum-intensity projections of the
voxels at or above a threshold, over the brain's silhouette) above three
slices through the peak, over anatomy: the MNI152 template that ships with
nilearn for maps in an MNI space, the run's mean or reference image (or its
brain mask) for maps in the BOLD's own space. Views are neurological (left
on the left); sagittal views face right (anterior on the right).
"""

from __future__ import annotations

import base64
import functools
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

PANEL_GAP = 6  # pixels between panels
WHITE = np.array([255, 255, 255], np.uint8)

# Diverging scale for statistics (negative: cyan -> blue, positive: red -> yellow), as
# (position in [-1, 1], RGB); one-sided maps use the positive half. The same stops are the
# CSS gradient of the colour bar, so the bar is exactly the scale drawn.
STAT_STOPS = ((-1.0, (0, 255, 255)), (-0.5, (0, 60, 255)), (0.0, (40, 0, 140)),
              (0.0, (140, 0, 20)), (0.5, (255, 40, 0)), (1.0, (255, 255, 0)))
# correlations and weights: blue - white - red
DIVERGING_STOPS = ((-1.0, (33, 102, 172)), (0.0, (247, 247, 247)), (1.0, (178, 24, 43)))


# --- PNG and colours ------------------------------------------------------------

def png_uri(rgb: np.ndarray) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI (zlib level 3: fast; no filters)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 3)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _lut(stops, n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours at n points of [-1, 1], piecewise linear between stops; two
    stops at 0 make a jump there (the negative half ends on the first, the positive
    half starts from the second)."""
    zeros = [i for i, s in enumerate(stops) if s[0] == 0]
    halves = (stops[:zeros[0] + 1], stops[zeros[-1]:])
    pos = np.linspace(-1, 1, n)
    out = np.empty((n, 3))
    for half, rows in zip(halves, (pos < 0, pos >= 0)):
        xs = np.array([s[0] for s in half], float)
        cols = np.array([s[1] for s in half], float)
        for c in range(3):
            out[rows, c] = np.interp(pos[rows], xs, cols[:, c])
    return out.round().astype(np.uint8)


STAT_LUT = _lut(STAT_STOPS)
DIVERGING_LUT = _lut(DIVERGING_STOPS)


def colour(values: np.ndarray, vmax: float, lut: np.ndarray = STAT_LUT) -> np.ndarray:
    """Colours of values on a symmetric scale [-vmax, vmax] (clipped)."""
    scaled = np.clip(np.asarray(values, float) / max(vmax, 1e-12), -1, 1)
    return lut[np.round((scaled + 1) / 2 * (len(lut) - 1)).astype(int)]


def css_gradient(symmetric: bool, stops=STAT_STOPS) -> str:
    """The CSS linear-gradient of a colour scale (left: -vmax or 0, right: vmax)."""
    used = [(p, c) for p, c in stops if symmetric or p >= 0]
    if not symmetric:
        used = used[1:] if len(used) > 1 and used[0][0] == used[1][0] else used
    lo = used[0][0]
    return "linear-gradient(to right," + ",".join(
        f"rgb{tuple(c)} {100 * (p - lo) / (1 - lo):.1f}%" for p, c in used) + ")"


def text_colour(rgb) -> str:
    """Black or white text, whichever reads better on a background colour."""
    r, g, b = (float(v) for v in rgb)
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


# --- brain figures ------------------------------------------------------------------

@dataclass
class Grid:
    """A display grid: shape and voxel-to-world affine (near RAS, isotropic voxels),
    with its anatomy (0-1 grey, NaN outside) and brain silhouette."""

    shape: tuple
    affine: np.ndarray
    anatomy: np.ndarray
    brain: np.ndarray
    scale: int  # display pixels per voxel
    silhouettes: list = field(default_factory=list)  # projections of the brain, made on first use
    background: str = "the MNI152 template"  # what the slices are drawn over, in words
    key: str = "mni152-2mm"  # identifies the grid and anatomy (reused figures must match it)


MNI_TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"  # in nilearn/datasets/data


@functools.lru_cache(maxsize=1)
def mni_grid() -> Grid:
    """nilearn's bundled MNI152 template (no download), averaged to 2 mm, brain where it
    exceeds 0.2 of its maximum (as nilearn's load_mni152_brain_mask); loaded once per
    process, read with nibabel alone (importing nilearn.datasets costs seconds)."""
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / MNI_TEMPLATE
    img = nib.load(str(path))
    t1 = np.asanyarray(img.dataobj, dtype=np.float32)
    t1 = t1[: t1.shape[0] // 2 * 2, : t1.shape[1] // 2 * 2, : t1.shape[2] // 2 * 2]
    t1 = t1.reshape(t1.shape[0] // 2, 2, t1.shape[1] // 2, 2, t1.shape[2] // 2, 2).mean(axis=(1, 3, 5))
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = img.affine[:3, :3] @ [0.5, 0.5, 0.5] + img.affine[:3, 3]
    brain = t1 > 0.2 * t1.max()
    return Grid(t1.shape, affine, _grey(t1, brain), brain, 2)


def _grey(values: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Anatomy scaled to 0-1 between its 2nd and 99.5th percentiles inside the brain; NaN outside."""
    inside = values[brain & np.isfinite(values)]
    if inside.size == 0:
        return np.full(values.shape, np.nan, np.float32)
    lo, hi = np.percentile(inside, [2, 99.5])
    grey = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)
    grey[~brain] = np.nan
    return grey


def native_grid(affine: np.ndarray, shape: tuple, anatomy: np.ndarray | None, brain: np.ndarray) -> Grid:
    """A display grid for a map in the BOLD's own space: its field of view, isotropic voxels of
    the smallest voxel size, axes ordered as RAS; anatomy (mean/reference image) on the map grid."""
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)], float)
    world = (affine @ corners.T).T[:, :3]
    size = float(np.min(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    lo, hi = world.min(axis=0), world.max(axis=0)
    disp_shape = tuple(int(v) for v in np.floor((hi - lo) / size) + 1)
    disp_affine = np.diag([size, size, size, 1.0])
    disp_affine[:3, 3] = lo
    disp_brain = resample(brain.astype(np.float32), affine, disp_shape, disp_affine) > 0.5
    values = anatomy if anatomy is not None else brain.astype(np.float32)
    grey = _grey(resample(values.astype(np.float32), affine, disp_shape, disp_affine), disp_brain)
    scale = max(1, int(round(220 / max(disp_shape))))
    return Grid(disp_shape, disp_affine, grey, disp_brain, scale,
                background="the run's mean BOLD image" if anatomy is not None else "the brain mask")


def resample(data: np.ndarray, affine: np.ndarray, shape: tuple, to_affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour values of a volume on another grid (0 outside): what each display
    voxel shows is a value of the map, never an interpolation of it."""
    m = np.linalg.solve(affine, to_affine)  # display voxel -> map voxel
    lin, off = m[:3, :3], m[:3, 3]
    if np.allclose(lin - np.diag(np.diag(lin)), 0):  # axis-aligned: one index vector per axis
        coords = [np.arange(n) * lin[a, a] + off[a] for a, n in enumerate(shape)]
        idx = [np.round(c).astype(int) for c in coords]
        # inside the map's field of view between its first and last voxel centres, as scipy
        # (and so nilearn) resamples
        ok = [(c > -1e-6) & (c < data.shape[a] - 1 + 1e-6) for a, c in enumerate(coords)]
        out = np.zeros(shape, data.dtype)
        sub = data[np.ix_(*[np.clip(i, 0, data.shape[a] - 1) for a, i in enumerate(idx)])]
        keep = ok[0][:, None, None] & ok[1][None, :, None] & ok[2][None, None, :]
        out[keep] = sub[keep]
        return out
    from scipy.ndimage import affine_transform

    return affine_transform(data, lin, off, output_shape=shape, order=0, mode="constant", cval=0.0)


def _signed_max(volume: np.ndarray, axis: int) -> np.ndarray:
    """Along an axis, the value of largest |value|, with its sign."""
    hi, lo = volume.max(axis=axis), volume.min(axis=axis)
    return np.where(-lo > hi, lo, hi)


def _orient(sag: np.ndarray, cor: np.ndarray, axi: np.ndarray) -> list[np.ndarray]:
    """Display-grid planes as images (rows top to bottom): sagittal (y, z) anterior right,
    superior up; coronal (x, z) and axial (x, y) with left on the left."""
    return [sag.T[::-1], cor.T[::-1], axi.T[::-1]]


def _axis_indices(affine: np.ndarray, shape: tuple, grid: Grid):
    """For a map on a grid parallel to the display grid: per display axis, the map index of
    each display voxel (nearest) and whether it lies in the map's field of view; else None."""
    m = np.linalg.solve(affine, grid.affine)
    lin, off = m[:3, :3], m[:3, 3]
    if not np.allclose(lin - np.diag(np.diag(lin)), 0):
        return None
    coords = [np.arange(n) * lin[a, a] + off[a] for a, n in enumerate(grid.shape)]
    idx = [np.clip(np.round(c).astype(int), 0, shape[a] - 1) for a, c in enumerate(coords)]
    ok = [(c > -1e-6) & (c < shape[a] - 1 + 1e-6) for a, c in enumerate(coords)]
    return idx, ok


def _map_views(data: np.ndarray, affine: np.ndarray, grid: Grid, glass_threshold: float):
    """Projections of the values at or above the threshold and slices through the peak, on
    the display grid; with the peak's display index (None for an empty map). Maps on grids
    parallel to the display grid are projected on their own grid and only the 2D views are
    resampled; others are resampled whole (nearest neighbour)."""
    plan = _axis_indices(affine, data.shape, grid)
    if plan is None:
        vol = resample(data, affine, grid.shape, grid.affine)
        peak = None if not vol.any() else np.unravel_index(int(np.argmax(np.abs(vol))), vol.shape)
        at = peak if peak is not None else tuple(n // 2 for n in grid.shape)
        shown = np.where(np.abs(vol) >= glass_threshold, vol, 0)
        return (_orient(*(_signed_max(shown, a) for a in range(3))),
                _orient(vol[at[0]], vol[:, at[1]], vol[:, :, at[2]]), peak)
    idx, ok = plan

    def to_display(img: np.ndarray, a: int, b: int) -> np.ndarray:
        return np.where(ok[a][:, None] & ok[b][None, :], img[np.ix_(idx[a], idx[b])], 0)

    shown = np.where(np.abs(data) >= glass_threshold, data, 0)
    projections = _orient(to_display(_signed_max(shown, 0), 1, 2), to_display(_signed_max(shown, 1), 0, 2),
                          to_display(_signed_max(shown, 2), 0, 1))
    peak = None
    if data.any():
        ijk = np.unravel_index(int(np.argmax(np.abs(data))), data.shape)
        disp = np.linalg.solve(grid.affine, affine @ [*ijk, 1])[:3]
        peak = tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(disp, grid.shape))
    at = peak if peak is not None else tuple(n // 2 for n in grid.shape)

    def plane(axis: int) -> np.ndarray:
        others = [a for a in range(3) if a != axis]
        if not ok[axis][at[axis]]:
            return np.zeros([grid.shape[a] for a in others], data.dtype)
        return to_display(np.take(data, idx[axis][at[axis]], axis=axis), *others)

    return projections, _orient(plane(0), plane(1), plane(2)), peak


def _enlarge(img: np.ndarray, k: int) -> np.ndarray:
    return img if k == 1 else np.repeat(np.repeat(img, k, axis=0), k, axis=1)


def _row(panels: list[np.ndarray], height: int) -> np.ndarray:
    """Panels side by side, top-aligned, separated by white gaps."""
    parts = []
    for i, p in enumerate(panels):
        padded = np.full((height, p.shape[1], 3), 255, np.uint8)
        padded[:p.shape[0]] = p
        parts.append(padded)
        if i < len(panels) - 1:
            parts.append(np.full((height, PANEL_GAP, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    return mask & ~inner


@dataclass
class BrainFigure:
    uri: str
    peak_mm: tuple | None  # world coordinates of the slices (the peak), None for an empty map
    n_shown: int  # voxels of the map at or above the glass-brain threshold


def brain_figure(data: np.ndarray, affine: np.ndarray, grid: Grid, *, vmax: float, glass_threshold: float,
                 slice_threshold: float | None, symmetric: bool = True) -> BrainFigure:
    """Glass brain (|value| >= glass_threshold) above slices through the peak.

    ``slice_threshold`` hides |values| below it on the slices; None draws every value,
    fading from transparent at 0 to opaque at |value| >= 2 so the anatomy stays visible
    under weak effects. One-sided maps (``symmetric=False``) use the positive half
    of the scale, 0 to vmax."""
    data = np.nan_to_num(data.astype(np.float32, copy=False))
    if not symmetric:
        data = np.clip(data, 0, None)
    lut = STAT_LUT if symmetric else STAT_LUT[len(STAT_LUT) // 2:]
    cmin = -vmax if symmetric else 0.0

    def paint(values: np.ndarray, base: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        idx = np.clip((values - cmin) / max(vmax - cmin, 1e-12), 0, 1) * (len(lut) - 1)
        rgb = lut[np.round(idx).astype(int)].astype(np.float32)
        return (base * (1 - alpha[..., None]) + rgb * alpha[..., None]).round().astype(np.uint8)

    projected, planes, peak = _map_views(data, affine, grid, glass_threshold)
    at = peak if peak is not None else tuple(n // 2 for n in grid.shape)
    if not grid.silhouettes:  # one assignment: figures of one grid may be drawn in parallel threads
        grid.silhouettes = [p != 0 for p in _orient(*(grid.brain.any(axis=a) for a in range(3)))]
    glass, slices = [], []
    for values, sil in zip(projected, grid.silhouettes):
        base = np.where(sil[..., None], 236, 255).astype(np.float32) * np.ones(3, np.float32)
        base[_outline(sil)] = 150
        glass.append(_enlarge(paint(values, base, (values != 0).astype(np.float32)), grid.scale))
    anatomy = _orient(grid.anatomy[at[0]], grid.anatomy[:, at[1]], grid.anatomy[:, :, at[2]])
    for values, grey in zip(planes, anatomy):
        base = np.where(np.isnan(grey), 255.0, 25 + 210 * np.nan_to_num(grey))[..., None] * np.ones(3, np.float32)
        if slice_threshold is None:
            alpha = np.clip(np.abs(values) / 2.0, 0, 1)
        else:
            alpha = ((np.abs(values) >= slice_threshold) & (values != 0)).astype(np.float32)
        slices.append(_enlarge(paint(values, base, alpha), grid.scale))
    height = max(p.shape[0] for p in glass + slices)
    top, bottom = _row(glass, height), _row(slices, height)
    image = np.concatenate([top, np.full((PANEL_GAP, top.shape[1], 3), 255, np.uint8), bottom])
    peak_mm = None if peak is None else tuple(float(v) for v in (grid.affine @ [*peak, 1])[:3])
    # voxels of the map itself (the display grid repeats each map voxel)
    return BrainFigure(png_uri(image), peak_mm, int(np.count_nonzero(np.abs(data) >= glass_threshold)))


# --- design figures -------------------------------------------------------------------

def column_width(n_columns: int, room: int = 1100) -> int:
    """Pixels per design column: wide enough for a label, narrow enough to fit ``room``."""
    n = max(n_columns, 1)
    return int(max(6, min(max(22, 120 // n), room // n)))  # a design of one or two columns still shows


def design_image(design: pd.DataFrame, width: int, row_height: float = 1.0, diverging: bool = False) -> str:
    """A design matrix as an image, ``width`` pixels per column: each column scaled to its
    largest |value| (as nilearn draws designs), grey (white lowest, black highest) or, for
    group designs, blue-white-red (negative, 0, positive)."""
    values = design.to_numpy(dtype=float)
    peak = np.abs(values).max(axis=0)
    scaled = values / np.where(peak > 0, peak, 1.0)
    if diverging:
        rgb = colour(scaled, 1.0, DIVERGING_LUT)
    else:  # per column: white at its lowest value (0, or -1 where it has negative values), black at 1
        low = np.minimum(scaled.min(axis=0), 0.0)
        grey = (255 * (1 - (scaled - low) / (1 - low))).round().astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
    rows = np.round(np.arange(max(1, round(values.shape[0] * row_height))) / row_height).astype(int)
    rgb = np.repeat(rgb[np.clip(rows, 0, values.shape[0] - 1)], width, axis=1)
    rgb[:, ::width] = np.minimum(rgb[:, ::width], 200)  # faint column separators
    rgb = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), constant_values=120)  # a frame: white cells stay visible
    return png_uri(rgb)


def read_map(path: Path):
    """Data (3D float32) and affine of a map; nibabel only."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    return data.reshape(data.shape[:3]), img.affine
