"""Participant level: every run's GLM, then fixed effects per subject.

Flow: discover runs -> check every run's inputs and build its design (cheap,
all runs first, so bad input stops the job before any computing) -> fit runs
(in parallel) writing run maps -> combine each subject's runs from the
written maps.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .design import (
    DEFAULT_CONFOUNDS,
    ContrastSpec,
    DesignSettings,
    build_design,
    check_contrasts,
    default_contrasts,
    mean_framewise_displacement,
    read_confounds,
    read_events,
)
from .discovery import RunInputs
from .errors import DataError, ModelError
from .firstlevel import (
    RunGLM,
    check_design,
    check_estimable,
    check_left_out,
    check_statistic_maps,
    design_rank,
    element_means,
    mean_scaling,
)
from .fixedeffects import DegenerateRunError, fixed_effects
from .images import (
    check_same_grid,
    load_mask,
    nifti_bytes,
    read_header,
    stream_masked_timeseries,
    unmask,
)
from .surfaces import (
    Geometry,
    check_smoothing,
    kind_of_path,
    map_files,
    map_path,
    pair_paths,
    read_map,
    read_run_series,
    run_series_info,
    same_grid,
    smooth_elements,
    usable_elements,
)
from .outputs import (
    STATS_F,
    STATS_T,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_tsv,
    bids_uri,
    entity_prefix,
    func_dir,
    sidecar_path,
    statmap_path,
)

log = logging.getLogger("bidsglm")
TR_TOLERANCE = 1e-3  # seconds between sidecar and header


@dataclass(frozen=True)
class ModelSettings:
    """Everything that defines a run's model (part of each output's provenance)."""

    confounds: tuple = DEFAULT_CONFOUNDS
    smoothing_fwhm: float | None = 6.0
    hrf_model: str = "glover"
    drift_model: str | None = "cosine"
    high_pass: float = 1.0 / 128
    noise_model: str = "ar1"
    slice_time_ref: float | None = None  # None: StartTime / TR from the sidecar, else 0
    allow_tr_mismatch: bool = False

    def fingerprint(self, contrasts: list[ContrastSpec]) -> str:
        payload = json.dumps(
            {"settings": asdict(self), "contrasts": [(c.name, c.weights) for c in contrasts],
             "version": __version__},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class PreparedRun:
    """A run whose inputs passed every check, with its design matrix."""

    inputs: RunInputs
    tr: float
    n_volumes: int
    slice_time_ref: float
    design: pd.DataFrame
    contrasts: list  # ContrastSpec estimable in this run
    dropped: dict  # contrast name -> reason
    confound_columns: list
    fd_mean: float | None = None  # mean framewise displacement (mm), for group exclusions
    notes: list = field(default_factory=list)  # warnings about the inputs, one line each (logged, recorded)
    geometry: Geometry | None = None  # surfaces: the elements' layout (brain models, hemispheres)

    def __post_init__(self):
        """Whichever front door built it (command line or Stats Model), a prepared run's design
        can be estimated: checked here, before anything is fitted or written."""
        check_run_design(self)


def _design_source(prep: "PreparedRun", column: str | None) -> Path:
    """The input a design column comes from, for messages."""
    if column in prep.confound_columns:
        return prep.inputs.confounds
    return prep.inputs.events if column is not None else prep.inputs.bold


def check_run_design(prep: "PreparedRun") -> None:
    """No all-zero or non-finite regressor, a residual degree of freedom, estimable contrasts;
    each failure is one line naming the run's file."""
    X = prep.design.to_numpy(dtype=np.float64)
    columns = [str(c) for c in prep.design.columns]
    try:
        check_design(X, columns)
    except ModelError as exc:
        column = next((c for c in columns if f"'{c}'" in exc.problem), None)
        hint = ""
        if "zero in every volume" in exc.problem and column not in prep.confound_columns:
            hint = " (no event of this condition within the scan, or a column that is n/a in every row)"
        elif "no residual degrees of freedom" in exc.problem:
            drifts = sum(c.startswith("drift") or c.startswith("cosine") for c in columns)
            hint = (f" ({len(prep.confound_columns)} confounds, {drifts} drift terms: use fewer confounds "
                    "or a lower --high-pass)")
        raise ModelError(exc.problem + hint, _design_source(prep, column)) from exc
    if design_rank(X) < X.shape[1]:
        for con in prep.contrasts:
            try:
                check_estimable(con.matrix(columns), X, columns, con.name)
            except ModelError as exc:
                raise ModelError(exc.problem, prep.inputs.events) from exc


