"""Reports for surface and grayordinate results: maps, designs and tables, without figures.

Drawing maps on template surfaces is not implemented yet; these pages list what was
written (each map with its contrast, test and degrees of freedom), the design matrices,
the maps' value ranges and the cluster tables, so a surface run gets a report in the
same places as a volume run (``sub-<label>.html``, ``group/report.html``).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from .errors import DataError
from .outputs import atomic_write_bytes, sidecar_path
from .surfaces import kind_of_path, read_map

_MAP_PATTERNS = ("*_statmap.dscalar.nii", "*_hemi-L_*_statmap.shape.gii")
_NOTE = ("Surface maps are not drawn in this report yet: open the maps in Connectome Workbench "
         "(wb_view) or nilearn's plotting.plot_surf_stat_map.")


def has_surface_maps(folder: Path) -> bool:
    return any(next(folder.rglob(p), None) for p in _MAP_PATTERNS)


def _table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p>none</p>"
    return df.to_html(index=False, escape=True, border=0, na_rep="n/a", float_format=lambda v: f"{v:.4g}")


def _maps_table(folder: Path, maps: list[Path]) -> str:
    rows = []
    for path in maps:
        side = {}
        if sidecar_path(path).is_file():
            side = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
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
            f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(_NOTE)}</p>{body}</body></html>").encode()


def _maps(folder: Path, recursive: bool = True) -> list[Path]:
    glob = folder.rglob if recursive else folder.glob
    return sorted(p for pattern in _MAP_PATTERNS for p in glob(pattern) if kind_of_path(p) != "volume"
                  and "_desc-brain_mask" not in p.name)


def participant_report(output_dir: Path, subject: str) -> Path:
    folder = output_dir / f"sub-{subject}"
    maps = _maps(folder)
    if not maps:
        raise DataError(f"no surface maps for sub-{subject}", folder)
    sections = ["<h2>Maps</h2>", _maps_table(output_dir, maps), "<h2>Designs</h2>"]
    for design in sorted(folder.rglob("*_design.tsv")):
        table = pd.read_csv(design, sep="\t")
        sections.append(f"<h3>{html.escape(design.name)}</h3><p>{table.shape[0]} volumes, columns: "
                        f"{html.escape(', '.join(table.columns))}</p>")
    path = output_dir / f"sub-{subject}.html"
    atomic_write_bytes(path, _page(f"bidsglm report: sub-{subject} (surfaces)", sections))
    return path


def group_report(group_dir: Path) -> Path:
    maps = _maps(group_dir, recursive=False)
    if not maps:
        raise DataError("no group-level surface maps to report (run the group level first)", group_dir)
    sections = ["<h2>Maps</h2>", _maps_table(group_dir, maps), "<h2>Cluster tables</h2>"]
    for table in sorted(group_dir.glob("*_clusters.tsv")):
        sections.append(f"<h3>{html.escape(table.name)}</h3>" + _table(pd.read_csv(table, sep="\t")))
    thresholded = [p for p in maps if "desc-thresholded" in p.name]
    for p in thresholded:
        side = json.loads(sidecar_path(p).read_text(encoding="utf-8"))
        if "ClusterTable" in side:
            sections.append(f"<p>{html.escape(p.name)}: {html.escape(side['ClusterTable'])}</p>")
    path = group_dir / "report.html"
    atomic_write_bytes(path, _page("bidsglm group report (surfaces)", sections))
    return path
