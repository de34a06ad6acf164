"""A CPU kernel's rows shared among threads: numba row functions (nogil) over ranges of rows, run
by the calling thread and a pool of Python threads.

Not numba's parallel loops (prange): their parfor machinery was ~30% of what the first run after an
install spends compiling the merge kernel (15.7 -> 11.1 s on the H200 machine, 12.4-13.0 -> 9.3 s
on the 2-core VM), for no speed: at 16 threads merge_half took 28.8-30.5 ms against 31.3-32.5 ms
with prange, and 34.7-37.4 ms against 52.0-56.2 ms beside four sha256 threads (bench/RESULTS.md,
"The first run after an install compiles the CPU kernels"). Nor do they launch numba's OpenMP
layer. Used by the merge kernel (kernels.py), the FP8 kernel (fp8_kernel.py), rounding.decide's
numba twin (rounding_kernel.round_decide), verify's comparison (verifier/compare_kernel.py) and the
ONNX fold's content digests (onnx/_sketch_kernel.py).
The helpers are the pipeline's own daemon Workers (threads.py): an interrupted merge's exit does
not wait for them.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import CancelledError

from .threads import Workers

# Ranges per thread, so that uneven threads still balance, and the fewest elements worth handing
# to another thread
TASKS_PER_THREAD = 4
MIN_TASK_ELEMS = 1 << 15

_pool: Workers | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def on_threads(fn, args: tuple, r0: int, r1: int, cols: int, threads: int | None = None) -> None:
    """fn(*args, lo, hi) over rows r0..r1 (of `cols` elements each), in ranges taken in turn by
    `threads` threads (default: torch.get_num_threads(), the count every torch op of the merge
    uses; the premerge worker, which has no torch, gives its own): this one and the shared pool's.
    A small tensor stays on this thread."""
    global _pool, _pool_size
    if threads is None:
        import torch
        threads = torch.get_num_threads()
    rows = r1 - r0
    tasks = max(1, min(rows, threads * TASKS_PER_THREAD, rows * cols // MIN_TASK_ELEMS)) if threads > 1 else 1
    if tasks == 1:
        fn(*args, r0, r1)
        return
    cuts = [r0 + rows * k // tasks for k in range(tasks + 1)]
    ranges = zip(cuts[:-1], cuts[1:])
    take = threading.Lock()

    def work():
        while True:
            with take:
                lo_hi = next(ranges, None)
            if lo_hi is None:
                return
            fn(*args, *lo_hi)

    with _pool_lock:  # submitted under the lock: a pool replaced by a larger one is never given work
        if _pool_size < threads - 1:
            if _pool is not None:
                # what it runs finishes; what has not started is cancelled: whoever submitted it
                # takes the ranges itself (work() runs until none is left)
                _pool.shutdown(wait=False)
            _pool = Workers(threads - 1, "loramerge-kernel", initializer=_gradual)
            _pool_size = threads - 1
        helpers = [_pool.submit(work) for _ in range(min(threads, tasks) - 1)]
    try:
        work()
    finally:  # every range is taken: wait for the helpers still on one
        for h in helpers:
            try:
                h.result()  # a helper's error is the merge's
            except CancelledError:
                pass  # it never started (a replaced pool): this thread took its ranges


def _gradual() -> None:
    """A helper thread's start: gradual underflow (IEEE's default) for good. A new thread gets its
    creator's floating-point environment, and the pool lives on after it: made by a thread that
    flushed subnormals to zero, it would flush for every later merge (fpenv.py; the kernels' bounds
    allow for flushing, but the same bits whoever made the pool is the simpler promise). Without
    torch (the premerge worker) nothing sets the flag: the threads start with IEEE's default."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)
