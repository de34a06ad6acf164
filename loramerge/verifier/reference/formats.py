"""The three LoRA formats, read from their definitions (see the package docstring).

PEFT (peft/tuners/lora: LoraConfig, Linear/Embedding/Conv layers, get_pattern_key):
  scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; r and lora_alpha per module
  from rank_pattern / alpha_pattern, whose keys are regular expressions: the first key k (in the
  config's order) for which re.match(rf"(.*\\.)?({k})$", module) succeeds gives the value.
  Linear: W[out, in] += scaling * B @ A; with fan_in_fan_out (GPT-2's Conv1D, W stored [in, out])
  the transpose; PEFT turns fan_in_fan_out off for a plain nn.Linear, which shows in the stored
  shape. Embedding: W[vocab, dim] += scaling * (B @ A).T with lora_embedding_A [r, vocab] and
  lora_embedding_B [dim, r]. ConvNd: W[out, in, *k] += scaling * B[out, r] @ A[r, in * k...].
  DoRA: W' = m * (W + dW) / ||W + dW|| per output unit (lora_magnitude_vector holds m).
  lora_B.bias: bias += scaling * lora_B.bias. Other saved tensors (modules_to_save copies, biases
  trained with bias='all'/'lora_only', the base layer of an embedding) replace the tensor.
kohya-ss (networks/lora.py, LoRAModule): scale = alpha / lora_dim, lora_dim = lora_down's rows,
  an alpha that is missing or 0 meaning alpha = lora_dim; delta = lora_up @ lora_down (flattened
  for convolutions).
loralib (loralib/layers.py): scaling = lora_alpha / r, r = lora_B's columns; Linear as PEFT's,
  fan_in_fan_out or Embedding transposed; MergedLinear: lora_A stacks one [r, in] block per
  enabled group, lora_B one [rows, r] block, and group k's B_k @ A_k lands in the k-th enabled
  row group of W (enable_lora).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .terms import RefTerm
from .files import KOHYA_PREFIXES, load, peft_files

PEFT_PREFIX = "base_model.model."
TUNER_NAMES = {"ADALORA": "AdaLoRA", "IA3": "IA3", "LOHA": "LoHa", "LOKR": "LoKr", "VERA": "VeRA"}
PEFT_ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def read(kind: str, where: Path, index: int, *, lora_alpha, fan_in_fan_out, enable_lora):
    """(terms, what was left out) for one adapter, or (why it is not read here, '')."""
    if kind == "peft":
        return _peft(where, index)
    if kind == "kohya":
        return _kohya(where, index)
    return _loralib(where, index, lora_alpha, fan_in_fan_out, enable_lora)


def _pattern(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value, key
    return default, None


def _peft(root: Path, index: int):
    config, tensors = peft_files(root)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        return f"{root}: a PEFT {TUNER_NAMES.get(peft_type, peft_type)} adapter", ""
    slots: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    left_out = []
    for key, t in tensors.items():
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        if "trainable_tokens_delta" in parts:
            left_out.append("trained token rows")
            continue
        at = [j for j, p in enumerate(parts) if p in PEFT_ROLES]
        if at:
            j = at[-1]  # module path, role, then an optional adapter name and weight/bias
            slot = parts[j] + (".bias" if parts[-1] == "bias" else "")
            slots.setdefault(".".join(parts[:j]), {})[slot] = t
            continue
        if "modules_to_save" in parts:  # X.modules_to_save.<adapter>.weight is X.weight
            j = parts.index("modules_to_save")
            parts = parts[:j] + parts[j + 2:]
        saved[".".join(p for p in parts if p not in ("base_layer", "token_adapter"))] = t

    terms = [RefTerm(index, name, "replace", "a full tensor saved in the adapter", value=t, wanted=name)
             for name, t in saved.items()]
    for module in [m for m in slots if _param_wrapper(config, m)]:
        del slots[module]  # target_parameters (MoE experts): not read here (check 4 applies them)
        left_out.append("target_parameters (MoE experts)")
    for module, s in slots.items():
        r, r_key = _pattern(config.get("rank_pattern"), module, config["r"])
        alpha, a_key = _pattern(config.get("alpha_pattern"), module, config["lora_alpha"])
        rs = bool(config.get("use_rslora"))
        scale = alpha / math.sqrt(r) if rs else alpha / r
        how = (f"lora_alpha {alpha:g}{f' (alpha_pattern {a_key!r})' if a_key is not None else ''} / "
               f"{'sqrt(r)' if rs else 'r'}, r {r}{f' (rank_pattern {r_key!r})' if r_key is not None else ''}")
        if "lora_embedding_A" in s:
            a, b, layout = s["lora_embedding_A"], s["lora_embedding_B"], "transposed"
        else:
            a, b = s["lora_A"], s["lora_B"]
            layout = "conv" if a.dim() > 2 else ("fifo" if config.get("fan_in_fan_out") else "linear")
        mag = s.get("lora_magnitude_vector")
        terms.append(RefTerm(index, module, "lora", how, scale, b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1),
                             layout,
                             None if mag is None else mag.reshape(-1).double(), wanted=module + ".weight"))
        if "lora_B.bias" in s:
            terms.append(RefTerm(index, module, "bias", how, scale, value=s["lora_B.bias"].double(),
                                 wanted=module + ".bias"))
    return terms, ", ".join(sorted(set(left_out)))


def _param_wrapper(config: dict, module: str) -> bool:
    """Does PEFT's target_parameters wrap this module (a ParamWrapper, whose factors hold every
    expert of a fused parameter)? Its keys nest '.base_layer' for each further parameter; a target
    'mlp.experts.down_proj' names the module 'mlp.experts'; a bare parameter name could be any
    module's, so then every module target_modules does not select is one."""
    params = config.get("target_parameters") or []
    if not params:
        return False
    if module.endswith(".base_layer"):
        return True
    for t in params:
        mod = t.rpartition(".")[0]
        if mod and (module == mod or module.endswith("." + mod)):
            return True
    if all("." in t for t in params):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is None
    return not any(module == t or module.endswith("." + t) for t in targets)


