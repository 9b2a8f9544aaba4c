"""Group level: second-level models from the participant level's maps in OUTPUT_DIR.

Flow per task: find subject maps -> exclusions -> plan every model (designs,
contrasts, estimability: cheap, so bad input stops the job before anything
is written) -> read maps, fit, write statistic maps -> threshold, cluster
tables with atlas labels. Everything is written to OUTPUT_DIR/group/.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import atlases as atlas_mod
from .design import contrast_labels, parse_contrast, parse_contrast_option
from .errors import DataError, ModelError, UsageError
from .groupinputs import (
    Exclusion,
    SubjectMap,
    apply_exclusions,
    attach_run_records,
    find_subject_maps,
    map_mask,
    parse_run_rule,
    read_effect,
    read_participants,
)
from .groupmodels import (
    INTERCEPT,
    SPHERICITY_NOTE,
    anova_design,
    TooFewInputsError,
    check_enough_inputs,
    code_covariates,
    column_name,
    contrast_rows,
    fit_ols,
    is_estimable,
)
from .images import nifti_bytes, unmask
from .surfaces import (
    SHIPPED_MESHES,
    SURFACE_TFCE_E,
    Geometry,
    tfce_neighbours,
    space_kind,
    clusters_table as surface_clusters_table,
    cluster_refusal,
    map_files,
    no_neighbours,
    path_for_grid,
    same_grid,
    template_mesh,
    threshold_elements,
)
from .inference import (
    clusters_table,
    default_alpha,
    find_clusters,
    height_threshold,
    threshold_map,
)
from .permutation import (
    PermutationOptions,
    permutation_design,
    run_permutations,
)
from .outputs import atomic_write_bytes, atomic_write_json, atomic_write_tsv, entity_prefix, sidecar_path

log = logging.getLogger("bidsglm")

_STAT_WORDS = {
    "effect": "Group effect size",
    "variance": "Variance of the group effect size",
    "t": "t statistic",
    "F": "F statistic",
    "z": "z score (from the one-sided p-value)",
    "p": "One-sided (upper-tail) p-value",
}


@dataclass
class GroupContrast:
    """A t contrast (one row) or an F contrast (``f_test``: rows tested jointly)."""

    name: str
    rows: list  # ContrastSpec per row
    f_test: bool = False
    label: str = ""  # set when planned: the label in file names

    @property
    def is_f(self) -> bool:
        return self.f_test or len(self.rows) > 1


@dataclass
class Thresholding:
    height_control: str = "fpr"
    alpha: float = 0.001
    cluster_extent: int = 0
    two_sided: bool = True


@dataclass
class GroupSettings:
    model: str = "onesample"  # or 'anova'
    contrasts: list = field(default_factory=list)  # GroupContrast requested
    covariates: list = field(default_factory=list)
    group_by: str | None = None
    conditions: list | None = None  # ANOVA conditions (contrast names or labels)
    allow_incomplete: bool = False
    thresholding: Thresholding = field(default_factory=Thresholding)
    atlases: list = field(default_factory=list)
    permutations: PermutationOptions | None = None
    fwe_alpha: float = 0.05
    default_contrasts: bool = True  # the mean (or group means); a Stats Model without DummyContrasts: none


@dataclass
class PlannedModel:
    """One second-level model, checked and ready to fit."""

    task: str
    space: dict
    kind: str  # 'onesample' or 'anova'
    name: str  # subject contrast label (one-sample) or 'anova'
    design: pd.DataFrame  # rows: inputs
    inputs: list  # SubjectMap per design row
    contrasts: list  # (GroupContrast, (k, P) weights)
    excluded: list  # Exclusion
    covariate_coding: dict
    permutation_designs: list | None = None  # PermutationDesign per contrast, with --permutations


# --- options -> settings ----------------------------------------------------------

def parse_group_contrasts(t_options, f_options) -> list[GroupContrast]:
    out = []
    for text in t_options or ():
        spec = parse_contrast_option(text)
        out.append(GroupContrast(spec.name, [spec]))
    for text in f_options or ():
        name, sep, exprs = text.partition("=")
        parts = [e.strip() for e in exprs.split(";") if e.strip()]
        if not sep or not name.strip() or not parts:
            raise ModelError(f"--group-f-contrast {text!r}: expected NAME=EXPR1;EXPR2")
        out.append(GroupContrast(name.strip(), [parse_contrast(name.strip(), e) for e in parts], f_test=True))
    return out


def settings_from_args(args) -> GroupSettings:
    height = args.height_control
    alpha = args.alpha if args.alpha is not None else default_alpha(height)
    if not 0 < alpha < 1:
        raise UsageError(f"--alpha must be between 0 and 1, got {alpha}")
    if args.cluster_extent < 0:
        raise UsageError(f"--cluster-extent must not be negative, got {args.cluster_extent}")
    permutations = _permutation_options(args, not args.one_sided)
    if args.group_model == "anova" and (args.covariates or args.group_by):
        raise UsageError("--covariates/--group-by do not apply to --group-model anova: its subject "
                         "columns absorb every between-subject effect")
    return GroupSettings(
        model=args.group_model,
        contrasts=parse_group_contrasts(args.group_contrast, args.group_f_contrast),
        covariates=list(args.covariates or []),
        group_by=args.group_by,
        conditions=args.conditions,
        allow_incomplete=args.allow_incomplete,
        thresholding=Thresholding(height, alpha, args.cluster_extent, not args.one_sided),
        atlases=atlas_mod.check_atlas_names(args.atlases),
        permutations=permutations,
        fwe_alpha=args.fwe_alpha,
    )


def _permutation_options(args, two_sided: bool) -> PermutationOptions | None:
    if args.permutations < 0:
        raise UsageError(f"--permutations must not be negative, got {args.permutations}")
    if not 0 < args.cluster_forming_p < 1:
        raise UsageError(f"--cluster-forming-p must be between 0 and 1, got {args.cluster_forming_p}")
    if not 0 < args.fwe_alpha < 1:
        raise UsageError(f"--fwe-alpha must be between 0 and 1, got {args.fwe_alpha}")
    if args.permutations == 0:
        if args.tfce:
            raise UsageError("--tfce needs --permutations N (TFCE is assessed by permutation)")
        return None
    seed = args.random_seed
    if seed is None:  # drawn once, recorded in every sidecar so the run can be repeated
        seed = int(np.random.SeedSequence().entropy % 2**32)
    elif seed < 0:
        raise UsageError(f"--random-seed must not be negative, got {seed}")
    return PermutationOptions(args.permutations, seed, two_sided, args.cluster_forming_p, args.tfce)


# --- planning -------------------------------------------------------------------------

def _missing_message(what: str, missing: list[str], present: int) -> str:
    return (f"{what} is missing for {', '.join('sub-' + s for s in missing)} (present for {present} "
            f"subject(s)); pass --allow-incomplete to proceed without them")


def _default_onesample_contrasts(design: pd.DataFrame, group_by: str | None) -> list[GroupContrast]:
    """The mean; with --group-by, each group's mean and every difference between groups."""
    if not group_by:
        return [GroupContrast(INTERCEPT, [parse_contrast(INTERCEPT, INTERCEPT)])]
    prefix = column_name(group_by, "")
    levels = [c for c in design.columns if c.startswith(prefix) and design[c].isin([0.0, 1.0]).all()]
    out = [GroupContrast(c, [parse_contrast(c, c)]) for c in levels]
    for i, a in enumerate(levels):
        for b in levels[i + 1:]:
            out.append(GroupContrast(f"{a} - {b}", [parse_contrast(f"{a} - {b}", f"{a} - {b}")]))
    return out


