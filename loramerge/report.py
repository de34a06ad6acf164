"""Reports as JSON: one convention for every command's report.

A report is a dataclass that mixes in JsonReport. `to_json()` gives every field, converted to
JSON types (paths and dtypes as strings, tuples as lists, nested dataclasses as objects,
non-finite floats as null), less the names in `json_exclude`, plus the values of the properties
named in `json_extra`. A field added to a report therefore shows up in `--json` output without
further work; a report whose field needs another shape overrides to_json and calls super().
`ok` is true unless a report says otherwise (verify's can fail without raising).
"""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from pathlib import PurePath
from typing import Any, ClassVar


def jsonable(value: Any) -> Any:
    """`value` as JSON-compatible Python: dict, list, str, int, float (finite), bool, None."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return jsonable(value.value)
    if hasattr(value, "to_json") and callable(value.to_json):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)  # torch.dtype and other small descriptive objects


class JsonReport:
    """Mixin for dataclass reports; see the module docstring."""

    json_exclude: ClassVar[tuple[str, ...]] = ()
    json_extra: ClassVar[tuple[str, ...]] = ()

    @property
    def ok(self) -> bool:
        return True

    def to_json(self) -> dict:
        out = {"ok": self.ok}
        for f in dataclasses.fields(self):
            if f.name not in self.json_exclude:
                out[f.name] = jsonable(getattr(self, f.name))
        for name in self.json_extra:
            out[name] = jsonable(getattr(self, name))
        return out


def human_bytes(n: int) -> str:
    """A size for people: 512 B, 578.31 KB, 16.06 GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"
