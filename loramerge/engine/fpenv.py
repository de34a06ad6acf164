"""Gradual underflow for the threads that do merge math, whatever the caller set.

torch.set_flush_denormal(True) (or a library built with -ffast-math) makes the CPU read float32
and float64 subnormals as zero (DAZ) and flush subnormal results to zero (FTZ). Every bfloat16
subnormal is a float32 subnormal, so torch's bf16 -> float32/float64 conversions then read them as
0 and results in that range round wrong. The setting belongs to a thread (x86's MXCSR), and a new
thread starts with its creator's. That includes the threads of an OpenMP pool, which GNU OpenMP
(torch's on Linux; numba's parallel loops share it) makes once per thread that runs parallel
regions, at its first one, and, unlike Intel's and LLVM's OpenMP, never brings in line with that
thread afterwards: a caller that flushed when it first ran a parallel torch op keeps pool threads
that flush, whatever it sets later.

`gradual_underflow()` covers the calling thread for as long as it is inside: where it flushes,
flushing off and its OpenMP pools given its floating-point environment; threads it starts inside
inherit it. On the way out it puts the thread's flushing back, but leaves the pools with gradual
underflow (IEEE's default): flushing them again would leave them flushing after the caller turns
it off in its thread, where the next entry would not look (below). Not covered: a thread that
flushed when its pool was made and has turned flushing off since (its pool still flushes, and
finding that out costs a parallel region, milliseconds on a busy machine, at every entry). The
engine's own worker threads (apply, unmerge) are made inside, so their pools never flush.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from contextlib import contextmanager

import torch

from ..errors import NumericsError

_local = threading.local()
_libs: dict[str, ctypes.CDLL | None] = {}


def flushes_subnormals() -> bool:
    """Whether this thread flushes float32 subnormals to zero (DAZ or FTZ): 2^-149 * 2 is 2^-148
    with gradual underflow, 0 with either."""
    tiny = torch.tensor(1, dtype=torch.int32).view(torch.float32)
    return int(tiny.mul(2).view(torch.int32)) != 2


@contextmanager
def gradual_underflow():
    """Gradual underflow in this thread and its OpenMP pools for the duration (module docstring);
    reentrant. Raises NumericsError where the thread flushes and torch cannot turn that off."""
    if getattr(_local, "depth", 0):
        _local.depth += 1
        try:
            yield
        finally:
            _local.depth -= 1
        return
    flushed = _unflush()
    _local.depth = 1
    try:
        if flushed:  # (a pool that flushes under a thread that does not is not looked for: docstring)
            _sync_pools()
        yield
    finally:
        _local.depth = 0
        if flushed:  # the thread only: its pools keep gradual underflow (module docstring)
            torch.set_flush_denormal(True)


def _unflush() -> bool:
    """Turn this thread's flushing of subnormals off; whether it was on (to be put back)."""
    if not flushes_subnormals():
        return False
    torch.set_flush_denormal(False)
    if flushes_subnormals():
        torch.set_flush_denormal(True)
        raise NumericsError("this thread's floating-point unit flushes subnormal numbers to zero (set by "
                            "torch.set_flush_denormal(True) or by a library built with -ffast-math) and torch "
                            "cannot turn that off on this CPU: merged values near zero would be wrong. Run "
                            "loramerge in a process (or thread) that does not set it")
    return True


def _sync_pools() -> None:
    """Give this thread's GNU OpenMP pool threads its floating-point environment: one parallel
    region of torch's team size whose threads each call fesetenv with this thread's fenv_t (read
    by fegetenv). A no-op where no libgomp is loaded (Intel's and LLVM's OpenMP pass the master's
    setting on by themselves) or the C library lacks the calls."""
    n = torch.get_num_threads()
    gomps = _gomps() if n > 1 else []
    libm = _lib(ctypes.util.find_library("m") or "") if gomps else None
    if libm is None:
        return
    env = ctypes.create_string_buffer(1024)  # more than any platform's fenv_t
    if libm.fegetenv(env) != 0:
        return
    fesetenv = ctypes.cast(libm.fesetenv, ctypes.c_void_p)
    for gomp in gomps:
        gomp.GOMP_parallel(fesetenv, env, n, 0)


def _gomps() -> list[ctypes.CDLL]:
    """Each libgomp loaded in the process (torch's, and numba's if it is another), found in
    /proc/self/maps (Linux, where GNU OpenMP is used); [] elsewhere."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(maxsplit=5)[-1].strip() for line in f if "/libgomp" in line}
    except OSError:
        return []
    out = []
    for p in sorted(paths):
        lib = _lib(p)
        if lib is not None and hasattr(lib, "GOMP_parallel"):
            lib.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            lib.GOMP_parallel.restype = None
            out.append(lib)
    return out


def _lib(path: str) -> ctypes.CDLL | None:
    """The loaded library at `path` (dlopen of a loaded one is a lookup), None if it cannot be."""
    if path not in _libs:
        try:
            _libs[path] = ctypes.CDLL(path) if path else None
        except OSError:
            _libs[path] = None
    return _libs[path]
