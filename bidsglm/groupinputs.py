"""What the group level reads: the participant level's maps and records in OUTPUT_DIR.

Nothing here touches BIDS_DIR or the work directory: subject maps, run maps,
run records (``*_design.json``, which carry degrees of freedom and mean
framewise displacement) and the copied participants.tsv are all in OUTPUT_DIR.
Excluding a run recomputes that subject's fixed effects from its remaining
run maps.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .discovery import SpaceSpec, parse_bids_name, read_json, refuse_unknown_labels, strip_prefix
from .errors import DataError, UsageError
from .fixedeffects import DegenerateRunError, fixed_effects
from .outputs import OUTPUT_ENTITIES as _OUTPUT_KEYS
from .outputs import entity_prefix, func_dir, sidecar_path, statmap_path
from .surfaces import kind_of_path, map_path, read_map, same_grid

SPACE_KEYS = ("space", "res", "den")
# subject effect maps: volumes, CIFTI, and GIfTI pairs (found by their hemi-L file)
_EFFECT_PATTERNS = ("*_stat-effect_statmap.nii.gz", "*_stat-effect_statmap.dscalar.nii",
                    "*_hemi-L_*_stat-effect_statmap.shape.gii")


@dataclass
class RunRecord:
    """One run's ``_design.json``: entities (without space), dof, FD, contrasts."""

    path: Path
    entities: dict
    dof: float
    fd_mean: float | None
    contrasts: dict  # contrast name -> label
    model: dict = field(default_factory=dict)  # the run model's settings (HRF, drift, noise, smoothing)

    @property
    def run_label(self) -> str:
        return entity_prefix(self.entities)


@dataclass
class SubjectMap:
    """A subject-level contrast map written by the participant level."""

    entities: dict  # sub, ses, task, space, res, ...
    label: str  # contrast label in file names
    name: str  # contrast name (from the sidecar)
    effect: Path
    runs: list = field(default_factory=list)  # RunRecord of runs that were combined
    runs_kept: list | None = None  # None: all runs, use the subject map as written

    @property
    def subject(self) -> str:
        return self.entities["sub"]

    @property
    def task(self) -> str:
        return self.entities["task"]

    def space_entities(self) -> dict:
        return {k: self.entities[k] for k in SPACE_KEYS if k in self.entities}


def _space_text(entities: dict) -> str:
    return ":".join(f"{entities[k]}" if k == "space" else f"{k}-{entities[k]}" for k in SPACE_KEYS if k in entities)


def find_subject_maps(output_dir: Path, space: str | None = None, tasks=None, participants=None,
                      sessions=None, run_maps: bool = False) -> list[SubjectMap]:
    """Subject-level effect maps (no ``run-``) for the selected space, tasks and subjects;
    with ``run_maps``, run maps instead (a Stats Model's Dataset node fed by its Run node)."""
    if not (output_dir / "dataset_description.json").is_file():
        raise DataError("not a bidsglm output folder (no dataset_description.json); "
                        "run the participant level first", output_dir)
    wanted_subs = {strip_prefix(p, "sub") for p in participants} if participants else None
    wanted_ses = {strip_prefix(s, "ses") for s in sessions} if sessions else None
    wanted_tasks = {strip_prefix(t, "task") for t in tasks} if tasks else None
    written = []
    paths = sorted(p for pattern in _EFFECT_PATTERNS for p in output_dir.glob(f"sub-*/**/func/{pattern}"))
    for path in paths:
        parsed = parse_bids_name(path)
        if parsed is None or ("run" in parsed.entities) != run_maps or "contrast" not in parsed.entities:
            continue
        written.append((path, parsed))
    if not written:
        raise DataError("no subject-level maps found in OUTPUT_DIR; run the participant level first", output_dir)
    check_selection([parsed.entities for _, parsed in written], participants, sessions, tasks, output_dir)
    found = []
    for path, parsed in written:
        ent = {k: v for k, v in parsed.entities.items() if k not in ("contrast", "stat", "hemi")}
        if wanted_subs is not None and ent.get("sub") not in wanted_subs:
            continue
        if wanted_ses is not None and ent.get("ses") not in wanted_ses:
            continue
        if wanted_tasks is not None and ent.get("task") not in wanted_tasks:
            continue
        sidecar = read_json(sidecar_path(path))
        label = parsed.entities["contrast"]
        name = sidecar.get("Contrast", {}).get("Name", label)
        found.append(SubjectMap(ent, label, name, path))
    if not found:  # each label exists, not together
        raise DataError("no subject-level maps for the selected participants, sessions and tasks together",
                        output_dir)
    return _select_space(found, space, output_dir)


