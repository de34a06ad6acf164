"""Float32 matmuls in IEEE float32, and subnormals kept, while loramerge does merge math.

The error bounds behind the exact rounding (engine/lowrank.py) assume true float32 products. Two
torch settings break that: TF32 on CUDA (10-bit mantissa products: torch.backends.cuda.matmul,
torch.set_float32_matmul_precision("high"/"medium"), or TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which
some torch versions honour whatever the flags say) and bfloat16 products in oneDNN on CPUs with
AMX/AVX512-BF16 (precision "medium"). The flags are process-global, so they cannot be toggled per
call from several compute threads: every entry point that does merge math (api.apply and unmerge,
engine.run, onnx.export_onnx and the fold, verify, combine) runs inside `exact_matmul()`, which
sets them to IEEE once for the outermost call and puts them back after it.

The same guard gives the merge gradual underflow (fpenv.py): a caller's
torch.set_flush_denormal(True) would have bfloat16 subnormals read as zero. That setting is per
thread (and per OpenMP pool thread), so it is turned off for each thread that enters, with its
pools, and put back for the thread when it leaves.

What the flags cannot guarantee is checked where it matters: ops.merge_weight (and verify's
float32 comparison) asks `float32_gemm_exact(device)` before a float32 GEMM, which reads the flags
back and, on CUDA, runs a probe product once per device; if TF32 (or oneDNN bf16) is still in
force (the override, or a caller outside the guard), the merge accumulates in float64 instead
(same bytes: float64 GEMMs are never TF32).
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager

import torch

from . import fpenv

_lock = threading.RLock()
_depth = 0
_saved: dict | None = None
_probed: dict = {}


def _new_api() -> bool:
    """torch >= 2.9: per-backend fp32_precision; mixing it with the legacy flags can raise."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _state() -> dict:
    if _new_api():
        return {"cuda": torch.backends.cuda.matmul.fp32_precision,
                "mkldnn": torch.backends.mkldnn.matmul.fp32_precision}
    return {"precision": torch.get_float32_matmul_precision(), "tf32": torch.backends.cuda.matmul.allow_tf32}


def _set(state: dict | None) -> None:
    """Apply a saved state, or IEEE float32 (None)."""
    if _new_api():
        torch.backends.cuda.matmul.fp32_precision = "ieee" if state is None else state["cuda"]
        torch.backends.mkldnn.matmul.fp32_precision = "ieee" if state is None else state["mkldnn"]
    else:
        torch.set_float32_matmul_precision("highest" if state is None else state["precision"])
        torch.backends.cuda.matmul.allow_tf32 = False if state is None else state["tf32"]


@contextmanager
def exact_matmul():
    """IEEE float32 matmuls (no TF32, no bf16) and gradual underflow for the duration; reentrant
    and thread-safe: the outermost entry sets the matmul flags, its exit restores what the caller
    had; each entering thread gets fpenv.gradual_underflow() (its own outermost entry turns
    flushing off, its exit puts the thread's setting back)."""
    global _depth, _saved
    with fpenv.gradual_underflow():  # per thread (fpenv.py)
        with _lock:
            if _depth == 0:
                _saved = _state()
                _set(None)
            _depth += 1
        try:
            yield
        finally:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _set(_saved)
                    _saved = None


def guarded(fn):
    """Decorator: run fn inside exact_matmul()."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with exact_matmul():
            return fn(*args, **kwargs)
    return wrapper


def active() -> bool:
    """Whether some caller is inside exact_matmul() (for tests of the entry points)."""
    return _depth > 0


def flags_ieee() -> bool:
    """What the flags say: float32 matmuls in IEEE float32 on CUDA and in oneDNN. With the new API
    only the new API is read (reading the legacy flags after setting the new ones raises)."""
    if _new_api():
        generic = torch.backends.fp32_precision
        return all((p if p != "none" else generic) in ("ieee", "none") for p in
                   (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
    return not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"


def float32_gemm_exact(device: torch.device) -> bool:
    """Whether a float32 GEMM on `device` now has IEEE float32 products: the flags, and on CUDA a
    probe: (1 + 2^-12) * 1 summed over 64 terms is exact in float32 (64 + 2^-6), while TF32 rounds
    the factor to its 10-bit mantissa first. The probe runs once per device and flag state."""
    if not flags_ieee():
        return False
    if device.type != "cuda":
        return True
    key = (device.index if device.index is not None else torch.cuda.current_device(), str(_state()))
    if key not in _probed:
        x = torch.full((64, 64), 1 + 2.0 ** -12, dtype=torch.float32, device=device)
        got = torch.mm(x, torch.ones(64, 64, dtype=torch.float32, device=device))
        _probed[key] = bool((got == 64 + 2.0 ** -6).all())
    return _probed[key]
