"""Find the inputs of each run: fMRIPrep's preprocessed BOLD, brain mask and
confounds in a derivatives folder, and the events and sidecars in the raw
dataset.

File names are parsed with a small BIDS entity parser rather than by indexing
the whole dataset with pybids: discovery then costs one directory walk, and
the rules for which file belongs to which run are explicit here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, UsageError
from .surfaces import space_kind

SURFACE_EXT = {"cifti": ".dtseries.nii", "gifti": ".func.gii"}

# Entities that identify one acquisition (one run); order is BIDS order.
RUN_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo")
NATIVE_SPACE = "native"
_NIFTI_EXT = (".nii.gz", ".nii")
_SURFACE_BOLD = ("_bold.dtseries.nii", "_bold.func.gii")  # fMRIPrep's surface outputs (no desc-)


@dataclass(frozen=True)
class BidsFile:
    """A file whose name follows the BIDS ``key-value_..._suffix.ext`` pattern."""

    path: Path
    entities: dict
    suffix: str
    extension: str

    def get(self, key, default=None):
        return self.entities.get(key, default)


def parse_bids_name(path: str | Path) -> BidsFile | None:
    """Split a BIDS file name into entities, suffix and extension, or None."""
    path = Path(path)
    name = path.name
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    if len(parts) < 2 and "-" in stem:
        return None
    entities = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep or not key or not value:
            return None
        entities[key] = value
    suffix = parts[-1]
    if "-" in suffix:
        return None
    return BidsFile(path, entities, suffix, dot + ext)


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` and ``01`` both mean participant ``01``."""
    return label[len(prefix) + 1 :] if label.startswith(prefix + "-") else label


@dataclass(frozen=True)
class SpaceSpec:
    """A requested output space: ``MNI152NLin2009cAsym``, ``X:res-2``, ``native``."""

    name: str
    res: str | None = None
    den: str | None = None  # surface density (fsLR:den-91k)

    @classmethod
    def parse(cls, text: str) -> "SpaceSpec":
        name, _, rest = text.partition(":")
        res = den = None
        if rest:
            key, _, value = rest.partition("-")
            if key not in ("res", "den") or not value or (key == "den" and space_kind(name) == "volume"):
                raise UsageError(f"--space {text!r}: expected SPACE, SPACE:res-N or (surfaces) SPACE:den-N")
            res, den = (value, None) if key == "res" else (None, value)
        if not re.fullmatch(r"[A-Za-z0-9]+", name):
            raise UsageError(f"--space {text!r}: a space label is alphanumeric")
        return cls(name, res, den)

    @property
    def is_native(self) -> bool:
        return self.name == NATIVE_SPACE

    def matches(self, f: BidsFile) -> bool:
        if self.is_native:
            # fMRIPrep writes BOLD-space outputs without space- (newer: space-run for masks)
            return f.get("space") in (None, "run")
        if f.get("space") != self.name:
            return False
        return (self.res is None or f.get("res") == self.res) and (self.den is None or f.get("den") == self.den)

    def __str__(self) -> str:
        return self.name + (f":res-{self.res}" if self.res else "") + (f":den-{self.den}" if self.den else "")


