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
from . import groupblocks
from .design import contrast_labels, parse_contrast, parse_contrast_option
from .errors import DataError, ModelError, UsageError
from .discovery import strip_prefix
from .groupinputs import (
    Exclusion,
    SubjectMap,
    apply_exclusions,
    attach_run_records,
    check_grids,
    check_same_model,
    expected_subjects,
    find_subject_maps,
    map_mask,
    parse_run_rule,
    read_effect,
    read_participants,
    read_variance,
    variance_path,
)
from .groupmodels import (
    INTERCEPT,
    SPHERICITY_CORRECTED_NOTE,
    SPHERICITY_NOTE,
    check_mixed_design,
    anova_design,
    TooFewInputsError,
    check_enough_inputs,
    code_covariates,
    column_name,
    contrast_rows,
    fit_ols,
    is_estimable,
)
from .firstlevel import ZERO_VARIANCE, check_statistic_maps
from .clusterkernels import CONNECTIVITY_NAMES, TFCE_CONNECTIVITY_NAMES, TFCE_MAX_STEPS, tfce_step
from .images import nifti_bytes, unmask
from .mixedeffects import fit_mixed
from .sphericity import NAMES as SPHERICITY_NAMES, corrected_f_tails, epsilon
from .surfaces import (
    SURFACE_TFCE_E,
    TEMPLATE_VERTICES,
    Geometry,
    TemplateMeshError,
    geometry_mesh,
    mesh_or_reason,
    space_kind,
    clusters_table as surface_clusters_table,
    map_files,
    no_neighbours,
    path_for_grid,
    read_map,
    restrict_to_mask,
    same_grid,
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
    TFCE_DH,
    PermutationOptions,
    permutation_design,
    run_permutations,
)
from .outputs import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_tsv,
    check_planned_folders,
    check_planned_names,
    entity_prefix,
    sidecar_path,
)

log = logging.getLogger("bidsglm")

