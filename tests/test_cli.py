"""Command line: option spellings, exit codes, and one clear line (no traceback,
no outputs for the affected run) for every bad input the issue lists."""

import gzip
import json
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsglm.cli import build_parser, main

FMRIPREP = ("derivatives", "fmriprep", "sub-01", "func")
STEM = "sub-01_task-flanker_run-1"
SPACE = "space-MNI152NLin2009cAsym"


def _run(capsys, *args):
    code = main([*map(str, args)])
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(err, *fragments):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR: " in line]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])


def _statmaps(out):
    return sorted(p.name for p in out.rglob("*_statmap.nii.gz")) if out.exists() else []


def _fmriprep(root, name):
    return root.joinpath(*FMRIPREP, name)


def test_both_spellings_and_prefixes():
    parser = build_parser()
    a = parser.parse_args(["in", "out", "participant", "--participant-label", "sub-01", "02",
                           "--skip-bids-validation"])
    b = parser.parse_args(["in", "out", "participant", "--participant_label", "01", "sub-02",
                           "--skip_bids_validator"])
    assert a.participant_label == ["sub-01", "02"] and b.participant_label == ["01", "sub-02"]
    assert a.skip_bids_validation and b.skip_bids_validation


def test_version_and_help_exit_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "bidsglm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--participant-label" in capsys.readouterr().out


def test_usage_errors_exit_64(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), str(tmp_path / "o"), "participant", "--noise-model", "ar9"])
    assert exc.value.code == 64
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 64


def test_console_script_exit_code(demo_small, tmp_path):
    """The installed entry point itself returns the exit code (64: a label that names nothing) and prints one line."""
    root, _ = demo_small
    proc = subprocess.run([sys.executable, "-m", "bidsglm", str(root), str(tmp_path / "o"), "participant",
                           "--skip-bids-validation", "--participant-label", "99"],
                          capture_output=True, text=True)
    assert proc.returncode == 64
    _assert_one_line_error(proc.stderr, "sub-99", "not found")


def test_missing_dataset_description(capsys, demo_copy, tmp_path):
    (demo_copy / "dataset_description.json").unlink()
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, "dataset_description.json", "not a BIDS dataset")
    assert not (tmp_path / "out").exists()


def test_unknown_participant(capsys, demo_copy, tmp_path):
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                     "--participant-label", "sub-07")
    assert code == 64
    _assert_one_line_error(err, "sub-07", "not found")


def test_no_bold_in_space(capsys, demo_copy, tmp_path):
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                     "--space", "MNI152NLin6Asym")
    assert code == 65
    _assert_one_line_error(err, "MNI152NLin6Asym", "MNI152NLin2009cAsym")  # says what is there


@pytest.mark.parametrize("drop", ["onset", "duration", "trial_type"])
def test_events_missing_column(capsys, demo_copy, tmp_path, drop):
    path = demo_copy / "sub-01" / "func" / f"{STEM}_events.tsv"
    pd.read_csv(path, sep="\t").drop(columns=[drop]).to_csv(path, sep="\t", index=False)
    out = tmp_path / "out"
    code, err = _run(capsys, demo_copy, out, "participant", "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, f"{STEM}_events.tsv", drop)
    assert _statmaps(out) == []


def test_events_non_numeric_onset(capsys, demo_copy, tmp_path):
    path = demo_copy / "sub-01" / "func" / f"{STEM}_events.tsv"
    table = pd.read_csv(path, sep="\t", dtype=str)
    table.loc[3, "onset"] = "12.5s"
    table.to_csv(path, sep="\t", index=False)
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, f"{STEM}_events.tsv", "column 'onset', line 5", "'12.5s'")


def test_contrast_unknown_condition(capsys, demo_copy, tmp_path):
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                     "--contrast", "bad=incongruent - congruent")
    assert code == 65
    _assert_one_line_error(err, "contrast 'bad'", "unknown condition", "incongruent_correct")


def test_confound_column_absent(capsys, demo_copy, tmp_path):
    out = tmp_path / "out"
    code, err = _run(capsys, demo_copy, out, "participant", "--skip-bids-validation",
                     "--confounds", "trans_x", "csf_wm")
    assert code == 65
    _assert_one_line_error(err, "desc-confounds_timeseries.tsv", "'csf_wm'", "absent")
    assert _statmaps(out) == []


