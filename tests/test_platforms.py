"""Platform files: the Boutiques descriptor (generated from build_parser(), checked
by Boutiques' own tools), the brainlife-style config.json entry point (run on
the demo at both levels), CITATION.cff, and provenance in dataset_description.json."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import nibabel as nib
import pytest

from bidsglm import __version__, configjson
from bidsglm.boutiques import EXIT_CODES, descriptor, descriptor_text
from bidsglm.cli import build_parser
from bidsglm.cli import main as cli_main
from conftest import installed_tool

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "bidsglm.boutiques.json"
EXAMPLES = ROOT / "examples"




def _options(parser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


# --- Boutiques -------------------------------------------------------------------

def test_descriptor_in_the_repository_is_the_generated_one():
    assert DESCRIPTOR.read_text() == descriptor_text(), (
        "bidsglm.boutiques.json is out of date: python -m bidsglm.boutiques > bidsglm.boutiques.json")


def test_bosh_validate_accepts_the_descriptor():
    proc = subprocess.run([installed_tool("bosh"), "validate", str(DESCRIPTOR)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_descriptor_agrees_with_the_parser_option_by_option():
    parser = build_parser()
    inputs = {i["id"]: i for i in json.loads(DESCRIPTOR.read_text())["inputs"]}
    actions = _options(parser)
    assert sorted(inputs) == sorted(a.dest for a in actions)  # nothing missing, nothing extra
    command = json.loads(DESCRIPTOR.read_text())["command-line"].split()
    assert command[0] == "bidsglm"
    for action in actions:
        entry = inputs[action.dest]
        assert entry["value-key"] in command, action.dest
        if action.option_strings:
            assert entry["command-line-flag"] in action.option_strings, action.dest
            assert entry["optional"] is True
        else:
            assert "command-line-flag" not in entry and entry["optional"] is False
            assert command.index(entry["value-key"]) < command.index("[PARTICIPANT_LABEL]")
        assert entry.get("value-choices") == (list(action.choices) if action.choices else None), action.dest
        is_list = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
        assert entry.get("list", False) == is_list, action.dest
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._CountAction))
        assert (entry["type"] == "Flag") == switch, action.dest
        if action.type is int:
            assert entry["type"] == "Number" and entry["integer"] is True, action.dest
        # defaults: in the description, never "default-value" (platforms would pass them on)
        assert "default-value" not in entry, action.dest
        if not switch and action.default is not None:
            assert "default" in entry["description"], action.dest
        if action.help:
            assert entry["description"].split(" (default")[0][:40] in re.sub(r"\s+", " ", action.help), action.dest
    # positional order as the parser takes them
    positional = [a.dest for a in actions if not a.option_strings]
    assert [inputs[d]["value-key"] for d in positional] == command[1:1 + len(positional)]


def test_descriptor_declares_image_outputs_and_exit_codes():
    data = descriptor()
    assert data["tool-version"] == __version__
    assert data["container-image"]["image"] == f"bidsglm/bidsglm:{__version__}"
    assert {c["code"] for c in data["error-codes"]} == {code for code, _ in EXIT_CODES} >= {64, 65, 70, 130}
    assert data["output-files"][0]["path-template"] == "[OUTPUT_DIR]"
    readme = (ROOT / "README.md").read_text()
    for code, _ in EXIT_CODES:  # the README's table of exit codes lists every code declared
        assert re.search(rf"^\| {code} \|", readme, re.M), code


def _simulated_command(invocation: Path) -> str:
    proc = subprocess.run([installed_tool("bosh"), "exec", "simulate", str(DESCRIPTOR), "-i", str(invocation)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("bidsglm ")]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_bosh_simulate_gives_the_readme_command_line():
    command = _simulated_command(EXAMPLES / "boutiques-invocation.json")
    assert command in (ROOT / "README.md").read_text()
    args = build_parser().parse_args(shlex.split(command)[1:])
    invocation = json.loads((EXAMPLES / "boutiques-invocation.json").read_text())
    assert str(args.bids_dir) == invocation["bids_dir"] and args.analysis_level == "participant"
    assert args.contrast == invocation["contrast"] and args.participant_label == ["01"]
    assert args.smoothing_fwhm == 6 and args.n_cpus == 4


def test_bosh_simulate_repeats_the_flag_of_repeatable_options(tmp_path):
    invocation = tmp_path / "invocation.json"
    invocation.write_text(json.dumps({"bids_dir": "/d", "output_dir": "/o", "analysis_level": "group",
                                      "group_contrast": ["a=mean", "b=age"], "tfce": True,
                                      "confounds": ["trans_x", "rot_z"]}))
    args = build_parser().parse_args(shlex.split(_simulated_command(invocation))[1:])
    assert args.group_contrast == ["a=mean", "b=age"] and args.tfce is True
    assert args.confounds == ["trans_x", "rot_z"]


# --- config.json (brainlife-style) -------------------------------------------------

def _write(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


def test_config_json_runs_both_levels_like_the_command_line(demo_results, tmp_path, monkeypatch):
    """The participant level from config.json writes the same maps as the command
    line with the same options (the demo_results fixture); then the group level."""
    root, reference, _ = demo_results
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "config.json", {
        "bids": str(root), "level": "participant", "skip_bids_validation": True, "quiet": True,
        "contrasts": {"IncongruentMinusCongruent": "incongruent_correct - congruent_correct",
                      "congruent_correct": "congruent_correct", "incongruent_correct": "incongruent_correct",
                      "errors": "incongruent_incorrect"},
        "_app": "brainlife bookkeeping, ignored"})
    assert configjson.main([]) == 0  # config.json in the working folder, outputs into ./output
    out = tmp_path / "output"
    maps = sorted(out.rglob("*_statmap.nii.gz"))
    assert len(list(out.rglob("*contrast-incongruentMinusCongruent_stat-z_statmap.nii.gz"))) == 2 * 3
    assert [p.relative_to(out) for p in maps] == sorted(p.relative_to(reference)
                                                        for p in reference.rglob("*_statmap.nii.gz")
                                                        if "group" not in p.parts)
    for path in maps:
        ours = np.asanyarray(nib.load(path).dataobj)
        theirs = np.asanyarray(nib.load(reference / path.relative_to(out)).dataobj)
        np.testing.assert_array_equal(ours, theirs)

    group = _write(tmp_path / "group.json", {"bids": str(root), "output": str(out), "level": "group",
                                             "permutations": 10, "random_seed": 1, "quiet": True,
                                             "allow_incomplete": True})
    assert configjson.main([str(group)]) == 0
    assert list((out / "group").rglob("*stat-t_statmap.nii.gz"))
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Version"] == __version__


@pytest.mark.parametrize("config, message", [
    ({"bids": "/d", "level": "participant", "smoothing": 6}, "unknown key(s) 'smoothing'"),
    ({"bids": "/d", "level": "participant", "smoothing_fwhm": "six"}, "'six' is not a number"),
    ({"bids": "/d", "level": "participant", "smoothing_fwhm": [6]}, "key 'smoothing_fwhm': expected a string"),
    ({"bids": "/d", "level": "subject"}, "invalid choice: 'subject'"),
    ({"bids": "/d", "level": "group", "tfce": "yes"}, "key 'tfce': expected true or false"),
    ({"bids": "/d", "level": "group", "n_cpus": 1.5}, "invalid int value: '1.5'"),
    ({"level": "group"}, "missing key 'bids'"),
    ({"bids": "/d", "level": "group", "permutations": 10, "n-perm": 20}, "give the same option"),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_config_json_refuses_a_bad_key_or_value_in_one_line(tmp_path, capsys, config, message):
    path = _write(tmp_path / "config.json", config)
    assert configjson.main([str(path)]) == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err, err


def test_config_json_that_is_not_json_or_missing(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{"bids": "/d",}')
    assert configjson.main([str(bad)]) == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid JSON" in err and "line 1" in err
    assert configjson.main([str(tmp_path / "absent.json")]) == 64
    assert "cannot be read" in capsys.readouterr().err


def test_config_json_errors_after_parsing_have_the_command_lines_exit_codes(demo_copy, tmp_path):
    """A contrast naming no condition: 65 from both entry points, before any output."""
    config = {"bids": str(demo_copy), "output": str(tmp_path / "a"), "level": "participant",
              "contrasts": ["bad=no_such_condition"], "skip_bids_validation": True, "quiet": True}
    code = configjson.main([str(_write(tmp_path / "c.json", config))])
    argv = configjson.command_line({**config, "output": str(tmp_path / "b")}, build_parser())
    assert code == cli_main(argv) == 65


def test_example_config_files_are_valid(tmp_path):
    for name in ("config.json", "config-group.json"):
        config = json.loads((EXAMPLES / name).read_text())
        argv = configjson.command_line(config, build_parser())
        args = build_parser().parse_args(argv)
        assert args.analysis_level == config["level"]
    args = build_parser().parse_args(configjson.command_line(json.loads((EXAMPLES / "config.json").read_text()),
                                                             build_parser()))
    assert args.contrast == ["IncongruentMinusCongruent=incongruent_correct - congruent_correct"]
    assert args.derivatives == [Path("input/bids/derivatives/fmriprep")] and args.task == ["flanker"]


def test_config_json_help_lists_every_option(capsys):
    assert configjson.main(["--help"]) == 0
    text = capsys.readouterr().out
    for action in _options(build_parser()):
        assert action.dest in text


# --- citation and provenance -----------------------------------------------------------

def test_citation_cff_validates_against_its_schema():
    cff = ROOT / "CITATION.cff"
    proc = subprocess.run([installed_tool("check-jsonschema"), "--builtin-schema", "vendor.citation-file-format",
                           str(cff)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = re.search(r"^version: (\S+)$", cff.read_text(), re.M).group(1)
    assert version == __version__


def test_dataset_description_records_the_container_image(tmp_path, monkeypatch):
    from bidsglm.outputs import ensure_dataset

    monkeypatch.delenv("BIDSGLM_CONTAINER_IMAGE", raising=False)
    ensure_dataset(tmp_path / "plain", {"raw": tmp_path})
    plain = json.loads((tmp_path / "plain" / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert plain["Version"] == __version__ and "Container" not in plain
    monkeypatch.setenv("BIDSGLM_CONTAINER_IMAGE", "bidsglm/bidsglm:0.1.0")
    monkeypatch.setenv("BIDSGLM_CONTAINER_DIGEST", "sha256:" + "ab" * 32)
    ensure_dataset(tmp_path / "image", {"raw": tmp_path})
    inside = json.loads((tmp_path / "image" / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert inside["Container"] == {"Type": "docker", "Tag": "bidsglm/bidsglm:0.1.0",
                                   "URI": "docker://bidsglm/bidsglm@sha256:" + "ab" * 32}
    monkeypatch.setenv("APPTAINER_CONTAINER", "/scratch/bidsglm.sif")
    monkeypatch.delenv("BIDSGLM_CONTAINER_DIGEST")
    ensure_dataset(tmp_path / "sif", {"raw": tmp_path})
    sif = json.loads((tmp_path / "sif" / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert sif["Container"] == {"Type": "singularity", "Tag": "bidsglm/bidsglm:0.1.0"}


def test_permission_hint_inside_the_image_names_the_docker_user_option(monkeypatch):
    from bidsglm.container import permission_hint

    monkeypatch.delenv("BIDSGLM_CONTAINER_IMAGE", raising=False)
    assert permission_hint() == ""
    monkeypatch.setenv("BIDSGLM_CONTAINER_IMAGE", "bidsglm/bidsglm:0.1.0")
    for var in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    assert "--user $(id -u):$(id -g)" in permission_hint()
    monkeypatch.setenv("APPTAINER_CONTAINER", "/x.sif")
    assert "--user" not in permission_hint() and "can write" in permission_hint()
