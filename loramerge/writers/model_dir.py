"""Everything in a merged model directory besides the tensors: the shard index, and the base's
non-weight files (config, generation config, tokenizer, chat template) so transformers loads
the output as it is."""

from __future__ import annotations

import json
from pathlib import Path

from ..types import Plan
from .manifest import copy_hashed, write_hashed

INDEX = "model.safetensors.index.json"


def write_index(plan: Plan, out_dir: Path, files: dict) -> None:
    """Write the shard index; its manifest record goes into `files`."""
    weight_map = {name: f.name for f in plan.files for j in f.jobs for name, *_ in j.entries}
    index = {"metadata": {"total_size": plan.nbytes}, "weight_map": weight_map}
    files[INDEX] = write_hashed(out_dir / INDEX, (json.dumps(index, indent=2) + "\n").encode())


def copy_extras(plan: Plan, out_dir: Path, files: dict) -> list[str]:
    """Copy non-weight files; apply plan.config_updates and config_removals to config.json (e.g. a
    dequantized output drops quantization_config). Returns names copied; their manifest records go
    into `files`."""
    copied = []
    for src in plan.extra_files:
        dst = out_dir / src.name
        if src.name == "config.json" and (plan.config_updates or plan.config_removals):
            cfg = json.loads(src.read_text())
            for key in plan.config_removals:
                cfg.pop(key, None)
            for key, value in plan.config_updates.items():
                cfg[key] = value
                if key == "torch_dtype" and "dtype" in cfg:  # transformers>=4.56 writes "dtype"
                    cfg["dtype"] = value
            files[src.name] = write_hashed(dst, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
        else:
            files[src.name] = copy_hashed(src, dst)
        copied.append(src.name)
    return copied
