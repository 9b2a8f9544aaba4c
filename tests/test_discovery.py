"""Matching runs to masks, confounds, events and sidecars."""

import json
from pathlib import Path

import pytest

from bidsglm.discovery import (
    SpaceSpec,
    discover_runs,
    find_derivatives,
    parse_bids_name,
    strip_prefix,
)
from bidsglm.errors import DataError, UsageError


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _dataset(tmp_path, bold_names, mask_names, sub="01"):
    root = tmp_path / "bids"
    _touch(root / "dataset_description.json", json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    _touch(root / "task-a_bold.json", json.dumps({"RepetitionTime": 2.0, "TaskName": "a"}))
    _touch(root / f"sub-{sub}" / "func" / f"sub-{sub}_task-a_run-1_events.tsv", "onset\tduration\ttrial_type\n")
    deriv = root / "derivatives" / "fmriprep"
    _touch(deriv / "dataset_description.json", json.dumps({"Name": "f", "DatasetType": "derivative"}))
    func = deriv / f"sub-{sub}" / "func"
    for n in bold_names + mask_names:
        _touch(func / n)
    _touch(func / f"sub-{sub}_task-a_run-1_desc-confounds_timeseries.tsv")
    return root, deriv


def test_parse_bids_name():
    f = parse_bids_name("sub-01_ses-2_task-x_run-1_space-MNI_res-2_desc-preproc_bold.nii.gz")
    assert f.entities == {"sub": "01", "ses": "2", "task": "x", "run": "1", "space": "MNI", "res": "2",
                          "desc": "preproc"}
    assert f.suffix == "bold" and f.extension == ".nii.gz"
    assert strip_prefix("sub-01", "sub") == "01" and strip_prefix("01", "sub") == "01"


def test_res_entity_does_not_break_matching(tmp_path):
    root, deriv = _dataset(tmp_path,
                           ["sub-01_task-a_run-1_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz"],
                           ["sub-01_task-a_run-1_space-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz"])
    runs = discover_runs(root, [deriv], SpaceSpec.parse("MNI152NLin2009cAsym"))
    assert len(runs) == 1 and runs[0].entities["res"] == "2"
    assert runs[0].mask.name.endswith("res-2_desc-brain_mask.nii.gz")
    assert runs[0].bold_sidecar["RepetitionTime"] == 2.0  # inherited from the top level


def test_two_resolutions_need_a_choice(tmp_path):
    bolds = [f"sub-01_task-a_run-1_space-MNI152NLin2009cAsym_res-{r}_desc-preproc_bold.nii.gz" for r in (1, 2)]
    masks = [b.replace("desc-preproc_bold", "desc-brain_mask") for b in bolds]
    root, deriv = _dataset(tmp_path, bolds, masks)
    with pytest.raises(DataError, match="SPACE:res-N"):
        discover_runs(root, [deriv], SpaceSpec.parse("MNI152NLin2009cAsym"))
    runs = discover_runs(root, [deriv], SpaceSpec.parse("MNI152NLin2009cAsym:res-2"))
    assert runs[0].bold.name == bolds[1] and runs[0].mask.name == masks[1]


@pytest.mark.parametrize("mask_name", ["sub-01_task-a_run-1_desc-brain_mask.nii.gz",
                                       "sub-01_task-a_run-1_space-run_desc-brain_mask.nii.gz"])
def test_native_space_both_mask_spellings(tmp_path, mask_name):
    root, deriv = _dataset(tmp_path, ["sub-01_task-a_run-1_desc-preproc_bold.nii.gz",
                                      "sub-01_task-a_run-1_space-T1w_desc-preproc_bold.nii.gz"],
                           [mask_name, "sub-01_task-a_run-1_space-T1w_desc-brain_mask.nii.gz"])
    runs = discover_runs(root, [deriv], SpaceSpec.parse("native"))
    assert len(runs) == 1
    assert runs[0].bold.name == "sub-01_task-a_run-1_desc-preproc_bold.nii.gz"
    assert runs[0].mask.name == mask_name
    assert "space" not in runs[0].entities


def test_missing_mask_is_named(tmp_path):
    root, deriv = _dataset(tmp_path, ["sub-01_task-a_run-1_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"], [])
    with pytest.raises(DataError, match="no brain mask"):
        discover_runs(root, [deriv], SpaceSpec.parse("MNI152NLin2009cAsym"))


def test_derivatives_found_only_when_derivative_with_bold(tmp_path):
    root, deriv = _dataset(tmp_path, ["sub-01_task-a_run-1_space-X_desc-preproc_bold.nii.gz"], [])
    _touch(root / "derivatives" / "other" / "dataset_description.json", json.dumps({"DatasetType": "derivative"}))
    assert find_derivatives(root, None) == [deriv]


def test_space_spec_errors():
    with pytest.raises(UsageError):
        SpaceSpec.parse("MNI:den-2")
    assert str(SpaceSpec.parse("MNI152NLin6Asym:res-2")) == "MNI152NLin6Asym:res-2"
