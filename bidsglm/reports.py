"""HTML reports of the participant and group levels, built from OUTPUT_DIR alone.

Each report is one self-contained file (figures embedded as PNG data URIs,
styles inline, no scripts or fonts from the network), so it opens offline and
can be regenerated at any time from the written maps and their sidecars
(``--reports-only``), without refitting anything.

- ``sub-<label>.html`` at the top of OUTPUT_DIR (as fMRIPrep names its
  reports): per run the design, its correlations and variance inflation, the
  contrast weights, confounds and motion; per contrast the z maps of each run
  and of the subject, with the runs that contributed or were dropped and why.
- ``group/report.html``: participants included and excluded, each model's
  design and contrasts, and per contrast the unthresholded and thresholded
  maps, threshold, cluster tables and permutation results.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .errors import DataError
from .groupmodels import INTERCEPT
from .outputs import atomic_write_bytes, sidecar_path

log = logging.getLogger("bidsglm")

VIF_LIMIT = 10.0  # variance inflation above this gets a warning (a common rule of thumb)
GLASS_THRESHOLD = 3.09  # |z| shown on glass brains of unthresholded maps (p < 0.001 one-sided)
PERMUTATION_KINDS = ("voxel", "clustersize", "clustermass", "tfce")
_MODEL_KEYS = ("HRFModel", "DriftModel", "HighPassFilterCutoffHz", "NoiseModel", "SmoothingFWHM")

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1400px;
padding:0 24px 48px;color:#1d2330;line-height:1.4}
h1{border-bottom:3px solid #34609a;padding-bottom:6px}h2{margin-top:40px;border-bottom:1px solid #ccd}
h3{margin-top:28px}h4{margin:18px 0 6px}h5{font-size:15px;margin:16px 0 6px}h6{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
td,th{border:1px solid #ccd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef1f6}
.tbl td,.tbl th{max-width:24em}.tbl .n{white-space:nowrap;text-align:right}
.clusters table{width:100%}.clusters th{white-space:nowrap}.clusters .lab{font-size:12px;min-width:7em}
.clusters th.lab{white-space:normal}.clusters .cl{color:#445;border-top:1px dotted #bbc;margin-top:2px}
img{display:block;margin:6px 0 6px;image-rendering:pixelated}
.warn{background:#fff3cd;border-left:4px solid #e0a800;padding:6px 10px;margin:8px 0}
.ok{color:#2a7a2a}.muted{color:#667}code{background:#f2f3f6;padding:0 3px}
nav ul{margin:2px 0}nav li{margin:1px 0}
.maps{display:flex;flex-wrap:wrap;gap:10px 16px;align-items:flex-start}
figure{margin:8px 0}figcaption{font-weight:600;font-size:15px}
.cap{font-size:13px;color:#445;max-width:660px}
.cbar{display:flex;align-items:center;gap:8px;font-size:13px;margin:6px 0 10px}
.cbar .bar{width:260px;height:14px;border:1px solid #889}
.dm{margin:6px 0 4px}.dmcols{display:grid;align-items:end}
.dmcols span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;overflow:hidden;
max-height:170px;font-size:11px;line-height:1.25;padding-bottom:3px;justify-self:center}
table.heat{font-size:11px}table.heat td{text-align:center;min-width:26px;padding:2px 3px}
table.heat th.v{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;font-weight:500;
vertical-align:bottom;background:none;border:none;padding:2px 4px}
table.heat th.r{font-weight:500;white-space:nowrap;background:none}
table.heat tr:first-child th{background:none;border:none}
"""


# --- small HTML builders ----------------------------------------------------

def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _anchor(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "-", text).strip("-")


def _kv_table(rows: dict) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


