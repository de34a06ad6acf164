"""loramerge: fold LoRA adapters into base model weights, exactly and in bounded memory.

The public API is imported lazily: `import loramerge` (and the CLI's `--help`) does not pay for
torch until a function is used.
"""

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
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
