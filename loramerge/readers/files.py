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
            return load_file(str(path))
        return load_bin_state_dict(path)
    except CheckpointError as e:
        raise AdapterError(str(e)) from e