def _set_labels(contrasts: list[GroupContrast], prefix: str = "") -> None:
    """File-name labels; the one-sample mean keeps the subject contrast's label."""
    labels = contrast_labels([c.name for c in contrasts])
    for con in contrasts:
        if not prefix:
            con.label = labels[con.name]
        elif con.name == INTERCEPT:
            con.label = prefix
        else:
            con.label = prefix + _capitalised(labels[con.name])


def _weights(contrasts: list[GroupContrast], columns: list[str], aliases=None, where="group model"):
    return [(c, contrast_rows(c.rows, columns, aliases, where)) for c in contrasts]


def plan_onesample(task, space, label, maps, all_subjects, settings, participants) -> PlannedModel:
    present = sorted(m.subject for m in maps)
    missing = sorted(set(all_subjects) - set(present))
    what = f"task-{task} contrast '{maps[0].name}'"
    if missing and not settings.allow_incomplete:
        raise DataError(_missing_message(what, missing, len(present)))
    excluded = [Exclusion(f"sub-{s}", task, "", label, "no subject-level map for this contrast") for s in missing]
    if settings.covariates or settings.group_by:
        table, source = participants()
        design, dropped = code_covariates(table, settings.covariates, present, source, settings.group_by)
        excluded += [Exclusion(f"sub-{s}", task, "", label, why) for s, why in dropped.items()]
    else:
        design = pd.DataFrame({INTERCEPT: 1.0}, index=pd.Index(present, name="participant"))
    design.index = [f"sub-{s}" for s in design.index]
    design.index.name = "participant_id"
    check_enough_inputs(design, f"{what}, one-sample model")
    by_subject = {m.subject: m for m in maps}
    inputs = [by_subject[s[4:]] for s in design.index]
    defaults = _default_onesample_contrasts(design, settings.group_by) if settings.default_contrasts else []
    contrasts = defaults + list(settings.contrasts)
    contrasts = [GroupContrast(c.name, c.rows, c.f_test) for c in contrasts]  # labels differ per model
    _set_labels(contrasts, label)
    weights = _weights(contrasts, list(design.columns), where="one-sample model")
    coding = {c: ("intercept" if c == INTERCEPT else "mean-centred" if c in settings.covariates
                  else "group indicator" if settings.group_by and c.startswith(column_name(settings.group_by, ""))
                  else "centred indicator") for c in design.columns}
    return PlannedModel(task, space, "onesample", label, design, inputs, weights, excluded, coding)


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def plan_anova(task, space, maps_by_label, all_subjects, settings) -> PlannedModel:
    aliases = {m.name: m.label for ms in maps_by_label.values() for m in ms}  # names also accepted
    labels_available = sorted(maps_by_label)
    if settings.conditions:
        conditions = []
        for c in settings.conditions:
            lab = aliases.get(c, c)
            if lab not in maps_by_label:
                raise ModelError(f"--conditions: '{c}' is not a subject-level contrast of task-{task} "
                                 f"(available: {', '.join(labels_available)})")
            conditions.append(lab)
    else:
        conditions = labels_available
    if len(conditions) < 2:
        raise ModelError(f"task-{task}: the repeated-measures model needs at least two conditions, "
                         f"got {', '.join(conditions) or 'none'}")
    have = {lab: {m.subject for m in maps_by_label[lab]} for lab in conditions}
    complete = sorted(set.intersection(*have.values()))
    incomplete = sorted(set(all_subjects) - set(complete))
    excluded = []
    if incomplete:
        detail = "; ".join(f"sub-{s} lacks {', '.join(c for c in conditions if s not in have[c])}"
                           for s in incomplete)
        if not settings.allow_incomplete:
            raise DataError(f"task-{task} repeated-measures model: condition maps missing ({detail}); "
                            "pass --allow-incomplete to leave those subjects out")
        excluded = [Exclusion(f"sub-{s}", task, "", "", "lacks a condition of the repeated-measures model")
                    for s in incomplete]
    rows = [(s, c) for s in complete for c in conditions]
    design = anova_design(rows, conditions)
    check_enough_inputs(design, f"task-{task} repeated-measures model")
    index = {(m.subject, m.label): m for lab in conditions for m in maps_by_label[lab]}
    inputs = [index[r] for r in rows]
    contrasts = list(settings.contrasts) or [_omnibus(conditions)]
    _set_labels(contrasts)
    weights = _weights(contrasts, list(design.columns), aliases, where="repeated-measures model")
    for con, w in weights:
        if not is_estimable(w, design.to_numpy()):
            raise ModelError(f"group contrast '{con.name}' is not estimable in the repeated-measures model: "
                             "condition weights must sum to zero in each row (the subject columns absorb "
                             "each subject's mean); test a single condition with the one-sample model")
    coding = {c: "indicator" for c in design.columns}
    return PlannedModel(task, space, "anova", "anova", design, inputs, weights, excluded, coding)


