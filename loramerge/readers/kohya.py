"""kohya-ss / diffusers-trainer LoRA files (Stable Diffusion and friends).

Keys: `lora_unet_<path with dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
(and `lora_te_`, `lora_te1_`, `lora_te2_` for text encoders). scale = alpha / rank, rank read off
lora_down; a missing alpha, or alpha 0, means alpha = rank (kohya's own rule). LyCORIS writes LoHa and
LoKr under the same names (`.hada_w1_a` ..., `.lokr_w1` ...; readers/lycoris.py) with LyCORIS'
scale rules: alpha / rank, a missing or zero alpha meaning no scaling, and a LoKr made of two full
matrices (no rank) unscaled. Their DoRA (`dora_scale`), full diffs and other algorithms are refused. Because the names are
flattened, the base tensor is found by flattening the base's names the same way; a flattened name
must match exactly one base module (resolved in the plan), and a key that matches none is an
error, never a skipped line in a log.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import AdapterError
from ..types import Adapter, LoraPair, TunerTarget
from . import lycoris
from .files import all_finite

PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
FLAT = "flat:"
_LYCORIS = "|".join(s for slots in lycoris.SLOTS.values() for s in slots)
_KEY = re.compile(r"^(?P<module>lora_(?:unet|te\d?)_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|"
                  + _LYCORIS + r")$")
# Other LyCORIS algorithms and DoRA variants use other keys; they are refused by name.
_OTHER = ("oft_", "dora_scale", ".diff", "lora_mid", "boft_", "ia3_", "glora", "scalar")


def looks_like_kohya(keys) -> bool:
    return any(k.startswith(PREFIXES) for k in keys)


def read_kohya(path: Path, tensors: dict[str, torch.Tensor]) -> Adapter:
    modules: dict[str, dict[str, str]] = {}
    problems = []
    for key in tensors:
        m = _KEY.match(key)
        if m is None:
            kind = next((o for o in _OTHER if o in key), None)
            problems.append(f"{key}: " + (f"a LyCORIS/DoRA '{kind.strip('._')}' tensor; only LoRA, LoHa and LoKr "
                                          "are supported" if kind else
                                          "not a kohya LoRA key (lora_down/lora_up/alpha, hada_*, lokr_*)"))
            continue
        modules.setdefault(m.group("module"), {})[m.group("part").split(".")[0]] = key
    pairs = []
    for module, slots in sorted(modules.items()):
        tuner = next((lycoris.tuner_of(s) for s in slots if lycoris.tuner_of(s)), None)
        if tuner is not None:
            rec = _lycoris_target(tuner, module, slots, tensors)
            if isinstance(rec, str):
                problems.append(f"{module}: {rec}")
            else:
                pairs.append(rec)
            continue
        if "lora_down" not in slots or "lora_up" not in slots:
            problems.append(f"{module}: needs both lora_down.weight and lora_up.weight")
            continue
        down, up = tensors[slots["lora_down"]], tensors[slots["lora_up"]]
        if not (down.is_floating_point() and up.is_floating_point()):
            problems.append(f"{module}: lora_down/lora_up are {down.dtype}/{up.dtype}; expected floating point")
            continue
        if down.dim() < 2 or up.dim() != down.dim() or up.shape[1] != down.shape[0] or down.shape[0] == 0 \
                or any(d != 1 for d in up.shape[2:]):
            problems.append(f"{module}: lora_down {list(down.shape)} and lora_up {list(up.shape)} do not form a pair "
                            "([r, in(, k..)] and [out, r(, 1..)], r > 0)")
            continue
        rank = down.shape[0]
        if not (all_finite(down) and all_finite(up)):
            problems.append(f"{module}: lora_down/lora_up contain NaN or Inf; the file is broken")
            continue
        alpha_t = tensors.get(slots.get("alpha", ""), torch.tensor(float(rank)))
        if alpha_t.numel() != 1 or not bool(torch.isfinite(alpha_t.float()).all()):
            problems.append(f"{module}: alpha must be one finite number, found {alpha_t.dtype} {list(alpha_t.shape)}")
            continue
        # kohya-ss' LoRAModule: `alpha = lora_dim if alpha is None or alpha == 0` (scale 1, not 0)
        alpha = float(alpha_t.item()) or float(rank)
        pairs.append(LoraPair(
            module=module, a_key=slots["lora_down"], b_key=slots["lora_up"], bias_key=None, rank=rank,
            alpha=alpha, scale=alpha / rank, base_shape=(up.shape[0],) + tuple(down.shape[1:]),
            layout="conv" if down.dim() > 2 else "linear",
            target=FLAT + _strip_prefix(module)))
    if problems:
        raise AdapterError(f"{path}: not a usable kohya LoRA file", problems)
    if not pairs:
        raise AdapterError(f"{path}: no lora_down/lora_up pairs (nor LoHa/LoKr tensors) found")
    return Adapter(path=path, format="kohya", pairs=pairs, tensors=tensors)


def _strip_prefix(module: str) -> str:
    for p in PREFIXES:
        if module.startswith(p):
            return module[len(p):]
    return module


def _lycoris_target(tuner: str, module: str, slots: dict[str, str], tensors) -> TunerTarget | str:
    """A LoHa/LoKr target from one module's LyCORIS tensors, or the problem with them."""
    own = lycoris.SLOTS[tuner]
    stray = [s for s in slots if s != "alpha" and s not in own]
    if stray:
        return f"mixes {tuner} tensors with {', '.join(sorted(stray))}"
    roles = {own[s]: k for s, k in slots.items() if s != "alpha"}
    shape, rank, problem = lycoris.shapes(tuner, roles, tensors)
    if problem:
        return problem
    alpha = float(tensors[slots["alpha"]].item()) if "alpha" in slots else 0.0
    if rank is None:  # LoKr of two full matrices: LyCORIS sets alpha = dim, i.e. no scaling
        scale, rank = 1.0, 0
    else:
        alpha = alpha or float(rank)  # missing or 0: alpha = dim
        scale = alpha / rank
    return TunerTarget(module, tuner, tuple(sorted(roles.items())), scale, shape,
                       "conv" if len(shape) > 2 else "linear", rank, alpha, target=FLAT + _strip_prefix(module),
                       origin="lycoris")
