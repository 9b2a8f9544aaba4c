"""The BIDS derivatives dataset bidsglm writes: names, sidecars, atomic writes.

Every file is written to a hidden temporary file in its final folder and then
renamed, so a reader (or a rerun after a crash) never sees a truncated file
under a final name, and concurrent jobs writing the same file (cluster array
jobs sharing OUTPUT_DIR) each replace it whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from . import __url__, __version__
from .errors import UsageError
from .surfaces import map_path

BIDS_VERSION = "1.10.0"
OUTPUT_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "hemi", "space", "res", "den")
STATS_T = ("effect", "variance", "t", "z", "p")
STATS_F = ("F", "z", "p")

# BIDS 1.10 defines no contrast/stat entities or statmap suffix yet
BIDSIGNORE = """\
# Written by bidsglm: statistical maps, design matrices and reports use names
# (contrast-, stat-, _statmap, _design) that the BIDS schema does not define yet.
# Folders are named without a trailing slash: the validator ignores "group" but not "group/".
*_statmap.nii.gz
*_statmap.dscalar.nii
*_statmap.shape.gii
*_statmap.json
*_design.tsv
*_design.json
*_mask.nii.gz
*_mask.dscalar.nii
*_mask.shape.gii
*_mask.json
*.html
group
reports
logs
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


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
            }
        ],
        "SourceDatasets": [{"URL": root.as_uri()} for root in links.values()],
        "DatasetLinks": {name: root.as_uri() for name, root in links.items()},
    }
    existing = None
    if desc_path.exists():
        try:
            existing = json.loads(desc_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            existing = None
        names = [g.get("Name") for g in (existing or {}).get("GeneratedBy", []) if isinstance(g, dict)]
        if existing is not None and "bidsglm" not in names:
            raise UsageError(
                "OUTPUT_DIR already holds another dataset (its dataset_description.json "
                "was not written by bidsglm); choose an empty or bidsglm folder",
                desc_path,
            )
    if existing != _jsonable(description):
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(desc_path, description)
    readme = output_dir / "README.md"
    if not readme.exists():
        atomic_write_text(readme, OUTPUT_README)
    ignore = output_dir / ".bidsignore"
    if not ignore.exists() or ignore.read_text() != BIDSIGNORE:
        atomic_write_text(ignore, BIDSIGNORE)
