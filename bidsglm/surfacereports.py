"""Reports for surface and grayordinate results: maps drawn on template surfaces, designs and tables.

These pages list what was written (each map with its contrast, test and degrees of freedom),
the design matrices, the maps' value ranges and the cluster tables, and draw the z maps (and
permutation maps) on the template's inflated surface where a template mesh ships offline
(``surfaces.template_mesh``; fsaverage5 today), with the colour scale and thresholds of the
volume figures: run and subject maps show every value (transparent at 0, opaque from |z| 2),
group maps also thresholded at the threshold that was applied. CIFTI cortex values are placed
on their mesh vertices by the brain models; the medial wall and subcortical voxels are not drawn.
Where no mesh ships for a space the report says so in one line and lists the tables, as before.
"""

from __future__ import annotations

import functools
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import BidsGlmError, DataError
from .outputs import atomic_write_bytes, sidecar_path
from .reports import cluster_table
from .surfaces import HEMIS, Geometry, kind_of_path, read_map

_MAP_PATTERNS = ("*_statmap.dscalar.nii", "*_hemi-L_*_statmap.shape.gii")
GLASS_THRESHOLD = 3.09  # as reports.GLASS_THRESHOLD: the height shown where no threshold was applied
_FIGURE_STYLE = (".maps{display:flex;flex-wrap:wrap;gap:10px 16px;align-items:flex-start}figure{margin:8px 0}"
                 "figcaption{font-weight:600;font-size:15px}.cap{font-size:13px;color:#445;max-width:660px}"
                 ".cbar{display:flex;align-items:center;gap:8px;font-size:13px;margin:6px 0 10px}"
                 ".cbar .bar{width:260px;height:14px;border:1px solid #889}img{display:block;margin:6px 0}"
                 "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccd;padding:3px 8px}"
                 "body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 24px 48px}"
                 ".note{background:#fff3cd;border-left:4px solid #e0a800;padding:6px 10px}")


def has_surface_maps(folder: Path) -> bool:
    return any(next(folder.rglob(p), None) for p in _MAP_PATTERNS)


def _table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p>none</p>"
    return df.to_html(index=False, escape=True, border=0, na_rep="n/a", float_format=lambda v: f"{v:.4g}")


def _side(path: Path) -> dict:
    side = sidecar_path(path)
    return json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}


def _maps_table(folder: Path, maps: list[Path]) -> str:
    rows = []
    for path in maps:
        side = _side(path)
        values, geom = read_map(path)
        nonzero = values[values != 0]
        rows.append({"map": path.relative_to(folder).as_posix(),
                     "contrast": (side.get("Contrast") or {}).get("Name", "") if isinstance(side.get("Contrast"), dict)
                     else side.get("Contrast", ""),
                     "statistic": side.get("Statistic", ""), "dof": json.dumps(side.get("DegreesOfFreedom")),
                     "elements": geom.describe(), "min": float(nonzero.min()) if nonzero.size else 0.0,
                     "max": float(nonzero.max()) if nonzero.size else 0.0})
    return _table(pd.DataFrame(rows))


