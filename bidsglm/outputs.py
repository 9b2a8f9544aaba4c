"""The BIDS derivatives dataset bidsglm writes: names, sidecars, atomic writes.

Every file is written to a hidden temporary file and then renamed into place,
so a reader (or a rerun after a crash) never sees a truncated file under a
final name, and concurrent jobs writing the same file (cluster array jobs
sharing OUTPUT_DIR) each replace it whole. Renaming replaces a symbolic link
at the final name; it never writes through it.

While an ``OutputSession`` is active (one per level and invocation, opened by
the CLI), ``atomic_write_bytes`` - the one write primitive - also

- refuses any path that does not resolve (symbolic links of every parent
  followed) inside OUTPUT_DIR, or that resolves into an input dataset;
- journals what it does, so that a failed or interrupted invocation is rolled
  back: files it created are removed, files it replaced get their earlier
  content back, folders it created are removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from . import __url__, __version__
from .container import generated_by_container
from .errors import OutputError, UsageError
from .surfaces import map_path

BIDS_VERSION = "1.10.0"
OUTPUT_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "hemi", "space", "res", "den")
STATS_T = ("effect", "variance", "t", "z", "p")
STATS_F = ("F", "z", "p")

# BIDS 1.10 defines no contrast/stat entities or statmap suffix yet. Only what the schema cannot
# describe is hidden from the validator, so it checks the rest: dataset_description.json, README.md,
# and the brain masks (sub-*/func/*_desc-brain_mask.nii.gz) with their sidecars.
BIDSIGNORE = """\
# Written by bidsglm: what the BIDS schema cannot describe yet. Everything else
# (dataset_description.json, README.md, the brain masks sub-*/func/*_mask.nii.gz
# and their sidecars) is left to the validator.
# Statistical maps and design matrices: contrast-, stat- entities, _statmap and _design suffixes.
*_statmap.nii.gz
*_statmap.dscalar.nii
*_statmap.shape.gii
*_statmap.json
*_design.tsv
*_design.json
# HTML reports (sub-<label>.html), the mean BOLD image of BOLD-space runs that they draw
# maps over (a 3D _boldref in BOLD space is not in the schema), and run logs
# surface and grayordinate masks: not in the schema either
*_mask.dscalar.nii
*_mask.shape.gii
*.html
*_boldref.nii.gz
logs
# Group level and BIDS Stats Model nodes: files without a subject (group/, node-<Name>/).
# Folders are named without a trailing slash: the validator ignores "group" but not "group/".
group
node-*
# a copy of the raw dataset's table for the group level's covariates; it lists every
# participant, also those not (yet) analysed here
participants.tsv
participants.json
"""


OUTPUT_README = """\
# bidsglm results

Statistical maps from task-fMRI GLMs, written by bidsglm.

- `sub-<s>/func/*_run-<r>_*_contrast-<c>_stat-<stat>_statmap.nii.gz`: one run's GLM
  (stat: effect, variance, t, z, p); `*_run-<r>_design.tsv` is its design matrix and
  `*_run-<r>_design.json` the model, dropped contrasts and provenance.
- The same names without `run-`: precision-weighted fixed effects across the subject's runs.
- `group/`: second-level maps, thresholded maps and cluster tables (`bidsglm ... group`).
- `participants.tsv`: a copy of the raw dataset's table, read by the group level for covariates.
- `node-<Name>/`: the outputs of one node of a BIDS Stats Model (`--model`), each a dataset of its own.
- Every map has a JSON sidecar with the contrast weights, test, degrees of freedom,
  noise model, smoothing and input files.