_STAT_WORDS = {
    "effect": "Group effect size",
    "variance": "Variance of the group effect size",
    "t": "t statistic",
    "F": "F statistic",
    "z": "z score (from the one-sided p-value)",
    "p": "One-sided (upper-tail) p-value",
    "tau2": "Between-subject variance (tau^2) of the mixed-effects model",
    "epsilon": "Nonsphericity correction factor epsilon (per voxel) of the repeated-measures F test",
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
    connectivity: int = 6  # neighbours joining clusters: 6 faces, 18 + edges, 26 + corners


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
    estimator: str = "ols"  # or 'mixed': first-level variances and a per-voxel tau^2 (REML)
    sphericity: str = "gg"  # repeated-measures F tests with several numerator dof: none, gg, hf


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
    estimator = getattr(args, "group_estimator", "ols")
    if estimator == "mixed" and args.group_model == "anova":
        raise UsageError("--group-estimator mixed applies to the one-sample model (with covariates and "
                         "groups); the repeated-measures ANOVA is fitted by OLS")
    connectivity = getattr(args, "connectivity", 6)
    if permutations is not None:
        permutations.connectivity = connectivity
    return GroupSettings(
        model=args.group_model,
        contrasts=parse_group_contrasts(args.group_contrast, args.group_f_contrast),
        covariates=list(args.covariates or []),
        group_by=args.group_by,
        conditions=args.conditions,
        allow_incomplete=args.allow_incomplete,
        thresholding=Thresholding(height, alpha, args.cluster_extent, not args.one_sided, connectivity),
        atlases=atlas_mod.check_atlas_names(args.atlases),
        permutations=permutations,
        fwe_alpha=args.fwe_alpha,
        estimator=estimator,
        sphericity=getattr(args, "sphericity_correction", "gg"),
    )


DEFAULT_CONNECTIVITY = 6  # the command line's defaults (cli.py): an option that differs was given
DEFAULT_CLUSTER_FORMING_P = 0.001


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
        if args.cluster_forming_p != DEFAULT_CLUSTER_FORMING_P:  # would do nothing: say so
            raise UsageError(f"--cluster-forming-p {args.cluster_forming_p:g} needs --permutations N (it forms the "
                             "clusters of cluster-size and cluster-mass permutation inference)")
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
    if missing:
        log.warning("%s: no subject-level map for %s; left out (--allow-incomplete) and listed in the "
                    "exclusions table", what, ", ".join(f"sub-{s}" for s in missing))
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
    clash = sorted({c.name for c in defaults} & {c.name for c in settings.contrasts})
    if clash:
        raise ModelError(f"group contrast '{clash[0]}' (--group-contrast/--group-f-contrast, or a Dataset node's "
                         f"Contrasts) has the name of a default contrast of this model "
                         f"({', '.join(c.name for c in defaults)}) and would overwrite its maps; choose another name")
    contrasts = defaults + list(settings.contrasts)
    contrasts = [GroupContrast(c.name, c.rows, c.f_test) for c in contrasts]  # labels differ per model
    _set_labels(contrasts, label)
    weights = _weights(contrasts, list(design.columns), where="one-sample model")
    for con, w in weights:  # collinear covariates (age and 2 x age) leave some contrasts unidentified
        if not is_estimable(w, design.to_numpy()):
            raise ModelError(f"task-{task} contrast '{label}': group contrast '{con.name}' is not estimable: the "
                             f"design's columns ({', '.join(map(str, design.columns))}) are linearly dependent "
                             "and its weights fall on that dependence (leave out a redundant covariate)")
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


def plan_task(task, maps, settings, participants, expected=None) -> list[PlannedModel]:
    """``expected(label)``: subjects whose run records list that contrast (so a subject without any
    map for it is not silently left out); by default only the subjects with some map count."""
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
        expected_any = set().union(*(expected(label) for label in by_label)) if expected else set()
        return [plan_anova(task, space, by_label, sorted(set(all_subjects) | expected_any), settings)]
    plans = []
    for label in sorted(by_label):
        subjects = sorted(set(all_subjects) | (expected(label) if expected else set()))
        try:
            plans.append(plan_onesample(task, space, label, by_label[label], subjects, settings,
                                        participants))
        except TooFewInputsError as exc:
            if not (settings.allow_incomplete and len(by_label[label]) < len(all_subjects)):
                raise
            log.warning("%s; contrast skipped", exc.message)
    return plans


def _expected_subjects(inputs_dir, task, args, left_out, by_contrast, label) -> set[str]:
    """Subjects the participant level fitted this contrast for, less those excluded on purpose."""
    found = expected_subjects(inputs_dir, task, label, args.participant_label, args.session_label)
    return {s for s in found if s not in left_out and (s, label) not in by_contrast}


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


def _read_inputs(output_dir: Path, model: PlannedModel, grid=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, V) effects in the group mask (voxels every input covers), the mask and its affine
    (``grid``: the group mask and affine when known)."""
    mask, affine = grid or _group_mask(output_dir, model)
    Y = np.stack([read_effect(output_dir, m, mask, affine) for m in model.inputs])
    finite = np.isfinite(Y)
    share_bad = 1.0 - finite.mean(axis=1)
    worst = int(np.argmax(share_bad))
    if share_bad[worst] > MAX_NONFINITE_SHARE:
        raise DataError(f"effect map is non-finite (NaN or infinite) in {share_bad[worst]:.0%} of the "
                        f"{Y.shape[1]} voxels of the group mask", model.inputs[worst].effect)
    finite = finite.all(axis=0)
    if not finite.all():  # a few voxels: left out of the group mask, with a warning
        bad = [model.inputs[i].effect.name for i in np.flatnonzero(share_bad > 0)]
        log.warning("%s %s: %d voxel(s) left out of the group mask: non-finite in %s", _prefix(model),
                    model.name, int((~finite).sum()), ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
        mask[mask] = finite
        Y = Y[:, finite]
    if not mask.any():
        raise DataError(f"{_prefix(model)}: no voxel has a finite effect in every input map")
    return Y, mask, affine


def _group_mask(output_dir: Path, model: PlannedModel):
    """The voxels every input covers, and their affine (or surface geometry). Combined one
    mask at a time: thousands of inputs' masks held at once would take GBs."""
    group_mask, affine = None, None
    for m in model.inputs:
        mask, aff = map_mask(output_dir, m)
        if affine is not None and (mask.shape != group_mask.shape or not same_grid(aff, affine)):
            raise DataError(f"map is on a different grid (or brain models) from sub-{model.inputs[0].subject}'s; "
                            "group models need every subject in one template space", m.effect)
        group_mask = mask if group_mask is None else group_mask & mask
        affine = aff if affine is None else affine
    mask = group_mask
    if not mask.any():
        raise DataError(f"{_prefix(model)}: the subjects' brain masks do not overlap")
    return mask, affine


MAX_NONFINITE_SHARE = 0.5  # an input map non-finite in more of the group mask is broken, not edgy


def _sidecar(model, con, weights, stat, dof, output_dir, extra=None) -> dict:
    columns = list(model.design.columns)
    rows = [dict((c, float(v)) for c, v in zip(columns, w) if v != 0) for w in weights]
    extra = extra or {}
    side = {
        "Description": f"{_STAT_WORDS[stat]} of group contrast '{con.name}'",
        "Level": "group",
        "Model": extra.pop("Model", None) or (
            "repeated-measures ANOVA (OLS)" if model.kind == "anova" else
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
    side.update(extra)
    return {k: v for k, v in side.items() if v is not None}


def _design_name(model: PlannedModel) -> str:
    what = f"contrast-{model.name}" if model.kind == "onesample" else "desc-anova"
    return f"{_prefix(model)}_{what}_design"


def fit_and_write(output_dir: Path, model: PlannedModel, settings: GroupSettings,
                  group_dir: Path | None = None) -> list[Path]:
    """Fit one planned model on maps under ``output_dir``; write into ``group_dir`` (OUTPUT_DIR/group)."""
    t0 = time.perf_counter()
    group_dir = group_dir or output_dir / "group"
    designs = model.permutation_designs or [None] * len(model.contrasts)
    mixed = settings.estimator == "mixed"
    mask, affine = _group_mask(output_dir, model)
    if groupblocks.streams(len(model.inputs), int(mask.sum()), settings.estimator, model.kind):
        mask, fit, permuted, subject_by_condition = _fit_in_blocks(output_dir, model, settings, designs,
                                                                   mask, affine)
    else:
        Y, mask, affine = _read_inputs(output_dir, model, (mask, affine))
        Y, mask, fit = _without_flat_voxels(Y, mask, model, fit_ols(Y, model.design.to_numpy()))
        if mixed:
            Y, variances, mask = _with_variances(output_dir, model, Y, mask)
            fit = fit_mixed(Y, variances, model.design.to_numpy())
            del variances
        subject_by_condition = _subject_by_condition(Y, model) if _corrects_sphericity(model, settings) else None
        # permutations before any file: an interrupted run leaves no file of this model
        permuted = [None if design is None else
                    run_permutations(Y, design, mask, settings.permutations, label=f"contrast-{con.label}: ",
                                     **_surface_permutation_args(affine, mask, settings))
                    for (con, _), design in zip(model.contrasts, designs)]
        del Y
    computed = [_contrast_values(model, con, weights, fit, settings, subject_by_condition, perm is not None)
                for (con, weights), perm in zip(model.contrasts, permuted)]
    written = []
    design_table = model.design.reset_index()
    atomic_write_tsv(group_dir / f"{_design_name(model)}.tsv", design_table)
    mask_path = group_dir / f"{_design_name(model).removesuffix('_design')}_mask.nii.gz"
    _write_map(mask_path, np.ones(int(mask.sum())), mask, affine)
    mni = model.space.get("space", "").startswith("MNI")
    if mixed:
        written.append(_write_tau2(group_dir, model, fit, mask, affine))
    for (con, weights), perm_result, (values, stats_written, extra) in zip(model.contrasts, permuted, computed):
        stat = "F" if con.is_f else "t"
        base = f"{_prefix(model)}_contrast-{con.label}"
        for s in stats_written:
            path = _write_map(group_dir / f"{base}_stat-{s}_statmap.nii.gz", values[s], mask, affine)
            atomic_write_json(sidecar_path(path), _sidecar(model, con, weights, s, fit.dof, output_dir,
                                                           dict(extra)))
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


def _fit_in_blocks(output_dir, model, settings, designs, mask, affine):
    """The fit and permutations of a large OLS model a block of voxels at a time
    (groupblocks.py): mask, fit, permutation results; no sphericity data (no ANOVA)."""
    labels = {id(d): f"contrast-{con.label}: " for (con, _), d in zip(model.contrasts, designs)}

    def permute(design, final_mask, prepared):
        return run_permutations(None, design, final_mask, settings.permutations, label=labels[id(design)],
                                prepared=prepared, **_surface_permutation_args(affine, final_mask, settings))

    blocked = groupblocks.fit_in_blocks(
        model.inputs, lambda m: read_effect(output_dir, m, mask, affine), mask, model.design.to_numpy(),
        f"{_prefix(model)} {model.name}", groupblocks.work_folder(output_dir), designs, settings.permutations,
        permute)
    return blocked.mask, blocked.fit, blocked.permuted, None


def _without_flat_voxels(Y: np.ndarray, mask: np.ndarray, model: PlannedModel, fit):
    """Voxels where the model fits every input exactly (identical or constant maps) have no
    error variance: they leave the mask with a warning, and the OLS ``fit`` is redone without
    them; if every voxel is so, the model is refused. Returns Y, mask and fit."""
    flat = ~(fit.dispersion > ZERO_VARIANCE * np.einsum("nv,nv->v", Y, Y) / Y.shape[0])
    if not flat.any():
        return Y, mask, fit
    if flat.all():
        raise DataError(f"{_prefix(model)} {model.name}: the model fits the input maps exactly in every "
                        "voxel (identical or constant maps?): no error variance to test against")
    log.warning("%s %s: %d voxel(s) left out of the group mask: the model fits the inputs exactly there "
                "(zero variance)", _prefix(model), model.name, int(flat.sum()))
    mask = mask.copy()
    mask[mask] = ~flat
    Y = Y[:, ~flat]
    return Y, mask, fit_ols(Y, model.design.to_numpy())


def _contrast_values(model, con, weights, fit, settings, subject_by_condition, permuted: bool):
    """The maps of one contrast (checked finite before anything is written), the statistics
    to write and the sidecar entries of the estimator or the sphericity correction."""
    res = fit.contrast(weights, f_test=con.is_f)
    values = {"t": res.stat, "F": res.stat, "z": res.z, "p": res.p}
    if not con.is_f:
        values.update(effect=res.effect, variance=res.variance)
    stats_written = ("F", "z", "p") if con.is_f else ("effect", "variance", "t", "z", "p")
    extra = _estimator_info(model, fit, permuted) if settings.estimator == "mixed" else {}
    if subject_by_condition is not None and con.is_f and res.dim > 1:
        values["epsilon"] = epsilon(subject_by_condition, settings.sphericity)
        values["p"], values["z"] = corrected_f_tails(res.stat, res.dim, fit.dof, values["epsilon"])
        stats_written += ("epsilon",)
        extra = _sphericity_info(settings, res.dim, fit.dof)
    try:  # every map checked before any is written
        check_statistic_maps({name: values[name] for name in stats_written})
    except DataError as exc:
        raise DataError(f"{_prefix(model)} contrast '{con.name}': {exc.problem}") from exc
    return values, stats_written, extra


# --- mixed effects and sphericity ------------------------------------------------------------

def _check_mixed_inputs(plan: PlannedModel) -> None:
    """Before anything is written: a full-rank design and every subject's variance map."""
    check_mixed_design(plan.design, f"task-{plan.task} contrast '{plan.name}', mixed-effects model")
    for m in plan.inputs:
        if m.runs_kept is None and not variance_path(m).is_file():
            raise DataError("variance map of this subject-level effect is missing (the mixed-effects "
                            "group model needs it); rerun the participant level", variance_path(m))


def _with_variances(output_dir: Path, model: PlannedModel, Y: np.ndarray, mask: np.ndarray):
    """Each input's first-level variance in the mask; voxels where one is not positive and
    finite leave the mask (as voxels with non-finite effects do)."""
    variances = np.stack([read_variance(output_dir, m, mask) for m in model.inputs])
    valid = (np.isfinite(variances) & (variances > 0)).all(axis=0)
    if not valid.all():
        log.info("%s %s: %d voxel(s) without a positive first-level variance in every input left out",
                 _prefix(model), model.name, int((~valid).sum()))
        mask = mask.copy()
        mask[mask] = valid
        Y, variances = Y[:, valid], variances[:, valid]
    if not mask.any():
        raise DataError(f"{_prefix(model)} {model.name}: no voxel has a positive first-level variance in "
                        "every input (needed by the mixed-effects model)")
    return Y, variances, mask


MIXED_DOF_NOTE = ("Wald statistic b / se(b) (PyMARE's z) referred to a t distribution with N - p degrees "
                  "of freedom (N inputs, p design columns), as FSL's FLAME1 does; a normal reference would "
                  "be liberal with few subjects")


def _estimator_info(model: PlannedModel, fit, permuted: bool) -> dict:
    kind = ("one-sample mixed-effects model" if INTERCEPT in model.design.columns
            else "group means, mixed-effects model")
    info = {
        "Model": f"{kind} ({fit.method}: first-level variances + between-subject variance tau^2 per voxel)",
        "Estimator": {
            "Name": "mixed",
            "Method": fit.method,
            "WithinSubjectVariance": "each subject's first-level variance map (stat-variance)",
            "BetweenSubjectVariance": "tau^2 estimated per voxel, one value pooled over all subjects "
                                      "and groups (no per-group variance), stat-tau2 map",
            "DegreesOfFreedomNote": MIXED_DOF_NOTE,
            "VoxelsNotConverged": int((~fit.converged).sum()),
        },
    }
    if permuted:
        info["PermutationNote"] = ("permutation inference (desc-*FWE maps) permutes the OLS t statistic, not "
                                   "the mixed-effects statistic")
    return info


def _write_tau2(group_dir: Path, model: PlannedModel, fit, mask, affine) -> Path:
    # through the format layer, as every group map (NIfTI, dscalar or a GIfTI pair)
    path = _write_map(group_dir / f"{_prefix(model)}_contrast-{model.name}_stat-tau2_statmap.nii.gz",
                      fit.tau2, mask, affine)
    atomic_write_json(sidecar_path(path), {
        "Description": _STAT_WORDS["tau2"] + f", {fit.method} estimate, >= 0",
        "Level": "group",
        "SubjectContrast": model.inputs[0].name,
        "Estimator": fit.method,
        "Participants": sorted({f"sub-{m.subject}" for m in model.inputs}),
        "DesignMatrix": f"{_design_name(model)}.tsv",
        "VoxelsNotConverged": int((~fit.converged).sum()),
    })
    return path


def _corrects_sphericity(model: PlannedModel, settings: GroupSettings) -> bool:
    return (model.kind == "anova" and settings.sphericity != "none"
            and any(con.is_f and np.linalg.matrix_rank(w) > 1 for con, w in model.contrasts))


def _subject_by_condition(Y: np.ndarray, model: PlannedModel) -> np.ndarray:
    """(S, K, V) the repeated-measures inputs arranged by subject and condition."""
    subjects = sorted({m.subject for m in model.inputs})
    conditions = sorted({m.label for m in model.inputs})
    data = np.empty((len(subjects), len(conditions), Y.shape[1]))
    for row, m in enumerate(model.inputs):
        data[subjects.index(m.subject), conditions.index(m.label)] = Y[row]
    return data


def _sphericity_info(settings: GroupSettings, k: int, dof: float) -> dict:
    method = SPHERICITY_NAMES[settings.sphericity]
    return {
        "Model": f"repeated-measures ANOVA (OLS), {method}-corrected F",
        "Assumptions": SPHERICITY_CORRECTED_NOTE.format(method=method),
        "SphericityCorrection": {
            "Method": method,
            "Epsilon": "per voxel, in the stat-epsilon map",
            "CorrectedDegreesOfFreedom": f"epsilon x [{k}, {dof:g}] per voxel (p and z maps use them)",
            "Note": "epsilon of the condition factor (all differences between conditions); for an F test "
                    "of fewer rows than conditions - 1 it is applied to that test's pooled error as an "
                    "approximation",
        },
    }


def _threshold_and_table(group_dir, base, z_volume, stat_volume, mask, affine, z_in_mask, stat, is_f,
                         settings, mni) -> tuple[int, float]:
    """``z_in_mask`` is the full-precision z (the height threshold is computed from it);
    ``z_volume`` holds it as written (float32), which is what gets thresholded."""
    th = settings.thresholding
    two_sided = th.two_sided and not is_f  # an F test has one tail
    threshold = height_threshold(z_in_mask, th.height_control, th.alpha, two_sided)
    if isinstance(affine, Geometry):
        return _surface_threshold_and_table(group_dir, base, z_volume, stat_volume, mask, affine, threshold,
                                            stat, two_sided, th, settings.atlases)
    kept = threshold_map(z_volume, mask, threshold, th.cluster_extent, two_sided, th.connectivity)
    info = {
        "Description": "z map thresholded at the height threshold and cluster extent below; 0 elsewhere",
        "HeightControl": th.height_control,
        "Alpha": th.alpha,
        "TwoSided": two_sided,
        "Threshold": threshold if np.isfinite(threshold) else None,
        "ThresholdStatistic": "z",
        "ClusterExtent": th.cluster_extent,
        "ClusterConnectivity": CONNECTIVITY_NAMES[th.connectivity],
        "VoxelsInMask": int(mask.sum()),
    }
    path = group_dir / f"{base}_stat-z_desc-thresholded_statmap.nii.gz"
    atomic_write_bytes(path, nifti_bytes(kept.astype(np.float32), affine))
    clusters = find_clusters(kept, affine, connectivity=th.connectivity)
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
    """Before anything is fitted: cluster options need a template mesh that ships offline and matches
    the data (fsaverage5 GIfTI pairs; CIFTI cortex on fsLR 32k); voxel-wise inference works anywhere."""
    space = maps[0].entities.get("space") if maps else None
    kind = space_kind(space)
    if kind == "volume":
        return
    if space == "fsnative":
        raise DataError("maps in fsnative space: vertex i is a different place in each subject's own mesh, so "
                        "vertices do not correspond across subjects and a vertex-wise group model is meaningless; "
                        "resample to a template space (fsaverage5, fsLR) and rerun", maps[0].effect)
    if settings.thresholding.connectivity != DEFAULT_CONNECTIVITY:
        raise UsageError(f"--connectivity {settings.thresholding.connectivity} applies to volumes: on --space "
                         f"{space} elements join along the template mesh's edges (CIFTI voxels by faces)")
    forming_p = settings.permutations.cluster_forming_p if settings.permutations is not None else None
    if forming_p is not None and forming_p != DEFAULT_CLUSTER_FORMING_P:
        reason = mesh_or_reason(read_map(maps[0].effect)[1])[1]
        if reason:
            raise UsageError(f"--cluster-forming-p {forming_p:g} on --space {space}: {reason} "
                             "(no cluster-size or cluster-mass inference uses it)")
    tfce = settings.permutations is not None and settings.permutations.tfce
    extent = settings.thresholding.cluster_extent > 1
    if not (tfce or extent):
        return
    option = "--tfce" if tfce else "--cluster-extent"
    if kind == "gifti" and space not in TEMPLATE_VERTICES:
        raise UsageError(f"{option} on --space {space}: cluster inference needs a template mesh, which ships "
                         f"offline for {', '.join(TEMPLATE_VERTICES)} only; use voxel-wise inference "
                         "(--cluster-extent 0, --permutations without --tfce)")
    _, geom = read_map(maps[0].effect)
    try:
        mesh = geometry_mesh(geom)
    except TemplateMeshError as exc:  # the data are not on the shipped template: bad data, exit 65
        raise TemplateMeshError(f"{option}: {exc.problem}", maps[0].effect) from exc
    if mesh is None:
        raise UsageError(f"{option} on --space {space}: {mesh_or_reason(geom)[1]}")


def _surface_permutation_args(grid, mask, settings) -> dict:
    """Surfaces: the element graph's neighbour table (cluster size/mass and TFCE on the template mesh),
    or a table without neighbours where no mesh applies (vertex-wise maxima only)."""
    if not isinstance(grid, Geometry):
        return {}
    mesh, _ = mesh_or_reason(grid)
    table = no_neighbours(mask) if mesh is None else restrict_to_mask(mesh, mask)
    return {"neighbours": table, "tfce_extent": SURFACE_TFCE_E}


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
                                 th, settings_atlases=()) -> tuple[int, float]:
    """Thresholded surface map; clusters and their table on a shipped template mesh only."""
    mesh, refusal = mesh_or_reason(geom)
    if th.cluster_extent > 1 and mesh is None:  # checked before fitting; kept as a guard
        raise UsageError(f"--cluster-extent: {refusal}")
    kept = threshold_elements(z_full, mask, threshold, th.cluster_extent, two_sided, mesh)
    path = _write_map(group_dir / f"{base}_stat-z_desc-thresholded_statmap.nii.gz", kept[mask], mask, geom)
    info = {
        "Description": "z map thresholded at the height threshold and cluster extent below; 0 elsewhere",
        "HeightControl": th.height_control, "Alpha": th.alpha, "TwoSided": two_sided,
        "Threshold": threshold if np.isfinite(threshold) else None, "ThresholdStatistic": "z",
        "ClusterExtent": th.cluster_extent,
        "ClusterConnectivity": mesh.name if mesh else "none",
        "VerticesInMask": int(mask.sum()),
    }
    if mesh is None:
        info["ClusterTable"] = refusal
        atomic_write_json(sidecar_path(path), info)
        return int((kept != 0).sum()), threshold
    label_fn = _surface_label_fn(settings_atlases, mesh)
    table = surface_clusters_table(kept, stat_full, stat, mesh, geom, label_fn=label_fn)
    info["NumberOfClusters"] = len(table)
    atomic_write_json(sidecar_path(path), info)
    table_path = group_dir / f"{base}_clusters.tsv"
    atomic_write_tsv(table_path, table)
    atomic_write_json(table_path.with_suffix(".json"), {
        **{k: info[k] for k in ("HeightControl", "Alpha", "TwoSided", "Threshold", "ClusterExtent",
                                "ClusterConnectivity")},
        "cluster_id": "Cluster number, largest |peak z| first",
        "hemisphere": "Hemisphere of the peak vertex (L, R)",
        "vertex": "Peak vertex index in its hemisphere's template mesh (-1: a subcortical voxel of CIFTI data)",
        "x": "Peak x (mm) on the template midthickness (voxels: the voxel centre); y and z likewise",
        "peak_z": "z at the peak", f"peak_{stat}": f"{stat} at the peak",
        "cluster_size_vertices": "Vertices in the cluster",
        "cluster_size_mm2": "Cluster area in mm^2 on the template midthickness (a third of each triangle "
                            "per vertex)",
        **_SURFACE_TABLE_WORDS,
        "Atlases": _surface_atlas_words(settings_atlases),
    })
    return len(table), threshold


_SURFACE_TABLE_WORDS = {
    "structure": "CIFTI structure of the peak (CORTEX_LEFT, CORTEX_RIGHT, subcortical structures)",
    "cluster_size_voxels": "CIFTI: subcortical voxels in the cluster (cluster_size_vertices counts vertices)",
}


def _surface_label_fn(atlases: list[str], mesh):
    return atlas_mod.surface_labeller(atlases) if (atlases and mesh is not None) else None


def _surface_atlas_words(atlases: list[str]):
    if not atlases:
        return "none"
    return {a: f"<atlas>_peak: region of the MNI volume atlas at the peak's template coordinate (an "
               f"approximation: fsLR midthickness coordinates are MNI152, fsaverage5's are fsaverage/MNI305); "
               f"where it has none, the nearest labelled atlas voxel within {atlas_mod.SURFACE_SEARCH_MM:g} mm "
               "(its distance given)" for a in atlases}


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
        why = (f"only {result.n_rearrangements} rearrangements exist (all used)" if result.exhaustive
               else f"only {options.n_permutations} permutations were requested")
        fix = "more subjects are needed" if result.exhaustive else "raise --permutations"
        log.warning("contrast-%s: %s, so the smallest FWE p-value is %.3g, not below --fwe-alpha %g: "
                    "nothing can be significant (%s)", con.label, why, smallest_p, settings.fwe_alpha, fix)
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
        "ClusterConnectivity": CONNECTIVITY_NAMES[options.connectivity],
        "FWEAlpha": settings.fwe_alpha,
        "Participants": sorted({f"sub-{m.subject}" for m in model.inputs}),
        "PermutedStatistic": ("OLS " + stat + " (the group estimator is mixed; its statistic is not permuted)"
                              if settings.estimator == "mixed" else "OLS " + stat),
    }
    p_maps = {"voxel": result.p_voxel, "clustersize": result.p_cluster_size,
              "clustermass": result.p_cluster_mass}
    mesh = None
    if isinstance(affine, Geometry):  # clusters on the template mesh's graph, where one ships and fits
        mesh, refusal = mesh_or_reason(affine)
        common["ClusterConnectivity"] = mesh.name if mesh else f"none ({refusal})"
        common["ClusterSize"] = "elements: template vertices (and subcortical voxels of CIFTI data)"
        if mesh is None:
            p_maps = {"voxel": result.p_voxel}
    if result.p_tfce is not None:
        p_maps["tfce"] = result.p_tfce
        # the height step actually used: 0.1, or a map's peak / TFCE_MAX_STEPS when larger (1-dof t maps)
        steps = {"dh": float(tfce_step(np.asarray(result.stat, dtype=np.float64), result.two_sided, TFCE_DH)),
                 "dhRule": f"{TFCE_DH:g}, or each map's largest |value| / {TFCE_MAX_STEPS} when that is larger "
                           "(each permuted map its own); dh is the observed map's"}
        tfce_info = {"TFCE": {"E": 0.5, "H": 2.0, **steps,
                              "Connectivity": TFCE_CONNECTIVITY_NAMES[options.connectivity]}}
        if isinstance(affine, Geometry):
            tfce_info = {"TFCE": {"E": SURFACE_TFCE_E, "H": 2.0, **steps, "Connectivity": mesh.name}}
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
            kept = np.where(unmask(significant, mask) > 0, z_volume, 0.0)
            table = None if mesh is None else surface_clusters_table(
                kept, stat_volume, stat, mesh, affine, p_volume, _surface_label_fn(settings.atlases, mesh))
            n_clusters = 0 if table is None else len(table)
        else:
            clusters = find_clusters(np.where(unmask(significant, mask) > 0, z_volume, 0.0), affine,
                                     connectivity=options.connectivity)
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
                    contrast_names=None, settings: GroupSettings | None = None, run_maps: bool = False,
                    participants_table: tuple | None = None) -> None:
    """Group models over the subject maps in ``inputs_dir`` (default OUTPUT_DIR), written to
    ``group_dir`` (default OUTPUT_DIR/group). A BIDS Stats Model's Dataset node passes its
    source node's folder, its own folder, the contrasts its edge lets through and its settings."""
    t_start = time.perf_counter()
    inputs_dir = inputs_dir or output_dir
    group_dir = group_dir or output_dir / "group"
    settings = settings or settings_from_args(args)
    run_rules = [parse_run_rule(r) for r in args.exclude_run or ()]
    maps = find_subject_maps(inputs_dir, args.space, args.task, args.participant_label, args.session_label,
                             run_maps=run_maps)
    if contrast_names is not None:
        maps = [m for m in maps if m.name in contrast_names or m.label in contrast_names]
    attach_run_records(inputs_dir, maps)
    check_same_model(maps)
    _check_surface_options(maps, settings)
    maps, exclusions = apply_exclusions(maps, args.exclude_participant_label, run_rules, args.exclude_fd_mean)
    left_out = {strip_prefix(s, "sub") for s in args.exclude_participant_label or ()}  # on purpose, listed
    by_contrast = {(e.participant[4:], e.contrast) for e in exclusions if e.contrast}
    if not maps:
        raise DataError("every subject was excluded; nothing left to model", inputs_dir)

    if settings.permutations is not None:
        import numba

        numba.set_num_threads(max(1, min(args.n_cpus, numba.config.NUMBA_NUM_THREADS)))
    participants = functools.cache(lambda: participants_table or read_participants(output_dir))  # if needed

    tasks = sorted({m.task for m in maps})
    plans = []
    for task in tasks:
        task_maps = [m for m in maps if m.task == task]
        expected = functools.partial(_expected_subjects, inputs_dir, task, args, left_out, by_contrast)
        plans.extend(plan_task(task, task_maps, settings, participants, expected))
    if settings.permutations is not None:
        _plan_permutations(plans)
    check_grids(inputs_dir, [m for plan in plans for m in plan.inputs])
    if settings.estimator == "mixed":
        for plan in plans:
            _check_mixed_inputs(plan)
    if not plans:
        raise DataError("no group model has enough subjects to be fitted", inputs_dir)
    check_planned_folders([group_dir])
    check_planned_names(group_dir / f"{_prefix(p)}_contrast-{con.label}_stat-logp_desc-clustermassFWE_statmap.nii.gz"
                        for p in plans for con, _ in p.contrasts)
    modelled = {m.subject for plan in plans for m in plan.inputs}  # after every exclusion (covariates too)
    log.info("group level: %d model(s) for task(s) %s, %d subject(s) modelled; exclusions: %d", len(plans),
             ", ".join(tasks), len(modelled), len(exclusions) + sum(len(p.excluded) for p in plans))
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
