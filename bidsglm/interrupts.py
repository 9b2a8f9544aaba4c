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


def install_signal_handlers(received: list) -> dict:
    """For a command's main(): SIGINT and SIGTERM raise KeyboardInterrupt (``deliver``), so its
    output session rolls back, and are remembered in ``received`` (an interrupt that surfaces as
    another exception still ends the command as interrupted). Also where the parent left SIGINT
    ignored (a background job, a test runner's worker). Returns the handlers to restore."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return {}
    reset()

    def on_signal(signum, frame):
        received.append(signum)
        deliver(signum)  # raises KeyboardInterrupt, at once or at the next safe point

    return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_signal_handlers(previous: dict) -> None:
    import signal

    for signum, handler in previous.items():
        signal.signal(signum, handler)
