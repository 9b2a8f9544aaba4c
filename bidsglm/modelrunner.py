"""The participant level of a BIDS Stats Model (``--model model.json``).

The Run node is fitted run by run (designs from ``modeldesign``, the GLM and
map writing of the participant level); its outputs feed the Session and
Subject nodes along the model's Edges (with their Filters):

- ``meta`` nodes combine run contrasts by precision-weighted fixed effects;
- ``glm`` nodes with ``X: [1]`` fit the mean of the run effects by OLS
  (a one-sample t-test across runs, n - 1 degrees of freedom), as the
  model says.

- a ``glm`` contrast present in one run of a subject passes that run's
  estimate on (the fixed effects of one run), as the sidecar says.

Every node writes under ``OUTPUT_DIR/node-<label>/`` (the name in letters,
digits and _) and its sidecars name the node and the model, so nodes never
overwrite each other. The Dataset node is the group level's: fed by a
Subject/Session node or directly by the Run node (one run per subject), with
covariates, cell means, Transformations over participants.tsv and GroupBy
on a participants.tsv column, all through the group level's code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .design import contrast_labels, mean_framewise_displacement
from .discovery import SpaceSpec, discover_runs, find_derivatives
from .errors import BidsGlmError, DataError, ModelError
from .images import check_same_grid, read_header, unmask
from .modeldesign import PYBIDS_ENTITY, RunDesigner, check_run_grouping, first_line
from .outputs import (
    active_session,
    atomic_write_json,
    check_planned_folders,
    copy_participants_table,
    dataset_links,
    ensure_dataset,
    entity_prefix,
    forbid_inputs,
    func_dir,
    sidecar_path,
    statmap_path,
)
from .participant import (
    PreparedRun,
    RunResult,
    check_surface_geometries,
    contrast_stats,
    fit_run,
    repetition_time,
    subject_fixed_effects,
    write_map,
)
from .surfaces import check_smoothing, kind_of_path, path_for_grid, read_map, run_series_info
from .statistics import t_contrast
from .statsmodel import Node, StatsModel, brief_list, load_model, node_label

log = logging.getLogger("bidsglm")
_FILENAME_ENTITY = {v: k for k, v in PYBIDS_ENTITY.items()}  # Model.Input's names -> filename entities


def node_root(output_dir: Path, node: Node) -> Path:
    return output_dir / f"node-{node_label(node.name)}"


def _select_runs(runs, model: StatsModel):
    """Model.Input filters (subject, session, task, run) on top of the command line's."""
    kept = []
    for run in runs:
        ok = True
        for key, values in model.input.items():
            ent = _FILENAME_ENTITY.get(key)
            if ent is None:
                raise ModelError(f"filtering on {key!r} is not supported ({', '.join(_FILENAME_ENTITY)})",
                                 model.path, where="field 'Input'")
            have = run.entities.get(ent)
            if have is None or (have not in values and have.lstrip("0") not in [v.lstrip("0") for v in values]):
                ok = False
        if ok:
            kept.append(run)
    return kept