def _page(title: str, sections: list[str]) -> bytes:
    body = "".join(sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_FIGURE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>").encode()


def _maps(folder: Path, recursive: bool = True) -> list[Path]:
    glob = folder.rglob if recursive else folder.glob
    return sorted(p for pattern in _MAP_PATTERNS for p in glob(pattern) if kind_of_path(p) != "volume"
                  and "_desc-brain_mask" not in p.name)


# --- figures --------------------------------------------------------------------------

def _space(path: Path) -> str:
    found = re.search(r"_space-([A-Za-z0-9]+)", path.name)
    return found.group(1) if found else ""


@functools.lru_cache(maxsize=4)
def _display_meshes(space: str) -> tuple[dict, str]:
    """Per hemisphere (coords, faces, sulcal depth or None) of the surface maps are drawn on, and its
    name; the inflated surface where one ships, else the template mesh. Raises where none ships."""
    from . import surfaces

    meshes, names = {}, set()
    for hemi in HEMIS:
        try:
            coords, faces = surfaces.template_mesh(space, hemi, "inflated")
            names.add("inflated")
        except (BidsGlmError, LookupError, ValueError, TypeError):
            coords, faces = surfaces.template_mesh(space, hemi)
            names.add("template")
        sulc_of = getattr(surfaces, "template_sulcal_depth", None)
        meshes[hemi] = (coords, faces, sulc_of(space, hemi) if sulc_of else None)
    return meshes, f"the {space} {' and '.join(sorted(names))} surface"


def _hemisphere_values(values: np.ndarray, geom: Geometry, sizes: dict) -> dict:
    """Values per mesh vertex of each hemisphere (NaN where the map has none: a CIFTI medial wall)."""
    if geom.kind == "gifti":
        n_left = geom.hemi_sizes[0]
        parts = {"L": values[:n_left], "R": values[n_left:]}
        for hemi, part in parts.items():
            if part.size != sizes[hemi]:
                raise DataError(f"{part.size} vertices in hemisphere {hemi}, the template mesh has {sizes[hemi]}")
        return parts
    models, out = geom.brain_models, {}
    for name, hemi in (("CIFTI_STRUCTURE_CORTEX_LEFT", "L"), ("CIFTI_STRUCTURE_CORTEX_RIGHT", "R")):
        elements = np.flatnonzero(models.name == name)
        n = int(models.nvertices.get(name, 0)) if elements.size else 0
        if elements.size and n != sizes[hemi]:
            raise DataError(f"{n} vertices in hemisphere {hemi}, the template mesh has {sizes[hemi]}")
        full = np.full(sizes[hemi], np.nan)
        full[models.vertex[elements]] = values[elements]
        out[hemi] = full
    return out


class _Drawer:
    """Draws the maps of one space, or says once why it cannot."""

    def __init__(self, space: str):
        self.space = space
        try:
            self.meshes, self.surface = _display_meshes(space)
            self.problem = ""
        except (BidsGlmError, LookupError, ValueError, OSError) as exc:
            self.meshes, self.surface = {}, ""
            self.problem = f"No template mesh is available for --space {space}: maps are not drawn, the tables list them."
            self.detail = str(exc)

    def block(self, path: Path, title: str, *, vmax: float, threshold: float | None, symmetric: bool = True,
              stat: str = "z") -> str:
        from .surfacefigures import Hemisphere, surface_figure

        values, geom = read_map(path)
        sizes = {h: len(m[0]) for h, m in self.meshes.items()}
        try:
            parts = _hemisphere_values(np.asarray(values, np.float64), geom, sizes)
        except DataError as exc:
            return f'<p class="note">{html.escape(path.name)}: not drawn ({html.escape(exc.problem)}).</p>'
        hemis = {h: Hemisphere(self.meshes[h][0], self.meshes[h][1], parts[h], self.meshes[h][2]) for h in parts}
        fig = surface_figure(hemis, vmax=vmax, threshold=threshold, symmetric=symmetric)
        value = f"|{stat}|" if symmetric else stat
        shown = ("every value, transparent at 0 and opaque from |z| = 2" if threshold is None
                 else f"{value} &ge; {threshold:.3g}" if threshold > 1e-3 else "every non-zero value")
        caption = (f"Lateral (top) and medial (bottom) views of the left (left) and right hemispheres on "
                   f"{html.escape(self.surface)} (sulci darker); {shown} ({fig.n_shown} vertices"
                   f"{'' if threshold is None else ' shown'}).")
        return (f'<figure data-vmax="{vmax!r}" data-threshold="{threshold!r}" data-vertices-shown="{fig.n_shown}">'
                f"<figcaption>{html.escape(title)}</figcaption><img src=\"{fig.uri}\" alt=\"{html.escape(title)}\">"
                f'<div class="cap">{caption}</div></figure>')


def _colour_bar(vmax: float, symmetric: bool, label: str) -> str:
    from .figures import css_gradient

    low = f"{-vmax:.2g}" if symmetric else "0"
    return (f'<div class="cbar"><span>{html.escape(label)}</span><span>{low}</span>'
            f'<span class="bar" style="background:{css_gradient(symmetric)}"></span><span>{vmax:.2g}</span></div>')


def _vmax(paths: list[Path]) -> float:
    peaks = [float(np.nanmax(np.abs(v))) for v in (read_map(p)[0] for p in paths) if v.size and np.isfinite(v).any()]
    return max(peaks + [0.0]) or 1.0


def _contrast_of(path: Path) -> str:
    found = re.search(r"_contrast-([A-Za-z0-9]+)_", path.name)
    return found.group(1) if found else ""


def _figures_heading(z_maps: list[Path]) -> tuple["_Drawer | None", list[str]]:
    """The drawer of these maps' space and the section heading; no drawer, and a one-line note
    instead, where no template mesh ships for the space."""
    drawer = _Drawer(_space(z_maps[0]))
    sections = ["<h2>Maps on the surface</h2>"]
    if drawer.problem:
        return None, sections + [f'<p class="note">{html.escape(drawer.problem)}</p>']
    return drawer, sections


def _participant_figures(output_dir: Path, maps: list[Path]) -> list[str]:
    z_maps = [p for p in maps if "_stat-z_statmap" in p.name]
    if not z_maps:
        return []
    drawer, sections = _figures_heading(z_maps)
    if drawer is None:
        return sections
    for label in sorted({_contrast_of(p) for p in z_maps}):
        group = [p for p in z_maps if _contrast_of(p) == label]
        group.sort(key=lambda p: ("_run-" in p.name, p.name))  # the subject's map first, then runs
        vmax = _vmax(group)
        sections.append(f"<h3>contrast {html.escape(label)}</h3>"
                        + _colour_bar(vmax, True, "z, one scale for the subject and all runs:"))
        sections.append('<div class="maps">' + "".join(
            drawer.block(p, _title(output_dir, p), vmax=vmax, threshold=None) for p in group) + "</div>")
    return sections


def _title(output_dir: Path, path: Path) -> str:
    """A map's name without hemi-L (it stands for the pair), with its node folder where not this one."""
    name = path.name.replace("_hemi-L_", "_")
    node = next((part for part in path.parts if part.startswith("node-")), None)
    return f"{node}: {name}" if node and node != output_dir.name else name


def participant_report(output_dir: Path, subject: str) -> Path:
    folder = output_dir / f"sub-{subject}"
    maps = _maps(folder)
    if not maps:
        raise DataError(f"no surface maps for sub-{subject}", folder)
    # a Stats Model's Session/Subject nodes write beside the Run node (OUTPUT_DIR/node-<Name>/): their
    # maps of this subject are drawn with the run maps, on one scale
    siblings = ([f / f"sub-{subject}" for f in sorted(output_dir.parent.glob("node-*")) if f != output_dir]
                if output_dir.name.startswith("node-") else [])
    drawn = maps + [p for f in siblings if f.is_dir() for p in _maps(f)]
    sections = _participant_figures(output_dir, drawn)
    sections += ["<h2>Maps</h2>", _maps_table(output_dir, maps), "<h2>Designs</h2>"]
    for design in sorted(folder.rglob("*_design.tsv")):
        table = pd.read_csv(design, sep="\t")
        sections.append(f"<h3>{html.escape(design.name)}</h3><p>{table.shape[0]} volumes, columns: "
                        f"{html.escape(', '.join(table.columns))}</p>")
    path = output_dir / f"sub-{subject}.html"
    atomic_write_bytes(path, _page(f"bidsglm report: sub-{subject} (surfaces)", sections))
    return path


def _group_figures(group_dir: Path, maps: list[Path]) -> list[str]:
    z_maps = [p for p in maps if p.name.endswith(("_stat-z_statmap.shape.gii", "_stat-z_statmap.dscalar.nii"))]
    if not z_maps:
        return []
    drawer, sections = _figures_heading(z_maps)
    if drawer is None:
        return sections
    for z in z_maps:
        thresholded = z.with_name(z.name.replace("_stat-z_statmap", "_stat-z_desc-thresholded_statmap"))
        applied = _side(thresholded).get("Threshold") if thresholded.is_file() else None
        threshold = float(applied) if isinstance(applied, (int, float)) else GLASS_THRESHOLD
        shown = [(z, "unthresholded z", None)]
        if thresholded.is_file():
            shown.append((thresholded, "thresholded z", threshold))
        vmax = _vmax([p for p, _, _ in shown])
        sections.append(f"<h3>{html.escape(z.name.replace('_hemi-L_', '_'))}</h3>"
                        + _colour_bar(vmax, True, "z, one scale for both maps:"))
        sections.append('<div class="maps">' + "".join(
            drawer.block(p, title, vmax=vmax, threshold=thr) for p, title, thr in shown) + "</div>")
        for logp in sorted(group_dir.glob(z.name.replace("_stat-z_statmap", "_stat-logp_desc-*FWE_statmap"))):
            alpha = float(_side(logp).get("FWEAlpha", 0.05))
            lvmax = max(_vmax([logp]), -np.log10(alpha))
            kind = re.search(r"_desc-([a-z]+)FWE_", logp.name).group(1)
            sections.append(_colour_bar(lvmax, False, f"{kind} FWE, -log10 p:") + '<div class="maps">'
                            + drawer.block(logp, f"{kind}: -log10 FWE p", vmax=lvmax,
                                           threshold=float(-np.log10(alpha)), symmetric=False, stat="-log10 p")
                            + "</div>")
    return sections


def group_report(group_dir: Path) -> Path:
    maps = _maps(group_dir, recursive=False)
    if not maps:
        raise DataError("no group-level surface maps to report (run the group level first)", group_dir)
    sections = _group_figures(group_dir, maps)
    sections += ["<h2>Maps</h2>", _maps_table(group_dir, maps), "<h2>Cluster tables</h2>"]
    for table in sorted(group_dir.glob("*_clusters.tsv")):
        sections.append(f"<h3>{html.escape(table.name)}</h3>" + cluster_table(pd.read_csv(table, sep="\t")))
    thresholded = [p for p in maps if "desc-thresholded" in p.name]
    for p in thresholded:
        side = _side(p)
        if "ClusterTable" in side:
            sections.append(f"<p>{html.escape(p.name)}: {html.escape(side['ClusterTable'])}</p>")
    path = group_dir / "report.html"
    atomic_write_bytes(path, _page("bidsglm group report (surfaces)", sections))
    return path