def check_selection(written: list[dict], participants, sessions, tasks, output_dir: Path) -> None:
    """A selection label that names nothing the participant level wrote is a typo (a usage
    error): one line naming it and listing what OUTPUT_DIR holds, as the participant level does."""
    for what, key, wanted in (("participant label(s)", "sub", participants),
                              ("session label(s)", "ses", sessions), ("task(s)", "task", tasks)):
        refuse_unknown_labels(what, key, wanted, sorted({e[key] for e in written if e.get(key)}), output_dir,
                              place=" in OUTPUT_DIR", holder="the participant level wrote maps for", shown=20)


def earlier_contrasts(output_dir: Path, entities: dict, contrasts: dict[str, str]) -> list[str]:
    """Names of the subject-level contrasts OUTPUT_DIR holds for these entities that are not in
    ``contrasts`` (name -> label, those of the latest participant-level run): an earlier run
    wrote them, and the group level models them too."""
    labels = set(contrasts.values())
    return [name for label, name in subject_contrasts(output_dir, entities).items()
            if label not in labels and name not in contrasts]


def subject_contrasts(output_dir: Path, entities: dict) -> dict[str, str]:
    """The subject-level contrasts OUTPUT_DIR holds for one subject, session and task (and space,
    where ``entities`` name one), whichever participant-level run wrote them: label -> name."""
    ignored = ("run", "echo", "hemi", "contrast", "stat", *(() if "space" in entities else SPACE_KEYS))
    wanted = {k: str(v) for k, v in entities.items() if k in _OUTPUT_KEYS and k not in ignored}
    found = {}
    for pattern in _EFFECT_PATTERNS:
        for path in sorted(func_dir(output_dir, entities).glob(pattern)):
            parsed = parse_bids_name(path)
            if parsed is None or "run" in parsed.entities or "contrast" not in parsed.entities or \
                    {k: v for k, v in parsed.entities.items() if k not in ignored} != wanted:
                continue
            label = parsed.entities["contrast"]
            try:
                contrast = read_json(sidecar_path(path)).get("Contrast")
            except DataError:  # an unreadable sidecar: the label names the contrast well enough here
                contrast = None
            found[label] = str(contrast.get("Name", label)) if isinstance(contrast, dict) else label
    return found


def _select_space(maps: list[SubjectMap], space: str | None, output_dir: Path) -> list[SubjectMap]:
    spaces = sorted({_space_text(m.entities) for m in maps})
    if space is None:
        if len(spaces) > 1:
            raise UsageError(f"OUTPUT_DIR holds maps in several spaces ({', '.join(spaces)}); "
                             "choose one with --space")
        return maps
    spec = SpaceSpec.parse(space)
    chosen = [m for m in maps if spec.matches(m.entities)]  # entities answer .get as a BidsFile does
    if not chosen:
        raise DataError(f"no subject-level maps in space '{space}' (found: {', '.join(spaces)})", output_dir)
    return chosen


def attach_run_records(output_dir: Path, maps: list[SubjectMap]) -> None:
    """Give each subject map the records of the runs it was combined from."""
    cache: dict[Path, list[RunRecord]] = {}
    for m in maps:
        folder = func_dir(output_dir, m.entities)
        if folder not in cache:
            cache[folder] = [_run_record(p) for p in sorted(folder.glob("*_run-*_design.json"))]
        prefix = {k: v for k, v in m.entities.items() if k not in SPACE_KEYS}
        m.runs = [r for r in cache[folder]
                  if all(r.entities.get(k) == v for k, v in prefix.items()) and m.name in r.contrasts]


