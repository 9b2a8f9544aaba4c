"""Interrupts (SIGINT, SIGTERM) and compiled kernels.

The CLI's signal handler calls ``deliver``, which raises KeyboardInterrupt at
once: the output session then rolls back and the CLI exits 130 (143 for
SIGTERM). Raised while a parallel numba kernel runs, that exception crashes
the process (segmentation fault) or surfaces as a SystemError, so code that
calls such kernels in a loop runs inside ``deferred()``: there the signal is
only recorded, and ``check()`` - called between kernel calls - raises it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

_depth = 0
_pending: list[int] = []


def deliver(signum: int) -> None:
    """Called by the CLI's handler (main thread): raise now, or at the next ``check()``."""
    if _depth > 0:
        _pending.append(signum)
        return
    raise KeyboardInterrupt


def reset() -> None:
    """Forget a signal left pending by an earlier command in this process."""
    _pending.clear()


def check() -> None:
    """A safe point between kernel calls: raise a signal that arrived meanwhile."""
    if _pending:
        _pending.clear()
        raise KeyboardInterrupt


@contextmanager
def deferred():
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    check()