def _cell(value, tag: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    if isinstance(value, _LabelPair):
        peak = _cell_text(value.peak)
        cluster = _cell_text(value.cluster) if not _missing(value.cluster) else ""
        return (f"<{tag}{attr}><div>{peak}</div>" + (f'<div class="cl">{cluster}</div>' if cluster else "")
                + f"</{tag}>")
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        text = "n/a" if pd.isna(value) else f"{value:.4g}"
        return f'<{tag} class="n">{text}</{tag}>'
    return f"<{tag}{attr}>{_cell_text(value)}</{tag}>"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def _cell_text(value) -> str:
    # long labels (atlas regions, file names) may wrap after _ and ; only, never inside a word
    text = _esc("n/a" if _missing(value) else value)
    return text.replace("_", "_<wbr>").replace(";", ";<wbr>")


def _html_table(part: pd.DataFrame, headers: dict | None = None, classes: dict | None = None) -> str:
    headers, classes = headers or {}, classes or {}
    head = "".join(_cell(str(headers.get(c, c)), "th", classes.get(c, "")) for c in part.columns)
    column_classes = [classes.get(c, "") for c in part.columns]
    rows = "".join("<tr>" + "".join(_cell(v, "td", k) for v, k in zip(row, column_classes)) + "</tr>"
                   for row in part.itertuples(index=False, name=None))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _df_table(df: pd.DataFrame, shown: int = 20) -> str:
    """The first ``shown`` rows; the rest folded below them (a <details>, no script)."""
    if df.empty:
        return '<p class="muted">none</p>'
    table = f'<div class="tbl">{_html_table(df.head(shown))}</div>'
    if len(df) > shown:
        table += (f"<details><summary>{len(df) - shown} more rows</summary>"
                  f'<div class="tbl">{_html_table(df.iloc[shown:])}</div></details>')
    return table


# --- cluster tables ---------------------------------------------------------------

CLUSTERS_SHOWN = 20  # a cluster table shows its largest clusters; the rest are folded
# column names of the clusters TSVs (kept there) as the report's headers say them
_CLUSTER_HEADERS = {"cluster_id": "Cluster", "peak_z": "Peak z", "cluster_size_voxels": "Size (voxels)",
                    "cluster_size_mm3": "Size (mm³)", "p_fwe": "FWE p", "hemisphere": "Hemisphere",
                    "structure": "Structure", "vertex": "Vertex", "cluster_size_vertices": "Size (vertices)",
                    "cluster_size_mm2": "Area (mm²)"}
_ATLAS_NAMES = {"aal": "AAL", "harvard_oxford": "Harvard-Oxford", "juelich": "Jülich", "destrieux": "Destrieux"}


def _atlas_name(atlas: str) -> str:
    return _ATLAS_NAMES.get(atlas, atlas.replace("_", " ").capitalize())


def cluster_header(column: str) -> str:
    """'peak_z' -> 'Peak z', 'harvard_oxford_cluster' -> 'Harvard-Oxford (cluster)'."""
    if column in _CLUSTER_HEADERS:
        return _CLUSTER_HEADERS[column]
    if column.startswith("peak_"):
        return f"Peak {column.removeprefix('peak_')}"
    for part in ("peak", "cluster"):
        if column.endswith(f"_{part}"):
            return f"{_atlas_name(column.removesuffix(f'_{part}'))} ({part})"
    return column.replace("_", " ")


def _largest_clusters(table: pd.DataFrame, shown: int) -> tuple[np.ndarray, int]:
    """Rows of the ``shown`` largest clusters (a cluster's sub-peak rows, '1a', go with it), in
    the table's order, and the number of clusters."""
    number = table["cluster_id"].astype(str).str.extract(r"^(\d+)", expand=False)
    # size: voxels, or on surfaces vertices (plus the voxels of a CIFTI's subcortical part)
    size_columns = [c for c in ("cluster_size_vertices", "cluster_size_voxels") if c in table.columns] \
        or [c for c in ("cluster_size_mm3", "cluster_size_mm2") if c in table.columns][:1]
    sizes = sum((pd.to_numeric(table[c], errors="coerce") for c in size_columns),
                pd.Series(0.0, index=table.index))
    per_cluster = sizes.groupby(number, sort=False).max().fillna(0.0)  # sub-peak rows carry no size
    # largest first; equal sizes in the table's order (stable sort)
    order = np.argsort(-per_cluster.to_numpy(), kind="stable")
    kept = set(per_cluster.index[order[:shown]])
    return number.isin(kept).to_numpy(), len(per_cluster)


def cluster_table(table: pd.DataFrame, shown: int = CLUSTERS_SHOWN) -> str:
    """A cluster table with readable headers: the ``shown`` largest clusters in the table's order
    (peak |z|), the rest folded below; an atlas's peak and cluster labels share one cell when
    there are more than two atlases, so that four fit the page's width."""
    if table.empty:
        return '<p class="muted">no clusters</p>'
    table = table.copy()
    atlases = [c.removesuffix("_peak") for c in table.columns
               if c.endswith("_peak") and f"{c.removesuffix('_peak')}_cluster" in table.columns]
    headers = {c: cluster_header(c) for c in table.columns}
    if len(atlases) > 2:
        for atlas in atlases:
            peak, cluster = table.pop(f"{atlas}_peak"), table.pop(f"{atlas}_cluster")
            table[f"{atlas}_labels"] = [_LabelPair(p, c) for p, c in zip(peak, cluster)]
            headers[f"{atlas}_labels"] = f"{_atlas_name(atlas)} (peak, cluster)"
    label_columns = [c for c in table.columns if c.endswith(("_peak", "_cluster", "_labels"))]
    if "cluster_id" in table.columns:
        top, n_clusters = _largest_clusters(table, shown)
    else:
        top, n_clusters = np.arange(len(table)) < shown, len(table)
    classes = {c: "lab" for c in label_columns}
    shown_part, folded = table[top], table[~top]
    html_table = functools.partial(_html_table, headers=headers, classes=classes)
    if folded.empty:
        return f'<div class="tbl clusters">{html_table(shown_part)}</div>'
    n_folded = n_clusters - min(shown, n_clusters)
    caption = (f'<p class="cap">The {min(shown, n_clusters)} largest of {n_clusters} clusters; '
               f"{n_folded} more below.</p>")
    return (f'{caption}<div class="tbl clusters">{html_table(shown_part)}</div>'
            f"<details><summary>{n_folded} more cluster{'s' if n_folded != 1 else ''} "
            f"({len(folded)} rows)</summary>"
            f'<div class="tbl clusters">{html_table(folded)}</div></details>')


@dataclass(frozen=True)
class _LabelPair:
    """An atlas's label at the peak and over the cluster, drawn as two lines of one cell."""

    peak: object
    cluster: object


def _nav(index: list[tuple]) -> str:
    """Contents as nested lists: entries are (anchor, text, level), level 0 outermost."""
    out, level_now = [], -1
    for anchor, text, *rest in index:
        level = rest[0] if rest else 0
        if level > level_now:
            out.append("<ul><li>" * (level - level_now))
        else:
            out.append("</li>" + "</ul></li>" * (level_now - level) + "<li>")
        out.append(f'<a href="#{anchor}">{_esc(text)}</a>')
        level_now = level
    out.append("</li></ul>" * (level_now + 1))
    return "".join(out)


def _page(title: str, body: str, index: list[tuple]) -> bytes:
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_STYLE}</style></head><body><h1>{_esc(title)}</h1>"
            f'<p class="muted">bidsglm {_esc(__version__)}, written {time.strftime("%Y-%m-%d %H:%M")} '
            f"from the maps and sidecars in this folder.</p>"
            f"<nav><h2>Contents</h2>{_nav(index)}</nav>{body}</body></html>")
    return page.encode("utf-8")


def _number(value, digits: int = 3) -> str:
    """Degrees of freedom and counts as integers where they are whole, else a few digits."""
    if isinstance(value, (int, float)) and np.isfinite(value):
        return f"{value:.0f}" if abs(value - round(value)) < 1e-6 else f"{value:.{digits}g}"
    return "not recorded" if value is None else str(value)


def model_text(model: dict) -> str:
    """A run's model settings as a reader says them: 'high-pass 1/128 Hz (cosine)'."""
    parts = []
    if model.get("HRFModel"):
        parts.append(f"HRF {model['HRFModel']}")
    drift, cutoff = model.get("DriftModel"), model.get("HighPassFilterCutoffHz")
    if drift in (None, "none") and "DriftModel" in model:
        parts.append("no drift model")
    elif isinstance(cutoff, (int, float)) and cutoff > 0:
        period = 1.0 / cutoff
        hz = f"1/{period:.0f} Hz" if abs(period - round(period)) < 1e-6 else f"{cutoff:.4g} Hz"
        parts.append(f"high-pass {hz} ({drift or 'cosine'})")
    elif drift:
        parts.append(f"drift model {drift}")
    noise = model.get("NoiseModel")
    if noise:
        parts.append({"ar1": "AR(1) noise model", "ols": "OLS (no prewhitening)"}.get(str(noise).lower(),
                                                                                     f"noise model {noise}"))
    fwhm = model.get("SmoothingFWHM")
    if isinstance(fwhm, (int, float)):
        parts.append(f"smoothing {fwhm:g} mm FWHM" if fwhm > 0 else "no smoothing")
    return ", ".join(parts)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read a sidecar the report needs ({exc})", path) from exc