def _run_record(path: Path) -> RunRecord:
    record = read_json(path)
    parsed = parse_bids_name(path)
    model = record.get("Model") if isinstance(record.get("Model"), dict) else {}
    return RunRecord(path, dict(parsed.entities), float(record.get("DegreesOfFreedom", 0.0)),
                     record.get("FramewiseDisplacementMean"), dict(record.get("Contrasts", {})), dict(model))


# --- one model for every input ---------------------------------------------------------

def _model_signature(m: SubjectMap) -> dict:
    """What makes maps of one contrast comparable across subjects: the contrast's weights and
    test (from the subject map's sidecar) and the run model's settings (from its runs' records)."""
    sidecar = read_json(sidecar_path(m.effect)) if sidecar_path(m.effect).is_file() else {}
    contrast = sidecar.get("Contrast") if isinstance(sidecar.get("Contrast"), dict) else {}
    signature = {"contrast weights": _nonzero(contrast.get("Weights")), "test": sidecar.get("Test")}
    for r in m.runs:
        for key, value in r.model.items():
            signature.setdefault(key, value)
            if signature[key] != value:
                raise DataError(f"contrast '{m.name}': this run was fitted with {key} {value!r}, another run of "
                                f"sub-{m.subject} with {signature[key]!r}; rerun the participant level for this "
                                "subject with one model", r.path)
    return {k: v for k, v in signature.items() if v is not None}


def _nonzero(weights):
    """Weights without the zero ones: runs may differ in nuisance columns (a condition absent
    from one run, other confounds) without the contrast meaning anything else."""
    if isinstance(weights, dict):
        return {k: v for k, v in weights.items() if v != 0} or None
    if isinstance(weights, list):
        return [_nonzero(w) for w in weights]
    return weights


def check_same_model(maps: list[SubjectMap]) -> None:
    """Maps combined in one group model must mean the same thing: a contrast defined with
    other weights, or runs fitted with other settings (smoothing, HRF, high-pass, noise model),
    for some subjects (a participant level rerun with other options for part of them) is
    refused, naming both, rather than averaged into a result no one asked for."""
    first: dict[tuple, tuple[SubjectMap, dict]] = {}
    for m in maps:
        key = (m.task, m.label, tuple(sorted(m.space_entities().items())))
        signature = _model_signature(m)
        if key not in first:
            first[key] = (m, signature)
            continue
        ref, ref_signature = first[key]
        differ = [k for k in sorted(set(signature) | set(ref_signature)) if signature.get(k) != ref_signature.get(k)]
        if differ:
            what = "; ".join(f"{k} {signature.get(k)!r} here, {ref_signature.get(k)!r} for sub-{ref.subject}"
                             for k in differ)
            raise DataError(f"contrast '{m.name}' of sub-{m.subject} was made with another model than "
                            f"sub-{ref.subject}'s ({what}); a group model combines maps of one model: rerun the "
                            "participant level for every subject with the same options", sidecar_path(m.effect))


# --- exclusions -------------------------------------------------------------------

_RUN_RULE = re.compile(r"^([A-Za-z]+-[A-Za-z0-9]+)(_[A-Za-z]+-[A-Za-z0-9]+)*$")


def parse_run_rule(text: str) -> dict:
    """``sub-01_run-2`` -> {'sub': '01', 'run': '2'}: runs matching every entity."""
    if not _RUN_RULE.match(text):
        raise UsageError(f"--exclude-run {text!r}: give BIDS entities such as sub-01_run-2 "
                         "or sub-01_ses-1_task-stroop_run-1")
    return dict(part.split("-", 1) for part in text.split("_"))


