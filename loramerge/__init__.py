"""loramerge: fold LoRA adapters into base model weights, exactly and in bounded memory.

The public API is imported lazily: `import loramerge` (and the CLI's `--help`) does not pay for
torch until a function is used.
"""

import contextlib as _contextlib
import os as _os

# OpenMP threads that spin while waiting for work fight the reader, writer and compute threads of
# the streaming pipeline (measured: a small torch op 30x slower on a 2-core VM). Passive waiting
# costs nothing here. Only effective if torch is not imported yet; an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import (AdapterError, CheckpointError, LoraMergeError, NumericsError, OutputError,  # noqa: E402
                     PlanError, UsageError)

# public name -> module that defines it (imported on first use)
_LAZY = {
    "apply": "api", "ApplyReport": "api", "unmerge": "api", "UnmergeReport": "api",
    "combine": "arithmetic", "CombineReport": "arithmetic",
    "verify": "verifier", "VerifyReport": "verifier",
    "export_onnx": "onnx",
}

__all__ = [
    "export_onnx",
    "apply", "ApplyReport", "verify", "VerifyReport",
    "unmerge", "UnmergeReport", "combine", "CombineReport",
    "LoraMergeError", "CheckpointError", "AdapterError", "PlanError", "OutputError", "NumericsError",
    "UsageError",
]
__version__ = "0.1.0"


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loramerge' has no attribute {name!r}")
    value = getattr(import_heavy(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def import_heavy(module: str):
    """importlib.import_module for a module that imports torch, with the garbage collector's
    automatic collections held meanwhile: importing torch sets off ~370 of them, 0.12-0.23 s on a
    2-core machine (gc.callbacks)."""
    import importlib

    with collections_held():
        return importlib.import_module(module)


def frozen_imports() -> None:
    """Move every object the garbage collector tracks now into its permanent generation
    (gc.freeze); loramerge.api calls it once its imports (torch's among them) are done. They leave
    some 170k tracked objects, module-level and alive until the process ends. Python's exit runs
    full collections over all of them: 0.4 s of a 2-core machine's wall after the last line of a
    script that imported torch, against 0.1 s frozen. (Freezing again after numba's lazy import
    gained 0.02 s more: not done.) Frozen objects are still freed by reference
    counting; only a reference cycle that was already garbage at this moment is kept until exit.
    Every later full collection in the process skips them too."""
    import gc

    gc.freeze()


@_contextlib.contextmanager
def collections_held():
    """The garbage collector's automatic collections held for the duration (a context manager, or
    a decorator: `@collections_held()`); the caller's setting is put back. With torch and numba
    loaded, a full collection walks some 300k objects holding the GIL."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
