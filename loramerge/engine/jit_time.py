"""Seconds numba has spent compiling in this process, for apply's report.

The first CPU merge after an install compiles the fused kernels for the machine (~7 s on two
cores; ~11 s on the H200 machine when the float64 pass was still compiled every time:
bench/RESULTS.md, "The first run after an install compiles the CPU kernels"); later runs load them from numba's on-disk cache and compile nothing. Reporting it
says why a first run was slow. Measured with numba's event API ("numba:compile" start/end, on the
compiling thread); only the outermost compilation on a thread counts, as a kernel's callees are
compiled inside it.
Standard library only: numba is imported by the kernel modules, which call install().
"""

from __future__ import annotations

import threading
import time

_lock = threading.Lock()
_local = threading.local()
_total = 0.0
_installed = False


def seconds() -> float:
    """Total seconds of compilation so far (0 if numba was never used)."""
    return _total


def _start() -> None:
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.t0 = time.perf_counter()
    _local.depth = depth + 1


def _end() -> None:
    global _total
    _local.depth = getattr(_local, "depth", 1) - 1
    if _local.depth == 0:
        with _lock:
            _total += time.perf_counter() - _local.t0


def install() -> None:
    """Start counting (once per process; called where numba is imported)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    from numba.core import event

    class _Clock(event.Listener):
        def on_start(self, ev):
            _start()

        def on_end(self, ev):
            _end()

    event.register("numba:compile", _Clock())