def _same_label(a: str, b: str) -> bool:
    """Run labels compare as numbers where both are (run-2 == run-02)."""
    return a == b or (a.isdigit() and b.isdigit() and int(a) == int(b))


def run_matches(entities: dict, rule: dict) -> bool:
    return all(k in entities and _same_label(entities[k], v) for k, v in rule.items())


@dataclass
class Exclusion:
    participant: str
    task: str
    run: str  # '' for a whole subject
    contrast: str  # '' for every contrast
    reason: str


def apply_exclusions(maps: list[SubjectMap], exclude_subjects=None, run_rules=(),
                     fd_cutoff: float | None = None) -> tuple[list[SubjectMap], list[Exclusion]]:
    """Drop excluded subjects; mark excluded runs, so their subject's fixed
    effects are recomputed from the runs that remain."""
    excluded_subs = {strip_prefix(s, "sub") for s in exclude_subjects or ()}
    _check_exclusions_match(maps, excluded_subs, run_rules)
    kept, notes, seen = [], [], set()
    for m in maps:
        if m.subject in excluded_subs:
            if (m.subject, m.task) not in seen:
                notes.append(Exclusion(f"sub-{m.subject}", m.task, "", "", "excluded by --exclude-participant-label"))
                seen.add((m.subject, m.task))
            continue
        if not run_rules and fd_cutoff is None:
            kept.append(m)
            continue
        remaining = []
        for r in m.runs:
            reason = _run_exclusion(r, run_rules, fd_cutoff)
            if reason:
                key = (r.run_label, reason)
                if key not in seen:
                    notes.append(Exclusion(f"sub-{m.subject}", m.task, r.run_label, "", reason))
                    seen.add(key)
            else:
                remaining.append(r)
        if len(remaining) == len(m.runs):
            kept.append(m)
        elif remaining:
            m.runs_kept = remaining
            kept.append(m)
        else:
            notes.append(Exclusion(f"sub-{m.subject}", m.task, "", m.label, "every run of this contrast excluded"))
    return kept, notes


def _check_exclusions_match(maps: list[SubjectMap], excluded_subs: set, run_rules) -> None:
    """An exclusion that matches nothing is a typo: refuse it rather than model a
    subject or run the user meant to leave out."""
    subjects = sorted({m.subject for m in maps})
    unknown = sorted(excluded_subs - set(subjects))
    if unknown:
        raise UsageError(f"--exclude-participant-label: no subject-level maps for "
                         f"{', '.join('sub-' + s for s in unknown)}; subjects found: "
                         f"{', '.join('sub-' + s for s in subjects)}")
    runs = [r.entities for m in maps for r in m.runs]
    for rule in run_rules:
        if not any(run_matches(entities, rule) for entities in runs):
            text = "_".join(f"{k}-{v}" for k, v in rule.items())
            raise UsageError(f"--exclude-run {text}: matches no run of the participant level's outputs")


def _run_exclusion(record: RunRecord, run_rules, fd_cutoff) -> str:
    for rule in run_rules:
        if run_matches(record.entities, rule):
            return "excluded by --exclude-run"
    if fd_cutoff is not None:
        if record.fd_mean is None:
            raise DataError("no FramewiseDisplacementMean in this run record (no framewise_displacement "
                            "column in its confounds, or written by an older bidsglm: rerun the "
                            "participant level)", record.path)
        if record.fd_mean > fd_cutoff:
            return f"mean framewise displacement {record.fd_mean:.4f} mm > {fd_cutoff:g} mm"
    return ""


# --- reading maps -------------------------------------------------------------------