def test_confound_wildcards(demo_copy, tmp_path):
    out = tmp_path / "out"
    assert main([str(demo_copy), str(out), "participant", "--skip-bids-validation", "-q",
                 "--participant-label", "01", "--contrast", "congruent_correct",
                 "--confounds", "trans_?", "a_comp_cor_0[0-2]", "motion_outlier*",
                 "framewise_displacement"]) == 0
    rec1 = json.loads((out / "sub-01" / "func" / f"{STEM}_design.json").read_text())
    rec2 = json.loads((out / "sub-01" / "func" / "sub-01_task-flanker_run-2_design.json").read_text())
    expected = ["trans_x", "trans_y", "trans_z", "a_comp_cor_00", "a_comp_cor_01", "a_comp_cor_02"]
    # run 1 has no outlier columns: the wildcard selects nothing there
    assert rec1["Confounds"] == expected + ["framewise_displacement"]
    assert rec2["Confounds"] == expected + ["motion_outlier00", "framewise_displacement"]


def test_bold_mask_grid_mismatch(capsys, demo_copy, tmp_path):
    mask_path = _fmriprep(demo_copy, f"{STEM}_{SPACE}_desc-brain_mask.nii.gz")
    img = nib.load(mask_path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-1], img.affine), mask_path)
    out = tmp_path / "out"
    code, err = _run(capsys, demo_copy, out, "participant", "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, f"{STEM}_{SPACE}_desc-preproc_bold.nii.gz", "differs from brain mask grid")
    assert _statmaps(out) == []


def test_truncated_bold(capsys, demo_copy, tmp_path):
    bold = _fmriprep(demo_copy, f"{STEM}_{SPACE}_desc-preproc_bold.nii.gz")
    data = bold.read_bytes()
    bold.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, err = _run(capsys, demo_copy, out, "participant", "--skip-bids-validation",
                     "--participant-label", "01")
    assert code == 65
    _assert_one_line_error(err, f"{STEM}_{SPACE}_desc-preproc_bold.nii.gz", "truncated")
    assert not any("run-1" in name for name in _statmaps(out))
    assert not list(out.rglob(".*.tmp"))


def test_corrupt_bold(capsys, demo_copy, tmp_path):
    bold = _fmriprep(demo_copy, f"{STEM}_{SPACE}_desc-preproc_bold.nii.gz")
    bold.write_bytes(b"this is not a nifti file at all" * 10)
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, f"{STEM}_{SPACE}_desc-preproc_bold.nii.gz")


def test_uncompressed_truncated_after_header(capsys, demo_copy, tmp_path):
    """A .nii.gz whose gzip stream is valid but whose voxel data are cut short."""
    bold = _fmriprep(demo_copy, f"{STEM}_{SPACE}_desc-preproc_bold.nii.gz")
    raw = gzip.decompress(bold.read_bytes())
    bold.write_bytes(gzip.compress(raw[: len(raw) - 1000]))
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                     "--participant-label", "01")
    assert code == 65
    _assert_one_line_error(err, "truncated image")


def test_confounds_row_count(capsys, demo_copy, tmp_path):
    path = _fmriprep(demo_copy, f"{STEM}_desc-confounds_timeseries.tsv")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    table.iloc[:-3].to_csv(path, sep="\t", index=False)
    out = tmp_path / "out"
    code, err = _run(capsys, demo_copy, out, "participant", "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, f"{STEM}_desc-confounds_timeseries.tsv", "143 rows", "146 volumes")
    assert _statmaps(out) == []


def test_output_inside_bids_dir(capsys, demo_copy):
    code, err = _run(capsys, demo_copy, demo_copy / "derivatives" / "bidsglm", "participant",
                     "--skip-bids-validation")
    assert code == 64
    _assert_one_line_error(err, "inside BIDS_DIR")
    assert not (demo_copy / "derivatives" / "bidsglm").exists()


def test_tr_mismatch_is_error_unless_allowed(capsys, demo_copy, tmp_path):
    side = demo_copy / "task-flanker_bold.json"
    side.write_text(json.dumps({"TaskName": "flanker", "RepetitionTime": 2.5}))
    deriv_side = _fmriprep(demo_copy, f"{STEM}_{SPACE}_desc-preproc_bold.json")
    deriv_side.write_text(json.dumps({"TaskName": "flanker"}))
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                     "--participant-label", "01")
    assert code == 65
    _assert_one_line_error(err, "TR in the NIfTI header (2 s)", "(2.5 s)", "--allow-tr-mismatch")
    code, _ = _run(capsys, demo_copy, tmp_path / "out", "participant", "--skip-bids-validation",
                   "--participant-label", "01", "--allow-tr-mismatch", "--contrast", "congruent_correct")
    assert code == 0