@dataclass
class RunInputs:
    """Everything needed to model one run. Paths are absolute."""

    entities: dict  # sub, ses, task, acq, run, ... (+ space, res, den for outputs)
    bold: Path  # surfaces: the CIFTI dtseries, or a GIfTI pair's hemi-L file
    mask: Path  # surfaces have no mask file: the dtseries itself, or the pair's hemi-R file
    confounds: Path
    events: Path
    bold_sidecar: dict = field(default_factory=dict)
    bold_sidecar_files: list = field(default_factory=list)

    @property
    def subject(self) -> str:
        return self.entities["sub"]

    @property
    def task(self) -> str:
        return self.entities["task"]

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``sub-01 ses-1 task-flanker run-1``."""
        return " ".join(
            f"{k}-{self.entities[k]}" for k in RUN_ENTITIES if k in self.entities
        )


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path) from exc
    except RecursionError as exc:
        raise DataError("invalid JSON (nested too deeply)", path) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from exc
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror})", path) from exc
    if not isinstance(data, dict):
        raise DataError("expected a JSON object", path)
    return data


def check_dataset(bids_dir: Path) -> dict:
    """Return the dataset description, or fail if this is not a BIDS dataset."""
    if not bids_dir.is_dir():
        raise DataError("BIDS_DIR does not exist or is not a directory", bids_dir)
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise DataError("missing dataset_description.json: this is not a BIDS dataset", desc)
    return read_json(desc)


def check_raw_dataset(bids_dir: Path, description: dict) -> None:
    """BIDS_DIR is the raw dataset: a derivatives dataset there (fMRIPrep's output folder, say)
    fails validation and has no events; say so before anything else (a usage error)."""
    generated = description.get("GeneratedBy")
    names = [str(g.get("Name", "")) for g in generated if isinstance(g, dict)] if isinstance(generated, list) else []
    if description.get("DatasetType") == "derivative" or any("fmriprep" in n.lower() for n in names):
        name = description.get("Name") or next((n for n in names if n), None) or bids_dir.name
        raise UsageError(f"BIDS_DIR is a derivatives dataset ({name}): give the raw dataset as BIDS_DIR "
                         "(its fMRIPrep outputs are found under BIDS_DIR/derivatives/, or give them with "
                         "--derivatives)", bids_dir)


def check_selection(bids_dir: Path, participants=None, sessions=None, tasks=None) -> None:
    """Before validation and discovery (cheap: folder and file names of the raw dataset only):
    a participant, session or task label that BIDS_DIR does not hold is a usage error, one line
    listing what it holds."""
    subjects = list_subjects(bids_dir)
    refuse_unknown_labels("participant label(s)", "sub", participants, subjects, bids_dir)
    if sessions:
        refuse_unknown_labels("session label(s)", "ses", sessions, sorted(
            {p.name[4:] for s in subjects for p in (bids_dir / f"sub-{s}").glob("ses-*") if p.is_dir()}), bids_dir)
    if tasks:
        names = [p.name for p in bids_dir.glob("task-*")]
        names += [p.name for s in subjects for p in (bids_dir / f"sub-{s}").glob("**/func/*task-*")]
        refuse_unknown_labels("task(s)", "task", tasks, sorted(
            {f.get("task") for f in map(parse_bids_name, names) if f and f.get("task")}), bids_dir)


def refuse_unknown_labels(what: str, key: str, wanted, present: list[str], where: Path,
                          place: str = "", holder: str = "dataset has", shown: int = 10) -> None:
    """UsageError naming the labels of ``wanted`` (with or without their ``key-`` prefix) that
    are not in ``present``, and listing ``present`` (its first ``shown``): every selection option
    (-t, --participant-label, --session-label) at both levels says it this way."""
    unknown = [w for w in dict.fromkeys(strip_prefix(w, key) for w in wanted or ()) if w not in present]
    if unknown:
        prefix = "" if key == "task" else f"{key}-"
        raise UsageError(f"{what} not found{place}: {', '.join(prefix + u for u in unknown)} ({holder} "
                         f"{len(present)}: {', '.join(present[:shown]) or 'none'}"
                         f"{' ...' if len(present) > shown else ''})", where)


def check_output_dir(bids_dir: Path, output_dir: Path, level: str = "participant",
                     derivatives=()) -> None:
    """Before any work: BIDS_DIR exists (participant level), OUTPUT_DIR is neither inside
    nor holding an input dataset (symbolic links resolved), is a folder if it exists and
    holds no other tool's dataset. Writability is checked when the output session opens."""
    from .errors import OutputError
    from .outputs import OutputSession, check_owner

    if level == "participant" and not bids_dir.is_dir():
        raise UsageError("BIDS_DIR does not exist or is not a folder", bids_dir)
    if level == "participant" and derivatives:
        check_derivatives_option(derivatives)
    OutputSession(output_dir, [bids_dir, *derivatives])  # raises if the folders overlap
    if os.path.lexists(output_dir) and not output_dir.is_dir():
        raise OutputError("OUTPUT_DIR exists and is not a folder; choose a folder", output_dir)
    if level == "participant" and output_dir.is_dir():  # the group level reads (and checks) it
        check_owner(output_dir)


def input_datasets(bids_dir: Path, requested=None) -> list[Path]:
    """Folders never to be written to, known before any work: BIDS_DIR, the --derivatives
    folders, and each folder in BIDS_DIR/derivatives (a link there may lead elsewhere)."""
    folders = [bids_dir, *(Path(d).absolute() for d in requested or ())]
    deriv_root = bids_dir / "derivatives"
    try:
        folders += sorted(p for p in deriv_root.iterdir() if p.is_dir())
    except OSError:  # no derivatives folder (or not readable: found later, with a message)
        pass
    return folders


def check_derivatives_option(requested) -> None:
    """--derivatives folders exist and are datasets: only a dataset is searched, never a
    whole file system (``--derivatives /``)."""
    for root in requested:
        if not root.is_dir():
            raise UsageError("--derivatives: folder does not exist", root)
        if not (root / "dataset_description.json").is_file():
            raise UsageError("--derivatives: not a derivatives dataset (no dataset_description.json); "
                             "give fMRIPrep's output folder, e.g. BIDS_DIR/derivatives/fmriprep", root)


def _walk_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _holds_preproc_bold(root: Path) -> bool:
    for path in _walk_files(root):
        if "_desc-preproc_bold.nii" in path.name or path.name.endswith(_SURFACE_BOLD):
            return True
    return False


def find_derivatives(bids_dir: Path, requested: list[Path] | None) -> list[Path]:
    """Folders holding fMRIPrep outputs: the ones given, or those found under
    ``BIDS_DIR/derivatives`` that are derivative datasets with preprocessed BOLD."""
    if requested:
        check_derivatives_option(requested)
        return [Path(r) for r in requested]
    found = []
    deriv_root = bids_dir / "derivatives"
    if deriv_root.is_dir():
        for cand in sorted(p for p in deriv_root.iterdir() if p.is_dir()):
            desc = cand / "dataset_description.json"
            if not desc.is_file():
                continue
            if read_json(desc).get("DatasetType") != "derivative":
                continue
            if _holds_preproc_bold(cand):
                found.append(cand)
    if not found:
        raise DataError(
            "no fMRIPrep derivatives found (a folder with a dataset_description.json of "
            "DatasetType 'derivative' holding *_desc-preproc_bold.nii.gz); use --derivatives",
            deriv_root,
        )
    return found


def _index(root: Path) -> list[BidsFile]:
    files = []
    for path in _walk_files(root):
        if path.name.startswith(("sub-", "task-", "ses-")):
            f = parse_bids_name(path)
            if f is not None:
                files.append(f)
    return files


def list_subjects(bids_dir: Path) -> list[str]:
    return sorted(
        p.name[4:] for p in bids_dir.iterdir() if p.is_dir() and p.name.startswith("sub-")
    )


def _run_key(f: BidsFile) -> tuple:
    return tuple(f.get(k) for k in RUN_ENTITIES)


def _same_run(f: BidsFile, key: tuple, ignore=()) -> bool:
    return all(f.get(k) == v for k, v in zip(RUN_ENTITIES, key) if k not in ignore)


def _applies_to(sidecar: BidsFile, target: BidsFile) -> bool:
    """BIDS inheritance: a sidecar applies when its entities are a subset."""
    return all(target.get(k) == v for k, v in sidecar.entities.items())


def inherited_files(raw_files: list[BidsFile], target: BidsFile, suffix: str, ext: str):
    """Files of ``suffix``/``ext`` that apply to ``target``, least specific first."""
    hits = [
        f for f in raw_files
        if f.suffix == suffix and f.extension == ext and _applies_to(f, target)
    ]
    return sorted(hits, key=lambda f: (len(f.entities), len(f.path.parts)))


def _pick_one(cands: list[BidsFile], what: str, bold: Path) -> Path:
    if not cands:
        raise DataError(f"no {what} found for this BOLD run", bold)
    if len(cands) > 1:
        names = ", ".join(c.path.name for c in cands)
        raise DataError(f"several {what} files match this BOLD run: {names}", bold)
    return cands[0].path


def discover_runs(
    bids_dir: Path,
    derivatives: list[Path],
    space: SpaceSpec,
    participants: list[str] | None = None,
    sessions: list[str] | None = None,
    tasks: list[str] | None = None,
) -> list[RunInputs]:
    """Match every preprocessed BOLD run of the requested space to its mask,
    confounds, events and sidecar. Raises DataError naming what is missing."""
    all_subjects = list_subjects(bids_dir)
    if participants:
        refuse_unknown_labels("participant label(s)", "sub", participants, all_subjects, bids_dir)
        wanted = [strip_prefix(p, "sub") for p in participants]
    else:
        wanted = all_subjects
    wanted_ses = [strip_prefix(s, "ses") for s in sessions] if sessions else None
    wanted_tasks = [strip_prefix(t, "task") for t in tasks] if tasks else None

    raw_files = [f for f in _index(bids_dir) if "derivatives" not in f.path.relative_to(bids_dir).parts]
    deriv_files = [f for root in derivatives for f in _index(root)]
    if wanted_tasks:  # a mistyped task: say which tasks exist, as for participant labels
        all_tasks = sorted({f.get("task") for f in raw_files + deriv_files if f.get("task")})
        refuse_unknown_labels("task(s)", "task", wanted_tasks, all_tasks, bids_dir, shown=len(all_tasks))

    def selected(f: BidsFile) -> bool:
        return (
            f.get("sub") in wanted
            and (wanted_ses is None or f.get("ses") in wanted_ses)
            and (wanted_tasks is None or f.get("task") in wanted_tasks)
        )

    bolds_any_space = [
        f for f in deriv_files
        if f.suffix == "bold" and f.get("desc") == "preproc" and f.extension in _NIFTI_EXT
        and selected(f)
    ]
    bolds = [f for f in bolds_any_space if space.matches(f) and f.get("space") != "run"]
    kind = space_kind(space.name)
    if kind != "volume":
        surface_bolds = [f for f in deriv_files if f.suffix == "bold" and f.get("desc") in (None, "preproc")
                         and f.extension == SURFACE_EXT[kind] and selected(f) and space.matches(f)]
        bolds_any_space = bolds_any_space + surface_bolds
        bolds = surface_bolds
    if not bolds:
        spaces = sorted({f.get("space") or NATIVE_SPACE for f in bolds_any_space})
        where = ", ".join(str(d) for d in derivatives)
        hint = f"; spaces present: {', '.join(spaces)}" if spaces else ""
        task_hint = f" for task(s) {', '.join(wanted_tasks)}" if wanted_tasks else ""
        raise DataError(
            f"no preprocessed BOLD ({_bold_pattern(kind)}) in space '{space}'"
            f"{task_hint} for the selected participants{hint}",
            where,
        )

    by_run: dict[tuple, list[BidsFile]] = {}
    for f in bolds:
        by_run.setdefault(_run_key(f), []).append(f)

    runs = []
    for key, cands in sorted(by_run.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        if kind == "gifti":  # the two hemispheres of a run are fitted together
            runs.append(_match_run(_hemisphere_pair(cands, space), key, space, deriv_files, raw_files,
                                   bids_dir, mask=_hemisphere_pair(cands, space, "R").path))
            continue
        if len(cands) > 1:
            _refuse_copies_in_datasets(cands, derivatives)
            names = ", ".join(c.path.name for c in cands)
            raise DataError(
                f"several preprocessed BOLD files match space '{space}' ({names}); "
                "choose one with --space SPACE:res-N",
                cands[0].path.parent,
            )
        bold = cands[0]
        runs.append(_match_run(bold, key, space, deriv_files, raw_files, bids_dir))
    return runs


def _refuse_copies_in_datasets(cands: list[BidsFile], derivatives: list[Path]) -> None:
    """The same run preprocessed in two derivatives datasets (two fMRIPrep versions,
    say): the fix is choosing a dataset, not a resolution."""
    roots = sorted({str(root) for root in derivatives for c in cands if c.path.is_relative_to(root)})
    if len(roots) > 1:
        raise DataError(f"this run is preprocessed in {len(roots)} derivatives datasets ({', '.join(roots)}); "
                        "choose one with --derivatives FOLDER", cands[0].path)


def _bold_pattern(kind: str) -> str:
    return {"cifti": "*_bold.dtseries.nii", "gifti": "*_hemi-L|R_*_bold.func.gii"}.get(
        kind, "*_desc-preproc_bold.nii[.gz]")


def _hemisphere_pair(cands: list[BidsFile], space: SpaceSpec, hemi: str = "L") -> BidsFile:
    """The hemi-L (or hemi-R) file of a run's GIfTI pair; a missing or doubled hemisphere is refused."""
    found = [c for c in cands if c.get("hemi") == hemi]
    if len(found) != 1:
        names = ", ".join(c.path.name for c in cands)
        raise DataError(f"expected one hemi-L and one hemi-R GIfTI in space '{space}' for this run, "
                        f"found {len(found)} hemi-{hemi} ({names})", cands[0].path)
    return found[0]


def _match_run(bold, key, space, deriv_files, raw_files, bids_dir, mask: Path | None = None) -> RunInputs:
    same_dir = [f for f in deriv_files if f.path.parent == bold.path.parent]
    if mask is None and space_kind(space.name) == "cifti":
        mask = bold.path  # a dtseries holds only its brain models' grayordinates
    masks = [
        f for f in same_dir
        if f.suffix == "mask" and f.get("desc") == "brain" and f.extension in _NIFTI_EXT
        and _same_run(f, key) and space.matches(f)
        and (f.get("res") == bold.get("res"))
    ]
    if space.is_native and len(masks) > 1:
        # both spellings present: prefer the one without space-
        masks = [m for m in masks if m.get("space") is None] or masks
    if mask is None:
        mask = _pick_one(masks, "brain mask (*_desc-brain_mask.nii.gz)", bold.path)

    confounds = [
        f for f in same_dir
        if f.get("desc") == "confounds" and f.suffix in ("timeseries", "regressors")
        and f.extension == ".tsv" and _same_run(f, key)
    ]
    confounds_path = _pick_one(confounds, "confounds (*_desc-confounds_timeseries.tsv)", bold.path)

    # events live in the raw dataset; they may be inherited from a higher level
    target = BidsFile(bold.path, {k: v for k, v in zip(RUN_ENTITIES, key) if v is not None}, "bold", ".nii.gz")
    events = [
        f for f in inherited_files(raw_files, target, "events", ".tsv")
    ]
    if not events:
        raise DataError(
            "no events.tsv found in BIDS_DIR for this run "
            f"(expected {bold.path.name.split('_space-')[0].split('_desc-')[0]}_events.tsv)",
            bold.path,
        )
    events_path = events[-1].path  # most specific wins

    sidecar, sidecar_files = {}, []
    for f in inherited_files(raw_files, target, "bold", ".json"):
        sidecar.update(read_json(f.path))
        sidecar_files.append(f.path)
    deriv_json = bold.path.with_name(bold.path.name.split(".")[0] + ".json")
    if not deriv_json.is_file() and bold.get("hemi"):  # a pair's sidecar may leave hemi- out
        deriv_json = deriv_json.with_name(deriv_json.name.replace(f"_hemi-{bold.get('hemi')}", ""))
    if deriv_json.is_file():
        sidecar.update(read_json(deriv_json))
        sidecar_files.append(deriv_json)

    entities = {k: v for k, v in zip(RUN_ENTITIES, key) if v is not None}
    if not space.is_native:
        entities["space"] = bold.get("space")
        if bold.get("res"):
            entities["res"] = bold.get("res")
        if bold.get("den"):
            entities["den"] = bold.get("den")
    return RunInputs(
        entities=entities,
        bold=bold.path.resolve(),
        mask=mask.resolve(),
        confounds=confounds_path.resolve(),
        events=events_path.resolve(),
        bold_sidecar=sidecar,
        bold_sidecar_files=sidecar_files,
    )
