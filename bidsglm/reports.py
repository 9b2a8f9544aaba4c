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
h3{margin-top:28px}h4{margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
td,th{border:1px solid #ccd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef1f6}
img{max-width:100%;display:block;margin:6px 0 14px}
.warn{background:#fff3cd;border-left:4px solid #e0a800;padding:6px 10px;margin:8px 0}
.tbl{overflow-x:auto;max-width:100%}.ok{color:#2a7a2a}.muted{color:#667}nav ul{columns:2}code{background:#f2f3f6;padding:0 3px}
"""


# --- small HTML builders ----------------------------------------------------

def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _anchor(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "-", text).strip("-")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _kv_table(rows: dict) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


def _df_table(df: pd.DataFrame, max_rows: int = 200) -> str:
    if df.empty:
        return '<p class="muted">none</p>'
    shown = df.head(max_rows)
    more = f'<p class="muted">{len(df) - max_rows} more rows in the TSV file</p>' if len(df) > max_rows else ""
    table = shown.to_html(index=False, escape=True, border=0, na_rep="n/a", float_format=lambda v: f"{v:.4g}")
    return f'<div class="tbl">{table}</div>{more}'


def _page(title: str, body: str, index: list[tuple[str, str]]) -> bytes:
    nav = "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in index)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_STYLE}</style></head><body><h1>{_esc(title)}</h1>"
            f'<p class="muted">bidsglm {_esc(__version__)}, written {time.strftime("%Y-%m-%d %H:%M")} '
            f"from the maps and sidecars in this folder.</p>"
            f"<nav><h2>Contents</h2><ul>{nav}</ul></nav>{body}</body></html>")
    return page.encode("utf-8")


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
        design = pd.read_csv(tsv, sep="\t") if tsv.is_file() else pd.DataFrame()
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
        "volumes, TR": f"{len(rec.design)} volumes, TR {r.get('RepetitionTime')} s "
                       f"(slice-time reference {r.get('SliceTimeRef')})",
        "model": _esc(", ".join(f"{k} {v}" for k, v in model.items())) or '<span class="muted">not recorded</span>',
        "residual degrees of freedom": _esc(r.get("DegreesOfFreedom")),
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
    from .figures import contrast_matrix_figure, correlation_figure, design_matrix_figure

    parts.append("<h4>Design matrix</h4>" + _img(design_matrix_figure(rec.design), f"design matrix {rec.label}"))
    parts.append("<h4>Correlation between regressors</h4>"
                 + _img(correlation_figure(design_correlation(rec.design)), f"design correlations {rec.label}"))
    parts.append(_vif_section(rec.design, r.get("Confounds", [])))
    if rec.weights:
        weights = pd.DataFrame(rec.weights).T.reindex(columns=rec.design.columns).fillna(0.0)
        parts.append("<h4>Contrasts</h4>" + _img(contrast_matrix_figure(weights), f"contrast matrix {rec.label}"))
    return "".join(parts)


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


def _contrast_section(output_dir: Path, name: str, label: str, runs: list[RunRecord]) -> str:
    from .figures import brain_figure

    subject_prefix = _subject_prefix(runs[0].map_prefix)
    name_z = f"{subject_prefix}_contrast-{label}_stat-z_statmap.nii.gz"
    # a Stats Model's Subject node writes beside the Run node: OUTPUT_DIR/node-<Name>/
    folders = [output_dir] + (sorted(output_dir.parent.glob("node-*")) if output_dir.name.startswith("node-") else [])
    z_subject = next((f / name_z for f in folders if (f / name_z).is_file()), output_dir / name_z)
    parts = []
    side_path = sidecar_path(z_subject)
    if z_subject.is_file() and side_path.is_file():
        side = _read_json(side_path)
        used = ", ".join(f"run-{r}" if r is not None else "the run" for r in side.get("Runs", []))
        dropped = side.get("RunsDropped", {})
        parts.append(_kv_table({
            "runs combined": _esc(used or "none"),
            "runs dropped": "<br>".join(f"{_esc(k)}: {_esc(v)}" for k, v in dropped.items()) or "none",
            "degrees of freedom": _esc(side.get("DegreesOfFreedom")),
        }))
        parts.append(_img(brain_figure(z_subject, threshold=None, mni=_is_mni(z_subject.name),
                                       title=f"{name}: subject z (glass brain |z| > {GLASS_THRESHOLD})"),
                          f"subject z map {name}"))
    else:
        parts.append('<p class="warn">No subject-level map: the contrast is estimable in none of the runs.</p>')
    for rec in runs:
        z_run = output_dir / f"{rec.map_prefix}_contrast-{label}_stat-z_statmap.nii.gz"
        if z_run.is_file():
            parts.append(_img(brain_figure(z_run, threshold=None, mni=_is_mni(z_run.name),
                                           title=f"{name}: {rec.label} z"), f"run z map {name} {rec.label}"))
        elif name in rec.record.get("DroppedContrasts", {}):
            parts.append(f'<p class="muted">{_esc(rec.label)}: dropped '
                         f'({_esc(rec.record["DroppedContrasts"][name])})</p>')
    return "".join(parts)


def participant_report(output_dir: Path, subject: str) -> Path:
    """Write ``sub-<subject>.html``; returns its path."""
    runs = _run_records(output_dir, subject)
    if not runs:
        raise DataError(f"no participant-level results for sub-{subject} (no *_design.json)", output_dir)
    body, index = [], []
    groups: dict[str, list[RunRecord]] = {}
    for rec in runs:  # one section per task (and session and space)
        key = " ".join(p for p in rec.label.split() if not p.startswith("run-"))
        groups.setdefault(key, []).append(rec)
    for key, recs in groups.items():
        anchor = _anchor(key)
        index.append((anchor, key))
        body.append(f'<h2 id="{anchor}">{_esc(key)}</h2>')
        body.append(_kv_table({"runs": _esc(", ".join(r.label.split()[-1] for r in recs))}))
        for rec in recs:
            ra = _anchor(rec.label)
            index.append((ra, f"  {rec.label}: design"))
            log.info("report sub-%s: %s design", subject, rec.label)
            body.append(f'<h3 id="{ra}">{_esc(rec.label)}</h3>{_run_section(rec)}')
        contrasts: dict[str, str] = {}
        for rec in recs:
            contrasts.update(rec.record.get("Contrasts", {}))
            contrasts.update({n: "" for n in rec.record.get("DroppedContrasts", {}) if n not in contrasts})
        for name, label in contrasts.items():
            ca = _anchor(f"{key}-contrast-{name}")
            index.append((ca, f"  contrast {name}"))
            log.info("report sub-%s: %s contrast %s", subject, key, name)
            section = _contrast_section(output_dir, name, label, recs) if label else \
                '<p class="warn">Estimable in none of the runs.</p>'
            body.append(f'<h3 id="{ca}">Contrast {_esc(name)}</h3>{section}')
    path = output_dir / f"sub-{subject}.html"
    atomic_write_bytes(path, _page(f"bidsglm participant report: sub-{subject}", "".join(body), index))
    return path


def participant_reports(output_dir: Path, subjects: list[str], n_jobs: int = 1) -> list[Path]:
    """One report per subject, in parallel over subjects."""
    if n_jobs > 1 and len(subjects) > 1:
        from joblib import Parallel, delayed

        return list(Parallel(n_jobs=min(n_jobs, len(subjects)))(
            delayed(participant_report)(output_dir, s) for s in subjects))
    return [participant_report(output_dir, s) for s in subjects]


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


def _participants_section(group_dir: Path, models: dict[str, list[Path]]) -> str:
    parts = []
    for excl in sorted(group_dir.glob("*_exclusions.tsv")):
        table = pd.read_csv(excl, sep="\t", dtype=str, keep_default_na=False)
        parts.append(f"<h4>Excluded: <code>{_esc(excl.name)}</code></h4>{_df_table(table)}")
    for design, maps in models.items():
        side = _read_json(sidecar_path(maps[0]))
        people = side.get("Participants", [])
        parts.append(f"<h4>Included in <code>{_esc(design)}</code> ({len(people)})</h4>"
                     f"<p>{_esc(', '.join(people))}</p>")
    return "".join(parts)


def _threshold_text(side: dict) -> str:
    if not side:
        return "not recorded"
    tail = "two-sided" if side.get("TwoSided") else "one-sided"
    return (f"{side.get('HeightControl')} at {side.get('Alpha')} ({tail}): |{side.get('ThresholdStatistic', 'z')}| "
            f">= {side.get('Threshold', float('nan')):.3f}; cluster extent >= {side.get('ClusterExtent')} voxels; "
            f"{side.get('NumberOfClusters', '?')} cluster(s)")


def _permutation_section(group_dir: Path, base: str, stat: str, mni: bool) -> str:
    from .figures import brain_figure

    parts = []
    for kind in PERMUTATION_KINDS:
        logp = group_dir / f"{base}_stat-logp_desc-{kind}FWE_statmap.nii.gz"
        if not logp.is_file():
            continue
        side = _read_json(sidecar_path(logp))
        masked = group_dir / f"{base}_stat-{stat}_desc-{kind}FWE_statmap.nii.gz"
        clusters = group_dir / f"{base}_desc-{kind}FWE_clusters.tsv"
        info = {k: _esc(side[k]) for k in ("Rearrangement", "NumberOfRearrangements", "Exhaustive", "RandomSeed",
                                           "ClusterFormingP", "ClusterFormingThreshold", "FWEAlpha",
                                           "TFCE") if k in side}
        parts.append(f"<h4>{_esc(kind)} FWE</h4>{_kv_table(info) if info else ''}")
        alpha = float(side.get("FWEAlpha", 0.05))
        parts.append(_img(brain_figure(logp, threshold=1e-6, mni=mni, symmetric=False,
                                       glass_threshold=-np.log10(alpha),
                                       title=f"{kind}: -log10 FWE p (glass brain: p < {alpha:g})"),
                          f"{kind} FWE -log10 p"))
        if masked.is_file():
            parts.append(_img(brain_figure(masked, threshold=1e-6, mni=mni,
                                           title=f"{kind}: {stat} where FWE p < alpha"),
                              f"{kind} FWE significant {stat}"))
        if clusters.is_file():
            parts.append(_df_table(pd.read_csv(clusters, sep="\t")))
    return "".join(parts)


def _group_contrast_section(group_dir: Path, z: Path) -> str:
    from .figures import brain_figure

    side = _read_json(sidecar_path(z))
    base = z.name.removesuffix("_stat-z_statmap.nii.gz")
    stat = side.get("Test", "t")
    mni = _is_mni(z.name)
    thr_path = group_dir / f"{base}_stat-z_desc-thresholded_statmap.nii.gz"
    thr_side_path = sidecar_path(thr_path)
    thr_side = _read_json(thr_side_path) if thr_side_path.is_file() else {}
    con = side.get("Contrast", {})
    parts = [_kv_table({
        "contrast": f"{_esc(con.get('Name'))} = <code>{_esc(con.get('Expression'))}</code>",
        "test": f"{_esc(stat)}, degrees of freedom {_esc(side.get('DegreesOfFreedom'))}, "
                f"{_esc(side.get('NumberOfInputs'))} inputs",
        "model": _esc(side.get("Model")),
        "threshold": _esc(_threshold_text(thr_side)),
    })]
    parts.append(_img(brain_figure(z, threshold=None, mni=mni, title="unthresholded z (glass brain |z| > "
                                   f"{GLASS_THRESHOLD})"), f"unthresholded z {base}"))
    if thr_path.is_file():
        parts.append(_img(brain_figure(thr_path, threshold=1e-6, mni=mni, title="thresholded z"),
                          f"thresholded z {base}"))
    clusters = group_dir / f"{base}_clusters.tsv"
    if clusters.is_file():
        parts.append("<h4>Clusters</h4>" + _df_table(pd.read_csv(clusters, sep="\t")))
    perm = _permutation_section(group_dir, base, stat, mni)
    if perm:
        parts.append("<h4>Permutation inference</h4>" + perm)
    return "".join(parts)


def group_report(output_dir: Path, group_dir: Path | None = None) -> Path:
    """Write ``group/report.html`` (or ``report.html`` in a Dataset node's folder); returns its path."""
    from .figures import design_figure_from_table

    group_dir = group_dir or output_dir / "group"
    models = _group_contrasts(group_dir)
    if not models:
        raise DataError("no group-level maps to report (run the group level first)", group_dir)
    body = ['<h2 id="participants">Participants</h2>', _participants_section(group_dir, models)]
    index = [("participants", "Participants")]
    for design_name, maps in models.items():
        anchor = _anchor(design_name)
        index.append((anchor, design_name.removesuffix("_design.tsv")))
        body.append(f'<h2 id="{anchor}">Model <code>{_esc(design_name)}</code></h2>')
        design_path = group_dir / design_name
        if design_path.is_file():
            design = pd.read_csv(design_path, sep="\t", index_col=0)
            body.append(_img(design_figure_from_table(design), f"group design {design_name}"))
            body.append(f"<details><summary>design matrix values</summary>{_df_table(design.reset_index())}</details>")
        weights = {}
        for z in maps:
            con = _read_json(sidecar_path(z)).get("Contrast", {})
            w = con.get("Weights", {})
            weights[con.get("Label", z.name)] = "; ".join(
                ", ".join(f"{k} {v:g}" for k, v in row.items() if v) for row in (w if isinstance(w, list) else [w]))
        body.append("<h3>Contrasts</h3>" + _df_table(pd.DataFrame(
            {"label": list(weights), "weights (rows separated by ;)": list(weights.values())})))
        for z in maps:
            base = z.name.removesuffix("_stat-z_statmap.nii.gz")
            ca = _anchor(base)
            index.append((ca, f"  {_entities(base).get('contrast', base)}"))
            log.info("group report: %s", base)
            body.append(f'<h3 id="{ca}">{_esc(base)}</h3>{_group_contrast_section(group_dir, z)}')
    path = group_dir / "report.html"
    atomic_write_bytes(path, _page("bidsglm group report", "".join(body), index))
    return path
