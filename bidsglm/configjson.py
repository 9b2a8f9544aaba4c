"""brainlife-style entry point: ``bidsglm-config [config.json]``.

brainlife.io apps are an executable that reads ``config.json`` from the working
folder (input paths and parameters as keys) and writes into fixed folders. This
turns such a file into the command line and runs it, so validation, messages
and exit codes are exactly the command line's. Keys are the options' names
(``smoothing_fwhm`` or ``smoothing-fwhm``), plus a few platform names:

    {"bids": "input/bids", "fmriprep": "input/fmriprep", "level": "participant",
     "task": "flanker", "contrasts": {"IvC": "incongruent - congruent"},
     "smoothing_fwhm": 6, "permutations": 5000}

``output`` defaults to ``output`` in the working folder. Keys starting with
``_`` (brainlife's own bookkeeping) are ignored. A bad key or value is one line
on stderr and exit 64, before anything runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EX_USAGE

# platform names for the positional arguments and common options
ALIASES = {
    "bids": "bids_dir", "fmriprep": "derivatives", "fmriprep_dir": "derivatives",
    "output": "output_dir", "level": "analysis_level", "contrasts": "contrast",
    "group_contrasts": "group_contrast", "group_f_contrasts": "group_f_contrast",
}
DEFAULT_OUTPUT = "output"
_SKIPPED = (argparse._HelpAction, argparse._VersionAction)


class ConfigError(Exception):
    """A key or value of config.json that cannot become a command line."""


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every accepted key: the option's dest and its long flags without dashes."""
    keys = {}
    for action in parser._actions:
        if isinstance(action, _SKIPPED):
            continue
        keys[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--"):
                keys[flag[2:]] = keys[flag[2:].replace("-", "_")] = action
    for alias, dest in ALIASES.items():
        keys[alias] = keys[dest]
    return keys


def _scalar(key: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"key '{key}': expected a string or a number, got {json.dumps(value)}")
    return str(value)


def _values(key: str, value, action: argparse.Action) -> list[str]:
    """The command-line words for one key."""
    flag = action.option_strings[0] if action.option_strings else None
    longs = [o for o in action.option_strings if o.startswith("--")]
    flag = longs[0] if longs else flag
    if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
        if isinstance(action, argparse._CountAction) and type(value) is int and value >= 0:
            return [flag] * value
        if not isinstance(value, bool):
            raise ConfigError(f"key '{key}': expected true or false, got {json.dumps(value)}")
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction):  # repeatable: a list, a string or {name: expression}
        if isinstance(value, dict):
            items = [f"{_scalar(key, name)}={_scalar(key, expr)}" for name, expr in value.items()]
        else:
            items = [_scalar(key, v) for v in (value if isinstance(value, list) else [value])]
        return [word for item in items for word in (flag, item)]
    if action.nargs in ("+", "*"):
        items = [_scalar(key, v) for v in (value if isinstance(value, list) else [value])]
        if not items:
            raise ConfigError(f"key '{key}': expected at least one value")
        return ([flag] if flag else []) + items
    return ([flag] if flag else []) + [_scalar(key, value)]


def command_line(config: dict, parser: argparse.ArgumentParser) -> list[str]:
    """The bidsglm arguments that ``config`` stands for."""
    if not isinstance(config, dict):
        raise ConfigError("expected a JSON object of keys and values")
    keys = _actions(parser)
    config = {k: v for k, v in config.items() if not str(k).startswith("_") and v is not None}
    unknown = sorted(k for k in config if k not in keys)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(map(repr, unknown))}; see bidsglm-config --help")
    by_dest: dict[str, str] = {}
    for key in config:
        dest = keys[key].dest
        if dest in by_dest:
            raise ConfigError(f"keys '{by_dest[dest]}' and '{key}' give the same option")
        by_dest[dest] = key
    by_dest.setdefault("output_dir", None)
    positional = [a for a in parser._actions if not a.option_strings and not isinstance(a, _SKIPPED)]
    argv = []
    for action in positional:
        key = by_dest.pop(action.dest, None)
        if key is None and action.dest == "output_dir":
            argv.append(DEFAULT_OUTPUT)
            continue
        if key is None:
            names = [k for k, d in ALIASES.items() if d == action.dest] + [action.dest]
            raise ConfigError(f"missing key '{names[0]}' ({action.dest})")
        argv += _values(key, config[key], action)
    for dest, key in by_dest.items():
        if key is not None:
            argv += _values(key, config[key], keys[key])
    return argv


def _check(argv: list[str], parser: argparse.ArgumentParser) -> None:
    """Parse as the command line would, turning its usage error into ConfigError."""
    def error(message):
        raise ConfigError(message)

    parser.error = error
    parser.parse_args(argv)


def _help_text(parser: argparse.ArgumentParser) -> str:
    keys = _actions(parser)
    dests = sorted({a.dest for a in keys.values()})
    aliases = ", ".join(f"{k} ({v})" for k, v in ALIASES.items())
    return (__doc__.strip() + "\n\nKeys: " + ", ".join(dests) + f"\nPlatform names: {aliases}\n"
            "Values: true/false for switches; a list (or one value) for options taking several; "
            "{name: expression} or a list of 'name=expression' for contrasts.\n")


def main(argv=None) -> int:
    from .cli import build_parser, main as cli_main

    args = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(_help_text(parser))
        return 0
    if len(args) > 1:
        sys.stderr.write("usage: bidsglm-config [config.json]\n")
        return EX_USAGE
    path = Path(args[0] if args else "config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        sys.stderr.write(f"bidsglm-config: {path}: cannot be read ({exc.strerror})\n")
        return EX_USAGE
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        sys.stderr.write(f"bidsglm-config: {path}: not valid JSON ({exc})\n")
        return EX_USAGE
    except RecursionError:
        sys.stderr.write(f"bidsglm-config: {path}: not valid JSON (nested too deeply)\n")
        return EX_USAGE
    try:
        cli_args = command_line(config, parser)
        _check(cli_args, parser)
    except ConfigError as exc:
        sys.stderr.write(f"bidsglm-config: {path}: {exc}\n")
        return EX_USAGE
    return cli_main(cli_args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