def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Values and grid: a volume and its affine, or surface elements and their Geometry."""
    if kind_of_path(path) != "volume":
        return read_map(path)
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine
    except Exception as exc:  # noqa: BLE001 - any unreadable image is bad data
        raise DataError(f"cannot read image ({exc})", path) from exc


def subject_mask_path(output_dir: Path, entities: dict) -> Path:
    return map_path(func_dir(output_dir, entities) / f"{entity_prefix(entities)}_desc-brain_mask.nii.gz",
                    entities.get("space"))


def map_mask(output_dir: Path, m: SubjectMap) -> tuple[np.ndarray, np.ndarray]:
    """The voxels where this subject's (possibly recomputed) map is defined."""
    if m.runs_kept is None:
        paths = [subject_mask_path(output_dir, m.entities)]
    else:
        space = m.space_entities()
        paths = [subject_mask_path(output_dir, {**r.entities, **space}) for r in m.runs_kept]
    masks, affine = [], None
    for p in paths:
        if not p.is_file():
            raise DataError("brain mask written by the participant level is missing; rerun it", p)
        data, affine = read_volume(p)
        masks.append(data > 0)
    return np.logical_and.reduce(masks), affine


def _read_on_grid(path: Path, mask: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    """(V,) values of a 3D map in ``mask``; a map on another grid is bad data, named."""
    data, aff = read_volume(path)
    if data.shape[:3] != mask.shape or (data.ndim > 3 and data.shape[3:] != (1,) * (data.ndim - 3)):
        raise DataError(f"map has shape {data.shape}, its brain mask {mask.shape}: not on the grid of the "
                        "other maps (rerun the participant level, or leave this subject out)", path)
    if affine is not None and not same_grid(aff, affine):
        raise DataError("map's grid (affine or brain models) differs from its brain mask's: not on the grid "
                        "of the other maps", path)
    return data.reshape(mask.shape)[mask].astype(np.float64)


def read_effect(output_dir: Path, m: SubjectMap, mask: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """(V,) effect values in ``mask``: the subject map, or fixed effects over the runs kept."""
    if m.runs_kept is None:
        return _read_on_grid(m.effect, mask, affine)
    space = m.space_entities()
    effects, variances, paths = [], [], []
    for r in m.runs_kept:
        entities = {**r.entities, **space}
        label = r.contrasts[m.name]
        paths.append({s: statmap_path(output_dir, entities, label, s) for s in ("effect", "variance")})
        effects.append(_read_on_grid(paths[-1]["effect"], mask, affine))
        variances.append(_read_on_grid(paths[-1]["variance"], mask, affine))
    try:
        return fixed_effects(np.array(effects), np.array(variances), [r.dof for r in m.runs_kept]).effect
    except DegenerateRunError as exc:
        raise DataError(exc.problem, paths[exc.row]["variance" if "variance" in exc.problem else "effect"]) from exc


def _grid(path: Path) -> tuple[tuple, np.ndarray]:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable image is bad data
        raise DataError(f"cannot read image ({exc})", path) from exc
    return tuple(img.shape), img.affine


def check_grids(output_dir: Path, maps: list[SubjectMap]) -> None:
    """Before anything is written: every map an input reads is on one grid, its brain
    mask's, the same for every input (headers only)."""
    reference = None
    for m in maps:
        if kind_of_path(m.effect) != "volume":  # surfaces: their geometry is checked as maps are read
            continue
        if m.runs_kept is None:
            pairs = [(subject_mask_path(output_dir, m.entities), [m.effect])]
        else:
            space = m.space_entities()
            pairs = [(subject_mask_path(output_dir, {**r.entities, **space}),
                      [statmap_path(output_dir, {**r.entities, **space}, r.contrasts[m.name], s)
                       for s in ("effect", "variance")]) for r in m.runs_kept]
        for mask_path, paths in pairs:
            if not mask_path.is_file():
                raise DataError("brain mask written by the participant level is missing; rerun it", mask_path)
            grid = _grid(mask_path)
            reference = reference or (grid, mask_path)
            for path in [mask_path, *paths]:
                shape, affine = _grid(path) if path != mask_path else grid
                ref_shape, ref_affine = reference[0]
                if shape[:3] != ref_shape[:3] or any(n != 1 for n in shape[3:]) or \
                        not np.allclose(affine, ref_affine, atol=1e-4):
                    raise DataError(f"map is on another grid (shape {shape}) than {reference[1].name} "
                                    f"(shape {ref_shape}): group models need every map on one grid", path)


def expected_subjects(output_dir: Path, task: str, label: str, participants=None, sessions=None) -> set[str]:
    """Subjects whose run records (``*_design.json``) say a run of ``task`` estimated the
    contrast labelled ``label``: each should have a subject-level map for it."""
    wanted_subs = {strip_prefix(p, "sub") for p in participants} if participants else None
    wanted_ses = {strip_prefix(s, "ses") for s in sessions} if sessions else None
    found = set()
    for path in output_dir.glob(f"sub-*/**/func/*_task-{task}_*run-*_design.json"):
        parsed = parse_bids_name(path)
        if parsed is None or parsed.entities.get("task") != task:
            continue
        sub, ses = parsed.entities.get("sub"), parsed.entities.get("ses")
        if (wanted_subs is not None and sub not in wanted_subs) or (wanted_ses is not None and ses not in wanted_ses):
            continue
        try:
            contrasts = read_json(path).get("Contrasts", {})
        except DataError:
            continue  # an unreadable record: its subject's maps speak for themselves
        if label in contrasts.values():
            found.add(sub)
    return found


def check_rectangular(path: Path) -> None:
    """Every line has as many tab-separated fields as the header (pandas pads short
    lines with n/a without a word), and no column name is repeated."""
    from .design import check_unique_header

    check_unique_header(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read as a UTF-8 text table ({exc})", path) from exc
    if not lines:
        raise DataError("file is empty", path)
    width = len(lines[0].split("\t"))
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = len(line.split("\t"))
        if fields != width:
            raise DataError(f"{fields} tab-separated field(s), the header has {width}", path,
                            where=f"line {number}")


def variance_path(m: SubjectMap) -> Path:
    """The first-level variance map written beside a subject effect map."""
    return m.effect.with_name(m.effect.name.replace("_stat-effect_", "_stat-variance_"))


def read_variance(output_dir: Path, m: SubjectMap, mask: np.ndarray) -> np.ndarray:
    """(V,) variance of the subject effect in ``mask`` (the mixed-effects model's v_i): the
    subject's variance map, or the fixed-effects variance over the runs kept."""
    if m.runs_kept is None:
        path = variance_path(m)
        if not path.is_file():
            raise DataError("variance map of this subject-level effect is missing (the mixed-effects "
                            "group model needs it); rerun the participant level", path)
        return read_volume(path)[0][mask].astype(np.float64)
    space = m.space_entities()
    variances = np.array([read_volume(statmap_path(output_dir, {**r.entities, **space}, r.contrasts[m.name],
                                                   "variance"))[0][mask] for r in m.runs_kept])
    # the variance of the fixed-effects combination does not depend on the effects
    return fixed_effects(np.zeros_like(variances), variances, [r.dof for r in m.runs_kept]).variance


def read_participants(output_dir: Path) -> tuple[pd.DataFrame, Path]:
    """participants.tsv as copied by the participant level, indexed by label without 'sub-'."""
    path = output_dir / "participants.tsv"
    if not path.is_file():
        raise DataError("participants.tsv is missing from OUTPUT_DIR (the participant level copies it "
                        "from BIDS_DIR); rerun the participant level", output_dir)
    check_rectangular(path)
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False,
                            quoting=csv.QUOTE_NONE)  # BIDS tables have no quoting
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse as a tab-separated table ({exc})", path) from exc
    if "participant_id" not in table.columns:
        raise DataError("no participant_id column", path)
    ids = table["participant_id"]
    if ids.isna().any() or ids.duplicated().any():
        row = int(np.flatnonzero((ids.isna() | ids.duplicated()).to_numpy())[0])
        what = "n/a" if pd.isna(ids.iloc[row]) else f"{ids.iloc[row]} repeated"
        raise DataError(f"participant_id is {what}", path, where=f"line {row + 2}")
    table.index = [strip_prefix(str(p), "sub") for p in table["participant_id"]]
    return table, path
