"""`loramerge inspect PATH [--base BASE]`: what PATH is, as data and as text.

KINDS below is the one place a kind of file registers: its `claims(path)` returns the format
name when it recognizes PATH (first claim wins, so the cheap and specific tests come first),
`describe(path, format, options)` returns the kind's JSON keys, and `text(details)` the lines
people read. Adapter formats need nothing here: `adapter` reads every format the readers know
(readers/adapters.py: detect_format and read_adapter), and new checkpoint layouts or
quantizations appear through readers/checkpoint.py and inspector/checkpoint.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..readers import hub
from ..report import JsonReport, jsonable
from .adapter import ADAPTER
from .checkpoint import CHECKPOINT
from .kinds import Kind
from .onnx import ONNX, ONNX_ADAPTER

KINDS: list[Kind] = [ONNX_ADAPTER, ONNX, ADAPTER, CHECKPOINT]


@dataclass
class InspectReport(JsonReport):
    """JSON: {"ok", "path", "kind", "format", <the kind's keys>, "warnings", "seconds"}."""

    path: Path
    kind: str
    format: str
    details: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"ok": self.ok, "path": str(self.path), "kind": self.kind, "format": self.format,
                **jsonable(self.details), "warnings": list(self.warnings), "seconds": self.seconds}

    def summary(self) -> str:
        kind = next(k for k in KINDS if k.name == self.kind)
        lines = [f"{self.path}: {kind.title(self.format)}", *kind.text(self.details)]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def inspect(path, *, base=None, revision: str | None = None, **adapter_opts) -> InspectReport:
    """Describe `path` (a local path or a Hugging Face Hub id). `base`: for adapters, match every
    target against this checkpoint with the plan's own matching. `adapter_opts`: the reader
    options (lora_alpha, fan_in_fan_out, enable_lora, only)."""
    t0 = time.perf_counter()
    resolved = hub.resolve(path, "auto", revision)
    if not resolved.exists():
        raise UsageError(f"{path}: not found (neither a local path nor a Hugging Face Hub id)")
    options = {"base": hub.resolve(base, "base", revision) if base is not None else None, **adapter_opts}
    for kind in KINDS:
        fmt = kind.claims(resolved)
        if fmt is not None:
            break
    else:
        raise UsageError(f"{path}: not something loramerge reads: expected a model checkpoint, a LoRA adapter "
                         "(PEFT, loralib, kohya), an .onnx graph or an .onnx_adapter file")
    if options["base"] is not None and kind.name != "adapter":
        raise UsageError(f"--base: only used to match an adapter's targets; {path} is a {kind.title(fmt)}")
    details = kind.describe(resolved, fmt, options)
    fmt = details.pop("format", fmt)  # a describer may be more precise than its claim
    warnings = details.pop("warnings", [])
    if str(resolved) != str(path):
        details = {"resolved": str(resolved), **details}
    return InspectReport(path=Path(str(path)), kind=kind.name, format=fmt, details=details, warnings=warnings,
                         seconds=time.perf_counter() - t0)


__all__ = ["inspect", "InspectReport", "KINDS", "Kind"]
