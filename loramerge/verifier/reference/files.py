"""Which kind of adapter a path is, and its tensors, read straight from the files.

apply's readers have already validated these files (verify reads them first), so this stays
plain: safetensors through the safetensors library, pickles with weights_only=True."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def adapter_kind(path: Path) -> tuple[str | None, Path | str]:
    """('peft', directory) | ('kohya', file) | ('loralib', file), or (None, why not)."""
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return "peft", path
        files = [f for f in sorted(path.iterdir()) if f.suffix in SUFFIXES]
        if len(files) != 1:
            return None, f"{path}: not a PEFT directory and not one weights file"
        path = files[0]
    if path.name.startswith("adapter_model.") and (path.parent / PEFT_CONFIG).is_file():
        return "peft", path.parent
    keys = list(_keys(path))
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya", path
    if keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys):
        return "loralib", path
    return None, f"{path}: neither a kohya nor a loralib file"


def _keys(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    return list(load(path))


def load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def peft_files(root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, the adapter's tensors) of a PEFT directory."""
    config = json.loads((root / PEFT_CONFIG).read_text())
    for name in PEFT_WEIGHTS:
        if (root / name).is_file():
            return config, load(root / name)
    raise FileNotFoundError(f"{root}: no {' or '.join(PEFT_WEIGHTS)}")