def test_never_writes_into_bids_dir(demo_copy, tmp_path):
    def snapshot():
        return sorted((p.relative_to(demo_copy).as_posix(), p.stat().st_mtime_ns)
                      for p in demo_copy.rglob("*"))
    before = snapshot()
    assert main([str(demo_copy), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-q",
                 "--participant-label", "01", "--contrast", "congruent_correct"]) == 0
    assert snapshot() == before


def test_bids_validation_runs_and_rejects_invalid(capsys, demo_copy, tmp_path):
    from bidsglm.validation import validator_command

    if validator_command() is None:
        pytest.skip("bids-validator-deno not installed")
    (demo_copy / "sub-01" / "func" / "sub-01_task-flanker_run-1_bold.json").write_text("{not json")
    code, err = _run(capsys, demo_copy, tmp_path / "out", "participant", "-w", tmp_path / "work")
    assert code == 65
    _assert_one_line_error(err, "BIDS validation failed", "--skip-bids-validation")


# --- one level at a time (issue 16) ------------------------------------------------

def _help(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*map(str, args), "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_level_help_shows_that_levels_options(capsys, tmp_path):
    def flags(text: str) -> str:  # the option column of the help, not the descriptions
        return "\n".join(line.strip().split("  ")[0] for line in text.splitlines() if line.startswith("  -"))

    participant = flags(_help(capsys, tmp_path, tmp_path / "o", "participant"))
    group = flags(_help(capsys, tmp_path, tmp_path / "o", "group"))
    full = flags(_help(capsys))
    common = ("--participant-label", "--task", "--space", "--model", "--reports-only", "--n-cpus")
    for text in common:
        assert text in participant and text in group and text in full, text
    for text in ("--contrast", "--smoothing-fwhm", "--hrf-model", "--confounds"):
        assert text in participant and text not in group, text
    for text in ("--group-model", "--height-control", "--permutations", "--tfce", "--atlases"):
        assert text in group and text not in participant, text
    assert "usage: bidsglm BIDS_DIR OUTPUT_DIR participant [options]" in _help(capsys, tmp_path, "o", "participant")
    # every option of the parser is shown by exactly the help of its level(s)
    from bidsglm.cli import option_levels

    for flag, level in option_levels(build_parser()).items():
        if not flag.startswith("--") or flag in ("--help",):
            continue
        shown = re.compile(rf"(^|, ){re.escape(flag)}(?=[ ,=]|$)", re.M)
        assert bool(shown.search(participant)) == (level in ("common", "participant")), flag
        assert bool(shown.search(group)) == (level in ("common", "group")), flag


@pytest.mark.parametrize("level,args,named,belongs", [
    ("group", ["--contrast", "a=b"], "--contrast", "participant"),
    ("group", ["--smoothing-fwhm=4"], "--smoothing-fwhm", "participant"),
    ("participant", ["--permutations", "100"], "--permutations", "group"),
    ("participant", ["--height-con", "fdr"], "--height-control", "group"),  # an abbreviation, resolved
    ("group", ["--dask-scheduler", "tcp://127.0.0.1:9"], "--dask-scheduler", "participant"),
])
def test_other_levels_options_are_refused(capsys, tmp_path, level, args, named, belongs):
    code, err = _run(capsys, tmp_path, tmp_path / "o", level, *args)
    assert code == 64
    _assert_one_line_error(err, f"{named} is a {belongs}-level option")
    assert not (tmp_path / "o").exists()


def test_options_before_positionals_one_clear_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["-t", "flanker", str(tmp_path), str(tmp_path / "o"), "participant"])
    assert exc.value.code == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "usage: bidsglm BIDS_DIR OUTPUT_DIR" in err[0]
    assert "come first" in err[0] and "bidsglm data out participant -t flanker" in err[0]


def test_missing_bids_dir_is_usage_error(capsys, tmp_path):
    code, err = _run(capsys, tmp_path / "absent", tmp_path / "o", "participant")
    assert code == 64
    _assert_one_line_error(err, "absent", "does not exist")


def test_unknown_task_lists_the_tasks(capsys, demo_small, tmp_path):
    root, _ = demo_small
    code, err = _run(capsys, root, tmp_path / "o", "participant", "--skip-bids-validation", "-t", "flankr")
    assert code == 64
    _assert_one_line_error(err, "task(s) not found: flankr", "dataset has 1: flanker")


