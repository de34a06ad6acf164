"""Which base tensors an adapter may change, told from its tensor names alone (and its PEFT
config's module lists): the head start's guess of what it may copy before the plan exists
(writers/headstart.py), and the premerge worker's measure of how much there is to merge
(engine/premerge.py). Standard library only: both run before torch is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

from .st_header import raw_header

# a tensor's own name that says nothing of its module (every adapter's names hold "weight")
PARAMETERS = {"weight", "bias"}


def adapter_names(path: Path) -> list[str] | None:
    """The tensor names of a safetensors adapter (a PEFT directory or a single file), and the
    module names its PEFT config lists; None for anything else (no guess, no head start)."""
    names = []
    if path.is_dir():
        config = path / "adapter_config.json"
        if config.is_file():
            c = json.loads(config.read_text())
            if not isinstance(c, dict):
                return None  # the adapter's reader says what is wrong with it
            for key in ("target_modules", "modules_to_save", "layers_to_transform"):
                if isinstance(c.get(key), list):
                    names += [str(m) for m in c[key]]
        path = path / "adapter_model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    return names + list(raw_header(path)[0])


def touched_by(adapters: list[list[str]]):
    """A test for base tensor names some adapter may change: one whose module name (or own name,
    unless a plain weight or bias) is a part of an adapter's tensor names, or made of parts of them
    (kohya joins a module's path with '_'; fused experts are named like gate_up_proj). It may say
    yes too often (the tensor is then written as always), never no wrongly for PEFT's names, which
    hold each target module's name."""
    parts = {p for names in adapters for n in names for p in n.split(".")}
    pieces = {q for p in parts for q in p.split("_")}

    def touched(name: str) -> bool:
        *_, module, own = [""] + name.split(".")
        return any(p in parts or all(q in pieces for q in p.split("_"))
                   for p in (module, own) if p and p not in PARAMETERS)
    return touched