def _entities(name: str) -> dict:
    return dict(part.split("-", 1) for part in name.split("_") if "-" in part)


def _is_mni(name: str) -> bool:
    return _entities(name).get("space", "").startswith("MNI")


# --- design diagnostics -----------------------------------------------------

def variance_inflation(design: pd.DataFrame) -> pd.Series:
    """VIF of every non-constant column: 1 / (1 - R^2) of the column regressed on
    all the others with an intercept; infinite where the others explain it exactly."""
    varying = [c for c in design.columns if np.ptp(design[c].to_numpy(dtype=float)) > 0]
    X = design[varying].to_numpy(dtype=float)
    X = X - X.mean(axis=0)
    vif = {}
    for j, col in enumerate(varying):
        y, others = X[:, j], np.delete(X, j, axis=1)
        fit = np.linalg.lstsq(others, y, rcond=None)[0] if others.shape[1] else np.zeros(0)
        unexplained = float(np.sum((y - others @ fit) ** 2) / np.sum(y**2))
        vif[col] = 1.0 / unexplained if unexplained > 1e-12 else np.inf
    return pd.Series(vif, dtype=float)


def design_correlation(design: pd.DataFrame) -> pd.DataFrame:
    varying = [c for c in design.columns if np.ptp(design[c].to_numpy(dtype=float)) > 0]
    return design[varying].astype(float).corr()


def _column_kind(column: str, confounds: list[str]) -> str:
    if column in confounds:
        return "confound"
    if column == "constant" or column.startswith("drift_"):
        return "drift/constant"
    return "condition"


# --- participant report -----------------------------------------------------

def _read_design(path: Path) -> pd.DataFrame:
    """A run's design matrix as the participant level wrote it: numbers only (an edited or
    replaced file is bad data, named, not a crash in a figure)."""
    from .errors import DataError

    try:
        design = pd.read_csv(path, sep="\t")
        return design.apply(pd.to_numeric)
    except (ValueError, TypeError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"not a design matrix of numbers ({exc}); rerun the participant level", path) from exc


@dataclass
class RunRecord:
    """One run as the participant level recorded it."""

    label: str  # e.g. "task-flanker run-1"
    record: dict  # the run's _design.json
    design: pd.DataFrame
    map_prefix: str  # relative path prefix of its maps (up to, not including, _contrast-)
    weights: dict = field(default_factory=dict)  # contrast name -> {column: weight}
    model_from_maps: dict = field(default_factory=dict)  # settings read from a map sidecar


def _run_records(output_dir: Path, subject: str) -> list[RunRecord]:
    records = []
    for path in sorted((output_dir / f"sub-{subject}").rglob("*_design.json")):
        record = _read_json(path)
        mask = record.get("Mask", "")
        if not mask.endswith("_desc-brain_mask.nii.gz"):
            continue
        tsv = path.with_suffix(".tsv")
        design = _read_design(tsv) if tsv.is_file() else pd.DataFrame()
        ents = _entities(path.name.removesuffix("_design.json"))
        label = " ".join(f"{k}-{v}" for k, v in ents.items() if k != "sub")
        rec = RunRecord(label, record, design, mask.removesuffix("_desc-brain_mask.nii.gz"))
        for name, clabel in record.get("Contrasts", {}).items():
            side = output_dir / f"{rec.map_prefix}_contrast-{clabel}_stat-z_statmap.json"
            if side.is_file():
                meta = _read_json(side)
                weights = meta.get("Contrast", {}).get("Weights", {})
                if isinstance(weights, list):  # an F contrast: one row of weights per row of the matrix
                    rec.weights.update({f"{name} [{i}]": row for i, row in enumerate(weights, 1)})
                else:
                    rec.weights[name] = weights
                rec.model_from_maps = {k: meta[k] for k in _MODEL_KEYS if k in meta}
        records.append(rec)
    return records


def _subject_prefix(run_prefix: str) -> str:
    """The subject-level map prefix: the run's without its run (and echo) entity."""
    folder, _, name = run_prefix.rpartition("/")
    kept = [p for p in name.split("_") if not p.startswith(("run-", "echo-"))]
    return f"{folder}/{'_'.join(kept)}"


def _run_section(rec: RunRecord) -> str:
    r = rec.record
    model = r.get("Model") or rec.model_from_maps
    dropped = r.get("DroppedContrasts", {})
    fd = r.get("FramewiseDisplacementMean")
    rows = {
        "volumes, TR": f"{len(rec.design)} volumes, TR {_esc(r.get('RepetitionTime'))} s "
                       f"(slice-time reference {_esc(r.get('SliceTimeRef'))} of a TR)",
        "model": _esc(model_text(model)) or '<span class="muted">not recorded</span>',
        "residual degrees of freedom": _esc(_number(r.get("DegreesOfFreedom"))),
        "mean framewise displacement": f"{fd:.3f} mm" if isinstance(fd, (int, float)) else "not in the confounds table",
        "confounds used": _esc(", ".join(r.get("Confounds", [])) or "none"),
        "requested, matching no column": _esc(", ".join(r.get("ConfoundsUnmatched", [])) or "none"),
        "contrasts dropped in this run": "<br>".join(f"<b>{_esc(k)}</b>: {_esc(v)}" for k, v in dropped.items())
                                         or "none",
        "inputs": "<br>".join(f"<code>{_esc(s)}</code>" for s in r.get("Sources", [])),
    }
    parts = [_kv_table(rows)]
    if rec.design.empty:
        return parts[0] + '<p class="warn">design matrix file missing</p>'
    parts.append("<h4>Design matrix</h4>" + design_block(rec.design, f"design matrix {rec.label}")
                 + '<p class="cap">Rows: volumes, first at the top; each column scaled to its largest '
                   "absolute value; white is 0 (or -1 in columns with negative values), black 1.</p>")
    parts.append("<h4>Correlation between regressors</h4>" + heat_table(design_correlation(rec.design), 1.0))
    parts.append(_vif_section(rec.design, r.get("Confounds", [])))
    if rec.weights:
        weights = pd.DataFrame(rec.weights).T.reindex(columns=rec.design.columns).fillna(0.0)
        used = weights.loc[:, (weights != 0).any(axis=0)]
        scale = float(np.abs(used.to_numpy()).max()) if used.size else 1.0
        parts.append("<h4>Contrasts</h4>" + heat_table(used, scale, square=False)
                     + f'<p class="cap">Columns not shown ({weights.shape[1] - used.shape[1]}) have weight 0 '
                       "in every contrast.</p>")
    return "".join(parts)


