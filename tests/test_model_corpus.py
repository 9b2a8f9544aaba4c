"""Conformance over a corpus of published BIDS Stats Models (../shared/data/models/openneuro_glmfitlins,
110 models for 57 OpenNeuro datasets, MIT licence; see its README and LICENSE).

Each model runs end to end at both levels on a small simulated dataset built
from its dataset's ``<ds>_basic-details.json``: the events columns with their
types, the trial types (plus the levels the model itself names, e.g.
``trial_type.angry``), runs and sessions (as the model's Input selects them),
3 subjects, 90 volumes of noise on an 8 mm grid. Where the corpus has the peer
tool's Run-node design matrix, the columns built from events (conditions,
parametric and response-time regressors) must be the same columns here.

A model either runs (exit 0 at both levels, every node writes maps) or is
refused with exit 65 naming the node and field (``EXPECTED_REFUSALS`` lists
the models whose own content does not fit their data, with why). The default
run takes a few diverse models; the whole corpus is ``slow``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsglm.cli import main
from conftest import SHARED_DATA
from simulate import AFFINE, SHAPE, brain_mask, confounds

CORPUS_DIR = SHARED_DATA / "models" / "openneuro_glmfitlins"
CORPUS = sorted(CORPUS_DIR.glob("*/*_specs.json")) if CORPUS_DIR.is_dir() else []
N_SUBJECTS = 3
N_VOLUMES = 90
TR = 2.0
# diverse and quick: parametric + Replace/Assign (ds000001), Run->Dataset with run- entity (ds000144),
# sessions (ds000114), Threshold (ds000005), Scale with ReplaceNa (ds002006 Memory)
# (one run per subject, to stay quick; test_modelrunner covers nodes over several runs)
FAST = {"ds000001-balloonanalogrisktask": 1, "ds000144-emotionalfaces": 1, "ds000114-fingerfootlips": 1,
        "ds000005-mixedgamblestask": 1, "ds002006-Memory": 1}
# models whose own content does not fit the data they were written for: refused with exit 65
EXPECTED_REFUSALS = {
    "ds003481-verbs": "Contrasts[4] ('lexicalvprelexical').Weights: four weights for three conditions",
    "ds001597-cuedMFM": "Model.X names 'correct', a text column of the events (basic details: object), not Factor'd",
    "ds004920-ugdg": "Contrasts[7] ('paramdecision') names Decision_pmod, which is not in Model.X",
    "ds001715-dts": "Contrasts ('absmotionvcolor') lists signedcolor_abs twice with weights 1, -1: a contrast of "
                    "nothing (a typo for signedmotion_abs, surely)",
    "ds002033-ChangeDetection": "two Run contrasts named 'digitsvletter' (the second's maps would overwrite the "
                                "first's)",
}
CONFOUND_PREFIXES = ("trans_", "rot_", "cosine", "drift_", "a_comp_cor", "t_comp_cor", "framewise", "csf", "white_matter",
                     "global_signal", "motion_outlier", "non_steady_state", "dvars", "std_dvars", "rmsd")


def _name(path: Path) -> str:
    return path.name.removesuffix("_specs.json")


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _levels_named(model: dict, column: str) -> list[str]:
    """Levels of a categorical events column that the Run node names (``column.level``),
    and the values its Replace instructions map from."""
    run = model["Nodes"][0]
    instructions = (run.get("Transformations") or {}).get("Instructions", [])
    names = [column]  # the column and what Copy or Rename make of it
    for ins in instructions:
        if ins.get("Name") in ("Copy", "Rename") and set(ins.get("Input") or []) & set(names):
            names += list(ins.get("Output") or [])
    found = []
    for text in _strings(run):
        for name in names:
            m = re.fullmatch(re.escape(name) + r"\.([^*?\[\]]+)", text)
            if m:
                found.append(m.group(1))
    for ins in instructions:
        if ins.get("Name") == "Replace" and set(ins.get("Input") or []) & set(names):
            found += [str(k) for k in (ins.get("Replace") or {})]
    for ref in _reference_columns_of(model):  # levels the peer's run had (its design matrix), e.g. error trials
        m = re.fullmatch(re.escape(column) + r"\.(.+?)(_derivative|_dispersion)?", ref)
        if m:
            found.append(m.group(1))
    return list(dict.fromkeys(found))


def columns_the_model_reads(model: dict, columns: list[str]) -> list[str]:
    """Events columns the Run node's transformations read that the basic details do not list
    (the peer project rewrites the events of some datasets before modelling: preproc_events):
    the simulated events get them as numbers, and the table says so."""
    produced, factored, needed = set(), set(), []
    for ins in (model["Nodes"][0].get("Transformations") or {}).get("Instructions", []):
        for name in ins.get("Input") or []:
            if (any(ch in name for ch in "*?[") or name in produced or name in columns or
                    name.startswith(CONFOUND_PREFIXES) or name.split(".")[0] in factored or name in needed):
                continue
            needed.append(name)
        outputs = ins.get("Output") or []
        produced.update(outputs if isinstance(outputs, list) else [outputs])
        if ins.get("Name") in ("Factor", "Split"):
            factored.update(ins.get("Input") or [])
    for name in model["Nodes"][0]["Model"]["X"]:  # variables of X that no instruction makes
        if (isinstance(name, str) and not any(ch in name for ch in "*?[") and name not in produced and
                name not in columns and not name.startswith(CONFOUND_PREFIXES) and
                name.split(".")[0] not in factored | produced and name not in needed):
            needed.append(name)
    return needed


def _events(rng, model: dict, task: dict, n_volumes: int) -> pd.DataFrame:
    columns = list(task.get("column_names") or ["onset", "duration", "trial_type"])
    columns += columns_the_model_reads(model, columns)
    types = task.get("column_data_types") or {}
    listed = [str(v) for v in task.get("trial_type_values") or [] if v == v]  # (NaN: rows without a type)
    if task.get("preproc_events"):  # the peer's rewritten events drop spaces and hyphens (its design matrices)
        listed = [re.sub(r"[ \-]", "", v) for v in listed]
    trial_types = list(dict.fromkeys(listed + _levels_named(model, "trial_type"))) or ["task"]
    if any(v != v for v in task.get("trial_type_values") or []):
        trial_types.append("n/a")
    # at least 24 events: with fewer, each parametric column (one amplitude per event) is a
    # combination of the same few event responses, and the design is collinear by construction
    labels = np.repeat(trial_types, max(3, -(-24 // len(trial_types))))
    rng.shuffle(labels)
    n = len(labels)
    span = n_volumes * TR - 12
    onsets = np.sort(rng.uniform(2, span, n)).round(2)
    table = {"onset": onsets, "duration": rng.uniform(0.5, 3.0, n).round(2), "trial_type": labels}
    for col in columns:
        if col in table:
            continue
        named = _levels_named(model, col)
        # a column the basic details omit: labels if the model names text levels of it, else small integers
        kind = types.get(col) or ("object" if any(not _is_number(v) for v in named) else "int64")
        if kind == "object":
            table[col] = rng.choice(named or ["a", "b"], n)
        elif kind.startswith("int"):
            ints = [int(v) for v in named if v.lstrip("-").isdigit()]
            table[col] = rng.choice(ints or [0, 1, 2, 3], n)
        else:
            table[col] = rng.normal(0.0, 1.0, n).round(4) if not named else rng.choice(
                [float(v) for v in named if _is_number(v)] or [0.0, 1.0], n)
    return pd.DataFrame(table)[[c for c in dict.fromkeys(["onset", "duration", "trial_type", *columns])
                                 if c in table]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def simulate_for_model(spec_path: Path, root: Path, n_subjects: int = N_SUBJECTS, seed: int = 0,
                       max_runs: int = 2) -> dict:
    """BIDS raw events and fMRIPrep-like derivatives for one corpus model; returns what was made."""
    model = json.loads(spec_path.read_text())
    model["_spec_path"] = spec_path  # (for the levels in the peer's design matrix)
    details = json.loads(next(spec_path.parent.glob("*_basic-details.json")).read_text())
    task_name = model["Input"]["task"][0]
    task = details["Tasks"][task_name]
    subjects = [str(s) for s in model["Input"].get("subject", [])][:n_subjects] or \
        [f"{i:02d}" for i in range(1, n_subjects + 1)]
    runs = [str(r) for r in (model["Input"].get("run") or task.get("task_runs") or [])][:max_runs] or [None]
    sessions = [str(s) for s in (model["Input"].get("session") or task.get("task_sessions") or [])][:2] or [None]
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": model["Name"], "BIDSVersion": "1.8.0"}))
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects],
                  "age": rng.integers(20, 40, len(subjects))}).to_csv(root / "participants.tsv", sep="\t",
                                                                      index=False)
    (root / f"task-{task_name}_bold.json").write_text(json.dumps({"RepetitionTime": TR, "TaskName": task_name}))
    fmriprep = root / "derivatives" / "fmriprep"
    fmriprep.mkdir(parents=True)
    (fmriprep / "dataset_description.json").write_text(json.dumps({
        "Name": "simulated", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "simulated"}]}))
    mask = brain_mask()
    for sub in subjects:
        for ses in sessions:
            for run in runs:
                rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "") / "func"
                prefix = "_".join(p for p in (f"sub-{sub}", f"ses-{ses}" if ses else "", f"task-{task_name}",
                                              f"run-{run}" if run else "") if p)
                (root / rel).mkdir(parents=True, exist_ok=True)
                _events(rng, model, task, N_VOLUMES).to_csv(root / rel / f"{prefix}_events.tsv", sep="\t",
                                                             index=False, na_rep="n/a")
                out = fmriprep / rel
                out.mkdir(parents=True, exist_ok=True)
                data = 100 + rng.normal(0, 1, SHAPE + (N_VOLUMES,))
                img = nib.Nifti1Image(np.where(mask[..., None], data, 0).astype(np.float32), AFFINE)
                img.header.set_zooms((8.0, 8.0, 8.0, TR))
                space = f"{prefix}_space-MNI152NLin2009cAsym"
                nib.save(img, out / f"{space}_desc-preproc_bold.nii.gz")
                (out / f"{space}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": TR}))
                nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), out / f"{space}_desc-brain_mask.nii.gz")
                confounds(rng, N_VOLUMES, TR).to_csv(out / f"{prefix}_desc-confounds_timeseries.tsv", sep="\t",
                                                     index=False, na_rep="n/a")
    return {"subjects": subjects, "runs": runs, "sessions": sessions, "task": task_name,
            "added": columns_the_model_reads(model, list(task.get("column_names") or []))}


def _reference_columns_of(model: dict) -> list[str]:
    spec = model.get("_spec_path")
    return (_reference_columns(spec) or []) if spec else []


def _reference_columns(spec_path: Path) -> list[str] | None:
    found = sorted(spec_path.parent.glob("group_*/files/*_design-matrix.tsv"))
    task = _name(spec_path).split("-", 1)[1]
    found = [p for p in found if f"_task-{task}_" in p.name]
    if not found:
        return None
    columns = pd.read_csv(found[0], sep="\t", nrows=1).columns
    return [c for c in columns if not c.startswith(CONFOUND_PREFIXES) and c not in ("intercept", "constant")]


def run_corpus_model(spec_path: Path, work: Path, capsys, max_runs: int = 2) -> dict:
    """Both levels of one model on its simulated dataset: a row of the conformance table."""
    from bidsglm.statsmodel import load_model

    row = {"model": _name(spec_path), "loaded": "yes", "participant": None, "group": None, "outputs": "",
           "message": "", "design": "", "added": ""}
    root = work / "bids"
    made = simulate_for_model(spec_path, root, max_runs=max_runs)
    row["added"] = ",".join(made["added"])
    out = work / "out"
    try:
        model = load_model(spec_path)
    except Exception as exc:  # noqa: BLE001 - the table records why, and the exit code the CLI gives
        row.update(loaded="no")
        capsys.readouterr()
        row["participant"] = main([str(root), str(out), "participant", "--model", str(spec_path), "-q",
                                   "--skip-bids-validation"])
        err = capsys.readouterr().err.strip().splitlines()
        row["message"] = err[-1].split(" ERROR: ", 1)[-1] if err else str(exc)
        return row
    capsys.readouterr()
    args = [str(root), str(out), "participant", "--model", str(spec_path), "--skip-bids-validation", "-q",
            "--smoothing-fwhm", "0", "--no-reports"]
    row["participant"] = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    if row["participant"] == 0:
        row["group"] = main([str(root), str(out), "group", "--model", str(spec_path), "-q", "--no-reports"])
        err = capsys.readouterr().err.strip().splitlines()
    row["message"] = err[-1].split(" ERROR: ", 1)[-1] if err else ""
    counts = []
    for node in model.nodes:
        n = len(list((out / f"node-{node.name}").rglob("*_stat-effect_statmap.nii.gz")))
        counts.append(f"{node.name}={n}")
    row["outputs"] = " ".join(counts)
    reference = _reference_columns(spec_path)
    if reference is not None and row["participant"] == 0:
        design = next((out / f"node-{model.nodes[0].name}").rglob("*_design.tsv"))
        ours = set(pd.read_csv(design, sep="\t", nrows=1).columns)
        missing = [c for c in reference if c not in ours]
        row["design"] = "same event columns" if not missing else f"missing {', '.join(missing)}"
        row["outputs"] += f" [design lacks {', '.join(missing)}]" if missing else ""
    return row


def _check_row(row: dict) -> None:
    name = row["model"]
    if name in EXPECTED_REFUSALS:
        code = row["group"] if row["participant"] == 0 else row["participant"]
        assert code == 65, row
        assert "node '" in row["message"] and "field '" in row["message"], row
        return
    assert row["loaded"] == "yes", row
    assert row["participant"] == 0 and row["group"] == 0, row
    assert all(not part.endswith("=0") for part in row["outputs"].split()), row
    assert not row["design"].startswith("missing"), row


def _table(rows: list[dict]) -> str:
    head = f"{'model':42} {'loaded':6} {'part.':5} {'group':5} {'design':18} outputs / message"
    lines = [head, "-" * len(head)]
    for r in rows:
        tail = r["outputs"] if (r["participant"], r["group"]) == (0, 0) else r["message"][:400]
        tail += f" [events columns added: {r['added']}]" if r.get("added") else ""
        lines.append(f"{r['model']:42} {r['loaded']:6} {str(r['participant']):5} {str(r['group']):5} "
                     f"{r['design'][:18]:18} {tail}")
    return "\n".join(lines)


@pytest.mark.parametrize("name", list(FAST))
def test_corpus_model_runs(name, tmp_path, capsys):
    spec = CORPUS_DIR / name.split("-")[0] / f"{name}_specs.json"
    if not spec.is_file():
        pytest.skip(f"shared material not available: {spec}")
    row = run_corpus_model(spec, tmp_path, capsys, max_runs=FAST[name])
    with capsys.disabled():
        print("\n" + _table([row]))
    _check_row(row)


@pytest.mark.slow
def test_whole_corpus(tmp_path, capsys):
    if not CORPUS:
        pytest.skip(f"shared material not available: {CORPUS_DIR}")
    rows = []
    for i, spec in enumerate(CORPUS):
        rows.append(run_corpus_model(spec, tmp_path / f"m{i}", capsys))
        with capsys.disabled():
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    with capsys.disabled():
        print("\n" + _table(rows))
    failures = []
    for row in rows:
        try:
            _check_row(row)
        except AssertionError:
            failures.append(row["model"])
    assert not failures, failures