Effects are in percent signal change; p-values are one-sided (upper tail) and z-scores
are derived from them.
"""


def entity_prefix(entities: dict, drop=()) -> str:
    return "_".join(
        f"{k}-{entities[k]}" for k in OUTPUT_ENTITIES if k in entities and k not in drop
    )


def func_dir(output_dir: Path, entities: dict) -> Path:
    folder = output_dir / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    return folder / "func"


def statmap_path(output_dir: Path, entities: dict, contrast_label: str, stat: str) -> Path:
    name = f"{entity_prefix(entities)}_contrast-{contrast_label}_stat-{stat}_statmap.nii.gz"
    return map_path(func_dir(output_dir, entities) / name, entities.get("space"))  # surfaces: .dscalar.nii ...


def sidecar_path(path: Path) -> Path:
    """A GIfTI pair's sidecar leaves hemi- out: by BIDS inheritance it describes both files."""
    stem = path.name.split(".")[0]
    if path.name.endswith(".gii"):
        stem = stem.replace("_hemi-L_", "_").replace("_hemi-R_", "_")
    return path.with_name(stem + ".json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (the one write primitive).

    Any OSError (not writable, disk full, name too long, read-only file system)
    becomes an OutputError naming the path."""
    shown = path = Path(path)
    session = _active_session
    if session is not None:
        path = session.check(path)  # the real path: every parent's symbolic links resolved
    try:
        if session is not None:
            session.make_folders(path.parent)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temporary(path, data, session.tmp_dir if session is not None else path.parent)
        try:
            if session is not None:
                session.before_replace(path)
            try:
                _replace(tmp, path)
            except FileNotFoundError:  # an empty folder just removed by another job's rollback
                path.parent.mkdir(parents=True, exist_ok=True)
                _replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    except OSError as exc:
        raise OutputError(f"cannot write ({describe_os_error(exc, hint=True)})", shown) from exc


def _write_temporary(path: Path, data: bytes, folder: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".bidsglm-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _replace(tmp: str, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # the final folder is on another file system than the session's: stage beside it
        data = Path(tmp).read_bytes()
        _unlink_quietly(tmp)
        local = _write_temporary(path, data, path.parent)
        try:
            os.replace(local, path)
        except BaseException:
            _unlink_quietly(local)
            raise


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def describe_os_error(exc: OSError, hint: bool = False) -> str:
    """A short reason for an OSError, in words a user can act on (``hint``: how to get
    a writable folder, where permissions are the problem)."""
    reason = _reason(exc)
    if hint and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += f"; {DOCKER_HINT}"
    return reason


def _reason(exc: OSError) -> str:
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENAMETOOLONG: "file name too long",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a file is in the way",
        getattr(errno, "EDQUOT", -1): "disk quota exceeded",
    }
    return reasons.get(exc.errno) or exc.strerror or str(exc)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: dict) -> None:
    # strict JSON: a NaN or infinity in a sidecar is a bug upstream, never written (ValueError)
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_write_tsv(path: Path, table: pd.DataFrame) -> None:
    atomic_write_text(path, table.to_csv(sep="\t", index=False, float_format="%.10g", na_rep="n/a"))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def dataset_links(bids_dir: Path, derivatives: list[Path]) -> dict[str, Path]:
    """Names used in BIDS URIs (``bids:<name>:path``) for the input datasets."""
    links = {"raw": bids_dir.resolve()}
    for root in derivatives:
        name = root.resolve().name or "derivatives"
        base, i = name, 2
        while name in links:
            name, i = f"{base}{i}", i + 1
        links[name] = root.resolve()
    return links


def bids_uri(path: Path, links: dict[str, Path]) -> str:
    """``bids:fmriprep:sub-01/func/...`` for a file inside a linked dataset."""
    path = Path(path).resolve()
    best = None
    for name, root in links.items():
        if root == path or root in path.parents:
            if best is None or len(root.parts) > len(links[best].parts):
                best = name
    if best is None:
        return path.as_uri()
    return f"bids:{best}:{path.relative_to(links[best]).as_posix()}"


def copy_participants_table(bids_dir: Path, output_dir: Path) -> None:
    """Copy participants.tsv (and .json) so the group level finds covariates in OUTPUT_DIR
    without reading BIDS_DIR; refreshed on every participant-level run."""
    for name in ("participants.tsv", "participants.json"):
        source = bids_dir / name
        if source.is_file():
            data = source.read_bytes()
            target = output_dir / name
            if not target.is_file() or target.read_bytes() != data:
                atomic_write_bytes(target, data)


def check_owner(output_dir: Path) -> dict | None:
    """OUTPUT_DIR's dataset description, if any; UsageError when another tool wrote it."""
    desc_path = output_dir / "dataset_description.json"
    if not desc_path.exists():
        return None
    try:
        existing = json.loads(desc_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    names = [g.get("Name") for g in existing.get("GeneratedBy", []) if isinstance(g, dict)] \
        if isinstance(existing, dict) else []
    if "bidsglm" not in names:
        raise UsageError(
            "OUTPUT_DIR already holds another dataset (its dataset_description.json "
            "was not written by bidsglm); choose an empty or bidsglm folder",
            desc_path,
        )
    return existing


def source_link(root: Path, output_dir: Path) -> str:
    """Where a source dataset is, as it travels with OUTPUT_DIR: a relative path where the two
    sit side by side (the source under OUTPUT_DIR's parent: ``../raw``,
    ``../raw/derivatives/fmriprep``; not when that parent is the filesystem root, as for a
    container's /data and /out), else its DOI (``doi:...``) from its own
    dataset_description.json, else (no DOI recorded) its absolute ``file:`` URI."""
    root, output_dir = Path(root).absolute(), Path(output_dir).absolute()
    parent = output_dir.parent
    if parent != Path(parent.anchor) and (root.parent == parent or parent in root.parents):
        return Path(os.path.relpath(root, output_dir)).as_posix()
    doi = _source_description(root).get("DatasetDOI")
    if isinstance(doi, str) and doi.strip():
        return doi if doi.startswith("doi:") else "doi:" + doi.removeprefix("https://doi.org/")
    return root.as_uri()


def source_dataset(root: Path, output_dir: Path) -> dict:
    """A SourceDatasets entry: the source's name and DOI as its own description records them,
    and the link above unless it is that DOI."""
    entry = {}
    link = source_link(root, output_dir)
    desc = _source_description(root)
    if isinstance(desc.get("Name"), str) and desc["Name"].strip():
        entry["Name"] = desc["Name"]
    doi = desc.get("DatasetDOI")
    if isinstance(doi, str) and doi.strip():
        entry["DOI"] = doi if doi.startswith("doi:") else "doi:" + doi.removeprefix("https://doi.org/")
    if not link.startswith("doi:"):
        entry["URL"] = link
    return entry


def _source_description(root: Path) -> dict:
    try:
        desc = json.loads((Path(root) / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return desc if isinstance(desc, dict) else {}


def ensure_dataset(output_dir: Path, links: dict[str, Path]) -> None:
    """Create (or check) OUTPUT_DIR's dataset_description.json and .bidsignore.

    Safe when several jobs start at once: each writes identical content atomically."""
    desc_path = output_dir / "dataset_description.json"
    description = {
        "Name": "bidsglm: task-fMRI GLM statistical maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "bidsglm",
                "Version": __version__,
                "CodeURL": __url__,
                "Description": "Run-level GLMs with AR(1) prewhitening and subject-level fixed effects",
                **generated_by_container(),  # image name (and digest) when run inside the image
            }
        ],
        "SourceDatasets": [source_dataset(root, output_dir) for root in links.values()],
        "DatasetLinks": {name: source_link(root, output_dir) for name, root in links.items()},
    }
    existing = check_owner(output_dir)
    if existing != _jsonable(description):
        atomic_write_json(desc_path, description)
    readme = output_dir / "README.md"
    if not readme.exists():
        atomic_write_text(readme, OUTPUT_README)
    ignore = output_dir / ".bidsignore"
    if not ignore.exists() or ignore.read_text() != BIDSIGNORE:
        atomic_write_text(ignore, BIDSIGNORE)


# --- one invocation's writes: where they may go, and undoing them on failure -------------

SESSION_PREFIX = ".bidsglm-session-"
DOCKER_HINT = "choose a writable folder, or in Docker pass --user $(id -u):$(id -g)"
_active_session: "OutputSession | None" = None


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class OutputSession:
    """The writes of one invocation (one level) under OUTPUT_DIR.

    ``check`` refuses a path unless it resolves inside OUTPUT_DIR and outside every input
    dataset (``inputs``: BIDS_DIR first, then derivatives datasets). The journal, a hidden folder
    ``OUTPUT_DIR/.bidsglm-session-<host>-<pid>-<random>/``, holds the temporary files,
    one log per process of the files and folders this invocation creates (logged before
    they are created, so files of a killed worker process are found too) and hard links
    to the earlier versions of the files it replaces. ``rollback`` undoes all of it;
    ``commit`` only deletes the journal. The object is picklable: worker processes
    attach to it (``attached``) and journal into the same folder."""

    def __init__(self, output_dir: Path, inputs=()):
        self.output_dir = Path(output_dir).absolute()
        self.inputs: list[Path] = []
        self.real_root: Path | None = None
        self.folder: Path | None = None
        self.created_folders: list[Path] = []  # OUTPUT_DIR and parents made by begin()
        self._seen: set = set()
        self._log = None
        self._lock = threading.Lock()
        self.forbid(inputs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_seen=set(), _log=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def tmp_dir(self) -> Path:
        return self.folder / "tmp"

    # -- guard --------------------------------------------------------------------
    def forbid(self, folders) -> None:
        """Input datasets: never written to, and OUTPUT_DIR may neither be in one nor hold one."""
        for folder in folders:
            real = Path(folder).absolute().resolve()
            if real not in self.inputs:
                self.inputs.append(real)
        self._check_separate()

    def _check_separate(self) -> None:
        root = self.output_dir.resolve()
        for i, inp in enumerate(self.inputs):
            what = f"BIDS_DIR ({inp}), an input dataset" if i == 0 else f"the input dataset {inp}"
            link = f" (it resolves to {root})" if root != self.output_dir else ""
            if _within(root, inp):
                raise UsageError(f"OUTPUT_DIR{link} is inside {what}; bidsglm never writes into an input "
                                 "dataset, choose a folder outside it", self.output_dir)
            if _within(inp, root):
                raise UsageError(f"OUTPUT_DIR{link} contains {what}; choose a folder that neither is nor "
                                 "holds an input dataset", self.output_dir)

    def check(self, path: Path) -> Path:
        """The real path (every parent's symbolic links resolved) that writing ``path`` creates,
        or OutputError if that is outside OUTPUT_DIR or inside an input dataset. The last name is
        not resolved: a file is replaced by a rename, which replaces a symbolic link there."""
        path = Path(path).absolute()
        real = path.parent.resolve() / path.name
        for inp in self.inputs:
            if _within(real, inp):
                raise OutputError(f"refusing to write into the input dataset {inp}: the path resolves to "
                                  f"{real} (a symbolic link in OUTPUT_DIR?)", path)
        if not _within(real.parent, self.real_root) or real == self.real_root:
            raise OutputError(f"refusing to write outside OUTPUT_DIR ({self.real_root}): the path resolves "
                              f"to {real} (a symbolic link in OUTPUT_DIR?)", path)
        return real

    def check_folders(self, folders) -> None:
        for folder in dict.fromkeys(Path(f) for f in folders):
            self.check(folder / "_")

    # -- journal ------------------------------------------------------------------
    def begin(self) -> None:
        """Check OUTPUT_DIR (creating it, and removing it again on rollback, if it is missing)
        and open the journal there: the first write, so an OUTPUT_DIR that cannot be written
        to stops the run before any work."""
        out = self.output_dir
        if os.path.lexists(out) and not out.is_dir():
            raise OutputError("OUTPUT_DIR exists and is not a folder; choose a folder", out)
        self._check_separate()
        try:
            self.created_folders = [p for p in (out, *out.parents) if not os.path.lexists(p)]
            out.mkdir(parents=True, exist_ok=True)
            self.real_root = out.resolve()
            self.folder = Path(tempfile.mkdtemp(prefix=f"{SESSION_PREFIX}{socket.gethostname()}-{os.getpid()}-",
                                                dir=self.real_root))
            self.tmp_dir.mkdir()
            (self.folder / "backup").mkdir()
        except OSError as exc:
            self._remove_created_root()
            raise OutputError(f"cannot write into OUTPUT_DIR ({describe_os_error(exc, hint=True)})", out) from exc

    def make_folders(self, folder: Path) -> None:
        if folder.is_dir():
            return
        missing = []
        while not os.path.lexists(folder):
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            self._journal("folder", path)
            path.mkdir(exist_ok=True)

    def before_replace(self, path: Path) -> None:
        """Before ``path`` is replaced: log it as new, or keep its earlier version."""
        if path in self._seen:
            return
        self._seen.add(path)
        if not os.path.lexists(path):
            self._journal("file", path)
            return
        backup = self.folder / "backup" / path.relative_to(self.real_root)
        if os.path.lexists(backup):  # kept already by another process of this invocation
            return
        backup.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, backup, follow_symlinks=False)
        except OSError:  # no hard links on this file system
            shutil.copy2(path, backup, follow_symlinks=False)

    def _journal(self, kind: str, path: Path) -> None:
        with self._lock:
            if self._log is None:
                name = f"journal-{socket.gethostname()}-{os.getpid()}.log"
                self._log = open(self.folder / name, "a", encoding="utf-8")
            self._log.write(json.dumps([kind, path.relative_to(self.real_root).as_posix()]) + "\n")
            self._log.flush()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def commit(self) -> None:
        with _signals_ignored():
            self._close_log()
            shutil.rmtree(self.folder, ignore_errors=True)

    def rollback(self) -> None:
        """Put OUTPUT_DIR back as it was before this invocation (call once workers have stopped)."""
        if self.folder is None:
            return
        with _signals_ignored():
            self._close_log()
            backup_root = self.folder / "backup"
            for dirpath, dirnames, filenames in os.walk(backup_root):
                for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                    kept = Path(dirpath) / name
                    try:
                        os.replace(kept, self.real_root / kept.relative_to(backup_root))
                    except OSError:
                        pass
            files, folders = [], []
            for log in self.folder.glob("journal-*.log"):
                for line in log.read_text(encoding="utf-8").splitlines():
                    try:
                        kind, rel = json.loads(line)
                    except ValueError:  # a line cut short by a killed process
                        continue
                    (files if kind == "file" else folders).append(self.real_root / rel)
            for path in files:
                _unlink_quietly(path)
            for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
                try:
                    folder.rmdir()
                except OSError:
                    pass
            shutil.rmtree(self.folder, ignore_errors=True)
            self._remove_created_root()

    def _remove_created_root(self) -> None:
        for folder in self.created_folders:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


@contextmanager
def _signals_ignored():
    """Rollback and commit are short and must not be cut halfway by a second Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def output_session(output_dir: Path, inputs=()):
    """Every write inside the block is checked and journalled; on any exception (also
    KeyboardInterrupt) OUTPUT_DIR is put back as it was, on success the journal is dropped."""
    global _active_session
    session = OutputSession(output_dir, inputs)
    session.begin()
    previous, _active_session = _active_session, session
    try:
        yield session
    except BaseException:
        _active_session = previous
        session.rollback()
        raise
    _active_session = previous
    session.commit()


@contextmanager
def attached(session: "OutputSession | None"):
    """Make a session passed to a worker process the active one there."""
    global _active_session
    previous, _active_session = _active_session, session
    try:
        yield
    finally:
        _active_session = previous


def active_session() -> "OutputSession | None":
    return _active_session


def forbid_inputs(folders) -> None:
    """Add input datasets found during the run (fMRIPrep folders) to the active session's guard."""
    if _active_session is not None:
        _active_session.forbid(folders)


def check_planned_names(paths) -> None:
    """Before any work: no planned file name is longer than the file system allows (a long
    contrast name would otherwise fail only when its first map is written)."""
    for path in paths:
        path = Path(path)
        limit = _name_max(path)
        if len(path.name.encode()) > limit:
            raise OutputError(f"file name too long ({len(path.name.encode())} bytes, the file system allows "
                              f"{limit}); use shorter contrast names", path)


def _name_max(path: Path) -> int:
    for folder in (path.parent, *path.parents):
        if folder.exists():
            try:
                return os.pathconf(folder, "PC_NAME_MAX")
            except (OSError, ValueError, AttributeError):
                break
    return 255


def check_planned_folders(folders) -> None:
    """Before anything is written: each folder a level will write to must resolve inside
    OUTPUT_DIR and outside the input datasets (no-op without an active session)."""
    if _active_session is not None:
        _active_session.check_folders(folders)