def test_demo_help_describes_every_option(capsys):
    from bidsglm.demo import main as demo_main

    with pytest.raises(SystemExit) as exc:
        demo_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    options = out[out.index("options:"):]
    for flag in ("--subjects", "--voxel-size", "--seed"):
        block = options[options.index(flag):].split("\n  -")[0]
        assert len(block.split()) > 4, block  # a description, not just the flag and its metavar


def test_missing_derivatives_folder_is_usage_error(capsys, demo_small, tmp_path):
    root, _ = demo_small
    code, err = _run(capsys, root, tmp_path / "o", "participant", "--derivatives", tmp_path / "nowhere")
    assert code == 64
    _assert_one_line_error(err, "--derivatives: folder does not exist", "nowhere")


def test_same_run_in_two_derivatives_datasets_names_the_datasets(capsys, demo_copy, tmp_path):
    """Two fMRIPrep copies (say two versions): the advice is --derivatives, not --space."""
    shutil.copytree(demo_copy / "derivatives" / "fmriprep", demo_copy / "derivatives" / "fmriprep-old")
    code, err = _run(capsys, demo_copy, tmp_path / "o", "participant", "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, "preprocessed in 2 derivatives datasets", "fmriprep-old", "--derivatives")


def test_contradictory_report_options_are_refused(capsys, demo_small, tmp_path):
    root, _ = demo_small
    code, err = _run(capsys, root, tmp_path / "o", "participant", "--reports-only", "--no-reports")
    assert code == 64
    _assert_one_line_error(err, "--reports-only and --no-reports contradict")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options, fragment", [
    (["--participant-label", "01", "--participant_label", "02"], "--participant-label given twice: give all"),
    (["-t", "flanker", "--task", "flanker"], "--task given twice"),
    (["--smoothing-fwhm", "4", "--smoothing-fwhm=6"], "--smoothing-fwhm given twice with different values (4, 6)"),
    (["--smooth", "4", "--smoothing-fwhm", "5"], "--smoothing-fwhm given twice with different values"),
])
def test_repeated_options_that_change_a_value_are_refused(capsys, demo_small, tmp_path, options, fragment):
    """argparse keeps the last value: the first would be silently dropped."""
    root, _ = demo_small
    code, err = _run(capsys, root, tmp_path / "o", "participant", *options)
    assert code == 64
    _assert_one_line_error(err, fragment)
    assert not (tmp_path / "o").exists()


def test_repeating_an_option_with_the_same_value_or_appending_is_accepted():
    from bidsglm.cli import check_repeated_options

    parser = build_parser()
    check_repeated_options(parser, ["d", "o", "participant", "--high-pass", "0.01", "--high-pass", "0.01",
                                    "--contrast", "a", "--contrast", "b", "-v", "-v", "--no-reports", "--no-reports"])


# --- labels that name nothing, derivatives as BIDS_DIR, help per level, reruns (issue 16) ---------

def _no_validation(monkeypatch):
    """The validator must not run (and take its second) before a usage error."""
    import bidsglm.validation

    def refuse(*args, **kwargs):
        raise AssertionError("BIDS validation ran before the usage check")

    monkeypatch.setattr(bidsglm.validation, "validate_dataset", refuse)


@pytest.mark.parametrize("option, value, fragments", [
    ("--participant-label", "09", ("participant label(s) not found: sub-09", "dataset has 2: 01, 02")),
    ("-t", "flankr", ("task(s) not found: flankr", "dataset has 1: flanker")),
    ("--session-label", "2", ("session label(s) not found: ses-2", "dataset has 0: none")),
])
def test_participant_selection_naming_nothing_is_a_usage_error_before_validation(
        capsys, demo_small, tmp_path, monkeypatch, option, value, fragments):
    root, _ = demo_small
    _no_validation(monkeypatch)
    code, err = _run(capsys, root, tmp_path / "o", "participant", option, value)
    assert code == 64
    _assert_one_line_error(err, *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value, fragments", [
    ("-t", "flankr", ("task(s) not found in OUTPUT_DIR: flankr", "wrote maps for 1: flanker")),
    ("--participant-label", "09", ("participant label(s) not found in OUTPUT_DIR: sub-09",
                                   "wrote maps for 2: 01, 02")),
    ("--participant-label", "sub-01", ()),  # an existing label passes this check (2 are needed later)
])
def test_group_selection_naming_nothing_lists_what_output_dir_holds(capsys, demo_results, option, value,
                                                                      fragments):
    root, out, _ = demo_results
    code, err = _run(capsys, root, out, "group", option, value, "--atlases", "none")
    if not fragments:
        assert code == 65 and "not found" not in err and "at least 2" in err
        return
    assert code == 64
    _assert_one_line_error(err, *fragments)
    assert "run the participant level first" not in err
    assert not (out / "group").exists()


