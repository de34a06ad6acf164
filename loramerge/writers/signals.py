"""SIGTERM and SIGHUP (what schedulers, containers and closed terminals send) handled like Ctrl-C.

The command line installs handlers (handling()) that raise in the main thread, so the same
unwinding that Ctrl-C's KeyboardInterrupt gets removes the staged output; the exit status is
128 + the signal number (130, 143, 129). Two rules keep the cleanup itself safe:
- a signal that arrives inside a deferred() block (the renames that commit an output) waits for
  the block to end, so it never lands between two renames;
- once one signal has been raised, later ones are ignored until the process exits, so a second
  Ctrl-C or a scheduler's repeated SIGTERM cannot interrupt the removal of the staging.
Library callers keep their own handlers: nothing is installed unless asked.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

HANDLED = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                            getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt so every `except KeyboardInterrupt` and
    `finally` that cleans up after Ctrl-C does so for these too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_state = {"deferring": 0, "pending": None, "raised": False}


def _raise(signum: int):
    _state["raised"] = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum, frame):
    if _state["raised"]:
        return  # the cleanup of the first one is running: let it finish
    if _state["deferring"]:
        _state["pending"] = _state["pending"] or signum
        return
    _raise(signum)


@contextmanager
def handling():
    """Install the handlers for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in HANDLED}
    _state.update(deferring=0, pending=None, raised=False)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state.update(deferring=0, pending=None, raised=False)


@contextmanager
def deferred():
    """Hold back the handled signals while the block runs; deliver one that came at its end.
    Used around the renames that commit an output (Ctrl-C too: Python's own SIGINT handler is
    replaced only under handling(); without it, this block is not protected from Ctrl-C)."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        if not _state["deferring"] and _state["pending"] is not None and not _state["raised"]:
            signum, _state["pending"] = _state["pending"], None
            _raise(signum)


def exit_status(e: BaseException) -> int:
    """128 + the signal number, as shells report a process killed by that signal."""
    return 128 + int(getattr(e, "signum", signal.SIGINT))
