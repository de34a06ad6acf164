"""SIGTERM and SIGHUP (what schedulers, containers and closed terminals send) handled like Ctrl-C.

The command line installs handlers (handling()) that raise in the main thread, so the same
unwinding that Ctrl-C's KeyboardInterrupt gets removes the staged output; the exit status is
128 + the signal number (130, 143, 129). Three rules keep the unwinding and the cleanup safe:
- a signal that arrives inside a deferred() block (the renames that commit an output) waits for
  the block to end, so it never lands between two renames;
- once one signal has been raised, later ones are ignored until the process exits, so a second
  Ctrl-C or a scheduler's repeated SIGTERM cannot interrupt the removal of the staging;
- a signal that arrives while the main thread is importing a module waits for the import to end:
  an exception raised inside an extension module's initialisation can be swallowed there. A
  SIGTERM in the CLI's first half second, during torch's import, was lost (and, with the rule
  above, every later one too: the merge ran to the end) or left a module half-imported for the
  next import to trip on (an internal error). The held signal is sent again every
  REDELIVER_SECONDS until it lands outside an import (torch's takes 1-5 s), or raised where it
  is once held for MAX_HOLD_SECONDS; one still held when the command ends is raised then.
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


_state = {"deferring": 0, "pending": None, "raised": False, "installed": False, "depth": 0, "held_at": 0.0,
          "generation": 0, "closing": False}
# the poller's check-and-send against handling()'s exit: no re-sent signal after the handlers are
# put back (SIGTERM's default would kill a process whose output is already committed)
_send_lock = threading.Lock()

# how often a signal held back by an import is sent again (each one interrupts the main thread's
# system call of the moment: not more often than needed)
REDELIVER_SECONDS = 0.1
# the longest an import holds a signal (an import from a slow network disk, a hung one): raised
# inside it after this, as without the hold (a process stuck in an import still stops)
MAX_HOLD_SECONDS = 10.0
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


def _poll(generation: int) -> None:
    """handling()'s thread (started with the handlers, not from one: a thread started inside a
    signal handler can deadlock on threading's own lock): re-sends a signal an import holds to the
    main thread until the handler takes it."""
    while _state["generation"] == generation:
        time.sleep(REDELIVER_SECONDS)
        with _send_lock:
            if (_state["generation"] == generation and _state["installed"] and _state["held_at"]
                    and _state["pending"] is not None and not _state["raised"] and not _state["deferring"]):
                _send_to_main(_state["pending"])


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
    if _state["deferring"] or _state["closing"]:
        _state["pending"] = _state["pending"] or signum
        return
    held = _state["held_at"]
    # a second signal is held too: raised inside torch's import, a SIGTERM sent twice crashed the
    # process (std::terminate from its pybind11 init) or was swallowed, as the first one was
    if _importing(frame) and not (held and time.monotonic() - held > MAX_HOLD_SECONDS):
        if _state["pending"] is None:
            _state["pending"], _state["held_at"] = signum, time.monotonic()
        return
    signum = _state["pending"] or signum
    _state["pending"], _state["held_at"] = None, 0.0
    _raise(signum)


@contextmanager
def handling():
    """Install the handlers for the duration (main thread only, and once: elsewhere, or inside
    another handling(), a no-op). A signal an import still holds when the block ends is raised
    then: the command was interrupted all the same."""
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in HANDLED}
    generation = _state["generation"] + 1
    # the caller's frames (an import the command itself runs in is not one to wait for)
    _state.update(deferring=0, pending=None, raised=False, installed=True, depth=_depth(sys._getframe(2)),
                  held_at=0.0, generation=generation)
    threading.Thread(target=_poll, args=(generation,), name="signal-redeliver", daemon=True).start()
    try:
        yield
    finally:
        # from here on the handler only records: a signal raised while this waits for the lock
        # would skip the restore (and leave the handlers installed)
        _state["closing"] = True
        with _send_lock:
            for s, h in previous.items():
                signal.signal(s, h)
            left = _state["pending"] if not _state["raised"] else None
            _state.update(deferring=0, pending=None, raised=False, installed=False, depth=0, held_at=0.0,
                          generation=generation + 1, closing=False)
        if left is not None:
            raise KeyboardInterrupt if left == signal.SIGINT else Terminated(left)


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
            signum, _state["pending"], _state["held_at"] = _state["pending"], None, 0.0
            _raise(signum)


def exit_status(e: BaseException) -> int:
    """128 + the signal number, as shells report a process killed by that signal."""
    return 128 + int(getattr(e, "signum", signal.SIGINT))