def design_block(design: pd.DataFrame, alt: str, diverging: bool = False, row_px: float | None = None) -> str:
    """A design matrix image with its column names above the columns they name."""
    from .figures import column_width, design_image

    n = design.shape[1]
    width = column_width(n)
    row_px = row_px or float(np.clip(360 / max(len(design), 1), 0.5, 4))
    labels = "".join(f'<span title="{_esc(c)}">{_esc(c)}</span>' for c in design.columns) if width >= 11 else ""
    head = (f'<div class="dmcols" style="grid-template-columns:repeat({n},{width}px);width:{n * width}px;'
            f'margin-left:1px">'
            f"{labels}</div>") if labels else \
        f'<p class="cap">columns, left to right: {_esc(", ".join(map(str, design.columns)))}</p>'
    uri = design_image(design, width, row_px, diverging)
    return f'<div class="dm">{head}<img src="{uri}" alt="{_esc(alt)}" style="width:{n * width + 2}px"></div>'


def heat_table(values: pd.DataFrame, scale: float, square: bool = True) -> str:
    """A table of numbers on blue-white-red backgrounds (-scale to scale), each number in the
    colour that reads on its background; column names written upwards."""
    from .figures import DIVERGING_LUT, colour, text_colour

    head = "".join(f'<th class="v">{_esc(c)}</th>' for c in values.columns)
    rows = []
    colours = colour(values.to_numpy(dtype=float), scale, DIVERGING_LUT)
    for i, (name, row) in enumerate(values.iterrows()):
        cells = []
        for j, v in enumerate(row.to_numpy(dtype=float)):
            bg = colours[i, j]
            text = "" if (square and i == j) else (f"{v + 0.0:.2f}".replace("0.", ".", 1) if square else f"{v:g}")
            text = text.replace("-.00", ".00")
            cells.append(f'<td style="background:rgb{tuple(int(c) for c in bg)};color:{text_colour(bg)}" '
                         f'title="{_esc(name)} / {_esc(values.columns[j])}: {v:.4g}">{text}</td>')
        rows.append(f'<tr><th class="r">{_esc(name)}</th>{"".join(cells)}</tr>')
    return f'<table class="heat"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _vif_section(design: pd.DataFrame, confounds: list[str]) -> str:
    vif = variance_inflation(design)
    table = pd.DataFrame({"regressor": vif.index, "kind": [_column_kind(c, confounds) for c in vif.index],
                          "VIF": vif.to_numpy()})
    # a warning for the regressors of interest; collinear nuisance columns (motion, drifts) are
    # common and harmless to the contrasts, so they are only listed
    high = table[(table["VIF"] > VIF_LIMIT) & (table["kind"] == "condition")]
    if len(high):
        names = ", ".join(f"{n} ({v:.1f})" for n, v in zip(high["regressor"], high["VIF"]))
        warn = (f'<p class="warn">Variance inflation above {VIF_LIMIT:g} for {_esc(names)}: these conditions '
                "are largely explained by the other regressors, so their estimates are imprecise.</p>")
    else:
        warn = f'<p class="ok">Every condition has a variance inflation factor of at most {VIF_LIMIT:g}.</p>'
    nuisance = table[(table["VIF"] > VIF_LIMIT) & (table["kind"] != "condition")]
    if len(nuisance):
        warn += (f'<p class="muted">Nuisance regressors above {VIF_LIMIT:g}: '
                 f'{_esc(", ".join(nuisance["regressor"]))}.</p>')
    return (f"<h4>Variance inflation factors</h4>{warn}<details><summary>all regressors</summary>"
            f"{_df_table(table)}</details>")


def _colour_bar(vmax: float, symmetric: bool, label: str) -> str:
    from .figures import css_gradient

    low = f"{-vmax:.2g}" if symmetric else "0"
    return (f'<div class="cbar"><span>{_esc(label)}</span><span>{low}</span>'
            f'<span class="bar" style="background:{css_gradient(symmetric)}"></span>'
            f"<span>{vmax:.2g}</span></div>")


# Figures of the report being rewritten, by key: a rerun reuses the figure of a map whose values
# and drawing settings are unchanged instead of drawing it again (a map written again with the
# same values, as a rerun of the participant level does, is not drawn again).
_REUSABLE: dict[str, str] = {}
_FIGURE = re.compile(r'<figure data-key="([0-9a-f]{40})".*?</figure>', re.S)
DRAWING_VERSION = "1"  # changes whenever figures.py draws differently
# Figures of the report being written that are still to draw: placeholder -> arguments of
# _figure_html. They are drawn together once the page is assembled (in threads with n_jobs > 1).
_PENDING: dict[str, tuple] = {}
_PLACEHOLDER = re.compile("\x00figure-[0-9]+\x00")  # NUL never occurs in the escaped page


def _reusable_figures(report: Path) -> dict[str, str]:
    try:
        return {m.group(1): m.group(0) for m in _FIGURE.finditer(report.read_text(encoding="utf-8"))}
    except (OSError, UnicodeDecodeError):
        return {}


def _file_id(path: Path | str | None) -> str:
    """A file's name and a digest of its bytes (the name: OUTPUT_DIR may have moved)."""
    if not path:
        return ""
    try:
        return f"{Path(path).name}:{hashlib.sha1(Path(path).read_bytes()).hexdigest()}"
    except OSError:
        return f"{path}:absent"