def _fingerprint(model: StatsModel, node: Node, settings) -> str:
    payload = json.dumps({"model": model.raw, "node": node.name, "smoothing": settings.smoothing_fwhm,
                          "noise": settings.noise_model}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def prepare_model_run(run, designer: RunDesigner, allow_tr_mismatch: bool,
                      smoothing_fwhm: float | None = None) -> PreparedRun:
    if kind_of_path(run.bold) != "volume":
        return _prepare_surface_run(run, designer, allow_tr_mismatch, smoothing_fwhm)
    header = read_header(run.bold)
    shape = header.get_data_shape()
    if len(shape) != 4 or shape[3] < 2:
        raise DataError(f"preprocessed BOLD must be 4D with several volumes, got shape {shape}", run.bold)
    tr = repetition_time(run, header, allow_tr_mismatch)
    mask = designer.analysis_mask(run)
    if mask is not None:
        mask_hdr = read_header(mask)
        check_same_grid(run.bold, shape, header.get_best_affine(), mask, mask_hdr.get_data_shape(),
                        mask_hdr.get_best_affine())
        run = replace(run, mask=mask)
    X = designer.design(run, int(shape[3]), tr)
    contrasts, dropped = designer.contrasts(list(X.columns))
    confound_cols = [c for c in X.columns if c.startswith(("trans_", "rot_", "cosine", "a_comp", "t_comp",
                                                          "motion_outlier", "framewise", "csf", "white"))]
    return PreparedRun(run, tr, int(shape[3]), 0.0, X, contrasts, dropped, confound_cols,
                       mean_framewise_displacement(run.confounds))


def _prepare_surface_run(run, designer: RunDesigner, allow_tr_mismatch: bool,
                         smoothing_fwhm: float | None) -> PreparedRun:
    """A CIFTI or GIfTI run, through the options path's format layer (surfaces.py): length, TR
    (sidecar, checked against a CIFTI series step) and geometry from the headers."""
    space = run.entities.get("space", "")
    if designer.node.options.get("Mask"):
        raise ModelError(f"{run.label}: Model.Options.Mask is a volume; on --space {space} the elements with "
                         "usable time series are analysed", designer.model.path,
                         where=f"node '{designer.node.name}', field 'Model.Options.Mask'")
    check_smoothing(space, smoothing_fwhm)
    n_volumes, step, geometry = run_series_info(run.bold, run.mask, space)
    check_smoothing(space, smoothing_fwhm, geometry)
    if n_volumes < 2:
        raise DataError(f"a surface run needs several volumes, got {n_volumes}", run.bold)
    tr = repetition_time(run, None, allow_tr_mismatch, step, "CIFTI series axis")
    X = designer.design(run, n_volumes, tr)
    contrasts, dropped = designer.contrasts(list(X.columns))
    confound_cols = [c for c in X.columns if c.startswith(_CONFOUND_PREFIXES)]
    return PreparedRun(run, tr, n_volumes, 0.0, X, contrasts, dropped, confound_cols,
                       mean_framewise_displacement(run.confounds), geometry=geometry)


_CONFOUND_PREFIXES = ("trans_", "rot_", "cosine", "a_comp", "t_comp", "motion_outlier", "framewise", "csf", "white")


def run_model_participant_level(args, bids_dir: Path, output_dir: Path, settings) -> list[str]:
    """Fit the model's Run node and the Session/Subject nodes it feeds; returns the subjects."""
    t_start = time.perf_counter()
    model = load_model(args.model)
    _check_supported_graph(model)
    _check_participant_columns(model, bids_dir / "participants.tsv")
    run_node = model.nodes[0]
    derivatives = find_derivatives(bids_dir, args.derivatives)
    forbid_inputs(derivatives)
    space = SpaceSpec.parse(args.space or "MNI152NLin2009cAsym")
    runs = discover_runs(bids_dir, derivatives, space, args.participant_label, args.session_label, args.task)
    runs = _select_runs(runs, model)
    if not runs:
        raise ModelError("no runs match both the command line and the model's Input", model.path)
    log.info("model '%s' (%s): %d run(s) of %d participant(s); nodes: %s", model.name, model.path.name,
             len(runs), len({r.subject for r in runs}),
             ", ".join(f"{n.name} ({n.level}, {n.model_type})" for n in model.nodes))
    check_run_grouping(model, run_node, runs)
    designer = RunDesigner(bids_dir, derivatives, model, run_node)
    prepared = [prepare_model_run(r, designer, settings.allow_tr_mismatch, settings.smoothing_fwhm)
                for r in runs]  # all checked first
    check_surface_geometries(prepared)
    _check_contrasts_estimable(model, run_node, prepared)
    for edge in model.children(run_node.name):
        if model.node(edge.destination).level != "Dataset":
            _check_combining_node(model, model.node(edge.destination), [p.inputs for p in prepared])
    names = list(dict.fromkeys(c.name for p in prepared for c in p.contrasts))
    if not names:  # e.g. DummyContrasts over variables that no run has: nothing would be written
        reasons = sorted({why for p in prepared for why in p.dropped.values()})
        raise ModelError(f"no contrast can be estimated in any run ({brief_list(reasons, 3) or 'none defined'}); "
                         "nothing would be written", model.path, where=f"node '{run_node.name}', field 'Contrasts'")
    labels = contrast_labels(names)
    _check_labels_differ_in_more_than_case(model, run_node, labels)
    for i, edge in enumerate(model.edges):  # a Filter that keeps none of the contrasts feeds nothing
        wanted = edge.filter.get("contrast")
        if edge.source == run_node.name and wanted and not set(wanted) & set(names):
            raise ModelError(f"the Filter keeps contrast(s) {brief_list(wanted)}, which node '{run_node.name}' "
                             f"does not produce ({brief_list(names)}): node '{edge.destination}' would write "
                             "nothing", model.path, where=f"field 'Edges[{i}].Filter'")
    links = dataset_links(bids_dir, derivatives)
    root = node_root(output_dir, run_node)
    node_roots = [root] + [node_root(output_dir, model.node(e.destination)) for e in model.children(run_node.name)]
    check_planned_folders([output_dir, *node_roots, *(func_dir(r, p.inputs.entities) for r in node_roots
                                                     for p in prepared)])
    fingerprint = _fingerprint(model, run_node, settings)
    extra = _run_node_sidecar(model, run_node)
    if args.n_cpus > 1 and len(prepared) > 1:  # runs in parallel processes, as without a model
        from joblib import Parallel, delayed

        from .runner import _fit_in_worker

        results = Parallel(n_jobs=min(args.n_cpus, len(prepared)))(
            delayed(_fit_in_worker)(log.level, active_session(), p, settings, root, labels, links, fingerprint, extra)
            for p in prepared)
    else:
        results = [fit_run(p, settings, root, labels, links, fingerprint, extra) for p in prepared]
    for edge in model.children(run_node.name):
        dst = model.node(edge.destination)
        if dst.level == "Dataset":
            continue  # the group level's
        _fit_combining_node(model, dst, edge.filter, results, prepared, output_dir, settings, links, labels)
    # dataset-level files last (shared by array jobs; see runner.run_participant_level)
    ensure_dataset(output_dir, links)
    copy_participants_table(bids_dir, output_dir)
    ensure_dataset(root, links)
    log.info("model '%s': participant level done in %.1f s; results in %s", model.name,
             time.perf_counter() - t_start, output_dir)
    return sorted({r.subject for r in runs})


def _check_labels_differ_in_more_than_case(model: StatsModel, node: Node, labels: dict) -> None:
    """Contrast file labels equal but for case (explicit and dummy contrasts together) are one
    file on case-insensitive file systems (macOS, Windows, Docker Desktop mounts)."""
    seen: dict[str, str] = {}
    for name, label in labels.items():
        other = seen.setdefault(label.lower(), name)
        if other != name:
            raise ModelError(f"contrasts {other!r} and {name!r} give file labels that differ only in case "
                             f"({labels[other]}, {label}); rename one", model.path,
                             where=f"node '{node.name}', field 'Contrasts'")


def _check_supported_graph(model: StatsModel) -> None:
    """What both levels need of the model's graph, checked before either computes anything:
    Session and Subject nodes fed by the Run node; Dataset nodes glm over an intercept
    (plus covariates), grouped by contrast (and session)."""
    run_node = model.nodes[0]
    if run_node.level != "Run":
        raise ModelError("the first node must be a Run node", model.path, where=f"node '{run_node.name}'")
    for node in model.nodes[1:]:
        edge = model.parent_edge(node.name)
        where = f"node '{node.name}'"
        if edge is None:
            raise ModelError("no edge leads to this node", model.path, where=where)
        source = model.node(edge.source)
        if node.level == "Dataset":
            _check_dataset_node(model, node)
        if node.level in ("Session", "Subject") and source is not run_node:
            raise ModelError(f"a {node.level} node fed by the {source.level} node '{source.name}' is not "
                             "supported: Session and Subject nodes combine the Run node's contrasts (BIDS Stats Models, Edges)",
                             model.path, where=f"{where}, field 'Edges'")


def _check_contrasts_estimable(model: StatsModel, node: Node, prepared: list[PreparedRun]) -> None:
    """A contrast may lack its conditions in some runs (dropped there, recorded); in none is an error."""
    for i, con in enumerate(node.contrasts):
        if all(con.name in p.dropped for p in prepared):
            reasons = sorted({p.dropped[con.name] for p in prepared})
            raise ModelError(f"contrast '{con.name}' cannot be estimated in any run: {'; '.join(reasons)}",
                             model.path, where=f"node '{node.name}', field 'Contrasts[{i}].ConditionList'")


def _node_sidecar(model: StatsModel, node: Node) -> dict:
    return {"Node": node.name, "NodeLevel": node.level, "NodeModelType": node.model_type,
            "StatsModel": model.name, "StatsModelFile": model.path.name}


def _run_node_sidecar(model: StatsModel, node: Node) -> dict:
    """The Run node's design is the model's (transformations, Model.X), not the command line's."""
    return {**_node_sidecar(model, node),
            "HRFModel": node.hrf["Model"] if node.hrf else "as the model's transformations",
            "DriftModel": "cosine" if node.options.get("HighPassFilterCutoffHz") else
                          "as Model.X (e.g. fMRIPrep's cosine* columns)",
            "HighPassFilterCutoffHz": node.options.get("HighPassFilterCutoffHz")}


def _combining_groups(model: StatsModel, node: Node, runs) -> dict[tuple, list[int]]:
    """Indices of the runs each Session/Subject node output combines: per subject and task
    (and session when the node is a Session node or groups by session)."""
    by_session = node.level == "Session" or "session" in node.group_by
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault((run.subject, run.entities.get("ses") if by_session else None, run.task), []).append(i)
    for (sub, _, task), members in groups.items():
        if len({runs[i].entities.get("ses") for i in members}) > 1:
            raise ModelError(f"sub-{sub} task-{task}: runs from several sessions; combining across sessions "
                             "is not supported (add \"session\" to GroupBy, or a Session node)", model.path,
                             where=f"node '{node.name}', field 'GroupBy'")
    return groups


def _check_combining_node(model: StatsModel, node: Node, runs) -> None:
    """Before anything is fitted: what a Session/Subject node asks for can be done."""
    where = f"node '{node.name}'"
    if not node.intercept_only:
        raise ModelError("not supported by bidsglm: Session and Subject nodes support Model.X [1] only "
                         "(the mean of the runs; BIDS Stats Models, Model.X)", model.path,
                         where=f"{where}, field 'Model.X'")
    for con in node.contrasts:  # each input contrast is combined on its own, under its name
        bad = [c for c in con.conditions if c != "intercept"]
        if bad:
            raise ModelError(f"contrast '{con.name}' names {', '.join(bad)}; a node with Model.X [1] "
                             "has only the intercept", model.path, where=f"{where}, field 'Contrasts'")
    _combining_groups(model, node, runs)


def _fit_combining_node(model, node: Node, edge_filter: dict, results, prepared, output_dir, settings, links,
                        labels) -> None:
    """A Session or Subject node over the Run node's contrasts."""
    root = node_root(output_dir, node)
    wanted = set(edge_filter.get("contrast", [])) or None
    extra = {**_node_sidecar(model, node), "Level": node.level.lower()}
    for (sub, ses, task), members in _combining_groups(model, node, [r.inputs for r in results]).items():
        runs = [results[i] for i in members]
        contrasts = [c for c in {c.name: c for i in members for c in prepared[i].contrasts}.values()
                     if wanted is None or c.name in wanted]
        if node.model_type == "meta":
            written = subject_fixed_effects(runs, contrasts, labels, root, settings, links, extra)
        else:
            # a contrast in one run only: its estimate is what exists (a glm across runs needs two);
            # passed on as the fixed effects of that one run, and the sidecar says so
            single = [c for c in contrasts if c.test != "F" and sum(c.name in r.maps for r in runs) < 2]
            written = subject_fixed_effects(runs, single, labels, root, settings, links, {
                **extra, "SingleRun": "one run has this contrast: its estimate is passed on "
                                      "(a glm across runs needs two or more)"}) if single else []
            written += _ols_across_runs(runs, [c for c in contrasts if c not in single], labels, root, extra)
        log.info("sub-%s%s task-%s: node %s (%s) wrote %d maps", sub, f" ses-{ses}" if ses else "", task,
                 node.name, node.model_type, len(written))
    ensure_dataset(root, links)


def _ols_across_runs(results: list[RunResult], contrasts, labels, root: Path, extra_sidecar: dict) -> list[Path]:
    """One-sample OLS over the runs' effect maps (Model.Type glm, X [1])."""
    written = []
    first = results[0].inputs
    entities = {k: v for k, v in first.entities.items() if k not in ("run", "echo")}
    run_masks, grid = {}, None
    for r in results:  # read once
        values, grid = _read_any_map(r.mask_path)
        run_masks[id(r)] = values > 0
    for con in contrasts:
        if con.test == "F":
            continue
        runs = [r for r in results if con.name in r.maps]
        if len(runs) < 2:
            log.warning("sub-%s: contrast '%s' has %d run(s); a glm across runs needs 2 or more "
                        "(Model.Type 'meta' combines any number)", first.subject, con.name, len(runs))
            continue
        mask = np.logical_and.reduce([run_masks[id(r)] for r in runs])
        Y = np.stack([_read_any_map(r.maps[con.name]["effect"])[0].astype(np.float64)[mask] for r in runs])
        n = len(runs)
        effect = Y.mean(axis=0)
        variance = Y.var(axis=0, ddof=1) / n
        res = t_contrast(effect, variance, n - 1)
        values = {"effect": res.effect, "variance": res.variance, "t": res.stat, "z": res.z, "p": res.p}
        for stat in contrast_stats(con):
            path = path_for_grid(statmap_path(root, entities, labels[con.name], stat), grid)
            write_map(path, unmask(values[stat], mask), grid)
            atomic_write_json(sidecar_path(path), {
                "Description": f"{stat} of contrast '{con.name}': one-sample OLS across runs",
                "Contrast": {"Name": con.name, "Label": labels[con.name]},
                "Statistic": stat, "Test": con.test, "DegreesOfFreedom": n - 1,
                "Runs": [r.inputs.entities.get("run") for r in runs], **extra_sidecar})
            written.append(path)
    mask_path = path_for_grid(func_dir(root, entities) / f"{entity_prefix(entities)}_desc-brain_mask.nii.gz", grid)
    all_masks = np.logical_and.reduce(list(run_masks.values()))
    write_map(mask_path, all_masks.astype(np.float32), grid)
    return written


def _read_any_map(path: Path) -> tuple[np.ndarray, object]:
    """Values and grid of a map: a volume and its affine, or surface elements and their Geometry."""
    if kind_of_path(path) != "volume":
        return read_map(path)
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


# --- the Dataset node (group level) ---------------------------------------------------

def run_model_group_level(args, output_dir: Path) -> list[Path]:
    """Fit every Dataset node on the outputs of its source node; returns the node folders."""
    import dataclasses

    from .group import GroupSettings, run_group_level, settings_from_args
    from .groupmodels import INTERCEPT

    model = load_model(args.model)
    _check_supported_graph(model)
    datasets = [n for n in model.nodes if n.level == "Dataset"]
    if not datasets:
        raise ModelError("the model has no Dataset node for the group level", model.path)
    written = []
    for node in datasets:
        where = f"node '{node.name}'"
        edge = model.parent_edge(node.name)
        source = node_root(output_dir, model.node(edge.source))
        if not source.is_dir():
            raise ModelError(f"no outputs of node '{edge.source}' in {output_dir} (run the participant level "
                             "with this model first)", model.path, where=where)
        table = (_transformed_participants(model, node, output_dir, _subjects_with_maps(source, args))
                 if node.transformations else None)
        covariates, group_by = _dataset_columns(model, node, output_dir, table)
        base = settings_from_args(args)
        settings: GroupSettings = dataclasses.replace(
            base, model="onesample", covariates=covariates, group_by=group_by,
            contrasts=_group_contrasts(node, INTERCEPT),
            default_contrasts=node.dummy_contrasts is not None)
        root = node_root(output_dir, node)
        ensure_dataset(root, {})
        log.info("model '%s': node %s over node %s%s", model.name, node.name, edge.source,
                 f" (contrasts {', '.join(edge.filter['contrast'])})" if edge.filter.get("contrast") else "")
        run_maps = _dataset_over_runs(model, node, source)
        sessions = _sessions(source, args.session_label) if "session" in node.group_by else [None]
        subsets = _participant_subsets(model, node, output_dir, source, args.participant_label)
        for ses in sessions:  # grouped by session: one model per session, in ses-<label>/
            for folder, subjects in subsets:  # grouped by a participants.tsv column: one model per value
                target = (root / f"ses-{ses}" if ses else root) / folder
                part_args = copy.copy(args)
                if ses:
                    part_args.session_label = [ses]
                part_args.participant_label = subjects
                run_group_level(part_args, output_dir, inputs_dir=source, group_dir=target,
                                contrast_names=set(edge.filter["contrast"]) if edge.filter.get("contrast") else None,
                                settings=settings, run_maps=run_maps, participants_table=table)
                _tag_group_sidecars(target, model, node)
                written.append(target)
    return written


def _check_dataset_node(model: StatsModel, node: Node) -> None:
    where = f"node '{node.name}'"
    extra = _participant_grouping(node)
    if len(extra) > 1:
        raise ModelError(f"grouping by {', '.join(extra)} is not supported: contrast, session and one "
                         "participants.tsv column (BIDS Stats Models, Node.GroupBy)",
                         model.path, where=f"{where}, field 'GroupBy'")
    if node.model_type != "glm":
        raise ModelError("a Dataset node must be a glm: meta-analysis across subjects is not supported "
                         "(BIDS Stats Models, Model.Type)",
                         model.path, where=f"{where}, field 'Model.Type'")
    if not any(v in (1, "1", "intercept") for v in node.x) and not [v for v in node.x if isinstance(v, str)]:
        raise ModelError("Model.X is empty", model.path, where=f"{where}, field 'Model.X'")
    for con in node.contrasts:
        if con.test == "pass":
            raise ModelError("Test 'pass' has no meaning at the Dataset node", model.path,
                             where=f"{where}, field 'Contrasts' ('{con.name}')")


def _participant_grouping(node: Node) -> list[str]:
    """GroupBy names of a Dataset node other than contrast and session: participants.tsv columns."""
    return [g for g in node.group_by if g not in ("contrast", "session")]


def _check_participant_columns(model: StatsModel, participants: Path) -> None:
    """Before anything is fitted: a Dataset node's GroupBy column is in BIDS_DIR's participants.tsv."""
    for node in model.nodes:
        if node.level != "Dataset":
            continue
        wanted = [("GroupBy", g) for g in _participant_grouping(node)]
        if node.transformations:  # X may name their outputs: their inputs are checked here
            made = {o for ins in node.transformations for o in _as_list(ins.get("Output"))}
            wanted += [("Transformations", v) for ins in node.transformations for v in _as_list(ins.get("Input"))
                       if not any(ch in v for ch in "*?[") and v not in made]
        else:
            wanted += [("Model.X", v) for v in node.x if v not in (1, "1", "intercept")]
        if not wanted:
            continue
        try:
            columns = list(pd.read_csv(participants, sep="\t", nrows=0).columns)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise ModelError(f"{wanted[0][1]} needs participants.tsv ({exc})", model.path,
                             where=f"node '{node.name}', field '{wanted[0][0]}'") from exc
        for field_name, name in wanted:
            if name not in columns:
                raise ModelError(f"{name!r} is not a column of {participants} (columns: {brief_list(columns)})",
                                 model.path, where=f"node '{node.name}', field '{field_name}'")


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _participant_subsets(model: StatsModel, node: Node, output_dir: Path, source: Path,
                         selected) -> list[tuple[str, list]]:
    """GroupBy a participants.tsv column: one model per value, over that value's subjects with
    maps in ``source`` (folder ``<column>-<value>``); subjects with n/a in it are in none, with a warning."""
    from .groupinputs import read_participants

    extra = _participant_grouping(node)
    if not extra:
        return [("", selected)]
    column = extra[0]
    table, table_path = read_participants(output_dir)
    if column not in table.columns:
        raise ModelError(f"grouping by {column!r}: not a column of {table_path}", model.path,
                         where=f"node '{node.name}', field 'GroupBy'")
    chosen = {p.name[4:] for p in source.glob("sub-*") if p.is_dir()}
    if selected:
        chosen &= {s.removeprefix("sub-") for s in selected}
    values = table[column]
    absent = [s for s in table.index if pd.isna(values[s]) and s in chosen]
    if absent:
        log.warning("node %s: %s is n/a for %s; they are in no group", node.name, column,
                    ", ".join(f"sub-{s}" for s in absent))
    subsets = []
    for value in sorted(values.dropna().astype(str).unique()):
        subs = [s for s in table.index if str(values[s]) == value and s in chosen]
        if subs:
            subsets.append((f"{node_label(column)}-{node_label(value)}", subs))
    return subsets


def _subjects_with_maps(source: Path, args) -> set[str]:
    found = {p.name[4:] for p in source.glob("sub-*") if p.is_dir()}
    if args.participant_label:
        found &= {s.removeprefix("sub-") for s in args.participant_label}
    return found


def _transformed_participants(model: StatsModel, node: Node, output_dir: Path, subjects: set[str]) -> tuple:
    """participants.tsv after the Dataset node's Transformations (pybids, as at the Run node),
    over the subjects with maps of the source node (Demean centres over the subjects modelled):
    each column a variable indexed by subject; numbers where every value is one."""
    from bids.modeling.transformations import TransformerManager
    from bids.variables import BIDSVariableCollection, SimpleVariable

    from .groupinputs import read_participants

    table, path = read_participants(output_dir)
    table = table.loc[[s for s in table.index if s in subjects]]
    columns = [c for c in table.columns if c != "participant_id"]
    variables = []
    for col in columns:
        values = table[col]
        numbers = pd.to_numeric(values, errors="coerce")
        if numbers.notna().sum() == values.notna().sum():
            values = numbers
        variables.append(SimpleVariable(col, pd.DataFrame({"amplitude": values.to_numpy(),
                                                           "subject": list(table.index)}), "participants"))
    where = f"node '{node.name}', field 'Transformations'"
    try:
        collection = TransformerManager("pybids-transforms-v1").transform(
            BIDSVariableCollection(variables), copy.deepcopy(node.transformations))
        wide = collection.to_df()
    except KeyError as exc:
        raise ModelError(f"variable {exc.args[0]!r} is not a participants.tsv column or the output of an "
                         "earlier transformation", model.path, where=where) from exc
    except (BidsGlmError, MemoryError):
        raise
    except Exception as exc:  # whatever pybids raises on this node's instructions is the model's problem
        raise ModelError(f"the transformations failed ({type(exc).__name__}: {first_line(exc)})", model.path,
                         where=where) from exc
    wide = wide.set_index("subject")
    out = pd.DataFrame({c: wide[c].astype(str).where(wide[c].notna()) for c in wide.columns if c != "suffix"},
                       index=wide.index)
    out.insert(0, "participant_id", [f"sub-{s}" for s in out.index])
    return out, path


def _dataset_columns(model: StatsModel, node: Node, output_dir: Path,
                     table: tuple | None = None) -> tuple[list[str], str | None]:
    """Model.X of a Dataset node as the group design's columns, from participants.tsv:
    with the intercept, the other variables are covariates (numbers mean-centred, labels as
    centred indicators); without it, one column of labels gives one mean per level (cell
    means: sex -> sex_F, sex_M), and any other variables are covariates."""
    from .groupinputs import read_participants
    from .groupmodels import _is_numeric

    variables = [v for v in node.x if v not in (1, "1", "intercept")]
    if len(variables) < len(node.x):
        return variables, None
    where = f"node '{node.name}', field 'Model.X'"
    table, source = table or read_participants(output_dir)
    missing = [v for v in variables if v not in table.columns]
    if missing:
        raise ModelError(f"{brief_list(missing)} not in participants.tsv (columns: "
                         f"{brief_list(table.columns)})", model.path, where=where)
    factors = [v for v in variables if not _is_numeric(table[v].dropna())]
    if len(factors) != 1:
        raise ModelError("without the intercept, Model.X needs exactly one participants.tsv column of labels "
                         f"(one mean per level); found {len(factors)} ({', '.join(factors) or 'only numbers'}). "
                         "A model through the origin, or crossed factors, is not supported (BIDS Stats Models, "
                         "Model.X)", model.path, where=where)
    return [v for v in variables if v != factors[0]], factors[0]


def _dataset_over_runs(model: StatsModel, node: Node, source: Path) -> bool:
    """A Dataset node fed by the Run node takes the run maps as its inputs (True when they
    carry a run- entity). Its model has one row per map, so each subject must give one run per
    contrast (and session, when grouped by session): several runs of one subject are not
    independent observations, and bidsglm does not treat them as such."""
    from .discovery import parse_bids_name

    if model.node(model.parent_edge(node.name).source).level != "Run":
        return False
    maps = [parse_bids_name(p) for pattern in ("*_run-*_stat-effect_statmap.nii.gz",
                                               "*_run-*_stat-effect_statmap.dscalar.nii",
                                               "*_run-*_hemi-L_*_stat-effect_statmap.shape.gii")
            for p in source.glob(f"sub-*/**/func/{pattern}")]
    seen: dict[tuple, list] = {}
    for parsed in filter(None, maps):
        e = parsed.entities
        key = (e.get("sub"), e.get("ses") if "session" in node.group_by else None, e.get("task"),
               e.get("contrast"))
        seen.setdefault(key, []).append(e.get("run"))
    for (sub, ses, task, contrast), runs in sorted(seen.items(), key=str):
        if len(runs) > 1:
            raise ModelError(f"fed by the Run node, it would take {len(runs)} runs of sub-{sub}"
                             f"{f' ses-{ses}' if ses else ''} task-{task} (contrast {contrast}) as independent "
                             "subjects; add a Subject node (Type meta) between them, or select one run in "
                             "Model.Input", model.path, where=f"node '{node.name}', field 'Edges'")
    return bool(seen)


def _sessions(source: Path, selected) -> list:
    """Sessions of the source node's maps; none (a dataset without sessions): one model,
    as pybids treats grouping by an absent entity."""
    found = sorted({p.name[4:] for p in source.glob("sub-*/ses-*") if p.is_dir()})
    if selected:
        found = [s for s in found if s in {x.removeprefix("ses-") for x in selected}]
    return found or [None]


def dataset_node_folders(output_dir: Path, model: StatsModel) -> list[Path]:
    """Folders holding a Dataset node's group maps (the node's, its ses-<label> subfolders and
    their <column>-<value> subfolders)."""
    folders = []
    for node in model.nodes:
        if node.level != "Dataset":
            continue
        root = node_root(output_dir, node)
        candidates = [root, *sorted(root.glob("*-*/")), *sorted(root.glob("ses-*/*-*/"))]
        for folder in dict.fromkeys(p for p in candidates if p.is_dir()):
            if any(next(folder.glob(f"*_stat-z_statmap{ext}"), None) for ext in (".nii.gz", ".dscalar.nii", ".shape.gii")):
                folders.append(folder)
    return folders


def _group_contrasts(node: Node, intercept: str):
    """The node's explicit Contrasts as group contrasts over its design (1 -> the mean column).
    Weights are taken as numbers from the model, never parsed from text."""
    from .design import ContrastSpec
    from .group import GroupContrast
    from .groupmodels import column_name

    out = []
    for con in node.contrasts:
        rows = con.weights if con.test == "F" else (con.weights,)
        specs = []
        for row in rows:
            weights: dict[str, float] = {}
            for c, w in zip(con.conditions, row):
                if w:
                    # pybids names a level of a factor sex.F; the group design's column is sex_F
                    key = (intercept if c == "intercept" else c if c in node.x or "." not in c
                           else column_name(*c.split(".", 1)))
                    weights[key] = weights.get(key, 0.0) + float(w)
            expr = " + ".join(f"{w:g}*{c}" for c, w in weights.items())
            specs.append(ContrastSpec(con.name, expr, tuple(sorted(weights.items()))))
        out.append(GroupContrast(con.name, specs, f_test=con.test == "F"))
    return out


def _tag_group_sidecars(folder: Path, model: StatsModel, node: Node) -> None:
    for side in folder.glob("*.json"):
        if side.name == "dataset_description.json":
            continue
        meta = json.loads(side.read_text())
        meta.update({"Node": node.name, "NodeLevel": node.level, "StatsModel": model.name,
                     "StatsModelFile": model.path.name})
        atomic_write_json(side, meta)
