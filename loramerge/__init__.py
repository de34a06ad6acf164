"""loramerge: fold LoRA adapters into base model weights, exactly and in bounded memory."""

import os as _os

# OpenMP threads that spin while waiting for work fight the reader, writer and compute threads of
# the streaming pipeline (measured: a small torch op 30x slower on a 2-core VM). Passive waiting
# costs nothing here. Only effective if torch is not imported yet; an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import ApplyReport, apply
from .api import UnmergeReport, unmerge
from .combine import CombineReport, combine
from .onnx import export_onnx
from .errors import (AdapterError, CheckpointError, LoraMergeError, NumericsError, OutputError,
                     PlanError, UsageError)
from .verify import VerifyReport, verify

__all__ = [
    "export_onnx",
    "apply", "ApplyReport", "verify", "VerifyReport",
    "unmerge", "UnmergeReport", "combine", "CombineReport",
    "LoraMergeError", "CheckpointError", "AdapterError", "PlanError", "OutputError", "NumericsError",
    "UsageError",
]
__version__ = "0.1.0"