def _omnibus(conditions: list[str]) -> GroupContrast:
    """F test of any difference between conditions (successive differences)."""
    rows = [parse_contrast("effectOfCondition", f"{a} - {b}") for a, b in zip(conditions[:-1], conditions[1:])]
    return GroupContrast("effectOfCondition", rows, f_test=True)


def plan_task(task, maps, settings, participants) -> list[PlannedModel]:
    space = maps[0].space_entities()
    all_subjects = sorted({m.subject for m in maps})
    by_label: dict[str, list[SubjectMap]] = {}
    for m in maps:
        by_label.setdefault(m.label, []).append(m)
    for label, ms in by_label.items():
        subs = [m.subject for m in ms]
        if len(subs) != len(set(subs)):
            raise DataError(f"task-{task} contrast '{label}': several subject-level maps per subject "
                            "(several sessions?); choose one with --session-label")
    if settings.model == "anova":
        return [plan_anova(task, space, by_label, all_subjects, settings)]
    plans = []
    for label in sorted(by_label):
        try:
            plans.append(plan_onesample(task, space, label, by_label[label], all_subjects, settings,
                                        participants))
        except TooFewInputsError as exc:
            if not (settings.allow_incomplete and len(by_label[label]) < len(all_subjects)):
                raise
            log.warning("%s; contrast skipped", exc.message)
    return plans


