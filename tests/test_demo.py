"""The demo generator: datasets of any size pass BIDS validation."""

from __future__ import annotations

import pandas as pd
import pytest

from bidsglm.demo import bids_sex, make_demo


def test_source_codes_become_bids_sex_values():
    assert [bids_sex(v) for v in ("M", "F", "male", "Female", "o", " m ")] == ["M", "F", "M", "F", "O", "M"]
    assert bids_sex("D") == bids_sex("") == bids_sex(float("nan")) == "n/a"


def test_demo_with_more_subjects_than_the_first_six_passes_validation(tmp_path):
    """ds000102's participants 7 and 8 have sex 'D', which BIDS does not define
    (the validator's TSV_VALUE_INCORRECT_TYPE): the demo writes n/a for them."""
    from bidsglm.validation import validate_dataset, validator_command

    root = tmp_path / "bids"
    make_demo(root, n_subjects=8, voxel_size=6, seed=3)
    table = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(table["participant_id"]) == [f"sub-{i:02d}" for i in range(1, 9)]
    assert set(table["sex"]) <= {"M", "F", "O", "n/a"} and list(table["sex"][6:]) == ["n/a", "n/a"]
    if validator_command() is None:
        pytest.skip("bids-validator-deno is not installed")
    validate_dataset(root, tmp_path / "work")  # raises DataError on any validation error
