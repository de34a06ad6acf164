"""`loramerge verify`: check a merged checkpoint against its inputs (check.verify), tensor by
tensor (weights.py) and through the model's outputs (model.py); report.py holds what was found."""

from .check import verify
from .report import ModelCheck, TensorCheck, VerifyReport

__all__ = ["verify", "VerifyReport", "TensorCheck", "ModelCheck"]
