"""Loading one small tensor file (an adapter's weights) safely: safetensors after validating its
header, or a pickle read with weights_only=True so no code in it can run."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import AdapterError, CheckpointError
from .checkpoint import load_bin_state_dict, read_safetensors_header


def load_adapter_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            read_safetensors_header(path)  # validates size and header before loading
            from safetensors.torch import load_file
            try:
                return load_file(str(path))
            except Exception as e:  # noqa: BLE001 - SafetensorError and friends: what our check lets through
                raise AdapterError(f"{path}: not a valid safetensors file ({e}); re-save or re-download it") from e
        return load_bin_state_dict(path)
    except CheckpointError as e:
        raise AdapterError(str(e)) from e
