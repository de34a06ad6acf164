"""loramerge: fold LoRA adapters into base model weights, exactly and in bounded memory."""

from .api import ApplyReport, apply
from .api import UnmergeReport, unmerge
from .combine import CombineReport, combine
from .errors import (AdapterError, CheckpointError, LoraMergeError, NumericsError, OutputError,
                     PlanError, UsageError)
from .verify import VerifyReport, verify

__all__ = [
    "apply", "ApplyReport", "verify", "VerifyReport",
    "unmerge", "UnmergeReport", "combine", "CombineReport",
    "LoraMergeError", "CheckpointError", "AdapterError", "PlanError", "OutputError", "NumericsError",
    "UsageError",
]
__version__ = "0.1.0"