def test_group_level_without_subject_maps_says_run_the_participant_level(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}')
    code, err = _run(capsys, tmp_path / "bids", out, "group", "-t", "flanker")
    assert code == 65
    _assert_one_line_error(err, "no subject-level maps found in OUTPUT_DIR; run the participant level first")


@pytest.mark.parametrize("skip", [[], ["--skip-bids-validation"]])
def test_derivatives_dataset_as_bids_dir_is_named(capsys, demo_small, tmp_path, monkeypatch, skip):
    root, _ = demo_small
    _no_validation(monkeypatch)
    code, err = _run(capsys, root / "derivatives" / "fmriprep", tmp_path / "o", "participant", *skip)
    assert code == 64
    _assert_one_line_error(err, "BIDS_DIR is a derivatives dataset", "give the raw dataset as BIDS_DIR",
                           "--derivatives")
    assert not (tmp_path / "o").exists()


def test_fmriprep_generated_dataset_without_type_is_refused_too(capsys, demo_copy, tmp_path):
    (demo_copy / "dataset_description.json").write_text(json.dumps(
        {"Name": "prep", "BIDSVersion": "1.9.0", "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.0"}]}))
    code, err = _run(capsys, demo_copy, tmp_path / "o", "participant", "--skip-bids-validation")
    assert code == 64
    _assert_one_line_error(err, "BIDS_DIR is a derivatives dataset (prep)")


def test_each_levels_help_describes_that_level(capsys, tmp_path):
    def described(text: str, flag: str) -> str:  # an option's help, joined over its lines
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag))
        block = [lines[start]] + [line for line in lines[start + 1:]]
        end = next((i for i, line in enumerate(block[1:], 1) if line.lstrip().startswith("-")
                    or not line.startswith(" ")), len(block))
        return " ".join(" ".join(block[:end]).split())

    participant = _help(capsys, tmp_path, tmp_path / "o", "participant")
    group = _help(capsys, tmp_path, tmp_path / "o", "group")
    assert "permutations" not in described(participant, "--n-cpus")
    assert "runs fitted" not in described(group, "--n-cpus") and "permutations" in described(group, "--n-cpus")
    assert "group level" not in described(participant, "--space")
    assert "MNI152NLin2009cAsym" not in described(group, "--space")
    assert "Dataset nodes" not in described(participant, "--model")
    assert "group model" not in described(participant, "--model")
    assert "Run, Session and Subject" not in described(group, "--model")
    assert "--dask-scheduler" in participant and "--dask-scheduler" not in group


def test_rerun_with_other_contrasts_names_the_earlier_ones(capsys, demo_results, tmp_path):
    """Earlier contrasts' maps stay (contrasts may be added one command at a time) and are named,
    per subject, in the log and in the participant report."""
    from bidsglm import reports

    root, out, _ = demo_results
    work = tmp_path / "glm"
    shutil.copytree(out, work)
    code, err = _run(capsys, root, work, "participant", "--skip-bids-validation", "--contrast", "congruent_correct")
    assert code == 0
    notes = [line.split(" WARNING: ")[1] for line in err.splitlines() if "earlier run" in line]
    assert len(notes) == 2 and notes[0].startswith("sub-01 task-flanker") and notes[1].startswith("sub-02")
    assert "contrast(s) errors, incongruent_correct, IncongruentMinusCongruent from an earlier" in notes[0]
    assert "contrast(s) incongruent_correct, IncongruentMinusCongruent from an earlier" in notes[1]  # no errors map
    assert all("group level will model them" in note for note in notes)
    def note(folder):  # the report's sentence for sub-01, given the contrasts its run records list
        records = reports._run_records(folder, "01")
        listed = {name: label for r in records for name, label in r.record["Contrasts"].items()}
        return reports._earlier_contrasts_note(folder, records[0], listed)

    assert "contrast(s) errors, incongruent_correct, IncongruentMinusCongruent from an earlier" in note(work)
    assert note(out) == ""  # the original outputs: every contrast written by their command
