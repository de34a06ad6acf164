"""What a kind of file tells `inspect` (see inspector/__init__.py for the registry)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Kind:
    name: str                                        # the JSON "kind"
    claims: Callable[[Path], str | None]             # path -> format name, or None if not this kind
    describe: Callable[[Path, str, dict], dict]      # (path, format, options) -> JSON keys
    text: Callable[[dict], list[str]]                # JSON keys -> lines for people
    noun: str = ""                                   # "adapter", "checkpoint", ...

    def title(self, fmt: str) -> str:
        return f"{fmt} {self.noun or self.name}"


def counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


