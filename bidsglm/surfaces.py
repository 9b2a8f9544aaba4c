"""Surfaces and grayordinates: the format layer for CIFTI-2 and GIfTI data.

fMRIPrep writes ``*_space-fsLR_den-91k_bold.dtseries.nii`` (CIFTI-2: both cortical
surfaces without the medial wall, plus subcortical voxels) and
``*_hemi-L|R_space-fsaverage5_bold.func.gii`` (one GIfTI per hemisphere). Here they
become what the GLM, fixed effects and group models already take: a (time x elements)
array, plus a ``Geometry`` saying how to write element values back (brain models
copied from the input, or one file per hemisphere) and, where a template mesh ships
offline, which elements neighbour each other.

Everything else about a map path is the volume path's: writers take the name the
volume path would use (``..._statmap.nii.gz``) and ``map_path`` turns it into
``..._statmap.dscalar.nii`` or ``..._hemi-L_..._statmap.shape.gii`` (the hemi-R file
beside it). A GIfTI pair's sidecar drops ``hemi-`` so that, by BIDS inheritance, it
describes both hemisphere files.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, UsageError

CIFTI_SPACES = ("fsLR",)
GIFTI_SPACES = ("fsaverage5", "fsaverage6", "fsaverage", "fsnative")
HEMIS = ("L", "R")
# template meshes that ship inside an installed package (nilearn), so clusters can be formed offline
SHIPPED_MESHES = {"fsaverage5": 10242}
# vertices per hemisphere of each template space with a known size (fsnative: each subject's own)
TEMPLATE_SPACE_VERTICES = {"fsaverage": 163842, "fsaverage6": 40962, "fsaverage5": 10242}
# vertices per hemisphere of the fsLR mesh a CIFTI density (grayordinates, or mesh) label names
FSLR_DENSITY_VERTICES = {"91k": 32492, "32k": 32492, "170k": 59412, "59k": 59412, "164k": 163842}
_GIFTI_STRUCTURE = {"L": "CortexLeft", "R": "CortexRight"}


def space_kind(space: str | None) -> str:
    """'cifti', 'gifti' or 'volume' for a space label."""
    if space in CIFTI_SPACES:
        return "cifti"
    if space in GIFTI_SPACES:
        return "gifti"
    return "volume"


def kind_of_path(path: Path) -> str:
    name = Path(path).name
    if name.endswith((".dtseries.nii", ".dscalar.nii")):
        return "cifti"
    if name.endswith((".func.gii", ".shape.gii")):
        return "gifti"
    return "volume"


def check_smoothing(space: str, fwhm: float | None, geom: "Geometry | None" = None) -> None:
    """Volumetric smoothing does not apply on surfaces: they are smoothed on the template mesh
    (``smooth_elements``), which needs a mesh that ships offline for the space (UsageError) and
    data on that mesh (``geom``'s hemispheres of its vertex count; DataError)."""
    if space_kind(space) != "volume" and fwhm and geom is not None:
        check_smoothing(space, fwhm)
        for hemi, _, _, n_vertices in _cortex_parts(geom):
            n_mesh = len(template_mesh(space, hemi)[0])
            if n_vertices != n_mesh:
                raise DataError(f"--smoothing-fwhm {fwhm:g}: hemisphere {hemi} of the data has {n_vertices} "
                                f"vertices, the {space} template mesh {n_mesh}: the data are not on this mesh")
        return
    if space_kind(space) != "volume" and fwhm:
        hemis = HEMIS if space in GIFTI_SPACES or space in CIFTI_SPACES else ()
        try:
            for hemi in hemis:
                template_mesh(space, hemi)
        except DataError:
            hemis = ()
        if not hemis:
            raise UsageError(
                f"--smoothing-fwhm {fwhm:g}: smoothing on --space {space} needs its template mesh, and none "
                "ships offline (surface smoothing works on fsaverage5 and fsLR 32k); pass --smoothing-fwhm 0 or smooth "
                "before bidsglm")


# --- geometry -------------------------------------------------------------------------

@dataclass
class Geometry:
    """How the elements of a surface map are laid out.

    cifti: ``brain_models`` (nibabel's BrainModelAxis, copied from the input into every map);
    gifti: ``hemi_sizes`` (vertices in the left and right files; elements are left then right)."""

    kind: str
    n_elements: int
    brain_models: object = None
    hemi_sizes: tuple = ()
    space: str = ""
    _neighbours: np.ndarray | None = field(default=None, repr=False)
    _mesh: object = field(default=None, repr=False, compare=False)  # geometry_mesh's result, once built

    def same_as(self, other: "Geometry") -> bool:
        if not isinstance(other, Geometry) or self.kind != other.kind or self.n_elements != other.n_elements:
            return False
        if self.kind == "cifti":
            return self.brain_models == other.brain_models
        return tuple(self.hemi_sizes) == tuple(other.hemi_sizes)

    def describe(self) -> str:
        if self.kind == "cifti":
            names = sorted({n.replace("CIFTI_STRUCTURE_", "") for n in self.brain_models.name})
            return f"{self.n_elements} grayordinates ({len(names)} structures)"
        return f"{self.hemi_sizes[0]} + {self.hemi_sizes[1]} vertices (L + R)"


def same_grid(a, b) -> bool:
    """Volume affines or surface geometries describe the same elements."""
    if isinstance(a, Geometry) or isinstance(b, Geometry):
        return isinstance(a, Geometry) and a.same_as(b)
    return np.allclose(a, b, atol=1e-4)


# --- reading --------------------------------------------------------------------------

def _load(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken files
        raise DataError(f"not a readable CIFTI/GIfTI file ({exc})", path) from exc


def cifti_series_info(path: Path) -> tuple[int, float | None, Geometry]:
    """Volumes, series step in seconds (None if the axis is not in seconds) and geometry; header only."""
    import nibabel as nib

    img = _load(path)
    if not isinstance(img, nib.Cifti2Image):
        raise DataError("not a CIFTI-2 file", path)
    try:
        series, models = img.header.get_axis(0), img.header.get_axis(1)
    except Exception as exc:  # nibabel raises many types for a broken CIFTI header
        raise DataError(f"unreadable CIFTI axes ({exc})", path) from exc
    if not isinstance(series, nib.cifti2.SeriesAxis) or not isinstance(models, nib.cifti2.BrainModelAxis):
        raise DataError("expected a dtseries: a series axis (rows) and brain models (columns)", path)
    if str(series.unit).upper() != "SECOND":
        raise DataError(f"the series axis is in {series.unit}, not SECOND: not a time series", path)
    if not (np.isfinite(series.step) and series.step > 0):
        raise DataError(f"the series axis step is {series.step:g} s: a time series needs a positive step", path)
    check_brain_models(models, path)
    check_fslr_density(models, path)
    return int(series.size), float(series.step), Geometry("cifti", len(models), brain_models=models)


def check_fslr_density(models, path: Path) -> None:
    """A ``space-fsLR_den-<label>`` file's cortex must be on the mesh its density names (den-91k and
    den-32k: 32,492 vertices per hemisphere; den-170k/59k: 59,412; den-164k: 163,842)."""
    name = Path(path).name
    found = re.search(r"_space-fsLR_(?:[a-z]+-[A-Za-z0-9]+_)*?den-([A-Za-z0-9]+)_", name)
    expected = FSLR_DENSITY_VERTICES.get(found.group(1)) if found else None
    if expected is None:
        return
    for structure, count in models.nvertices.items():
        if structure in _CIFTI_CORTEX and count != expected:
            raise DataError(f"brain model {structure.replace('CIFTI_STRUCTURE_', '')} is on a surface of {count} "
                            f"vertices, but fsLR den-{found.group(1)} has {expected} per hemisphere", path)


def check_brain_models(models, path: Path) -> None:
    """Brain models Workbench would accept: vertex indices within each surface's vertex count, voxel
    indices within the volume, no grayordinate listed twice (DataError naming the file)."""
    names = np.asarray(models.name)
    vertices = np.asarray(models.vertex, dtype=np.int64)
    surface = np.asarray(models.surface_mask, bool)
    for name, count in models.nvertices.items():
        these = vertices[surface & (names == name)]
        bad = (these < 0) | (these >= count)
        if bad.any():
            raise DataError(f"brain model {name.replace('CIFTI_STRUCTURE_', '')} lists vertex {int(these[bad][0])}, "
                            f"outside its surface of {count} vertices", path)
        if np.unique(these).size != these.size:
            raise DataError(f"brain model {name.replace('CIFTI_STRUCTURE_', '')} lists a vertex twice "
                            "(duplicate grayordinate)", path)
    volume = np.asarray(models.volume_mask, bool)
    if volume.any():
        ijk = np.asarray(models.voxel, dtype=np.int64)[volume]
        shape = np.asarray(models.volume_shape if models.volume_shape is not None else (0, 0, 0))
        bad = (ijk < 0).any(axis=1) | (ijk >= shape).any(axis=1)
        if bad.any():
            raise DataError(f"a voxel brain model lists voxel {tuple(int(i) for i in ijk[bad][0])}, outside the "
                            f"volume of shape {tuple(int(n) for n in shape)}", path)
        if np.unique(ijk, axis=0).shape[0] != ijk.shape[0]:
            raise DataError("voxel brain models list a voxel twice (duplicate grayordinate)", path)


def read_cifti_series(path: Path) -> tuple[np.ndarray, Geometry]:
    """(T, V) float32 data and the geometry of a dtseries."""
    _, _, geom = cifti_series_info(path)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, left out as non-finite
            data = np.asarray(_load(path).get_fdata(dtype=np.float32))
    except Exception as exc:
        raise DataError(f"cannot read CIFTI data ({exc})", path) from exc
    return data, geom


def _gifti_arrays(path: Path, img=None) -> np.ndarray:
    """(T, V) of a func.gii (one data array per volume) or (1, V) of a shape.gii (``img``: the file,
    when the caller has loaded it)."""
    import nibabel as nib

    img = _load(path) if img is None else img
    if not isinstance(img, nib.gifti.GiftiImage) or not img.darrays:
        raise DataError("not a GIfTI file with data arrays", path)
    arrays = [np.asarray(d.data) for d in img.darrays]
    if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        raise DataError("GIfTI data arrays are not vectors of one length (a mesh file, not data?)", path)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, left out as non-finite
        return np.stack(arrays).astype(np.float32)


GIFTI_TIMESTEP_MS_ABOVE = 100.0  # a TimeStep above this is in milliseconds (Workbench writes ms)


def gifti_time_step(path: Path, img=None) -> float | None:
    """Seconds between volumes from a func.gii's ``TimeStep`` metadata (file-level, else the first data
    array's), or None where absent. Workbench writes milliseconds, AFNI seconds: values above 100 are
    read as milliseconds (no fMRI TR is 100 s). A TimeStep that is not a positive number: DataError."""
    img = _load(path) if img is None else img
    metas = [getattr(img, "meta", None)] + [getattr(d, "meta", None) for d in getattr(img, "darrays", [])[:1]]
    for meta in metas:
        value = (meta or {}).get("TimeStep") if meta is not None else None
        if value is None:
            continue
        try:
            step = float(value)
        except (TypeError, ValueError) as exc:
            raise DataError(f"GIfTI TimeStep metadata {value!r} is not a number", path) from exc
        if not (np.isfinite(step) and step > 0):
            raise DataError(f"GIfTI TimeStep metadata {value!r} is not a positive number of seconds", path)
        return step / 1000 if step > GIFTI_TIMESTEP_MS_ABOVE else step
    return None


def gifti_partner(path: Path) -> Path:
    """The hemi-R file of a hemi-L file (or the reverse)."""
    name = path.name
    if "_hemi-L_" in name:
        return path.with_name(name.replace("_hemi-L_", "_hemi-R_"))
    return path.with_name(name.replace("_hemi-R_", "_hemi-L_"))


def read_gifti_pair(left: Path, right: Path, space: str = "", left_img=None) -> tuple[np.ndarray, Geometry]:
    """(T, V_L + V_R) data of a hemisphere pair, left then right (``left_img``: the left file, loaded)."""
    yl, yr = _gifti_arrays(left, left_img), _gifti_arrays(right)
    if yl.shape[0] != yr.shape[0]:
        raise DataError(f"hemispheres differ in length: {yl.shape[0]} volumes in {left.name}, "
                        f"{yr.shape[0]} here", right)
    if yl.shape[1] != yr.shape[1] and space != "fsnative":
        raise DataError(f"hemispheres differ in vertex count on template {space}: {yl.shape[1]} in "
                        f"{left.name}, {yr.shape[1]} here", right)
    expected = TEMPLATE_SPACE_VERTICES.get(space)
    if expected is not None and yl.shape[1] != expected:
        raise DataError(f"{yl.shape[1]} vertices per hemisphere, but {space} has {expected}", left)
    geom = Geometry("gifti", yl.shape[1] + yr.shape[1], hemi_sizes=(yl.shape[1], yr.shape[1]), space=space)
    return np.hstack([yl, yr]), geom


def usable_elements(Y: np.ndarray) -> np.ndarray:
    """Elements with finite, non-constant time series: the surface "mask" (a constant element,
    such as zeros outside the data, has no variance to test)."""
    finite = np.isfinite(Y).all(axis=0)
    with np.errstate(over="ignore", invalid="ignore"):  # a range beyond float32 still varies
        varying = np.ptp(np.where(finite, Y, 0), axis=0) > 0
    return finite & varying


def read_map(path: Path) -> tuple[np.ndarray, Geometry]:
    """(V,) values of a dscalar (first map) or of a GIfTI pair given by either hemisphere."""
    if kind_of_path(path) == "cifti":
        import nibabel as nib

        img = _load(path)
        try:
            maps, models = img.header.get_axis(0), img.header.get_axis(1)
        except Exception as exc:  # nibabel raises many types for a broken CIFTI header
            raise DataError(f"unreadable CIFTI axes ({exc})", path) from exc
        if not isinstance(models, nib.cifti2.BrainModelAxis):
            raise DataError("expected brain models on the columns of a CIFTI map", path)
        if not isinstance(maps, nib.cifti2.ScalarAxis) or len(maps) != 1:
            what = "a series (dtseries)" if isinstance(maps, nib.cifti2.SeriesAxis) else f"{len(maps)} rows"
            raise DataError(f"expected a dscalar with one map, got {what}", path)
        check_brain_models(models, path)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                values = np.asarray(img.get_fdata(dtype=np.float32))[0]
        except Exception as exc:
            raise DataError(f"cannot read CIFTI data ({exc})", path) from exc
        return values, Geometry("cifti", len(models), brain_models=models)
    left = path if "_hemi-L_" in path.name else gifti_partner(path)
    right = gifti_partner(left)
    for p in (left, right):
        if not p.is_file():
            raise DataError("the other hemisphere of this map is missing", p)
    space = re.search(r"_space-([A-Za-z0-9]+)", path.name)
    Y, geom = read_gifti_pair(left, right, space.group(1) if space else "")
    return Y[0], geom


# --- writing --------------------------------------------------------------------------

def map_path(path: Path, space: str | None) -> Path:
    """The name a map gets in ``space``, from the volume path's ``...nii.gz`` name."""
    return path_for_kind(path, space_kind(space))


def path_for_grid(path: Path, grid) -> Path:
    """As ``map_path``, for a map on ``grid`` (an affine, or a surface Geometry)."""
    return path_for_kind(path, grid.kind if isinstance(grid, Geometry) else "volume")


def path_for_kind(path: Path, kind: str) -> Path:
    name = Path(path).name
    if kind == "volume" or not name.endswith(".nii.gz"):
        return Path(path)
    stem = name[: -len(".nii.gz")]
    if kind == "cifti":
        return Path(path).with_name(stem + ".dscalar.nii")
    if "_hemi-" not in stem:
        stem = stem.replace("_space-", "_hemi-L_space-", 1) if "_space-" in stem else "hemi-L_" + stem
    return Path(path).with_name(stem + ".shape.gii")


def map_files(path: Path, values: np.ndarray, geom: Geometry, name: str = "") -> list[tuple[Path, bytes]]:
    """(path, bytes) of each file of one map: one dscalar, or hemi-R then hemi-L (the hemi-L file is
    written last, so its presence means the pair is complete)."""
    import nibabel as nib

    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if values.size != geom.n_elements:
        raise ValueError(f"{values.size} values for {geom.n_elements} elements")
    if geom.kind == "cifti":
        return [(path, _cifti_header_bytes(geom, name or "values") + values.astype("<f4").tobytes())]
    left = path if "_hemi-L_" in path.name else gifti_partner(path)
    n_left = geom.hemi_sizes[0]
    out = []
    for hemi, part, target in (("R", values[n_left:], gifti_partner(left)), ("L", values[:n_left], left)):
        darray = nib.gifti.GiftiDataArray(part, intent="NIFTI_INTENT_NONE", datatype="NIFTI_TYPE_FLOAT32")
        meta = nib.gifti.GiftiMetaData({"AnatomicalStructurePrimary": _GIFTI_STRUCTURE[hemi]})
        out.append((target, nib.gifti.GiftiImage(darrays=[darray], meta=meta).to_bytes()))
    return out


_HEADERS: dict = {}  # (brain models fingerprint, map name) -> dscalar bytes before the data


def _cifti_header_bytes(geom: Geometry, name: str) -> bytes:
    """NIfTI-2 header and CIFTI XML of a one-map dscalar: serialising 91k brain models takes about
    a second, and every map of a run (and of a study) shares them, so they are built once (hence one
    map name, "values", for all: the file name says which statistic it is)."""
    import hashlib

    import nibabel as nib

    models = geom.brain_models
    digest = hashlib.sha1()
    for array in (models.name, models.vertex, models.voxel, models.affine if models.affine is not None else 0):
        digest.update(np.ascontiguousarray(np.asarray(array).astype(str) if np.asarray(array).dtype == object
                                           else np.asarray(array)).tobytes())
    digest.update(repr(sorted(models.nvertices.items())).encode())
    key = (digest.hexdigest(), name)
    if key not in _HEADERS:
        img = nib.Cifti2Image(np.zeros((1, len(models)), np.float32),
                              header=(nib.cifti2.ScalarAxis([name]), models))
        img.nifti_header.set_intent("ConnDenseScalar")
        full = img.to_bytes()
        if len(_HEADERS) > 64:
            _HEADERS.clear()
        _HEADERS[key] = full[: len(full) - 4 * len(models)]
    return _HEADERS[key]


def pair_paths(path: Path) -> list[Path]:
    """Every file of a map (a GIfTI map has two)."""
    return [gifti_partner(path), path] if kind_of_path(path) == "gifti" else [path]


# --- template meshes and adjacency ------------------------------------------------------

TEMPLATE_VERTICES = {"fsaverage5": 10242, "fsLR": 32492}  # vertices per hemisphere of each shipped mesh
_DATA = Path(__file__).parent / "data"
_CIFTI_CORTEX = {"CIFTI_STRUCTURE_CORTEX_LEFT": "L", "CIFTI_STRUCTURE_CORTEX_RIGHT": "R"}


class TemplateMeshError(DataError):
    """No template mesh ships offline for this space, or it does not match the data."""


def template_mesh(space: str, hemi: str, surface: str = "midthickness") -> tuple[np.ndarray, np.ndarray]:
    """(coords (V, 3) float mm, faces (F, 3) int) of a template hemisphere, from files inside installed
    packages (never downloaded): fsaverage5 from nilearn (midthickness = mean of its pial and white
    surfaces; also 'pial', 'white', 'inflated', 'sphere'), fsLR (32k) from bidsglm/data (the
    midthickness and 'sphere'; see fsLR32k_NOTICE.txt). Read-only arrays, cached."""
    coords, faces = _template_mesh(space, hemi, surface)
    return coords, faces


@functools.lru_cache(maxsize=16)
def _template_mesh(space: str, hemi: str, surface: str):
    if hemi not in HEMIS:
        raise TemplateMeshError(f"hemisphere must be one of {', '.join(HEMIS)}, got {hemi!r}")
    space = "fsLR" if space in ("fsLR", "fsLR32k", "fsLR:den-91k", "fsLR:den-32k") else space
    if space == "fsaverage5" and surface in ("midthickness", "pial", "white", "inflated", "sphere"):
        names = ("pial", "white") if surface == "midthickness" else (surface,)
        meshes = [_nilearn_fsaverage5(_NILEARN_SURFACES[n], hemi) for n in names]  # ship inside nilearn
        coords = np.mean([np.asarray(m.darrays[0].data, dtype=np.float64) for m in meshes], axis=0)
        faces = np.asarray(meshes[0].darrays[1].data, dtype=np.int64)
    elif space == "fsLR" and surface in ("midthickness", "sphere"):
        with np.load(_DATA / f"fsLR32k_hemi-{hemi}.npz") as data:
            coords = data[surface].astype(np.float64)
            faces = data["faces"].astype(np.int64)
    else:
        raise TemplateMeshError(f"no {surface} template mesh ships offline for space {space!r} "
                                f"(available: fsaverage5, fsLR 32k)")
    coords.setflags(write=False)
    faces.setflags(write=False)
    return coords, faces


def fslr_cortex_mask(hemi: str) -> np.ndarray:
    """(32492,) bool: cortex (True) or medial wall, BrainSpace's mask for the fsLR 32k mesh (CIFTI data
    carry their own list of cortical vertices, which is what the analyses use)."""
    with np.load(_DATA / f"fsLR32k_hemi-{hemi}.npz") as data:
        return data["cortex"].copy()


def mesh_neighbour_table(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """(V, D) int32 neighbours of each vertex (sharing a triangle edge), -1 padded."""
    import scipy.sparse as sp

    f = np.asarray(faces, dtype=np.int64)
    i = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    j = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    adj = sp.csr_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n_vertices, n_vertices))
    adj.sum_duplicates()
    adj.sort_indices()
    degree = np.diff(adj.indptr)
    table = np.full((n_vertices, max(int(degree.max(initial=0)), 1)), -1, dtype=np.int32)
    rows = np.repeat(np.arange(n_vertices), degree)
    cols = np.arange(adj.indices.size) - np.repeat(adj.indptr[:-1], degree)
    table[rows, cols] = adj.indices
    return table


def mesh_edges(faces: np.ndarray) -> np.ndarray:
    """(3F, 2) vertex pairs of a triangle mesh's edges (each edge once per triangle)."""
    f = np.asarray(faces, dtype=np.int64)
    return np.vstack([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])


def vertex_areas(coords: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """mm^2 per vertex: a third of the area of each triangle it belongs to."""
    c = np.asarray(coords, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    tri = 0.5 * np.linalg.norm(np.cross(c[f[:, 1]] - c[f[:, 0]], c[f[:, 2]] - c[f[:, 0]]), axis=1)
    return np.bincount(f.ravel(), weights=np.repeat(tri / 3, 3), minlength=len(c))


@dataclass
class Mesh:
    """The elements of a surface geometry as one graph: template vertices (sharing a triangle edge)
    and, for CIFTI, subcortical voxels (sharing a face); no edge joins the two or the hemispheres."""

    neighbours: np.ndarray  # (V, 2D) in clusterkernels' earlier/later layout
    areas: np.ndarray  # (V,) mm^2 on the template midthickness (0 for voxels)
    coords: np.ndarray  # (V, 3) template midthickness or voxel centre coordinates (mm)
    structure: np.ndarray  # (V,) CIFTI structure name without CIFTI_STRUCTURE_ (CORTEX_LEFT, THALAMUS_RIGHT...)
    vertex: np.ndarray  # (V,) template vertex index (-1 for voxels)
    name: str
    space: str = ""

    @property
    def is_vertex(self) -> np.ndarray:
        return self.vertex >= 0


def _hemi_label(structure: str) -> str:
    return "L" if structure.endswith("LEFT") else "R" if structure.endswith("RIGHT") else ""


def geometry_mesh(geom: Geometry) -> Mesh | None:
    """The element graph of a geometry on its shipped template mesh; None where no mesh ships
    (fsaverage6, fsaverage, fsnative; CIFTI without cortex). A CIFTI whose cortex is not on the fsLR
    32k mesh raises TemplateMeshError. Built once per geometry."""
    if geom._mesh is None:
        geom._mesh = _gifti_mesh(geom) if geom.kind == "gifti" else _cifti_mesh(geom)
    return geom._mesh or None


def _gifti_mesh(geom: Geometry):
    from . import clusterkernels as ck

    if TEMPLATE_VERTICES.get(geom.space) is None or geom.space == "fsLR":
        return False
    n = TEMPLATE_VERTICES[geom.space]
    if tuple(geom.hemi_sizes) != (n, n):
        raise TemplateMeshError(f"{geom.hemi_sizes[0]} + {geom.hemi_sizes[1]} vertices, but the {geom.space} "
                                f"template mesh has {n} per hemisphere")
    edges, areas, coords = [], [], []
    for k, hemi in enumerate(HEMIS):
        xyz, faces = template_mesh(geom.space, hemi)
        edges.append(mesh_edges(faces) + k * n)
        areas.append(vertex_areas(xyz, faces))
        coords.append(xyz)
    structure = np.repeat(["CORTEX_LEFT", "CORTEX_RIGHT"], n)
    return Mesh(ck.graph_neighbour_table(ck.edge_adjacency(np.vstack(edges), 2 * n)), np.concatenate(areas),
                np.vstack(coords), structure, np.tile(np.arange(n), 2),
                f"vertices sharing a triangle edge of the {geom.space} template mesh", geom.space)


def _cifti_mesh(geom: Geometry):
    """Cortical grayordinates are vertices of the fsLR mesh (the brain models' vertex indices: the
    medial wall is not in the data); subcortical voxels join their face neighbours (across structures,
    as one volume)."""
    from . import clusterkernels as ck

    models = geom.brain_models
    names = np.asarray(models.name).astype(str)
    short = np.char.replace(names, "CIFTI_STRUCTURE_", "")
    n_el = len(names)
    vertex = np.full(n_el, -1, dtype=np.int64)
    coords = np.zeros((n_el, 3))
    areas = np.zeros(n_el)
    edges = []
    surface = np.asarray(models.vertex) >= 0  # nibabel: -1 for voxels (as surface_mask, without a Python loop)
    if not surface.any():
        return False
    n_template = TEMPLATE_VERTICES["fsLR"]
    for structure, hemi in _CIFTI_CORTEX.items():
        where = np.flatnonzero(names == structure)
        if where.size == 0:
            continue
        n_mesh = models.nvertices[structure]
        if n_mesh != n_template:
            raise TemplateMeshError(f"the CIFTI {hemi} cortex is on a mesh of {n_mesh} vertices, but the fsLR "
                                    f"template mesh shipped has {n_template} (den-91k); clusters need a "
                                    "matching mesh")
        xyz, faces = template_mesh("fsLR", hemi)
        index = np.full(n_mesh, -1, dtype=np.int64)
        index[np.asarray(models.vertex)[where]] = where
        e = index[mesh_edges(faces)]
        edges.append(e[(e >= 0).all(axis=1)])
        vertex[where] = np.asarray(models.vertex)[where]
        coords[where] = xyz[vertex[where]]
        areas[where] = vertex_areas(xyz, faces)[vertex[where]]
    unknown = surface & (vertex < 0)
    if unknown.any():
        raise TemplateMeshError(f"CIFTI surface structure {short[unknown][0]} has no template mesh "
                                "(only the left and right cortex are on fsLR)")
    voxels = np.flatnonzero(~surface)
    if voxels.size:
        ijk = np.asarray(models.voxel)[voxels].astype(np.int64)
        coords[voxels] = nib_apply_affine(models.affine, ijk)
        shape = tuple(ijk.max(axis=0) + 2)
        grid = np.full(shape, -1, dtype=np.int64)
        grid[tuple(ijk.T)] = voxels
        for axis in range(3):
            step = np.zeros(3, dtype=np.int64)
            step[axis] = 1
            other = grid[tuple((ijk + step).T)]
            pairs = np.c_[voxels, other]
            edges.append(pairs[other >= 0])
    table = ck.graph_neighbour_table(ck.edge_adjacency(np.vstack(edges) if edges else np.zeros((0, 2)), n_el))
    return Mesh(table, areas, coords, short, vertex,
                "vertices sharing a triangle edge of the fsLR 32k template mesh; subcortical voxels sharing a face",
                "fsLR")


def nib_apply_affine(affine, ijk):
    import nibabel as nib

    return nib.affines.apply_affine(np.asarray(affine, dtype=np.float64), ijk)


def no_neighbours(mask: np.ndarray) -> np.ndarray:
    """A (V, 6) neighbour table without neighbours: where no template mesh ships, clusters are single
    elements and only voxel-wise maxima are used."""
    return np.full((int(mask.sum()), 6), -1, dtype=np.int32)


SURFACE_TFCE_E = 1.0  # TFCE extent exponent on surfaces (Smith & Nichols 2009: E 1, H 2 for 2D)


def restrict_to_mask(mesh: Mesh, mask: np.ndarray) -> np.ndarray:
    """The element graph's neighbour table over the masked elements, renumbered, for the cluster and
    TFCE kernels."""
    from . import clusterkernels as ck

    return ck.restrict_table(mesh.neighbours, mask)


def components(neighbours: np.ndarray, above: np.ndarray) -> np.ndarray:
    """(V,) component label (>= 1) of the elements in ``above``, 0 elsewhere (scipy's connected
    components on the graph of neighbour pairs both in ``above``)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n = len(above)
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    cols = neighbours.ravel()
    keep = (cols >= 0) & above[rows] & above[np.maximum(cols, 0)]
    graph = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    out = np.zeros(n, dtype=np.int64)
    _, relabelled = np.unique(labels[above], return_inverse=True)
    out[above] = relabelled + 1
    return out


# --- runs -----------------------------------------------------------------------------

def run_series_info(bold: Path, partner: Path, space: str) -> tuple[int, float | None, Geometry]:
    """Volumes, series step (CIFTI's series axis; GIfTI's TimeStep metadata, None where absent) and
    geometry of a surface run."""
    if kind_of_path(bold) == "cifti":
        return cifti_series_info(bold)
    img = _load(bold)  # loaded once: its data and its TimeStep metadata
    Y, geom = read_gifti_pair(bold, partner, space, img)
    return Y.shape[0], gifti_time_step(bold, img), geom


def read_run_series(bold: Path, partner: Path, space: str) -> tuple[np.ndarray, Geometry]:
    """(T, V) data of a surface run: the dtseries, or both hemispheres of a GIfTI pair."""
    if kind_of_path(bold) == "cifti":
        return read_cifti_series(bold)
    return read_gifti_pair(bold, partner, space)


# --- group-level inference on surfaces ------------------------------------------------

def mesh_or_reason(geom: Geometry) -> tuple[Mesh | None, str]:
    """The geometry's element graph, or None and why clusters cannot be formed on it (no template
    mesh ships for it, or its vertices are not those of the shipped template)."""
    try:
        mesh = geometry_mesh(geom)
    except TemplateMeshError as exc:
        return None, f"cluster inference is not available: {exc.problem}; voxel-wise inference works"
    if mesh is not None:
        return mesh, ""
    what = ("CIFTI data without cortical surfaces" if geom.kind == "cifti"
            else f"{geom.space or 'this surface'} (no template mesh ships offline: fsaverage5 and fsLR do)")
    return None, f"cluster inference is not available on {what}; voxel-wise inference works"


def cluster_refusal(geom: Geometry) -> str:
    """Why clusters cannot be formed on this geometry ('' when a shipped mesh allows them)."""
    return mesh_or_reason(geom)[1]


def threshold_elements(z: np.ndarray, mask: np.ndarray, threshold: float, cluster_extent: int,
                       two_sided: bool, mesh: Mesh | None) -> np.ndarray:
    """z where it passes the height threshold (and lies in a mesh cluster of at least ``cluster_extent``
    elements); 0 elsewhere."""
    z = np.where(mask, z, 0.0)
    out = np.zeros_like(z)
    for sign in (1, -1) if two_sided else (1,):
        above = mask & (sign * z >= threshold)
        if cluster_extent > 1:
            labels = components(mesh.neighbours, above)
            sizes = np.bincount(labels, minlength=labels.max() + 1)
            keep = sizes >= cluster_extent
            keep[0] = False
            above = keep[labels]
        out[above] = z[above]
    return out


def clusters_table(kept: np.ndarray, stat: np.ndarray, stat_name: str, mesh: Mesh, geom: Geometry,
                   p_values: np.ndarray | None = None, label_fn=None) -> pd.DataFrame:
    """One row per cluster of non-zero ``kept`` on the element graph (signs apart), largest |peak|
    first: the peak element, its hemisphere, structure, template vertex and coordinates, size in
    vertices (and voxels, CIFTI) and area in mm^2; ``label_fn(xyz, structure)`` adds atlas columns."""
    rows = []
    for sign in (1, -1):
        labels = components(mesh.neighbours, sign * kept > 0)
        for lab in range(1, labels.max() + 1):
            members = np.flatnonzero(labels == lab)
            peak = members[np.argmax(np.abs(kept[members]))]
            structure = str(mesh.structure[peak])
            row = {"hemisphere": _hemi_label(structure), "structure": structure,
                   "vertex": int(mesh.vertex[peak]),
                   "x": mesh.coords[peak, 0], "y": mesh.coords[peak, 1], "z": mesh.coords[peak, 2],
                   "peak_z": float(kept[peak]), f"peak_{stat_name}": float(stat[peak]),
                   "cluster_size_vertices": int(mesh.is_vertex[members].sum()),
                   "cluster_size_mm2": float(mesh.areas[members].sum())}
            if geom.kind == "cifti":
                row["cluster_size_voxels"] = int((~mesh.is_vertex[members]).sum())
            if p_values is not None:
                row["p_fwe"] = float(p_values[peak])
            if label_fn is not None:
                row.update(label_fn(mesh.coords[peak], structure))
            rows.append(row)
    columns = ["cluster_id", "hemisphere", "structure", "vertex", "x", "y", "z", "peak_z", f"peak_{stat_name}",
               "cluster_size_vertices", "cluster_size_mm2"]
    columns += ["cluster_size_voxels"] if geom.kind == "cifti" else []
    columns += ["p_fwe"] if p_values is not None else []
    rows.sort(key=lambda r: -abs(r["peak_z"]))
    for i, r in enumerate(rows, 1):
        r["cluster_id"] = i
    extra = [c for r in rows[:1] for c in r if c not in columns]
    return pd.DataFrame(rows, columns=columns + extra)



# --- fsaverage5 files nilearn ships, read with nibabel (importing nilearn.datasets costs seconds) ---

_NILEARN_SURFACES = {"pial": "pial", "white": "white", "inflated": "infl", "sphere": "sphere"}
_NILEARN_HEMI = {"L": "left", "R": "right"}


def _nilearn_fsaverage5(name: str, hemi: str):
    import gzip
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "fsaverage5"
    path = folder / f"{name}_{_NILEARN_HEMI[hemi]}.gii.gz"
    return nib.gifti.GiftiImage.from_bytes(gzip.decompress(path.read_bytes()))


def template_sulcal_depth(space: str, hemi: str) -> np.ndarray | None:
    """FreeSurfer sulcal depth per vertex of a template hemisphere (positive in sulci), or None."""
    if space != "fsaverage5":
        return None
    return np.asarray(_nilearn_fsaverage5("sulc", hemi).darrays[0].data, np.float64)


# --- smoothing on the mesh ------------------------------------------------------------
# Heat diffusion on the template's midthickness surface: Gaussian smoothing of FWHM f is the
# heat kernel at time t = sigma^2 / 2 (sigma = f / sqrt(8 ln 2); in 2D the heat equation
# u_t = laplacian(u) spreads an impulse to variance 2t per axis). The Laplace-Beltrami operator
# is the linear finite-element one (cotangent weights K over barycentric vertex areas A), stepped
# explicitly, u <- u - dt A^-1 K u, with dt small enough that every step keeps each spatial pattern
# or damps it (eigenvalues of a step in [0, 1]); the number of steps follows from f and the mesh,
# and smoothing an impulse gives the requested FWHM measured geodesically along the surface
# (tests/test_surfaces.py: within a few percent on fsaverage5 at 4-8 mm). An approximation: near
# obtuse triangles (negative cotangent weights) a smoothed impulse dips slightly below zero (about
# a tenth of its peak at most on fsaverage5), as finite-element diffusion does. Values spread only
# between usable vertices (the zeros of a medial wall do not leak in).

def cotangent_laplacian(coords: np.ndarray, faces: np.ndarray):
    """(K, areas): K (n, n) sparse symmetric, K_ij = -w_ij (half the sum of the cotangents of the angles
    facing edge ij), K_ii = sum_j w_ij; areas: barycentric vertex areas (mm^2)."""
    import scipy.sparse as sp

    c = np.asarray(coords, np.float64)
    f = np.asarray(faces, np.int64)
    n = len(c)
    rows, cols, weights = [], [], []
    for a, b, o in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):  # edge (a, b), angle at the opposite corner o
        u, v = c[f[:, a]] - c[f[:, o]], c[f[:, b]] - c[f[:, o]]
        cot = (u * v).sum(axis=1) / np.maximum(np.linalg.norm(np.cross(u, v), axis=1), 1e-12)
        rows.append(f[:, a])
        cols.append(f[:, b])
        weights.append(cot / 2)
    i, j, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
    W = sp.coo_matrix((w, (i, j)), shape=(n, n)).tocsr()
    W = W + W.T  # each edge's two triangles, both directions
    K = sp.diags(np.asarray(W.sum(axis=1)).ravel()) - W
    return K.tocsr(), vertex_areas(c, f)


@dataclass
class MeshSmoother:
    """n_steps applications of a sparse smoothing operator (one per step; rows sum to 1)."""

    step: object  # scipy.sparse csr (n, n)
    n_steps: int
    fwhm: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Smooth (n,) or (n, k) values along their first axis (elements x time)."""
        out = np.asarray(values, dtype=np.float32)
        step = self.step.astype(np.float32)
        for _ in range(self.n_steps):
            out = step @ out
        return out


FWHM_OVER_SIGMA = float(np.sqrt(8 * np.log(2)))
STEP_SAFETY = 0.9  # steps at most 0.9 of the largest the eigenvalue bound allows


def mesh_smoother(coords: np.ndarray, faces: np.ndarray, fwhm: float, keep: np.ndarray | None = None) -> MeshSmoother:
    """The heat-diffusion smoother of FWHM ``fwhm`` mm on a mesh, over the vertices in ``keep``
    (all by default; the others are left as they are and exchange nothing with their neighbours)."""
    import scipy.sparse as sp

    K, areas = cotangent_laplacian(coords, faces)
    n = K.shape[0]
    if keep is not None:
        keep = np.asarray(keep, bool)
        W = (sp.diags(K.diagonal()) - K).tocoo()
        inside = keep[W.row] & keep[W.col]
        W = sp.csr_matrix((W.data[inside], (W.row[inside], W.col[inside])), shape=(n, n))
        K = (sp.diags(np.asarray(W.sum(axis=1)).ravel()) - W).tocsr()
    t = (fwhm / FWHM_OVER_SIGMA) ** 2 / 2
    # Gershgorin bound on the eigenvalues of A^-1/2 K A^-1/2 (those of A^-1 K): with dt below 1 / bound
    # every eigenvalue of a step lies in [0, 1], so each step smooths and none amplifies or flips a pattern
    scale = 1 / np.sqrt(np.maximum(areas, 1e-12))
    sym = sp.diags(scale) @ abs(K) @ sp.diags(scale)
    bound = float(np.asarray(sym.sum(axis=1)).max())
    dt_max = STEP_SAFETY / max(bound, 1e-12)
    n_steps = max(int(np.ceil(t / dt_max)), 1) if fwhm > 0 else 0
    dt = t / max(n_steps, 1)
    step = sp.identity(n, format="csr") - sp.diags(dt / np.maximum(areas, 1e-12)) @ K
    return MeshSmoother(step.tocsr(), n_steps, float(fwhm))


def smooth_elements(Y: np.ndarray, geom: Geometry, fwhm: float, usable: np.ndarray) -> np.ndarray:
    """(T, V) surface data smoothed with FWHM ``fwhm`` mm between the ``usable`` elements: cortex on
    the template midthickness (both hemispheres apart), CIFTI subcortical voxels as volumes are
    smoothed, but within the subcortical voxels (a Gaussian normalised over them). Raises
    DataError where the data do not match a template mesh, UsageError where none ships."""
    if not fwhm:
        return Y
    out = np.array(Y, dtype=np.float32, copy=True)
    for hemi, elements, vertices, n_vertices in _cortex_parts(geom):
        try:
            coords, faces = template_mesh(geom.space or "fsLR", hemi)
        except DataError as exc:
            raise UsageError(f"--smoothing-fwhm {fwhm:g}: {exc.problem}") from exc
        if len(coords) != n_vertices:
            raise DataError(f"hemisphere {hemi} has {n_vertices} vertices, the {geom.space or 'fsLR'} template "
                            f"mesh {len(coords)}: the data do not match the template mesh")
        keep = np.zeros(n_vertices, bool)
        keep[vertices[usable[elements]]] = True
        full = np.zeros((n_vertices, Y.shape[0]), np.float32)
        full[vertices] = Y[:, elements].T
        smoothed = mesh_smoother(coords, faces, fwhm, keep).apply(full)
        out[:, elements] = smoothed[vertices].T
    if geom.kind == "cifti":
        voxels = np.flatnonzero(geom.brain_models.volume_mask)
        if voxels.size:
            out[:, voxels] = _smooth_voxels(Y[:, voxels], geom.brain_models.voxel[voxels],
                                            geom.brain_models.affine, fwhm, usable[voxels])
    return out


def _cortex_parts(geom: Geometry):
    """(hemi, element indices, their vertex indices, vertices of the hemisphere) per cortex part."""
    if geom.kind == "gifti":
        n_left = geom.hemi_sizes[0]
        yield "L", np.arange(n_left), np.arange(n_left), n_left
        yield "R", np.arange(n_left, geom.n_elements), np.arange(geom.hemi_sizes[1]), geom.hemi_sizes[1]
        return
    models = geom.brain_models
    for name, hemi in (("CIFTI_STRUCTURE_CORTEX_LEFT", "L"), ("CIFTI_STRUCTURE_CORTEX_RIGHT", "R")):
        elements = np.flatnonzero(models.name == name)
        if elements.size:
            yield hemi, elements, np.asarray(models.vertex[elements], np.int64), int(models.nvertices[name])


def _smooth_voxels(Y: np.ndarray, ijk: np.ndarray, affine: np.ndarray, fwhm: float,
                   usable: np.ndarray) -> np.ndarray:
    """(T, N) voxel series smoothed by the volume path's Gaussian (same sigmas and truncation),
    normalised within the usable voxels: (G * (y m)) / (G * m)."""
    from scipy.ndimage import gaussian_filter

    from .images import _TRUNCATE, smoothing_sigmas

    sigmas = smoothing_sigmas(affine, fwhm)
    pad = np.ceil(_TRUNCATE * sigmas).astype(int) + 1
    lo = ijk.min(axis=0) - pad
    local = ijk - lo
    shape = tuple(local.max(axis=0) + pad + 1)
    index = tuple(local.T)
    weight = np.zeros(shape, np.float64)
    weight[index] = usable
    norm = gaussian_filter(weight, sigmas, truncate=_TRUNCATE)[index]
    out = np.array(Y, dtype=np.float32, copy=True)
    vol = np.zeros(shape, np.float64)
    for t in range(Y.shape[0]):
        vol[index] = np.where(usable, Y[t], 0.0)
        smoothed = gaussian_filter(vol, sigmas, truncate=_TRUNCATE)[index]
        out[t] = np.where(usable, smoothed / np.maximum(norm, 1e-12), Y[t])
    return out
