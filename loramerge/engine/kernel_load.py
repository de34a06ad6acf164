"""The CPU kernels, loaded on a thread of their own while the merge begins without them.

Before the first half-precision merge on the CPU, numba must be imported, set up and the fused
kernel loaded from its cache: ~0.5 s on the 2-core VM, ~2 s on the H200 machine's CPUs. The first
run after an install compiles the kernel instead: 13 s on the VM, 16 s on the H200 machine, and
the merge waited for all of it (bench/RESULTS.md).

Loading is serial CPU work under the GIL: begun beside torch's import it saved nothing (measured on
both machines), and the torch path that could merge meanwhile is 10-15x slower than the kernel,
so for a load from the cache the compute thread simply waits, as before. A compilation is another
matter: while numba compiles, the compute thread merges on the torch path, which needs no numba
(rounding.decide in torch, not its numba twin) and gives the same bits (every path rounds
correctly: test_rounding), and switches to the kernel as soon as it is there.

start() is the pipeline's, for a CPU merge that will use the kernel; use_kernel() and loading()
are the math's. With no loader started (library calls of ops, GPU runs) both answer as if the
kernel were loaded: it is then imported on first use, as it always was.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time

import torch

from . import jit_time


class Loader:
    """Loads the fused kernel on a daemon thread: a tiny merge through kernels.merge_half with the
    run's first-pass precision, the same entry points (and signatures) as the first real one."""

    def __init__(self, accum: torch.dtype):
        self.done = threading.Event()
        self.merged_meanwhile = 0  # merges the torch path took while numba compiled
        self.seconds = 0.0
        self.pretending = False  # the test hook's stand-in for a compilation
        self._thread = threading.Thread(target=self._load, args=(accum,), name="loramerge-kernel-load", daemon=True)
        self._thread.start()

    def _load(self, accum: torch.dtype) -> None:
        t0 = time.perf_counter()
        try:
            delay = float(os.environ.get("LORAMERGE_TEST_KERNEL_LOAD_DELAY") or 0)
            if delay:  # test hook: a load that takes this long, as a compilation does
                self.pretending = True
                time.sleep(delay)
                self.pretending = False
            from . import kernels
            w = torch.zeros(2, 8, dtype=torch.bfloat16)
            a = torch.ones(2, 8)
            b = torch.ones(2, 2)
            kernels.merge_half(w, a, b, torch.ones(2, dtype=torch.float64), torch.bfloat16, accum=accum)
        except BaseException:  # noqa: BLE001  the first real call raises it again, where the run reports it
            pass
        finally:
            self.seconds = time.perf_counter() - t0
            self.done.set()


_current: Loader | None = None
_lock = threading.Lock()


def available() -> bool:
    """Whether the fused kernel can be used at all, without importing numba to find out."""
    return not os.environ.get("LORAMERGE_NO_KERNEL") and importlib.util.find_spec("numba") is not None


def start(accum: torch.dtype) -> Loader | None:
    """Begin loading the kernel, once per process; None when there is nothing to begin (no numba,
    LORAMERGE_NO_KERNEL, or a load begun before: a finished one answers at once)."""
    global _current
    with _lock:
        if _current is not None or not available():
            return None
        _current = Loader(accum)
        return _current


def loading() -> bool:
    """A load is under way: numba's modules may be half-imported, so the math keeps off them."""
    loader = _current
    return loader is not None and not loader.done.is_set()


def use_kernel() -> bool:
    """For a CPU half-precision merge about to start: True to use the fused kernel (loaded, or
    never begun here: imported on first use), after waiting for a load from the cache; False
    while numba compiles it (the torch path merges meanwhile; counted)."""
    loader = _current
    if loader is None:
        return True
    while not loader.done.wait(0.005):
        if jit_time.compiling() or loader.pretending:
            loader.merged_meanwhile += 1  # the compute thread's alone: no lock needed
            return False
    return True