def _kohya(path: Path, index: int):
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load(path).items():
        module, _, part = key.partition(".")
        modules.setdefault(module, {})[part] = t
    terms, left_out = [], []
    for module, parts in modules.items():
        if "lora_down.weight" not in parts:
            left_out.append("LyCORIS modules")
            continue
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        dim = down.shape[0]
        alpha = float(parts["alpha"].float()) if "alpha" in parts else 0.0
        how = f"alpha {alpha:g} / lora_dim {dim}" if alpha else f"no alpha: alpha = lora_dim {dim}"
        flat = next((module[len(p):] for p in KOHYA_PREFIXES if module.startswith(p)), module)
        terms.append(RefTerm(index, module, "lora", how, (alpha or dim) / dim, up.reshape(up.shape[0], -1),
                             down.reshape(dim, -1), "conv" if down.dim() > 2 else "linear",
                             wanted=flat, flat=True))
    return terms, ", ".join(sorted(set(left_out)))


def _loralib(path: Path, index: int, lora_alpha, fan_in_fan_out, enable_lora):
    if lora_alpha is None:
        return f"{path}: a loralib file without --lora-alpha", ""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load(path).items():
        module, _, part = key.rpartition(".")
        modules.setdefault(module, {})[part] = t
    terms = []
    for module, parts in modules.items():
        a, b = parts["lora_A"], parts["lora_B"]
        r = b.shape[1]
        terms.append(RefTerm(index, module, "lora", f"--lora-alpha {lora_alpha:g} / r {r}", lora_alpha / r, b, a,
                             "loralib", wanted=module + ".weight",
                             options={"fan_in_fan_out": fan_in_fan_out, "enable_lora": enable_lora}))
    return terms, ""


def orient(term: RefTerm, shape: tuple[int, ...]) -> str | None:
    """Settle the term's layout against the shape of the tensor it landed on, where the format
    leaves it to the model (PEFT's fan_in_fan_out on Linear, loralib); None, or why it does not fit."""
    if term.kind != "lora":
        return None
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    out, inn = term.left.shape[0], term.right.shape[1]
    if term.layout == "fifo":  # PEFT resets fan_in_fan_out on a plain nn.Linear ([out, in])
        term.layout = "linear" if (rows, cols) == (out, inn) and out != inn else "transposed"
    elif term.layout == "loralib":
        problem = _loralib_layout(term, shape)
        if problem:
            return problem
        out = term.left.shape[0]
    fits = (rows, cols) == ((inn, out) if term.layout == "transposed" else (out, inn))
    if not fits or (term.layout == "transposed" and len(shape) != 2):
        return (f"its factors give a [{out}, {inn}] change ({term.layout}), which does not fit the tensor's shape "
                f"{list(shape)}")
    return None


def _loralib_layout(term: RefTerm, shape: tuple[int, ...]) -> str | None:
    """loralib: [out, in] or [in, out] from the shape (or --fan-in-fan-out), and MergedLinear's
    block placement of lora_B (enable_lora)."""
    if len(shape) != 2:
        return f"loralib layers are 2-D, the tensor is {list(shape)}"
    b, a = term.left, term.right
    r = b.shape[1]
    enabled = a.shape[0] // r
    fifo = term.options.get("fan_in_fan_out")
    ways = [t for t in (False, True) if fifo in (None, t) and (shape[1], shape[0])[t] == a.shape[1]]
    if len(ways) != 1:
        return f"cannot tell whether {list(shape)} is stored [out, in] or [in, out]; pass --fan-in-fan-out"
    transposed = ways[0]
    out = shape[1] if transposed else shape[0]
    term.layout = "transposed" if transposed else "linear"
    per_group = b.shape[0] // enabled
    mask = term.options.get("enable_lora")
    if enabled == 1 and out == b.shape[0]:
        return None
    mask = tuple(mask) if mask is not None else (True,) * (out // per_group)
    if out % per_group or len(mask) != out // per_group or sum(mask) != enabled:
        return f"lora_B {list(b.shape)} does not split into the enabled row groups {mask} of {out} rows"
    left = torch.zeros((out, r * enabled), dtype=b.dtype)
    k = 0
    for g, on in enumerate(mask):
        if on:
            left[g * per_group:(g + 1) * per_group, k * r:(k + 1) * r] = b[k * per_group:(k + 1) * per_group]
            k += 1
    term.left = left
    return None