@dataclass
class RunResult:
    inputs: RunInputs
    maps: dict = field(default_factory=dict)  # contrast name -> {stat: path}
    dof: float = 0.0
    dropped: dict = field(default_factory=dict)
    mask_path: Path | None = None
    skipped: bool = False


# --- checking inputs -------------------------------------------------------

def repetition_time(run: RunInputs, header, allow_mismatch: bool, header_tr: float | None = None,
                    where: str = "NIfTI header") -> float:
    """RepetitionTime from the sidecar, checked against the NIfTI header, or (surfaces, no header) against
    ``header_tr`` (a CIFTI series step, a GIfTI TimeStep) and every other sidecar stating one."""
    sidecar_tr = run.bold_sidecar.get("RepetitionTime")
    if sidecar_tr is None:
        raise DataError("no RepetitionTime in the BOLD sidecar JSON (raw or derivative)", run.bold)
    try:
        sidecar_tr = float(sidecar_tr)
    except (TypeError, ValueError) as exc:
        raise DataError(f"RepetitionTime {sidecar_tr!r} is not a number", run.bold_sidecar_files[-1]) from exc
    if not sidecar_tr > 0:
        raise DataError(f"RepetitionTime {sidecar_tr} must be positive", run.bold_sidecar_files[-1])
    if header is None and kind_of_path(run.bold) != "volume":  # surfaces
        where = "CIFTI series axis" if kind_of_path(run.bold) == "cifti" else "GIfTI TimeStep metadata"
        check_sidecars_agree_on_tr(run, sidecar_tr, allow_mismatch)
    zooms = header.get_zooms() if header is not None else ()
    if len(zooms) > 3 and zooms[3] > 0:
        unit = header.get_xyzt_units()[1]
        header_tr = float(zooms[3]) * {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    if header_tr is not None and header_tr > 0:
        if abs(header_tr - sidecar_tr) > TR_TOLERANCE and not allow_mismatch:
            raise DataError(
                f"TR in the {where} ({header_tr:g} s) differs from RepetitionTime in the "
                f"sidecar ({sidecar_tr:g} s); fix the data or pass --allow-tr-mismatch to use the sidecar",
                run.bold,
            )
    return sidecar_tr


def check_sidecars_agree_on_tr(run: RunInputs, tr: float, allow_mismatch: bool) -> None:
    """Surfaces have no NIfTI header to check the TR against: every sidecar that states a
    RepetitionTime (the raw one, the derivative one) must agree with the one used (the most
    specific), unless --allow-tr-mismatch."""
    from .discovery import read_json

    if allow_mismatch:
        return
    for path in run.bold_sidecar_files:
        stated = read_json(path).get("RepetitionTime")
        try:
            stated = float(stated)
        except (TypeError, ValueError):
            continue  # absent here, or refused where it is the one used
        if abs(stated - tr) > TR_TOLERANCE:
            raise DataError(f"RepetitionTime {stated:g} s here differs from {tr:g} s in "
                            f"{run.bold_sidecar_files[-1].name}; fix the sidecars or pass --allow-tr-mismatch "
                            "to use the most specific one", path)


def prepare_run(run: RunInputs, settings: ModelSettings, contrasts: list[ContrastSpec],
                events: pd.DataFrame | None = None) -> PreparedRun:
    """Check headers, grids, events and confounds and build the design.

    Reads only headers and tables, so it is cheap to do for every run first.
    ``events`` may be passed when the caller has already read them."""
    if kind_of_path(run.bold) != "volume":
        check_smoothing(run.entities.get("space", ""), settings.smoothing_fwhm)
        n_volumes, step, geometry = run_series_info(run.bold, run.mask, run.entities.get("space", ""))
        check_smoothing(run.entities.get("space", ""), settings.smoothing_fwhm, geometry)
        if n_volumes < 2:
            raise DataError(f"a surface run needs several volumes, got {n_volumes}", run.bold)
        tr = repetition_time(run, None, settings.allow_tr_mismatch, step)
    else:
        bold_hdr = read_header(run.bold)
        shape = bold_hdr.get_data_shape()
        if len(shape) != 4 or shape[3] < 2:
            raise DataError(f"preprocessed BOLD must be 4D with several volumes, got shape {shape}", run.bold)
        mask_hdr = read_header(run.mask)
        check_same_grid(run.bold, shape, bold_hdr.get_best_affine(), run.mask,
                        mask_hdr.get_data_shape(), mask_hdr.get_best_affine())
        tr = repetition_time(run, bold_hdr, settings.allow_tr_mismatch)
        n_volumes = int(shape[3])
        geometry = None
    if settings.slice_time_ref is not None:
        str_ref = settings.slice_time_ref
    else:
        start = run.bold_sidecar.get("StartTime")
        str_ref = float(start) / tr if isinstance(start, (int, float)) and 0 <= start <= tr else 0.0
    if events is None:
        events = read_events(run.events)
    confounds = read_confounds(run.confounds, list(settings.confounds), n_volumes)
    try:
        design = build_design(
            events, confounds, n_volumes, tr,
            DesignSettings(settings.hrf_model, settings.drift_model, settings.high_pass,
                           slice_time_ref=str_ref),
        )
    except ModelError as exc:
        raise ModelError(exc.problem, exc.path or (run.bold if "Nyquist" in exc.problem else run.events),
                         exc.where) from exc
    notes = design.attrs.get("notes", [])
    for note in notes:
        log.warning("%s: %s", run.events, note)
    present = set(events["trial_type"])
    usable, dropped = [], {}
    for con in contrasts:
        missing = [c for c in con.conditions if c not in present]
        if missing:
            dropped[con.name] = f"condition(s) {', '.join(missing)} absent from this run's events"
        else:
            usable.append(con)
    return PreparedRun(run, tr, n_volumes, str_ref, design, usable, dropped, list(confounds.columns),
                       mean_framewise_displacement(run.confounds), notes, geometry)


def check_surface_geometries(prepared: list[PreparedRun]) -> None:
    """Before any fit: a subject's surface runs must share their elements (brain models, vertex
    counts), or their maps could not be combined."""
    first: dict[tuple, PreparedRun] = {}
    for prep in prepared:
        if prep.geometry is None:
            continue
        key = (prep.inputs.subject, prep.inputs.entities.get("ses"))
        ref = first.setdefault(key, prep)
        if not prep.geometry.same_as(ref.geometry):
            raise DataError(f"this run's {prep.geometry.describe()} differ from {ref.inputs.label}'s "
                            f"{ref.geometry.describe()}; runs of a subject must share brain models",
                            prep.inputs.bold)


def model_contrasts(runs_events: dict[str, set], requested: list[ContrastSpec] | None, task: str) -> list[ContrastSpec]:
    """Contrasts for one task: the requested ones, or each condition vs baseline."""
    conditions = set().union(*runs_events.values()) if runs_events else set()
    if not requested:
        return default_contrasts(sorted(conditions))
    check_contrasts(requested, conditions, f"task-{task}")
    return list(requested)


# --- computing --------------------------------------------------------------

def _map_sidecar(prep: PreparedRun, settings: ModelSettings, con: ContrastSpec, label: str,
                 stat: str, dof: float, links: dict) -> dict:
    return {
        "Description": f"{_STAT_WORDS[stat]} of contrast '{con.name}' for one run",
        "Level": "run",
        "Contrast": {
            "Name": con.name,
            "Label": label,
            "Expression": con.expression,
            "Weights": _weights_by_column(con, list(prep.design.columns)),
        },
        "Statistic": stat,
        "Test": con.test,
        "Tail": "one-sided (upper)" if stat in ("p", "z") else None,
        "DegreesOfFreedom": [con.matrix(list(prep.design.columns)).shape[0], dof] if con.test == "F" else dof,
        "NoiseModel": settings.noise_model,
        "SmoothingFWHM": settings.smoothing_fwhm,
        "HRFModel": settings.hrf_model,
        "DriftModel": settings.drift_model,
        "HighPassFilterCutoffHz": settings.high_pass,
        "SliceTimeRef": prep.slice_time_ref,
        "RepetitionTime": prep.tr,
        "SignalScaling": "percent signal change (voxel mean scaled to 100)",
        "Confounds": prep.confound_columns,
        "Sources": [bids_uri(p, links) for p in dict.fromkeys((prep.inputs.bold, prep.inputs.mask,
                                                               prep.inputs.confounds, prep.inputs.events))],
    }


def contrast_stats(con: ContrastSpec) -> tuple:
    """The maps written for a contrast: t and F tests, or effect and variance only ("pass")."""
    return {"F": STATS_F, "pass": ("effect", "variance")}.get(con.test, STATS_T)


def _weights_by_column(con: ContrastSpec, columns: list[str]):
    rows = [dict(zip(columns, row.tolist())) for row in con.matrix(columns)]
    return rows if con.test == "F" else rows[0]


_STAT_WORDS = {
    "effect": "Effect size (contrast of parameter estimates)",
    "variance": "Variance of the effect size",
    "t": "t statistic",
    "z": "z score (from the one-sided p-value)",
    "p": "One-sided (upper-tail) p-value",
    "F": "F statistic",
}


def _inputs_signature(run: RunInputs) -> list:
    """Size and modification time of each input: a changed input means redo."""
    sig = []
    for path in (run.bold, run.mask, run.confounds, run.events):
        st = path.stat()
        sig.append([path.name, st.st_size, st.st_mtime_ns])
    return sig


def _completion_record(prep: PreparedRun, output_dir: Path) -> Path:
    return func_dir(output_dir, prep.inputs.entities) / f"{entity_prefix(prep.inputs.entities, drop=('space', 'res', 'den'))}_design.json"


def _existing_result(prep, output_dir, fingerprint, labels) -> RunResult | None:
    """A run finished earlier with the same model: reuse its maps."""
    record_path = _completion_record(prep, output_dir)
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("ModelFingerprint") != fingerprint:
        return None
    if record.get("InputsSignature") != _inputs_signature(prep.inputs):
        return None
    if "FramewiseDisplacementMean" not in record:  # written by an older bidsglm
        return None
    result = RunResult(prep.inputs, dof=record.get("DegreesOfFreedom", 0.0), dropped=prep.dropped,
                       mask_path=output_dir / record.get("Mask", ""), skipped=True)
    for con in prep.contrasts:
        paths = {s: statmap_path(output_dir, prep.inputs.entities, labels[con.name], s) for s in contrast_stats(con)}
        if not all(p.is_file() for p in paths.values()):
            return None
        result.maps[con.name] = paths
    return result if result.mask_path.is_file() else None


def fit_run(prep: PreparedRun, settings: ModelSettings, output_dir: Path, labels: dict,
            links: dict, fingerprint: str, extra_sidecar: dict | None = None) -> RunResult:
    """Load, smooth, fit and write every contrast map of one run.

    ``extra_sidecar`` adds to (or overrides) every map's sidecar, e.g. a Stats Model's node."""
    existing = _existing_result(prep, output_dir, fingerprint, labels)
    if existing is not None:
        log.info("%s: already done with this model, reusing its maps", prep.inputs.label)
        return existing
    run = prep.inputs
    t0 = time.perf_counter()
    smoothing = "reading and smoothing" if settings.smoothing_fwhm else "reading"
    log.info("%s: %s %d volumes, then fitting %d contrast(s)", run.label, smoothing,
             prep.n_volumes, len(prep.contrasts))
    surface = kind_of_path(run.bold) != "volume"
    unit = "brain-mask voxels"
    if surface:  # surfaces: elements with usable series; grid = geometry
        Y, mask_affine = read_run_series(run.bold, run.mask, run.entities.get("space", ""))
        unit = "vertices" if mask_affine.kind == "gifti" else "grayordinates"
        mask = usable_elements(Y)
        try:  # the volume rule (nothing usable, or more than half unusable: refused) before any fit
            check_left_out(mask, unit)
        except DataError as exc:
            raise DataError(exc.problem, run.bold) from exc
        if settings.smoothing_fwhm:  # on the template mesh, between usable elements
            Y = smooth_elements(Y, mask_affine, settings.smoothing_fwhm, mask)
        Y = np.ascontiguousarray(Y[:, mask])
    else:
        mask, mask_affine = load_mask(run.mask)
        Y, _ = stream_masked_timeseries(run.bold, mask, settings.smoothing_fwhm)
    log.info("%s: %s %d volumes x %d %s (%.1f s)", run.label,
             "loaded and smoothed" if settings.smoothing_fwhm else "loaded",
             Y.shape[0], Y.shape[1], "elements" if surface else "voxels", time.perf_counter() - t0)
    # BOLD-space runs: their mean image is the anatomy the report draws their maps over
    mean_bold = None if run.entities.get("space") else Y.mean(axis=0, dtype=np.float64).astype(np.float32)
    means = element_means(Y)
    low_mean = int((np.abs(means) < 1).sum())
    Y = mean_scaling(Y, in_place=True, mean=means)
    t1 = time.perf_counter()
    hint = (f"{low_mean} {unit} have a mean signal below 1 in magnitude (data scaled near zero or "
            "demeaned?): percent signal scaling divides by max(mean, 1), so their variation is lost"
            if low_mean else "")
    try:
        glm = RunGLM(settings.noise_model).fit(Y, prep.design.to_numpy())
    except DataError as exc:
        raise DataError(f"BOLD in the brain mask: {exc.problem}" + (f" ({hint})" if hint else ""),
                        run.bold) from exc
    del Y
    notes = list(prep.notes)
    usable = glm.valid_
    if surface:  # unusable at reading and at the fit, counted once over all the elements
        usable = mask.copy()
        usable[mask] = glm.valid_
    try:
        note = check_left_out(usable, unit, hint)
    except DataError as exc:
        raise DataError(exc.problem, run.bold) from exc
    left_out = int((~usable).sum())
    if note:
        log.warning("%s: %s", run.bold, note)
        notes.append(note)
        if surface:
            mask = usable
        else:
            mask = mask.copy()
            mask[mask] = glm.valid_
    log.info("%s: %s GLM fitted (%d regressors, %.1f s)", run.label, settings.noise_model,
             prep.design.shape[1], time.perf_counter() - t1)

    result = RunResult(run, dof=glm.dof_, dropped=prep.dropped)
    columns = list(prep.design.columns)
    _check_contrast_maps(glm, prep.contrasts, columns, run.bold)
    for con in prep.contrasts:
        if con.test == "F":
            res = glm.contrast(con.matrix(columns))
            values = {"F": res.stat, "z": res.z, "p": res.p}
        else:
            res = glm.contrast(con.vector(columns))
            values = {"effect": res.effect, "variance": res.variance, "t": res.stat, "z": res.z, "p": res.p}
        paths = {}
        for stat in contrast_stats(con):
            path = statmap_path(output_dir, run.entities, labels[con.name], stat)
            write_map(path, unmask(values[stat], mask), mask_affine)
            atomic_write_json(sidecar_path(path), {
                **_map_sidecar(prep, settings, con, labels[con.name], stat, glm.dof_, links), **(extra_sidecar or {})})
            paths[stat] = path
        result.maps[con.name] = paths

    folder = func_dir(output_dir, run.entities)
    mask_path = map_path(folder / f"{entity_prefix(run.entities)}_desc-brain_mask.nii.gz",
                         run.entities.get("space"))
    write_map(mask_path, mask.astype(np.float32), mask_affine)
    if mean_bold is not None:
        atomic_write_bytes(folder / f"{entity_prefix(run.entities)}_desc-mean_boldref.nii.gz",
                           nifti_bytes(unmask(mean_bold, mask), mask_affine))
    result.mask_path = mask_path
    design_path = _completion_record(prep, output_dir).with_suffix(".tsv")
    atomic_write_tsv(design_path, prep.design)
    # written last: its presence with this fingerprint means the run is complete
    atomic_write_json(_completion_record(prep, output_dir), {
        "Description": "Design matrix of one run (rows: volumes) and the model that produced this run's maps",
        "RepetitionTime": prep.tr,
        "SliceTimeRef": prep.slice_time_ref,
        "DegreesOfFreedom": glm.dof_,
        "Contrasts": {c.name: labels[c.name] for c in prep.contrasts},
        "DroppedContrasts": prep.dropped,
        "Confounds": prep.confound_columns,
        "ConfoundsRequested": list(settings.confounds),
        "ConfoundsUnmatched": _unmatched_confounds(settings.confounds, prep.confound_columns),
        "FramewiseDisplacementMean": prep.fd_mean,
        "Warnings": notes,
        "VoxelsLeftOut": left_out,
        "Model": {"HRFModel": settings.hrf_model, "DriftModel": settings.drift_model,
                  "HighPassFilterCutoffHz": settings.high_pass, "NoiseModel": settings.noise_model,
                  "SmoothingFWHM": settings.smoothing_fwhm},
        "Mask": mask_path.relative_to(output_dir).as_posix(),
        "ModelFingerprint": fingerprint,
        "InputsSignature": _inputs_signature(run),
        "Sources": [bids_uri(p, links) for p in _run_sources(run)],
    })
    for name, reason in prep.dropped.items():
        log.warning("%s: contrast '%s' dropped: %s", run.label, name, reason)
    log.info("%s: wrote %d contrasts (%.1f s in all)", run.label, len(prep.contrasts),
             time.perf_counter() - t0)
    return result


def _run_sources(run: RunInputs) -> list[Path]:
    """The files a run's design and data come from: a GIfTI pair's both hemispheres."""
    bold = [run.bold, run.mask] if kind_of_path(run.bold) == "gifti" else [run.bold]
    return [*bold, run.events, run.confounds]


def _check_contrast_maps(glm: RunGLM, contrasts: list[ContrastSpec], columns: list[str], bold: Path) -> None:
    """Every contrast's maps finite with a positive variance before any map is written. Effect,
    variance and statistic only: finite statistics give finite z and p. O(P x V) per contrast,
    recomputed when writing rather than held in memory."""
    for con in contrasts:
        res = glm.contrast(con.matrix(columns) if con.test == "F" else con.vector(columns))
        values = {"F": res.stat} if con.test == "F" else \
            {"effect": res.effect, "variance": res.variance, "t": res.stat}
        try:
            check_statistic_maps(values)
        except DataError as exc:
            raise DataError(f"contrast '{con.name}': {exc.problem}", bold) from exc


def _unmatched_confounds(requested, used: list[str]) -> list[str]:
    """Requested names or patterns that selected no column of this run (e.g. ``motion_outlier*``
    in a run without outliers); exact names that are absent are an error earlier."""
    return [p for p in requested if not any(fnmatch.fnmatchcase(c, p) for c in used)]


def subject_fixed_effects(results: list[RunResult], contrasts: list[ContrastSpec], labels: dict,
                          output_dir: Path, settings: ModelSettings, links: dict,
                          extra_sidecar: dict | None = None) -> list[Path]:
    """Combine the written run maps of one subject and task, contrast by contrast."""
    import nibabel as nib

    first = results[0].inputs
    entities = {k: v for k, v in first.entities.items() if k not in ("run", "echo")}
    masks, affines = [], []
    for r in results:
        if kind_of_path(r.mask_path) != "volume":
            values, geom = read_map(r.mask_path)
            if affines and not geom.same_as(affines[0]):
                raise DataError(f"this run's {geom.describe()} differ from {results[0].inputs.label}'s "
                                f"{affines[0].describe()}; runs of a subject must share brain models",
                                r.inputs.bold)
            masks.append(values > 0)
            affines.append(geom)
            continue
        img = nib.load(str(r.mask_path))
        masks.append(np.asanyarray(img.dataobj) > 0)
        affines.append(img.affine)
    if any(m.shape != masks[0].shape or not same_grid(a, affines[0]) for m, a in zip(masks, affines)):
        log.warning("%s: runs are on different grids (native space?); no fixed effects written. "
                    "Use a template --space to combine runs.", " ".join(first.label.split()[:2]))
        return []
    written = []
    for con in contrasts:
        if con.test == "F":
            log.warning("sub-%s: F contrast '%s' is not combined across runs (fixed effects combine "
                        "t contrasts); its run maps stand alone", first.subject, con.name)
            continue
        stats = contrast_stats(con)
        contributing = [r for r in results if con.name in r.maps]
        dropped = {r.inputs.label: r.dropped.get(con.name, "not estimable")
                   for r in results if con.name not in r.maps}
        if not contributing:
            log.warning("sub-%s: contrast '%s' is estimable in none of its runs; no subject map",
                        first.subject, con.name)
            continue
        dof = float(sum(r.dof for r in contributing))
        images = _fixed_effects_images(contributing, con.name, [masks[results.index(r)] for r in contributing],
                                       affines[0], stats)
        for stat in stats:
            path = statmap_path(output_dir, entities, labels[con.name], stat)
            write_map(path, images[stat], affines[0])
            atomic_write_json(sidecar_path(path), {
                "Description": f"{_STAT_WORDS[stat]} of contrast '{con.name}': "
                               "precision-weighted fixed effects across runs",
                "Level": "subject",
                "Contrast": {"Name": con.name, "Label": labels[con.name], "Expression": con.expression,
                             "Weights": dict(con.weights)},
                "Statistic": stat,
                "Test": con.test,
                "Tail": "one-sided (upper)" if stat in ("p", "z") else None,
                "DegreesOfFreedom": dof,
                "FixedEffects": "precision-weighted (inverse-variance) mean of run effects",
                "Runs": [r.inputs.entities.get("run") for r in contributing],
                "RunsDropped": dropped,
                "NoiseModel": settings.noise_model,
                "SmoothingFWHM": settings.smoothing_fwhm,
                "Sources": [bids_uri(r.maps[con.name][s], links | {"bidsglm": output_dir.resolve()})
                            for r in contributing for s in ("effect", "variance")],
                **(extra_sidecar or {}),
            })
            written.append(path)
    mask_all = np.logical_and.reduce(masks)
    mask_path = map_path(func_dir(output_dir, entities) / f"{entity_prefix(entities)}_desc-brain_mask.nii.gz",
                         entities.get("space"))
    write_map(mask_path, mask_all.astype(np.float32), affines[0])
    return written


def _fixed_effects_images(contributing: list[RunResult], name: str, masks: list[np.ndarray],
                          affine: np.ndarray, stats=STATS_T) -> dict[str, bytes]:
    """Compressed NIfTI bytes of each subject-level statistic of one contrast.

    One run passes through unchanged (fixed effects of one run are that run's
    maps), so its files are copied rather than decompressed and recomputed."""
    if len(contributing) == 1:
        return {stat: Path(contributing[0].maps[name][stat]) for stat in stats}  # copied as it is
    mask = np.logical_and.reduce(masks)
    effects = np.stack([_read_masked(r.maps[name]["effect"], mask) for r in contributing])
    variances = np.stack([_read_masked(r.maps[name]["variance"], mask) for r in contributing])
    try:
        res = fixed_effects(effects, variances, [r.dof for r in contributing])
    except DegenerateRunError as exc:
        bad = contributing[exc.row].maps[name]
        raise DataError(exc.problem, bad["variance" if "variance" in exc.problem else "effect"]) from exc
    values = {"effect": res.effect, "variance": res.variance, "t": res.stat, "z": res.z, "p": res.p}
    values = {stat: values[stat] for stat in stats}
    check_statistic_maps(values)
    return {stat: unmask(values[stat], mask) for stat in stats}


def _read_masked(path: Path, mask: np.ndarray) -> np.ndarray:
    import nibabel as nib

    if kind_of_path(path) != "volume":
        return read_map(path)[0][mask].astype(np.float64)
    return np.asanyarray(nib.load(str(path)).dataobj)[mask].astype(np.float64)


def write_map(path: Path, values, grid) -> None:
    """Write a full map (volume or surface elements; a Path: copy that map's files) on ``grid`` (an
    affine or a surface Geometry)."""
    if isinstance(values, Path):
        for source, target in zip(pair_paths(values), pair_paths(path)):
            atomic_write_bytes(target, source.read_bytes())
    elif isinstance(grid, Geometry):
        for target, data in map_files(path, values, grid):
            atomic_write_bytes(target, data)
    else:
        atomic_write_bytes(path, nifti_bytes(values, grid))
