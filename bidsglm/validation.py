"""Validation of BIDS_DIR with the BIDS schema validator (bids-validator-deno)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .caches import user_cache_dir
from .errors import DataError, UsageError


def validator_command() -> str | None:
    """The validator executable: beside this Python first, then on PATH."""
    local = Path(sys.executable).parent / "bids-validator-deno"
    if local.is_file():
        return str(local)
    return shutil.which("bids-validator-deno")


def validate_dataset(bids_dir: Path, work_dir: Path | None = None) -> list[str]:
    """Run the schema validator; return its warnings' codes, raise on errors."""
    exe = validator_command()
    if exe is None:
        raise UsageError(
            "the BIDS validator (bids-validator-deno) is not installed; install it with "
            "'pip install bids-validator-deno' or pass --skip-bids-validation"
        )
    env = dict(os.environ)
    # deno caches modules; HOME may be read-only in containers
    if "DENO_DIR" not in env:  # a per-user folder: a shared /tmp/deno fails for the second user
        deno = Path(work_dir) / "deno" if work_dir else user_cache_dir("deno")
        if deno is not None:
            env["DENO_DIR"] = str(deno)
    proc = subprocess.run(
        [exe, "--format", "json", str(bids_dir)],
        capture_output=True, text=True, env=env, check=False,
    )
    try:
        report = json.loads(proc.stdout)
        issues = report["issues"]["issues"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(
            f"the BIDS validator failed to run (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ''}; "
            "pass --skip-bids-validation to go on without it"
        ) from exc
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        first = errors[0]
        where = first.get("location", "")
        codes = sorted({e.get("code", "?") for e in errors})
        raise DataError(
            f"BIDS validation failed with {len(errors)} error(s) ({', '.join(codes)}); first: "
            f"{first.get('code')} at {where or 'dataset'}"
            f"{(' - ' + first['issueMessage'].splitlines()[0]) if first.get('issueMessage') else ''}. "
            "Fix the dataset or pass --skip-bids-validation",
            bids_dir,
        )
    return sorted({i.get("code", "?") for i in issues})
