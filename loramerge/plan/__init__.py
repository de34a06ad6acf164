"""The plan: every decision before any byte is written (matching, validation, output layout).
Pure data from the readers' metadata; see build.build_plan."""

from .build import build_plan
from .describe import describe, plan_json
from .layout import parse_size
from .matching import ModuleMatcher

__all__ = ["build_plan", "describe", "plan_json", "parse_size", "ModuleMatcher"]