def _content_id(data: np.ndarray, affine: np.ndarray) -> str:
    """A digest of a map's values, shape and affine: what its figure is drawn from."""
    digest = hashlib.sha1(np.ascontiguousarray(data).view(np.uint8))
    digest.update(repr((data.dtype.str, data.shape)).encode())
    digest.update(np.asarray(affine, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _brain_block(data: np.ndarray, affine: np.ndarray, grid, *, title: str, vmax: float, glass: float,
                 slice_threshold: float | None, symmetric: bool = True, stat: str = "z",
                 source: Path | None = None) -> str:
    """One brain figure with its title and a caption that says exactly what is drawn; reused
    from the previous report when the map's values (read from ``source``) and every setting
    are unchanged. Returns a placeholder that _draw_figures replaces with the figure."""
    key = hashlib.sha1(repr((DRAWING_VERSION, _content_id(data, affine), grid.key, title, vmax, glass,
                             slice_threshold, symmetric, stat)).encode()).hexdigest()
    if source is not None and key in _REUSABLE:
        return _REUSABLE[key]
    placeholder = f"\x00figure-{len(_PENDING)}\x00"
    _PENDING[placeholder] = (key, data, affine, grid, title, vmax, glass, slice_threshold, symmetric, stat)
    return placeholder


def _figure_html(key: str, data: np.ndarray, affine: np.ndarray, grid, title: str, vmax: float, glass: float,
                 slice_threshold: float | None, symmetric: bool, stat: str) -> str:
    from .figures import brain_figure

    fig = brain_figure(data, affine, grid, vmax=vmax, glass_threshold=glass, slice_threshold=slice_threshold,
                       symmetric=symmetric)
    value = f"|{stat}|" if symmetric else stat
    where = ("empty map" if fig.peak_mm is None else
             "slices through the peak at x = {:.0f}, y = {:.0f}, z = {:.0f} mm".format(*fig.peak_mm))
    shown = ("every value, transparent at 0 and opaque from |z| = 2" if slice_threshold is None
             else f"{value} &ge; {slice_threshold:.3g}" if slice_threshold > 1e-3 else "every non-zero value")
    drawn = f"{value} &ge; {glass:.3g}" if glass > 1e-3 else "every non-zero value"
    caption = (f"Top: glass brain, {drawn} ({fig.n_shown} voxels). Bottom: {where}, "
               f"over {_esc(grid.background)}; {shown}. Left is left.")
    return (f'<figure data-key="{key}" data-glass-threshold="{glass!r}" data-voxels-shown="{fig.n_shown}" '
            f'data-vmax="{vmax!r}"><figcaption>{_esc(title)}</figcaption><img src="{fig.uri}" alt="{_esc(title)}">'
            f'<div class="cap">{caption}</div></figure>')


def _draw_figures(body: str, n_jobs: int = 1) -> str:
    """The page body with every pending figure drawn in place of its placeholder; figures are
    independent, so with ``n_jobs`` > 1 threads draw them (numpy and zlib release the GIL)
    and the page is the same, byte for byte, as drawn one after another."""
    pending = dict(_PENDING)
    _PENDING.clear()
    if not pending:
        return body
    if n_jobs > 1 and len(pending) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(n_jobs, len(pending)), thread_name_prefix="bidsglm-figure") as pool:
            drawn = dict(zip(pending, pool.map(lambda args: _figure_html(*args), pending.values())))
    else:
        drawn = {placeholder: _figure_html(*args) for placeholder, args in pending.items()}
    return _PLACEHOLDER.sub(lambda m: drawn[m.group(0)], body)


def _shared_vmax(arrays) -> float:
    """One colour scale for maps that are compared: the largest |value| among them."""
    peaks = [float(np.nanmax(np.abs(a))) for a in arrays if a.size and np.isfinite(a).any()]
    return max(peaks + [0.0]) or 1.0


def _run_grid(output_dir: Path, rec: RunRecord, map_path: Path):
    """Where a map is drawn: the MNI template, or the run's own mean/reference image (its brain
    mask where OUTPUT_DIR holds neither)."""
    from .figures import mni_grid

    if _is_mni(map_path.name):
        return mni_grid()
    mask = output_dir / rec.record.get("Mask", "")
    # named: the subject map (runs combined) is drawn over one of its runs' images
    run = " ".join(p for p in rec.label.split() if p.startswith(("run-", "echo-")))
    for suffix in ("_desc-mean_boldref.nii.gz", "_boldref.nii.gz"):
        anatomy = output_dir / f"{rec.map_prefix}{suffix}"
        if anatomy.is_file():
            return _native_grid(str(mask), str(anatomy), run)
    return _native_grid(str(mask), "", run)


def _native_grid(mask: str, anatomy: str, run: str = ""):
    return _native_grid_of(mask, anatomy, _file_id(mask), _file_id(anatomy), run)


@functools.lru_cache(maxsize=8)
def _native_grid_of(mask: str, anatomy: str, mask_id: str, anatomy_id: str, run: str = ""):
    """Cached by the files' contents too: a file rewritten with other values gets a new grid."""
    from .figures import native_grid, read_map

    brain, affine = read_map(Path(mask))
    values = read_map(Path(anatomy))[0] if anatomy else None
    grid = native_grid(affine, brain.shape, values, brain > 0)
    if run:  # "the mean BOLD image of run-1", not "the run's": the subject map has several runs
        grid.background = (f"the mean BOLD image of {run}" if values is not None
                           else f"the brain mask of {run}")
    grid.key = f"{mask_id}|{anatomy_id}|{grid.background}"  # the caption names the background
    return grid


def _contrast_section(output_dir: Path, name: str, label: str, runs: list[RunRecord], n_jobs: int = 1) -> str:
    from .figures import read_map

    subject_prefix = _subject_prefix(runs[0].map_prefix)
    name_z = f"{subject_prefix}_contrast-{label}_stat-z_statmap.nii.gz"
    # a Stats Model's Subject node writes beside the Run node: OUTPUT_DIR/node-<Name>/
    folders = [output_dir] + (sorted(output_dir.parent.glob("node-*")) if output_dir.name.startswith("node-") else [])
    z_subject = next((f / name_z for f in folders if (f / name_z).is_file()), output_dir / name_z)
    parts = []
    maps = []  # (title, path, run record)
    side_path = sidecar_path(z_subject)
    if z_subject.is_file() and side_path.is_file():
        side = _read_json(side_path)
        used = ", ".join(f"run-{r}" if r is not None else "the run" for r in side.get("Runs", []))
        dropped = side.get("RunsDropped", {})
        parts.append(_kv_table({
            "runs combined": _esc(used or "none"),
            "runs dropped": "<br>".join(f"{_esc(k)}: {_esc(v)}" for k, v in dropped.items()) or "none",
            "degrees of freedom": _esc(_number(side.get("DegreesOfFreedom"))),
        }))
        maps.append((f"{name}: subject (runs combined)", z_subject, runs[0]))
    else:
        parts.append('<p class="warn">No subject-level map: the contrast is estimable in none of the runs.</p>')
    notes = []
    for rec in runs:
        z_run = output_dir / f"{rec.map_prefix}_contrast-{label}_stat-z_statmap.nii.gz"
        if z_run.is_file():
            maps.append((f"{name}: {rec.label}", z_run, rec))
        elif name in rec.record.get("DroppedContrasts", {}):
            notes.append(f'<p class="muted">{_esc(rec.label)}: dropped '
                         f'({_esc(rec.record["DroppedContrasts"][name])})</p>')
    loaded = [read_map(path) for _, path, _ in maps]
    vmax = _shared_vmax(data for data, _ in loaded)
    if maps:
        parts.append(_colour_bar(vmax, True, "z, one scale for the subject and all runs:"))
    figures = [_brain_block(data, affine, _run_grid(output_dir, rec, path), title=title, vmax=vmax,
                            glass=GLASS_THRESHOLD, slice_threshold=None, source=path)
               for (title, path, rec), (data, affine) in zip(maps, loaded)]
    if figures:
        parts.append(f'<div class="maps">{"".join(figures)}</div>')
    return _draw_figures("".join(parts + notes), n_jobs)  # now: only one contrast's maps are held


def participant_report(output_dir: Path, subject: str, n_jobs: int = 1) -> Path:
    """Write ``sub-<subject>.html``; returns its path. ``n_jobs`` threads draw its figures."""
    runs = _run_records(output_dir, subject)
    if not runs:
        raise DataError(f"no participant-level results for sub-{subject} (no *_design.json)", output_dir)
    _REUSABLE.clear()
    _REUSABLE.update(_reusable_figures(output_dir / f"sub-{subject}.html"))
    try:
        return _write_participant_report(output_dir, subject, runs, n_jobs)
    finally:
        _REUSABLE.clear()
        _PENDING.clear()


def _write_participant_report(output_dir: Path, subject: str, runs: list[RunRecord], n_jobs: int = 1) -> Path:
    body, index = [], []
    groups: dict[str, list[RunRecord]] = {}
    for rec in runs:  # one section per task (and session and space)
        key = " ".join(p for p in rec.label.split() if not p.startswith("run-"))
        groups.setdefault(key, []).append(rec)
    for key, recs in groups.items():
        anchor = _anchor(key)
        index.append((anchor, key, 0))
        body.append(f'<h2 id="{anchor}">{_esc(key)}</h2>')
        body.append(_kv_table({"runs": _esc(", ".join(r.label.split()[-1] for r in recs))}))
        for rec in recs:
            ra = _anchor(rec.label)
            run_part = " ".join(p for p in rec.label.split() if p not in key.split()) or rec.label
            index.append((ra, f"{run_part}: design", 1))
            log.info("report sub-%s: %s design", subject, rec.label)
            body.append(f'<h3 id="{ra}">{_esc(rec.label)}</h3>{_run_section(rec)}')
        contrasts: dict[str, str] = {}
        for rec in recs:
            contrasts.update(rec.record.get("Contrasts", {}))
            contrasts.update({n: "" for n in rec.record.get("DroppedContrasts", {}) if n not in contrasts})
        body.append(_earlier_contrasts_note(output_dir, recs[0], contrasts))
        for name, label in contrasts.items():
            ca = _anchor(f"{key}-contrast-{name}")
            index.append((ca, f"contrast {name}", 1))
            log.info("report sub-%s: %s contrast %s", subject, key, name)
            section = _contrast_section(output_dir, name, label, recs, n_jobs) if label else \
                '<p class="warn">Estimable in none of the runs.</p>'
            body.append(f'<h3 id="{ca}">Contrast {_esc(name)}</h3>{section}')
    path = output_dir / f"sub-{subject}.html"
    page = _page(f"bidsglm participant report: sub-{subject}", _draw_figures("".join(body), n_jobs), index)
    atomic_write_bytes(path, page)
    return path


def _earlier_contrasts_note(output_dir: Path, rec: RunRecord, contrasts: dict) -> str:
    """One sentence naming the subject maps of contrasts not in these runs' records (an earlier
    participant-level run wrote them): the group level models them too."""
    from .discovery import parse_bids_name
    from .groupinputs import earlier_contrasts

    parsed = parse_bids_name(Path(rec.map_prefix + "_x.nii.gz"))
    if parsed is None or "sub" not in parsed.entities:
        return ""
    earlier = earlier_contrasts(output_dir, parsed.entities, contrasts)
    if not earlier:
        return ""
    return ('<p class="warn">' + _esc(f"OUTPUT_DIR also holds subject-level maps of contrast(s) "
                                      f"{', '.join(earlier)} from an earlier participant-level run, not shown "
                                      "here; the group level models them too (delete their files or use a new "
                                      "OUTPUT_DIR to drop them).") + "</p>")


def participant_reports(output_dir: Path, subjects: list[str], n_jobs: int = 1) -> list[Path]:
    """One report per subject: several subjects in parallel processes, the figures of a single
    subject's report in parallel threads."""
    if n_jobs > 1 and len(subjects) > 1:
        from joblib import Parallel, delayed

        return list(Parallel(n_jobs=min(n_jobs, len(subjects)))(
            delayed(participant_report)(output_dir, s) for s in subjects))
    return [participant_report(output_dir, s, n_jobs) for s in subjects]


def subjects_with_results(output_dir: Path, labels: list[str] | None = None) -> list[str]:
    found = sorted({p.name[4:] for p in output_dir.glob("sub-*") if p.is_dir()
                    and any(p.rglob("*_design.json"))})
    if labels:
        wanted = {lab.removeprefix("sub-") for lab in labels}
        found = [s for s in found if s in wanted]
    return found


# --- group report -------------------------------------------------------------

def _group_contrasts(group_dir: Path) -> dict[str, list[Path]]:
    """Unthresholded group z maps, grouped by the design they came from."""
    models: dict[str, list[Path]] = {}
    for z in sorted(group_dir.glob("*_stat-z_statmap.nii.gz")):
        side = _read_json(sidecar_path(z))
        models.setdefault(side.get("DesignMatrix", "unknown design"), []).append(z)
    return models


def _participants_section(group_dir: Path, models: dict[str, list[Path]], names: dict) -> str:
    parts = []
    for excl in sorted(group_dir.glob("*_exclusions.tsv")):
        table = pd.read_csv(excl, sep="\t", dtype=str, keep_default_na=False)
        task = _entities(excl.name).get("task", "?")
        parts.append(f"<h4>Excluded from task {_esc(task)} <code>{_esc(excl.name)}</code></h4>{_df_table(table)}")
    for design, maps in models.items():
        side = _read_json(sidecar_path(maps[0]))
        people = side.get("Participants", [])
        parts.append(f"<h4>Included in {_esc(names[design][0])}, {_esc(names[design][1])} ({len(people)})</h4>"
                     f"<p>{_esc(', '.join(people))}</p>")
    return "".join(parts)


def _threshold_text(side: dict) -> str:
    if not side:
        return "not recorded"
    tail = "two-sided" if side.get("TwoSided") else "one-sided"
    return (f"{side.get('HeightControl')} at {side.get('Alpha')} ({tail}): |{side.get('ThresholdStatistic', 'z')}| "
            f">= {side.get('Threshold', float('nan')):.3f}; cluster extent >= {side.get('ClusterExtent')} voxels; "
            f"{side.get('NumberOfClusters', '?')} cluster(s)")


def _group_grid(path: Path, group_dir: Path):
    """The MNI template, or for a map in another space the group mask as its silhouette."""
    from .figures import mni_grid

    if _is_mni(path.name):
        return mni_grid()
    masks = sorted(group_dir.glob("*_mask.nii.gz"))
    return _native_grid(str(masks[0]), "") if masks else _native_grid(str(path), "")


# permutation settings of a map's sidecar, as the report names them
_PERMUTATION_FIELDS = {"Rearrangement": "rearrangement", "NumberOfRearrangements": "number of rearrangements",
                       "Exhaustive": "every rearrangement (exhaustive)", "RandomSeed": "random seed",
                       "ClusterFormingP": "cluster-forming p", "ClusterFormingThreshold": "cluster-forming threshold",
                       "FWEAlpha": "family-wise error rate", "TFCE": "TFCE (threshold-free cluster enhancement)"}


def _setting_text(value) -> str:
    """A sidecar value as text: yes/no, 'not set', numbers to 4 significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "not set"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting_text(v)}" for k, v in value.items())
    return str(value)


def _permutation_section(group_dir: Path, base: str, stat: str, grid) -> str:
    from .figures import read_map

    parts = []
    for kind in PERMUTATION_KINDS:
        logp = group_dir / f"{base}_stat-logp_desc-{kind}FWE_statmap.nii.gz"
        if not logp.is_file():
            continue
        side = _read_json(sidecar_path(logp))
        masked = group_dir / f"{base}_stat-{stat}_desc-{kind}FWE_statmap.nii.gz"
        clusters = group_dir / f"{base}_desc-{kind}FWE_clusters.tsv"
        info = {label: _esc(_setting_text(side[k])) for k, label in _PERMUTATION_FIELDS.items() if k in side}
        parts.append(f"<h6>{_esc(kind)} FWE</h6>{_kv_table(info) if info else ''}")
        alpha = float(side.get("FWEAlpha", 0.05))
        data, affine = read_map(logp)
        vmax = max(_shared_vmax([data]), -np.log10(alpha))
        figures = [_brain_block(data, affine, grid, title=f"{kind}: -log10 FWE p", vmax=vmax,
                                glass=float(-np.log10(alpha)), slice_threshold=1e-6, symmetric=False,
                                stat="-log10 p", source=logp)]
        scale = _colour_bar(vmax, False, "-log10 FWE p:")
        if masked.is_file():
            mdata, maffine = read_map(masked)
            mvmax = _shared_vmax([mdata])
            figures.append(_brain_block(mdata, maffine, grid, title=f"{kind}: {stat} where FWE p < {alpha:g}",
                                        vmax=mvmax, glass=1e-6, slice_threshold=1e-6, stat=stat, source=masked))
            scale += _colour_bar(mvmax, True, f"{stat} (right-hand map):")
        parts.append(scale + f'<div class="maps">{"".join(figures)}</div>')
        if clusters.is_file():
            parts.append(cluster_table(pd.read_csv(clusters, sep="\t")))
    return "".join(parts)


def _group_contrast_section(group_dir: Path, z: Path) -> str:
    from .figures import read_map

    side = _read_json(sidecar_path(z))
    base = z.name.removesuffix("_stat-z_statmap.nii.gz")
    stat = side.get("Test", "t")
    grid = _group_grid(z, group_dir)
    thr_path = group_dir / f"{base}_stat-z_desc-thresholded_statmap.nii.gz"
    thr_side_path = sidecar_path(thr_path)
    thr_side = _read_json(thr_side_path) if thr_side_path.is_file() else {}
    con = side.get("Contrast", {})
    parts = [_kv_table({
        "contrast": _esc(_group_contrast_text(con)),
        "test": f"{_esc(stat)}, degrees of freedom {_esc(_number(side.get('DegreesOfFreedom')))}, "
                f"{_esc(side.get('NumberOfInputs'))} inputs",
        "model": _esc(side.get("Model")),
        "threshold": _esc(_threshold_text(thr_side)),
    })]
    # the glass brains show the height threshold actually applied (the default only when none was)
    applied = thr_side.get("Threshold")
    glass = float(applied) if isinstance(applied, (int, float)) else GLASS_THRESHOLD
    data, affine = read_map(z)
    maps = [(data, affine, "unthresholded z", None, z)]
    if thr_path.is_file():
        tdata, taffine = read_map(thr_path)
        extent = thr_side.get("ClusterExtent")
        maps.append((tdata, taffine, "thresholded z" + (f" (clusters of at least {extent} voxels)" if extent else ""),
                     glass, thr_path))
    vmax = _shared_vmax(m[0] for m in maps)
    parts.append(_colour_bar(vmax, True, "z, one scale for both maps:"))
    parts.append('<div class="maps">' + "".join(
        _brain_block(d, a, grid, title=title, vmax=vmax, glass=glass, slice_threshold=thr, source=src)
        for d, a, title, thr, src in maps) + "</div>")
    clusters = group_dir / f"{base}_clusters.tsv"
    if clusters.is_file():
        parts.append("<h5>Clusters</h5>" + cluster_table(pd.read_csv(clusters, sep="\t")))
    perm = _permutation_section(group_dir, base, stat, grid)
    if perm:
        parts.append("<h5>Permutation inference</h5>" + perm)
    return "".join(parts)


def group_report(output_dir: Path, group_dir: Path | None = None, n_jobs: int = 1) -> Path:
    """Write ``group/report.html`` (or ``report.html`` in a Dataset node's folder); returns its
    path. ``n_jobs`` threads draw its figures."""
    group_dir = group_dir or output_dir / "group"
    models = _group_contrasts(group_dir)
    if not models:
        raise DataError("no group-level maps to report (run the group level first)", group_dir)
    _REUSABLE.clear()
    _REUSABLE.update(_reusable_figures(group_dir / "report.html"))
    try:
        return _write_group_report(group_dir, models, n_jobs)
    finally:
        _REUSABLE.clear()
        _PENDING.clear()


def _model_names(models: dict[str, list[Path]]) -> dict[str, tuple[str, str, str]]:
    """Each group design as the report names it: (section, model, heading), e.g. ('task flanker',
    'contrast incongruentMinusCongruent', 'task flanker, contrast incongruentMinusCongruent:
    one-sample t-test, 4 subjects'); the space (and other entities) only where models differ in it."""
    ents = {d: _entities(d.removesuffix("_design.tsv")) for d in models}
    others = {d: " ".join(f"{k} {v}" for k, v in e.items() if k not in ("task", "contrast", "desc"))
              for d, e in ents.items()}
    several = len(set(others.values())) > 1
    names = {}
    for design, maps in models.items():
        side = _read_json(sidecar_path(maps[0]))
        section = ", ".join(p for p in (f"task {ents[design].get('task', '?')}", others[design] if several else "")
                            if p)
        kind = str(side.get("Model", "group model")).split(" (")[0]
        if "contrast" in ents[design]:
            model = f"contrast {side.get('SubjectContrast') or ents[design]['contrast']}"
        else:
            model = kind
        people = len(side.get("Participants", [])) or side.get("NumberOfInputs")
        what = f"{kind}, {people} subjects" if model != kind else f"{people} subjects"
        names[design] = (section, model, f"{section}, {model}: {what}")
    return names


def _write_group_report(group_dir: Path, models: dict[str, list[Path]], n_jobs: int = 1) -> Path:
    names = _model_names(models)
    body = ['<h2 id="participants">Participants</h2>', _participants_section(group_dir, models, names)]
    index = [("participants", "Participants", 0)]
    sections: dict[str, list[str]] = {}  # task (and space) -> its designs, in the order found
    for design_name in models:
        sections.setdefault(names[design_name][0], []).append(design_name)
    for section, designs in sections.items():
        index.append((_anchor(section), section, 0))
        body.append(f'<h2 id="{_anchor(section)}">{_esc(section)}</h2>')
        for design_name in designs:
            body.append(_group_model_section(group_dir, design_name, models[design_name], names[design_name],
                                             index, n_jobs))
    path = group_dir / "report.html"
    atomic_write_bytes(path, _page("bidsglm group report", _draw_figures("".join(body), n_jobs), index))
    return path


def _group_model_section(group_dir: Path, design_name: str, maps: list[Path], name: tuple[str, str, str],
                         index: list, n_jobs: int) -> str:
    """One group model: its design and contrasts, then each group contrast's maps and tables."""
    _, model, heading = name
    anchor = _anchor(design_name)
    index.append((anchor, model, 1))
    body = [f'<h3 id="{anchor}">{_esc(heading)}</h3>',
            f'<p class="muted">design matrix: <code>{_esc(design_name)}</code></p>']
    design_path = group_dir / design_name
    if design_path.is_file():
        design = pd.read_csv(design_path, sep="\t", index_col=0)
        body.append(design_block(design, f"group design {design_name}", diverging=True,
                                 row_px=float(np.clip(300 / max(len(design), 1), 3, 40)))
                    + '<p class="cap">Rows: participants, in the order of the values table; each column '
                      "scaled to its largest absolute value (blue negative, white 0, red positive).</p>")
        body.append(f"<details><summary>design matrix values</summary>{_df_table(design.reset_index(), 10**6)}"
                    "</details>")
    contrasts = [_read_json(sidecar_path(z)).get("Contrast", {}) for z in maps]
    weights = {}
    for z, con in zip(maps, contrasts):
        w = con.get("Weights", {})
        weights[con.get("Name", z.name)] = "; ".join(
            ", ".join(f"{k} {v:g}" for k, v in row.items() if v) for row in (w if isinstance(w, list) else [w]))
    body.append("<h4>Group contrasts</h4>" + _df_table(pd.DataFrame(
        {"group contrast": list(weights), "weights (rows separated by ;)": list(weights.values())})))
    for z, con in zip(maps, contrasts):
        base = z.name.removesuffix("_stat-z_statmap.nii.gz")
        ca = _anchor(base)
        if len(maps) > 1:  # a single group contrast is reached through its model's entry
            index.append((ca, f"group contrast {con.get('Name', base)}", 2))
        log.info("group report: %s", base)
        section = _draw_figures(_group_contrast_section(group_dir, z), n_jobs)  # one contrast's maps held
        body.append(f'<h4 id="{ca}">{_esc(model)}, group contrast {_esc(_group_contrast_text(con))}</h4>{section}')
    return "".join(body)


def _group_contrast_text(con: dict) -> str:
    """'mean: the group mean (intercept)'; 'a - b'; a name with its expression only where they differ."""
    name, expression = con.get("Name"), con.get("Expression")
    if name == INTERCEPT:
        return f"{name}: the group mean (intercept)"
    if expression is None or expression == name:
        return str(name)
    expression = "; ".join(expression) if isinstance(expression, list) else expression
    return f"{name} = {expression}"
