"""The LoRA paper's own format (microsoft/LoRA's `loralib`): `torch.save(lora.lora_state_dict(model))`.

Keys are `<module>.lora_A` / `<module>.lora_B` (parameters, no `.weight`), and nothing else is
stored: no alpha (the user supplies it), no layout. What the file cannot say is resolved against
the base tensor in the plan (resolve()): whether the layer stores its weight [out, in] or
[in, out] (fan_in_fan_out, embeddings), and, for MergedLinear (GPT-2's fused q/k/v with
enable_lora=[True, False, True]), which row groups the adapter covers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from ..errors import AdapterError
from ..types import Adapter, LoraPair
from .files import all_finite

_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)$")


def looks_like_loralib(keys) -> bool:
    keys = list(keys)
    return bool(keys) and all(_KEY.match(k) for k in keys)


def read_loralib(path: Path, tensors: dict[str, torch.Tensor], lora_alpha: float | None,
                 fan_in_fan_out: bool | None = None, enable_lora: tuple[bool, ...] | None = None) -> Adapter:
    if lora_alpha is None:
        raise AdapterError(f"{path}: a loralib checkpoint does not store lora_alpha; pass --lora-alpha with "
                           "the value the model was built with (lora.Linear(..., lora_alpha=...))")
    if not math.isfinite(lora_alpha):
        raise AdapterError(f"{path}: --lora-alpha {lora_alpha}: expected a finite number")
    modules: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _KEY.match(key)
        modules.setdefault(m.group("module"), {})[m.group("part")] = key
    problems, pairs = [], []
    for module, slots in sorted(modules.items()):
        if len(slots) != 2:
            problems.append(f"{module}: has only {', '.join(slots)}; the checkpoint is incomplete")
            continue
        a, b = tensors[slots["lora_A"]], tensors[slots["lora_B"]]
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{module}: lora_A/lora_B are {a.dtype}/{b.dtype}; expected floating point")
            continue
        if a.dim() != 2 or b.dim() != 2:
            problems.append(f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)}: only loralib's Linear, "
                            "MergedLinear and Embedding are supported (not ConvLoRA)")
            continue
        r = b.shape[1]
        if r == 0 or a.shape[0] == 0:
            problems.append(f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} have rank 0")
            continue
        if a.shape[0] % r:
            problems.append(f"{module}: lora_A has {a.shape[0]} rows, not a multiple of lora_B's rank {r}")
            continue
        if not (all_finite(a) and all_finite(b)):
            problems.append(f"{module}: lora_A/lora_B contain NaN or Inf; the adapter is broken")
            continue
        n_groups = a.shape[0] // r
        pairs.append(LoraPair(
            module=module, a_key=slots["lora_A"], b_key=slots["lora_B"], bias_key=None,
            rank=a.shape[0], alpha=float(lora_alpha), scale=float(lora_alpha) / r,
            base_shape=(b.shape[0], a.shape[1]), layout="auto",
            # a MergedLinear's group mask is unknown until the base shape is seen; resolve() sets it
            groups=(True,) * n_groups if n_groups > 1 else None,
        ))
    if problems:
        raise AdapterError(f"{path}: not a usable loralib checkpoint", problems)
    if not pairs:
        raise AdapterError(f"{path}: no lora_A/lora_B parameters found")
    options = {"fan_in_fan_out": fan_in_fan_out, "enable_lora": enable_lora}
    return Adapter(path=path, format="loralib", pairs=pairs, tensors=tensors, config=options)


def resolve(pair: LoraPair, shape: tuple[int, ...], adapter: Adapter) -> tuple[LoraPair | None, str | None]:
    """Fix a loralib pair's layout (and MergedLinear groups) against the base tensor's shape.
    Returns (resolved pair, None) or (None, problem)."""
    if len(shape) != 2:
        return None, f"base tensor has shape {list(shape)}; loralib layers are 2-D"
    b_rows, r = adapter.tensors[pair.b_key].shape
    a_in = adapter.tensors[pair.a_key].shape[1]
    enabled = pair.rank // r
    fifo = adapter.config.get("fan_in_fan_out")
    fits = [(layout, rows) for layout, (rows, cols) in (("linear", shape), ("transposed", shape[::-1]))
            if cols == a_in and fifo in (None, layout == "transposed")]
    if len(fits) == 2 and shape[0] == shape[1]:
        return None, (f"weight is square {list(shape)}, so its layout cannot be read off the shapes; pass "
                      "--fan-in-fan-out (weight stored [in, out], as GPT-2's Conv1D and loralib Embedding) "
                      "or --no-fan-in-fan-out")
    for layout, rows in fits:
        if pair.groups is None:
            if rows == b_rows:
                return dataclasses.replace(pair, layout=layout, base_shape=tuple(shape)), None
            continue
        rows_per_group = b_rows // enabled
        if rows % rows_per_group:
            continue
        n_groups = rows // rows_per_group
        mask = adapter.config.get("enable_lora")
        if mask is None:
            if n_groups != enabled:
                return None, (f"a loralib MergedLinear covering {enabled} of {n_groups} row groups, and which "
                              "ones is not stored: pass --enable-lora (e.g. 1,0,1 for q and v of a fused qkv)")
            mask = (True,) * n_groups
        if len(mask) != n_groups or sum(mask) != enabled:
            return None, (f"--enable-lora {','.join(str(int(x)) for x in mask)} does not fit: the weight has "
                          f"{n_groups} row groups and the adapter covers {enabled}")
        return dataclasses.replace(pair, layout=layout, base_shape=tuple(shape), groups=tuple(mask)), None
    return None, (f"base tensor has shape {list(shape)}, which lora_A {[pair.rank, a_in]} / lora_B {[b_rows, r]} "
                  "fit neither as [out, in] nor as [in, out]; the adapter is for another model")
