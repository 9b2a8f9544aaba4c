"""Logging set-up shared by the command line and worker processes.

It lives below the CLI so that worker entry points (joblib processes) can
configure their own handler without importing the command line."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("bidsglm")


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s bidsglm %(levelname)s: %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
