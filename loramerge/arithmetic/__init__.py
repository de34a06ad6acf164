"""Adapter arithmetic: algebra.py is the pure low-rank math (cat, svd, ties, dare), combine.py the
`combine` command that reads adapters, applies it per target and writes one PEFT adapter."""

from .combine import CombineReport, combine

__all__ = ["combine", "CombineReport"]
