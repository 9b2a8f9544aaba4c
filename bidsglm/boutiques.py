"""The Boutiques descriptor of the command line, generated from ``build_parser()``.

Boutiques-based platforms (CBRAIN and others) run a tool from a JSON descriptor:
its command line, inputs with types, defaults and allowed values, container
image, output files and exit codes. It is generated from the argument parser
so the two cannot drift; ``tests/test_platforms.py`` regenerates it and
compares it with the file in the repository.

    python -m bidsglm.boutiques > bidsglm.boutiques.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from . import __url__, __version__
from .errors import EX_DATAERR, EX_SOFTWARE, EX_USAGE

IMAGE = f"bidsglm/bidsglm:{__version__}"
EXIT_CODES = [
    (EX_USAGE, "usage error: a bad option or value, OUTPUT_DIR inside BIDS_DIR, the validator missing"),
    (EX_DATAERR, "bad data or model: the one-line message names the file and the problem"),
    (EX_SOFTWARE, "internal error (please report it, with the output of -v)"),
    (73, "OUTPUT_DIR cannot be created or written"),
    (130, "interrupted; finished outputs are kept, a rerun completes the rest"),
]
# Path-valued options that are inputs to read (Boutiques File); OUTPUT_DIR and
# scratch folders are written, so they are strings (paths the tool creates).
_READ_PATHS = {"bids_dir", "derivatives", "model"}
_SKIPPED = (argparse._HelpAction, argparse._VersionAction)


def _flag(action: argparse.Action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def _value_key(action: argparse.Action) -> str:
    return f"[{action.dest.upper()}]"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    return re.sub(r"\s+", " ", text).strip()


def _input(parser: argparse.ArgumentParser, action: argparse.Action) -> dict:
    """One Boutiques input for one argparse action."""
    entry = {"id": action.dest, "name": action.dest.replace("_", " ").capitalize(),
             "description": _help(parser, action), "value-key": _value_key(action)}
    flag_like = isinstance(action, (argparse._StoreTrueAction, argparse._CountAction))
    if flag_like:
        entry["type"] = "Flag"
    elif action.dest in _READ_PATHS:
        entry["type"] = "File"
    elif action.type is int:
        entry["type"] = "Number"
        entry["integer"] = True
    elif action.type is float or getattr(action.type, "__name__", "") == "_positive_float":
        entry["type"] = "Number"
        if getattr(action.type, "__name__", "") == "_positive_float":
            entry["minimum"] = 0
    else:
        entry["type"] = "String"  # paths written, free text, and values like 1/128
    if action.option_strings:
        entry["command-line-flag"] = _flag(action)
    entry["optional"] = bool(action.option_strings) and not action.required
    if action.choices:
        entry["value-choices"] = list(action.choices)
    repeated = isinstance(action, argparse._AppendAction)
    if action.nargs in ("+", "*") or repeated:
        entry["list"] = True
        entry["min-list-entries"] = 1
    if repeated:  # --contrast A --contrast B: the flag is repeated between values
        entry["list-separator"] = f" {entry['command-line-flag']} "
    # Defaults are documented in the description but not given as "default-value":
    # Boutiques would write them onto every command line (group-level options at the
    # participant level too), freezing this version's defaults into the platform's runs.
    default = action.default
    if not flag_like and default is not None and "default" not in entry["description"]:
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        entry["description"] += f" (default: {shown})"
    return entry


def _group_id(title: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", title).strip("_").lower()


def descriptor(parser: argparse.ArgumentParser | None = None) -> dict:
    """The Boutiques (schema 0.5) descriptor of ``parser`` (default: bidsglm's)."""
    if parser is None:
        from .cli import build_parser

        parser = build_parser()
    actions = [a for a in parser._actions if not isinstance(a, _SKIPPED)]
    positionals = [a for a in actions if not a.option_strings]
    options = [a for a in actions if a.option_strings]
    groups = []
    for group in parser._action_groups:
        members = [a.dest for a in group._group_actions if a in options]
        if members and group.title not in ("options", "optional arguments", "positional arguments"):
            groups.append({"id": _group_id(group.title), "name": group.title,
                           **({"description": re.sub(r"\s+", " ", group.description)}
                              if group.description else {}),
                           "members": members})
    return {
        "name": "bidsglm",
        "tool-version": __version__,
        "schema-version": "0.5",
        "description": parser.description,
        "author": "bidsglm developers",
        "url": __url__,
        "command-line": " ".join(["bidsglm"] + [_value_key(a) for a in positionals + options]),
        "container-image": {"type": "docker", "image": IMAGE},  # docker.io, the default index
        "inputs": [_input(parser, a) for a in positionals + options],
        "groups": groups,
        "output-files": [
            {"id": "derivatives_dataset", "name": "Derivatives dataset", "path-template": "[OUTPUT_DIR]",
             "description": "BIDS derivatives: statistical maps, sidecars, reports", "optional": False},
            {"id": "dataset_description", "name": "Dataset description",
             "path-template": "[OUTPUT_DIR]/dataset_description.json",
             "description": "GeneratedBy: bidsglm version (and container image)", "optional": False},
            {"id": "group_report", "name": "Group report", "path-template": "[OUTPUT_DIR]/group/report.html",
             "description": "HTML report of the group level", "optional": True},
        ],
        "error-codes": [{"code": code, "description": text} for code, text in EXIT_CODES],
        "tags": {"domain": ["neuroinformatics", "fmri", "bids-app"]},
        "suggested-resources": {"cpu-cores": 4, "ram": 8, "walltime-estimate": 3600},
    }


def descriptor_text() -> str:
    return json.dumps(descriptor(), indent=2) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(descriptor_text())