def _blocks(model: PlannedModel) -> np.ndarray | None:
    """Exchangeability blocks: the repeated-measures model permutes within subjects."""
    return np.array([m.subject for m in model.inputs]) if model.kind == "anova" else None


def _plan_permutations(plans: list[PlannedModel]) -> None:
    """What each contrast's permutations need; raises for contrasts that cannot be permuted."""
    for plan in plans:
        plan.permutation_designs = [
            permutation_design(plan.design.to_numpy(), weights, con.is_f, _blocks(plan),
                               what=f"group contrast '{con.name}'")
            for con, weights in plan.contrasts]


# --- computing and writing ----------------------------------------------------------------

def _prefix(model: PlannedModel) -> str:
    return f"task-{model.task}_{entity_prefix(model.space)}"


def _read_inputs(output_dir: Path, model: PlannedModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, V) effects in the group mask (voxels every input covers), the mask and its affine."""
    masks, affine = [], None
    for m in model.inputs:
        mask, aff = map_mask(output_dir, m)
        if affine is not None and (mask.shape != masks[0].shape or not same_grid(aff, affine)):
            raise DataError(f"map is on a different grid (or brain models) from sub-{model.inputs[0].subject}'s; "
                            "group models need every subject in one template space", m.effect)
        masks.append(mask)
        affine = aff if affine is None else affine
    mask = np.logical_and.reduce(masks)
    Y = np.stack([read_effect(output_dir, m, mask) for m in model.inputs])
    finite = np.isfinite(Y).all(axis=0)
    if not finite.all():
        mask[mask] = finite
        Y = Y[:, finite]
    if not mask.any():
        raise DataError(f"{_prefix(model)}: the subjects' brain masks do not overlap")
    return Y, mask, affine


def _sidecar(model, con, weights, stat, dof, output_dir) -> dict:
    columns = list(model.design.columns)
    rows = [dict((c, float(v)) for c, v in zip(columns, w) if v != 0) for w in weights]
    side = {
        "Description": f"{_STAT_WORDS[stat]} of group contrast '{con.name}'",
        "Level": "group",
        "Model": ("repeated-measures ANOVA (OLS)" if model.kind == "anova" else
                  "one-sample t-test (OLS)" if INTERCEPT in model.design.columns else "group means (OLS)"),
        "Contrast": {
            "Name": con.name,
            "Label": con.label,
            "Expression": [r.expression for r in con.rows] if con.is_f else con.rows[0].expression,
            "Weights": rows if con.is_f else rows[0],
        },
        "SubjectContrast": model.inputs[0].name if model.kind == "onesample" else None,
        "Statistic": stat,
        "Test": "F" if con.is_f else "t",
        "DegreesOfFreedom": [len(weights), dof] if con.is_f else dof,
        "Tail": "one-sided (upper)" if stat in ("p", "z") else None,
        "Participants": sorted({f"sub-{m.subject}" for m in model.inputs}),
        "NumberOfInputs": len(model.inputs),
        "DesignMatrix": f"{_design_name(model)}.tsv",
        "Covariates": {c: v for c, v in model.covariate_coding.items() if c != INTERCEPT} or None,
        "Exclusions": f"{_prefix(model)}_exclusions.tsv",
        "Sources": [f"bids::{m.effect.relative_to(output_dir).as_posix()}" for m in model.inputs
                    if m.runs_kept is None] or None,
    }
    if model.kind == "anova":
        side["Assumptions"] = SPHERICITY_NOTE
    return {k: v for k, v in side.items() if v is not None}


def _design_name(model: PlannedModel) -> str:
    what = f"contrast-{model.name}" if model.kind == "onesample" else "desc-anova"
    return f"{_prefix(model)}_{what}_design"


def fit_and_write(output_dir: Path, model: PlannedModel, settings: GroupSettings,
                  group_dir: Path | None = None) -> list[Path]:
    """Fit one planned model on maps under ``output_dir``; write into ``group_dir`` (OUTPUT_DIR/group)."""
    t0 = time.perf_counter()
    group_dir = group_dir or output_dir / "group"
    Y, mask, affine = _read_inputs(output_dir, model)
    fit = fit_ols(Y, model.design.to_numpy())
    # permutations before any file: an interrupted run leaves no file of this model
    designs = model.permutation_designs or [None] * len(model.contrasts)
    permuted = [None if design is None else
                run_permutations(Y, design, mask, settings.permutations, label=f"contrast-{con.label}: ",
                                 **_surface_permutation_args(affine, mask, settings))
                for (con, _), design in zip(model.contrasts, designs)]
    del Y
    written = []
    design_table = model.design.reset_index()
    atomic_write_tsv(group_dir / f"{_design_name(model)}.tsv", design_table)
    mask_path = group_dir / f"{_design_name(model).removesuffix('_design')}_mask.nii.gz"
    _write_map(mask_path, np.ones(int(mask.sum())), mask, affine)
    mni = model.space.get("space", "").startswith("MNI")
    for (con, weights), perm_result in zip(model.contrasts, permuted):
        res = fit.contrast(weights, f_test=con.is_f)
        stat = "F" if con.is_f else "t"
        values = {"t": res.stat, "F": res.stat, "z": res.z, "p": res.p}
        if not con.is_f:
            values.update(effect=res.effect, variance=res.variance)
        stats_written = ("F", "z", "p") if con.is_f else ("effect", "variance", "t", "z", "p")
        base = f"{_prefix(model)}_contrast-{con.label}"
        for s in stats_written:
            path = _write_map(group_dir / f"{base}_stat-{s}_statmap.nii.gz", values[s], mask, affine)
            atomic_write_json(sidecar_path(path), _sidecar(model, con, weights, s, fit.dof, output_dir))
            written.append(path)
        z_volume = unmask(values["z"], mask).astype(np.float64)
        stat_volume = unmask(values[stat], mask).astype(np.float64)
        n_clusters, threshold = _threshold_and_table(group_dir, base, z_volume, stat_volume, mask, affine,
                                                     values["z"], stat, con.is_f, settings, mni)
        log.info("task-%s contrast-%s (%s, %d inputs, dof %g): max |z| %.2f; %d cluster(s) at |z| >= %.3g",
                 model.task, con.label, stat, len(model.inputs), fit.dof, float(np.max(np.abs(values["z"]))),
                 n_clusters, threshold)
        if perm_result is not None:
            written += write_permutation_outputs(group_dir, base, model, con, perm_result, mask, affine,
                                                 values["z"], settings, mni)
    log.info("%s %s: %d contrast(s) written (%.1f s)", _prefix(model), model.name, len(model.contrasts),
             time.perf_counter() - t0)
    return written


def _threshold_and_table(group_dir, base, z_volume, stat_volume, mask, affine, z_in_mask, stat, is_f,
                         settings, mni) -> tuple[int, float]:
    """``z_in_mask`` is the full-precision z (the height threshold is computed from it);
    ``z_volume`` holds it as written (float32), which is what gets thresholded."""
    th = settings.thresholding
    two_sided = th.two_sided and not is_f  # an F test has one tail
    threshold = height_threshold(z_in_mask, th.height_control, th.alpha, two_sided)
    if isinstance(affine, Geometry):
        return _surface_threshold_and_table(group_dir, base, z_volume, stat_volume, mask, affine, threshold,
                                            stat, two_sided, th)
    kept = threshold_map(z_volume, mask, threshold, th.cluster_extent, two_sided)
    info = {
        "Description": "z map thresholded at the height threshold and cluster extent below; 0 elsewhere",
        "HeightControl": th.height_control,
        "Alpha": th.alpha,
        "TwoSided": two_sided,
        "Threshold": threshold if np.isfinite(threshold) else None,
        "ThresholdStatistic": "z",
        "ClusterExtent": th.cluster_extent,
        "ClusterConnectivity": "faces (6-neighbour, NN1)",
        "VoxelsInMask": int(mask.sum()),
    }
    path = group_dir / f"{base}_stat-z_desc-thresholded_statmap.nii.gz"
    atomic_write_bytes(path, nifti_bytes(kept.astype(np.float32), affine))
    clusters = find_clusters(kept, affine)
    label_fn = atlas_mod.labeller(settings.atlases) if (settings.atlases and mni) else None
    table = clusters_table(clusters, affine, stat_volume, stat, label_fn)
    info["NumberOfClusters"] = len(clusters)
    atomic_write_json(sidecar_path(path), info)
    table_path = group_dir / f"{base}_clusters.tsv"
    atomic_write_tsv(table_path, table)
    atomic_write_json(table_path.with_suffix(".json"), {
        **{k: info[k] for k in ("HeightControl", "Alpha", "TwoSided", "Threshold", "ClusterExtent",
                                "ClusterConnectivity")},
        "cluster_id": "Cluster number, largest peak first; letters mark sub-peaks (>= 8 mm apart, at most 3)",
        "x": "Peak x (mm, world coordinates of the map); y and z likewise",
        "peak_z": "z at the peak",
        f"peak_{stat}": f"{stat} at the peak",
        "cluster_size_voxels": "Voxels in the cluster",
        "cluster_size_mm3": "Cluster volume in mm^3",
        "Atlases": ({a: "<atlas>_peak: region at the peak (probabilistic atlases: regions >= 5 % there); "
                        "<atlas>_cluster: share of the cluster's voxels per region (>= 5 %)"
                     for a in settings.atlases} if label_fn else
                    "none (atlas labels need an MNI space)" if settings.atlases else "none"),
    })
    return len(clusters), threshold


def _check_surface_options(maps: list[SubjectMap], settings: GroupSettings) -> None:
    """Before anything is fitted: what surfaces do not support is refused (voxel-wise inference works)."""
    space = maps[0].entities.get("space") if maps else None
    kind = space_kind(space)
    if kind == "volume":
        return
    if settings.permutations is not None and settings.permutations.tfce and not (
            kind == "gifti" and space in SHIPPED_MESHES):
        raise UsageError(f"--tfce on --space {space}: TFCE needs a template mesh, which ships offline for "
                         f"{', '.join(SHIPPED_MESHES)} only; --permutations without --tfce gives vertex-wise "
                         "FWE p-values")
    if settings.thresholding.cluster_extent > 1 and not (kind == "gifti" and space in SHIPPED_MESHES):
        raise UsageError(f"--cluster-extent on --space {space}: cluster inference needs a template mesh, "
                         f"which ships offline for {', '.join(SHIPPED_MESHES)} only; use voxel-wise "
                         "thresholds (--cluster-extent 0)")


def _surface_permutation_args(grid, mask, settings) -> dict:
    """Surfaces: the mesh table for TFCE (fsaverage5), or none (vertex-wise maxima only)."""
    if not isinstance(grid, Geometry):
        return {}
    table = tfce_neighbours(grid, mask) if settings.permutations.tfce else None
    return {"neighbours": no_neighbours(mask) if table is None else table, "tfce_extent": SURFACE_TFCE_E}


def _write_map(path: Path, values: np.ndarray, mask: np.ndarray, grid) -> Path:
    """Write in-mask values as a map on ``grid`` (an affine, or a surface Geometry); returns the path
    (surfaces: renamed .dscalar.nii, or the hemi-L .shape.gii of a pair)."""
    path = path_for_grid(path, grid)
    full = unmask(values, mask)
    if isinstance(grid, Geometry):
        for target, data in map_files(path, full, grid):
            atomic_write_bytes(target, data)
    else:
        atomic_write_bytes(path, nifti_bytes(full, grid))
    return path


def _surface_threshold_and_table(group_dir, base, z_full, stat_full, mask, geom, threshold, stat, two_sided,
                                 th) -> tuple[int, float]:
    """Thresholded surface map; clusters and their table on a shipped template mesh only."""
    mesh = template_mesh(geom)
    if th.cluster_extent > 1 and mesh is None:  # checked before fitting; kept as a guard
        raise UsageError(f"--cluster-extent: {cluster_refusal(geom)}")
    kept = threshold_elements(z_full, mask, threshold, th.cluster_extent, two_sided, mesh)
    path = _write_map(group_dir / f"{base}_stat-z_desc-thresholded_statmap.nii.gz", kept[mask], mask, geom)
    info = {
        "Description": "z map thresholded at the height threshold and cluster extent below; 0 elsewhere",
        "HeightControl": th.height_control, "Alpha": th.alpha, "TwoSided": two_sided,
        "Threshold": threshold if np.isfinite(threshold) else None, "ThresholdStatistic": "z",
        "ClusterExtent": th.cluster_extent,
        "ClusterConnectivity": f"vertices sharing a triangle edge ({mesh.name})" if mesh else "none",
        "VerticesInMask": int(mask.sum()),
    }
    if mesh is None:
        info["ClusterTable"] = cluster_refusal(geom)
        atomic_write_json(sidecar_path(path), info)
        return int((kept != 0).sum()), threshold
    table = surface_clusters_table(kept, stat_full, stat, mesh, geom)
    info["NumberOfClusters"] = len(table)
    atomic_write_json(sidecar_path(path), info)
    table_path = group_dir / f"{base}_clusters.tsv"
    atomic_write_tsv(table_path, table)
    atomic_write_json(table_path.with_suffix(".json"), {
        **{k: info[k] for k in ("HeightControl", "Alpha", "TwoSided", "Threshold", "ClusterExtent",
                                "ClusterConnectivity")},
        "cluster_id": "Cluster number, largest |peak z| first",
        "hemisphere": "Hemisphere of the peak vertex (L, R)",
        "vertex": "Peak vertex index in its hemisphere's template mesh",
        "x": "Peak x (mm) on the template midthickness; y and z likewise",
        "peak_z": "z at the peak", f"peak_{stat}": f"{stat} at the peak",
        "cluster_size_vertices": "Vertices in the cluster",
        "cluster_size_mm2": "Cluster area in mm^2 on the template midthickness (a third of each triangle "
                            "per vertex)",
    })
    return len(table), threshold


# --- permutation inference -------------------------------------------------------------

_FWE_KINDS = {
    "voxel": "voxel-level (maximum statistic)",
    "clustersize": "cluster size",
    "clustermass": "cluster mass (sum of |statistic| - cluster-forming threshold)",
    "tfce": "threshold-free cluster enhancement",
}


def write_permutation_outputs(group_dir, base, model, con, result, mask, affine, z_in_mask, settings,
                              mni) -> list[Path]:
    """FWE-corrected -log10 p maps, the statistic masked to FWE-significant voxels and
    their cluster tables, for each kind of inference."""
    options = settings.permutations
    stat = "F" if con.is_f else "t"
    smallest_p = 1 / result.n_rearrangements
    if smallest_p >= settings.fwe_alpha:
        log.warning("contrast-%s: only %d rearrangements exist%s, so the smallest FWE p-value is %.3g, "
                    "not below --fwe-alpha %g: nothing can be significant (more subjects are needed)",
                    con.label, result.n_rearrangements, " (all used)" if result.exhaustive else "",
                    smallest_p, settings.fwe_alpha)
    common = {
        "Level": "group",
        "Contrast": con.name,
        "Test": stat,
        "Inference": "family-wise error by the maximum statistic over the mask, by permutation",
        "Rearrangement": result.scheme,
        "NumberOfRearrangements": result.n_rearrangements,
        "Exhaustive": result.exhaustive,
        "RandomSeed": None if result.exhaustive else options.seed,
        "TwoSided": result.two_sided,
        "ClusterFormingP": options.cluster_forming_p,
        "ClusterFormingThreshold": result.cluster_threshold,
        "ClusterConnectivity": "faces (6-neighbour, NN1)",
        "FWEAlpha": settings.fwe_alpha,
        "Participants": sorted({f"sub-{m.subject}" for m in model.inputs}),
    }
    p_maps = {"voxel": result.p_voxel, "clustersize": result.p_cluster_size,
              "clustermass": result.p_cluster_mass}
    if isinstance(affine, Geometry):  # the cluster-size kernels work on voxel grids only (see surfaces.py)
        p_maps = {"voxel": result.p_voxel}
        common["ClusterConnectivity"] = "none (no cluster-size/mass inference on surfaces)"
    if result.p_tfce is not None:
        p_maps["tfce"] = result.p_tfce
        tfce_info = {"TFCE": {"E": 0.5, "H": 2.0, "dh": 0.1, "Connectivity": "faces (6-neighbour)"}}
        if isinstance(affine, Geometry):
            tfce_info = {"TFCE": {"E": SURFACE_TFCE_E, "H": 2.0, "dh": 0.1,
                                  "Connectivity": "vertices sharing a triangle edge (fsaverage5 mesh)"}}
        path = _write_map(group_dir / f"{base}_stat-tfce_statmap.nii.gz", result.tfce, mask, affine)
        atomic_write_json(sidecar_path(path), {"Description": f"TFCE of the {stat} map (negative where "
                                               "the t map is negative)", **common, **tfce_info})
        common.update(tfce_info)
    written = []
    z_volume = unmask(z_in_mask, mask).astype(np.float64)
    stat_volume = unmask(result.stat, mask).astype(np.float64)
    label_fn = atlas_mod.labeller(settings.atlases) if (settings.atlases and mni) else None
    for kind, p in p_maps.items():
        significant = p < settings.fwe_alpha
        logp = np.where(p < 1, -np.log10(p), 0.0)
        path = _write_map(group_dir / f"{base}_stat-logp_desc-{kind}FWE_statmap.nii.gz", logp, mask, affine)
        atomic_write_json(sidecar_path(path), {
            "Description": f"-log10 FWE-corrected p-value, {_FWE_KINDS[kind]} inference", **common})
        masked = _write_map(group_dir / f"{base}_stat-{stat}_desc-{kind}FWE_statmap.nii.gz",
                            np.where(significant, result.stat, 0.0), mask, affine)
        atomic_write_json(sidecar_path(masked), {
            "Description": f"{stat} where the FWE-corrected p ({_FWE_KINDS[kind]}) is below "
                           f"{settings.fwe_alpha}; 0 elsewhere", "VoxelsSignificant": int(significant.sum()),
            **common})
        p_volume = unmask(p, mask)
        if isinstance(affine, Geometry):  # clusters on a shipped mesh, else no table
            mesh = template_mesh(affine)
            kept = np.where(unmask(significant, mask) > 0, z_volume, 0.0)
            table = None if mesh is None else surface_clusters_table(kept, stat_volume, stat, mesh, affine,
                                                                     p_volume)
            n_clusters = 0 if table is None else len(table)
        else:
            clusters = find_clusters(np.where(unmask(significant, mask) > 0, z_volume, 0.0), affine)
            table = clusters_table(clusters, affine, stat_volume, stat, label_fn)
            table.insert(5, "p_fwe", [float(p_volume[tuple(ijk)]) for c in clusters for ijk in c.peaks])
            n_clusters = len(clusters)
        written += [path, masked]
        if table is None:
            continue
        table_path = group_dir / f"{base}_desc-{kind}FWE_clusters.tsv"
        atomic_write_tsv(table_path, table)
        atomic_write_json(table_path.with_suffix(".json"), {
            "Description": f"Clusters of voxels with FWE-corrected p < {settings.fwe_alpha} "
                           f"({_FWE_KINDS[kind]} inference)",
            "p_fwe": "FWE-corrected p-value at the peak" + (" (the cluster's p-value)" if "cluster" in kind
                                                             else ""),
            **{k: common[k] for k in ("Rearrangement", "NumberOfRearrangements", "TwoSided",
                                      "ClusterFormingThreshold", "ClusterConnectivity", "FWEAlpha")}})
        log.info("contrast-%s: %d voxel(s), %d cluster(s) FWE-significant (%s, p < %g)", con.label,
                 int(significant.sum()), n_clusters, kind, settings.fwe_alpha)
    return written


def _write_exclusions(group_dir: Path, prefix: str, rows: list[Exclusion]) -> None:
    table = pd.DataFrame([(r.participant, r.run, r.contrast, r.reason) for r in rows],
                         columns=["participant_id", "run", "contrast", "reason"]).drop_duplicates()
    path = group_dir / f"{prefix}_exclusions.tsv"
    atomic_write_tsv(path, table)


def run_group_level(args, output_dir: Path, *, inputs_dir: Path | None = None, group_dir: Path | None = None,
                    contrast_names=None, settings: GroupSettings | None = None) -> None:
    """Group models over the subject maps in ``inputs_dir`` (default OUTPUT_DIR), written to
    ``group_dir`` (default OUTPUT_DIR/group). A BIDS Stats Model's Dataset node passes its
    source node's folder, its own folder, the contrasts its edge lets through and its settings."""
    t_start = time.perf_counter()
    inputs_dir = inputs_dir or output_dir
    group_dir = group_dir or output_dir / "group"
    settings = settings or settings_from_args(args)
    run_rules = [parse_run_rule(r) for r in args.exclude_run or ()]
    maps = find_subject_maps(inputs_dir, args.space, args.task, args.participant_label, args.session_label)
    if contrast_names is not None:
        maps = [m for m in maps if m.name in contrast_names or m.label in contrast_names]
    attach_run_records(inputs_dir, maps)
    _check_surface_options(maps, settings)
    maps, exclusions = apply_exclusions(maps, args.exclude_participant_label, run_rules, args.exclude_fd_mean)
    if not maps:
        raise DataError("every subject was excluded; nothing left to model", inputs_dir)

    if settings.permutations is not None:
        import numba

        numba.set_num_threads(max(1, min(args.n_cpus, numba.config.NUMBA_NUM_THREADS)))
    participants = functools.cache(lambda: read_participants(output_dir))  # read only if a model needs it

    tasks = sorted({m.task for m in maps})
    plans = []
    for task in tasks:
        task_maps = [m for m in maps if m.task == task]
        plans.extend(plan_task(task, task_maps, settings, participants))
    if settings.permutations is not None:
        _plan_permutations(plans)
    if not plans:
        raise DataError("no group model has enough subjects to be fitted", inputs_dir)
    log.info("group level: %d model(s) for task(s) %s, %d subject(s); exclusions: %d", len(plans),
             ", ".join(tasks), len({m.subject for m in maps}), len(exclusions))
    n_written = 0
    for task in tasks:
        task_plans = [p for p in plans if p.task == task]
        if not task_plans:
            continue
        prefix = _prefix(task_plans[0])
        task_excl = [e for e in exclusions if e.task == task] + [e for p in task_plans for e in p.excluded]
        _write_exclusions(group_dir, prefix, task_excl)
        for plan in task_plans:
            n_written += len(fit_and_write(inputs_dir, plan, settings, group_dir))
    log.info("group level done in %.1f s: %d maps in %s", time.perf_counter() - t_start, n_written, group_dir)
