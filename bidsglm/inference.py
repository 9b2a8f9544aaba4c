"""Thresholding of z maps and cluster tables.

Conventions follow nilearn's ``threshold_stats_img`` and ``get_clusters_table``
(and are tested against them): voxels survive where |z| exceeds the height
threshold (z > threshold one-sided), clusters are face-connected (6-neighbour,
AFNI's NN1) unless 18 or 26 connectivity is asked for, positive and negative
clusters are formed separately, and a two-sided test splits alpha between the tails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from .errors import UsageError

HEIGHT_CONTROLS = ("fpr", "fdr", "bonferroni")
FACES = ndimage.generate_binary_structure(3, 1)  # 6-connectivity


def structure(connectivity: int = 6) -> np.ndarray:
    """scipy.ndimage structuring element: 6 faces, 18 faces and edges, 26 also corners."""
    if connectivity not in (6, 18, 26):
        raise UsageError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])


def default_alpha(height_control: str) -> float:
    """0.001 uncorrected, 0.05 for corrected thresholds."""
    return 0.001 if height_control == "fpr" else 0.05


def fdr_threshold(z: np.ndarray, alpha: float) -> float:
    """Benjamini-Hochberg threshold on z-scores (inf when nothing survives)."""
    z_sorted = -np.sort(-np.asarray(z, dtype=np.float64))
    p = stats.norm.sf(z_sorted)
    n = len(p)
    below = p < alpha * np.arange(1, n + 1) / n
    if not below.any():
        return np.inf
    return float(z_sorted[np.flatnonzero(below)[-1]] - 1e-12)


def height_threshold(z: np.ndarray, height_control: str, alpha: float, two_sided: bool) -> float:
    """z threshold for the in-mask z-scores ``z`` (V,)."""
    if height_control not in HEIGHT_CONTROLS:
        raise UsageError(f"height control must be one of {', '.join(HEIGHT_CONTROLS)}, not {height_control!r}")
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be between 0 and 1, got {alpha}")
    alpha_tail = alpha / 2 if two_sided else alpha
    if height_control == "fpr":
        return float(stats.norm.isf(alpha_tail))
    if height_control == "bonferroni":
        return float(stats.norm.isf(alpha_tail / max(len(z), 1)))
    return fdr_threshold(np.abs(z) if two_sided else z, alpha_tail)


def threshold_map(z_volume: np.ndarray, mask: np.ndarray, threshold: float, cluster_extent: int = 0,
                  two_sided: bool = True, connectivity: int = 6) -> np.ndarray:
    """z values where they pass the height threshold and lie in a cluster of at
    least ``cluster_extent`` voxels; 0 elsewhere."""
    z = np.where(mask, z_volume, 0.0)
    out = np.zeros_like(z)
    for sign in (1, -1) if two_sided else (1,):
        above = sign * z >= threshold
        if cluster_extent > 1:
            labels, n = ndimage.label(above, structure(connectivity))
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            keep = sizes >= cluster_extent
            keep[0] = False
            above = keep[labels]
        out[above] = z[above]
    return out


@dataclass
class Cluster:
    """One connected cluster of a thresholded map.

    voxels : (n, 3) voxel indices; peaks : (k, 3) indices of the peak and its
    sub-peaks (strongest first); values : (k,) the map's values there."""

    sign: int
    voxels: np.ndarray
    peaks: np.ndarray
    values: np.ndarray

    @property
    def size(self) -> int:
        return len(self.voxels)


def _local_maxima(values: np.ndarray, in_cluster: np.ndarray) -> np.ndarray:
    """Voxels no lower than any of their 26 neighbours within the cluster."""
    filled = np.where(in_cluster, values, -np.inf)
    neighbourhood_max = ndimage.maximum_filter(filled, size=3, mode="constant", cval=-np.inf)
    return np.argwhere(in_cluster & (filled >= neighbourhood_max))


def find_clusters(thresholded: np.ndarray, affine: np.ndarray, min_distance: float = 8.0,
                  max_subpeaks: int = 3, connectivity: int = 6) -> list[Cluster]:
    """Clusters of the non-zero voxels (``connectivity`` 6, 18 or 26), largest peak first.

    Sub-peaks are local maxima at least ``min_distance`` mm from every stronger
    peak kept, at most ``max_subpeaks`` per cluster (nilearn's defaults)."""
    clusters = []
    for sign in (1, -1):
        signed = sign * thresholded
        labels, n = ndimage.label(signed > 0, structure(connectivity))
        if n == 0:
            continue
        slices = ndimage.find_objects(labels)
        for i, sl in enumerate(slices, start=1):
            offset = np.array([s.start for s in sl])
            in_cluster = labels[sl] == i
            local = signed[sl]
            maxima = _local_maxima(local, in_cluster)
            order = np.argsort(-local[tuple(maxima.T)], kind="stable")
            maxima = maxima[order] + offset
            kept = [maxima[0]]
            for candidate in maxima[1:]:
                if len(kept) > max_subpeaks:
                    break
                mm = _to_mm(affine, np.array([candidate] + kept))
                if np.all(np.linalg.norm(mm[1:] - mm[0], axis=1) >= min_distance):
                    kept.append(candidate)
            peaks = np.array(kept)
            clusters.append(Cluster(sign, np.argwhere(in_cluster) + offset, peaks,
                                    thresholded[tuple(peaks.T)]))
    clusters.sort(key=lambda c: -abs(c.values[0]))
    return clusters


def _to_mm(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return np.asarray(ijk, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def voxel_volume(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3])))


def clusters_table(clusters: list[Cluster], affine: np.ndarray, stat_volume: np.ndarray | None = None,
                   stat_name: str = "t", labeller=None):
    """One row per peak: cluster id (1, 1a, 1b, ...), peak mm coordinates, peak z
    (and the t or F value there), cluster size in voxels and mm3, atlas labels.

    ``labeller(peak_xyz, cluster_xyz) -> dict`` adds atlas columns."""
    import pandas as pd

    rows = []
    vol = voxel_volume(affine)
    for number, cluster in enumerate(clusters, start=1):
        peaks_mm = _to_mm(affine, cluster.peaks)
        cluster_mm = _to_mm(affine, cluster.voxels)
        for k, (ijk, xyz, value) in enumerate(zip(cluster.peaks, peaks_mm, cluster.values)):
            row = {
                "cluster_id": f"{number}" if k == 0 else f"{number}{chr(ord('a') + k - 1)}",
                "x": round(float(xyz[0]), 2), "y": round(float(xyz[1]), 2), "z": round(float(xyz[2]), 2),
                "peak_z": float(value),
            }
            if stat_volume is not None:
                row[f"peak_{stat_name}"] = float(stat_volume[tuple(ijk)])
            row["cluster_size_voxels"] = cluster.size if k == 0 else None
            row["cluster_size_mm3"] = round(cluster.size * vol, 3) if k == 0 else None
            if labeller is not None:
                row.update(labeller(xyz, cluster_mm if k == 0 else None))
            rows.append(row)
    columns = ["cluster_id", "x", "y", "z", "peak_z"] + ([f"peak_{stat_name}"] if stat_volume is not None else []) \
        + ["cluster_size_voxels", "cluster_size_mm3"]
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=columns)
    table["cluster_size_voxels"] = table["cluster_size_voxels"].astype("Int64")
    return table
