"""Typed failures. Code below the CLI raises these; only the CLI turns them
into one-line messages and exit codes."""

from __future__ import annotations

import re
from pathlib import Path


def one_line(text: str) -> str:
    """Text folded onto one line (messages from nibabel and others may hold newlines; a file name
    may too): each line break, with the spaces around it, becomes one space."""
    return re.sub(r"[ \t]*[\r\n]+[ \t]*", " ", str(text)).strip()

EX_OK = 0
EX_USAGE = 64  # bad command line
EX_DATAERR = 65  # bad input data or model
EX_SOFTWARE = 70  # internal error
EX_CANTCREAT = 73  # cannot create output (OUTPUT_DIR not writable, disk full, name too long, ...)
EX_INTERRUPTED = 130  # SIGINT (Ctrl-C); SIGTERM ends with 128 + 15 = 143


class BidsGlmError(Exception):
    """Base class: a problem with an optional file (and location) it concerns."""

    exit_code = EX_SOFTWARE

    def __init__(self, problem: str, path: str | Path | None = None, where: str | None = None):
        self.problem = one_line(problem)
        self.path = Path(path) if path is not None else None
        self.where = where
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(one_line(str(self.path)))
        if self.where:
            parts.append(one_line(self.where))
        prefix = ": ".join(parts)
        return f"{prefix}: {self.problem}" if prefix else self.problem

    def __reduce__(self):  # keep type and fields across joblib worker processes
        return (self.__class__, (self.problem, self.path, self.where))


class UsageError(BidsGlmError):
    """The command line asks for something impossible or contradictory."""

    exit_code = EX_USAGE


class DataError(BidsGlmError):
    """Input data (images, tables, sidecars) are missing, malformed or inconsistent."""

    exit_code = EX_DATAERR


class ModelError(DataError):
    """The statistical model (contrasts, conditions, confounds) cannot be built."""


class OutputError(BidsGlmError):
    """OUTPUT_DIR cannot take the results: not writable, not a folder, disk full, a name too
    long, or a path that would resolve outside OUTPUT_DIR or into an input dataset."""

    exit_code = EX_CANTCREAT
