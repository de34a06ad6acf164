"""Read every adapter on its own and place its terms on the merge's output tensors."""

from __future__ import annotations

from pathlib import Path

from . import formats
from .files import adapter_kind
from .place import place_dotted, place_flat
from .terms import Reading


def read_adapters(paths: list[Path], shapes: dict[str, tuple[int, ...]], *, lora_alpha: float | None = None,
                  fan_in_fan_out: bool | None = None, enable_lora: tuple[bool, ...] | None = None,
                  only: str | None = None) -> Reading:
    """Read every adapter and place its terms on the output tensors `shapes` (name -> shape: what
    a merge writes). The loralib options are the user's, as for apply; `only` keeps the targets
    whose module path (kohya: key) starts with it."""
    reading = Reading()
    for i, path in enumerate(paths):
        kind, where = adapter_kind(Path(path))
        if kind is None:
            reading.skipped[i] = where
            continue
        terms, partial = formats.read(kind, where, i, lora_alpha=lora_alpha, fan_in_fan_out=fan_in_fan_out,
                                      enable_lora=enable_lora)
        if isinstance(terms, str):
            reading.skipped[i] = terms
            continue
        reading.covered.add(i)
        if partial:
            reading.partial[i] = partial
        for term in terms:
            if only is not None and not term.module.startswith(only):
                continue
            name, why = (place_flat if term.flat else place_dotted)(term.wanted, shapes)
            why = why or (formats.orient(term, shapes[name]) or "")
            if why:
                reading.unplaced.append((f"{where}: {term.module}", why))
                continue
            term.name = name
            reading.terms.setdefault(name, []).append(term)
    return reading
