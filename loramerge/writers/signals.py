"""SIGTERM and SIGHUP (what schedulers, containers and closed terminals send) handled like Ctrl-C.

The command line installs handlers (handling()) that raise in the main thread, so the same
unwinding that Ctrl-C's KeyboardInterrupt gets removes the staged output; the exit status is
128 + the signal number (130, 143, 129). Two rules keep the cleanup itself safe:
- a signal that arrives inside a deferred() block (the renames that commit an output) waits for
  the block to end, so it never lands between two renames;
- once one signal has been raised, later ones are ignored until the process exits, so a second
  Ctrl-C or a scheduler's repeated SIGTERM cannot interrupt the removal of the staging;
- a signal that arrives while the main thread is importing a module waits for the import to end
  (it is sent again every REDELIVER_SECONDS until it lands outside one). An exception raised
  inside an extension module's initialisation can be swallowed there: a SIGTERM in the CLI's
  first half second, during torch's import, was lost (and, with the rule above, every later one
  too: the merge ran to the end) or left a module half-imported for the next import to trip on
  (an internal error). torch's import takes 1-5 s: that is the most the signal waits.
Library callers keep their own handlers: nothing is installed unless asked.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager

HANDLED = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                            getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt so every `except KeyboardInterrupt` and
    `finally` that cleans up after Ctrl-C does so for these too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_state = {"deferring": 0, "pending": None, "raised": False, "installed": False, "depth": 0}

# how often a signal held back by an import is sent again
REDELIVER_SECONDS = 0.05
# the import system's own frames: one of them below the handler's frame means an import is running
_IMPORT_FILES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")


def _raise(signum: int):
    _state["raised"] = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _depth(frame) -> int:
    n = 0
    while frame is not None:
        n, frame = n + 1, frame.f_back
    return n


def _importing(frame) -> bool:
    """Whether `frame` runs inside an import started after handling() was entered (an import
    around the whole command, a CLI run from a module's top level, does not count)."""
    for _ in range(_depth(frame) - _state["depth"]):
        if frame.f_code.co_filename in _IMPORT_FILES:
            return True
        frame = frame.f_back
    return False


def _redeliver(signum: int) -> None:
    """Send `signum` again until the handler has taken it (or handling() ended)."""
    while _state["installed"] and _state["pending"] == signum and not _state["raised"]:
        time.sleep(REDELIVER_SECONDS)
        if _state["installed"] and _state["pending"] == signum and not _state["raised"] and not _state["deferring"]:
            _send_to_main(signum)


def _send_to_main(signum: int) -> None:
    # to the main thread itself: a signal taken by another thread would wait for the main
    # thread's next bytecode, not interrupt a sleep or a wait it is in
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signum)
    else:
        signal.raise_signal(signum)


def _handler(signum, frame):
    if _state["raised"]:
        return  # the cleanup of the first one is running: let it finish
    if _state["deferring"]:
        _state["pending"] = _state["pending"] or signum
        return
    if _importing(frame):
        if _state["pending"] is None:
            _state["pending"] = signum
            threading.Thread(target=_redeliver, args=(signum,), name="loramerge-signal", daemon=True).start()
        return
    _state["pending"] = None
    _raise(signum)


@contextmanager
def handling():
    """Install the handlers for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in HANDLED}
    # the caller's frames (an import the command itself runs in is not one to wait for)
    _state.update(deferring=0, pending=None, raised=False, installed=True, depth=_depth(sys._getframe(2)))
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state.update(deferring=0, pending=None, raised=False, installed=False, depth=0)


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
