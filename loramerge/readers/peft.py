"""PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors (or .bin).

Everything PEFT-specific lives here: key naming, which config fields change the math, and
PEFT's own matching rules for target_modules, layers_to_transform and rank/alpha patterns.
The result is a normalized Adapter whose LoraPairs carry the final scale.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import AdapterError
from ..types import Adapter, LoraPair
from .checkpoint import load_bin_state_dict

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# Config fields that change the merged weights and are not supported yet. Each is refused with
# its reason rather than ignored: ignoring any of them gives a silently wrong model.
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each column by a learned magnitude",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layout) stores the delta transposed",
    "modules_to_save": "modules_to_save replaces whole base tensors with trained copies",
    "trainable_token_indices": "trainable_token_indices replaces embedding rows",
    "layer_replication": "layer_replication duplicates layers, changing the model's structure",
    "target_parameters": "target_parameters adapts nn.Parameters directly (e.g. MoE experts)",
    "use_qalora": "QA-LoRA merges into group-quantized weights",
    "alora_invocation_tokens": "activated LoRA (aLoRA) only applies after its invocation tokens, "
                               "so it cannot be folded into the weights",
    "megatron_config": "Megatron parallel layers shard the weights differently",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between several LoRA experts at run time",
}
# init_lora_weights values whose training changed the BASE weights (the adapter is only right on
# top of a residual base), unless PEFT converted the adapter at save time.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")


def read_peft_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    root = path.parent if path.is_file() else path
    cfg_path = root / CONFIG
    if not root.exists():
        raise AdapterError(f"{path}: adapter not found")
    if not cfg_path.is_file():
        raise AdapterError(f"{root}: no {CONFIG}; expected a PEFT adapter directory "
                           f"({CONFIG} + adapter_model.safetensors), e.g. from PeftModel.save_pretrained")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("top level is not an object")
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: invalid JSON ({e}); re-save the adapter") from e

    _check_config(cfg_path, config)
    tensors = _load_weights(root, path)
    pairs = _pairs(root, config, tensors)
    return Adapter(path=root, format="peft", pairs=pairs, tensors=tensors, config=config)


def _check_config(cfg_path: Path, config: dict) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; loramerge merges LoRA adapters only")
    problems = []
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            problems.append(f"{key} must be a positive number, found {config.get(key)!r}")
    for key, why in UNSUPPORTED_FIELDS.items():
        value = config.get(key)
        if value not in (None, False, [], {}, ""):
            problems.append(f"{key}={value!r} is not supported yet: {why}")
    bias = config.get("bias", "none")
    if bias not in ("none", None):
        problems.append(f"bias={bias!r} is not supported yet: the adapter carries trained base biases "
                        "that replace the base model's")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={init!r}: this initialization changed the base weights during "
                        "training, so merging into the original base is wrong; re-save the adapter with "
                        "PEFT's path_initial_model_for_weight_conversion to convert it to plain LoRA")
    if problems:
        raise AdapterError(f"{cfg_path}: cannot merge this adapter as configured", problems)


def _load_weights(root: Path, given: Path) -> dict[str, torch.Tensor]:
    candidates = [given] if given.is_file() else [root / w for w in WEIGHTS]
    for f in candidates:
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            from ..readers.checkpoint import read_safetensors_header  # validates before loading
            read_safetensors_header(f)
            from safetensors.torch import load_file
            try:
                return load_file(str(f))
            except Exception as e:
                raise AdapterError(f"{f}: cannot read adapter weights ({e})") from e
        try:
            return load_bin_state_dict(f)
        except Exception as e:
            raise AdapterError(str(e)) from e
    raise AdapterError(f"{root}: no adapter weights ({' or '.join(WEIGHTS)}) next to {CONFIG}")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern key k (in dict order) with
    re.match(rf"(.*\\.)?({k})$", module) wins; otherwise the default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def targets_module(config: dict, module: str) -> bool:
    """PEFT's check_target_module_exists for a module path as PEFT saw it (no base_model prefix)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return True  # PEFT filled them from its per-architecture defaults; trust the weights
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layers = [layers] if isinstance(layers, int) else list(layers)
    pattern = config.get("layers_pattern")
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return m is not None and int(m.group("idx")) in layers


def _pairs(root: Path, config: dict, tensors: dict[str, torch.Tensor]) -> list[LoraPair]:
    modules: dict[str, dict[str, str]] = {}
    unknown = []
    for key in tensors:
        m = _KEY.match(key)
        if not m or (m.group("part") == "lora_A" and m.group("param") == "bias"):
            unknown.append(key)
            continue
        module = m.group("module")
        module = module[len(PREFIX):] if module.startswith(PREFIX) else module
        slot = m.group("part") + ("_bias" if m.group("param") == "bias" else "")
        modules.setdefault(module, {})[slot] = key
    problems = []
    if unknown:
        kinds = sorted({k.rsplit(".", 2)[-2] if k.count(".") >= 2 else k for k in unknown})
        problems.append(f"{len(unknown)} tensor(s) are not LoRA A/B factors and are not supported yet "
                        f"(e.g. {unknown[0]!r}; kinds: {', '.join(kinds[:6])})")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    pairs = []
    for module, slots in modules.items():
        if "lora_A" not in slots or "lora_B" not in slots:
            missing = "lora_A" if "lora_A" not in slots else "lora_B"
            problems.append(f"{module}: has no {missing}.weight; the adapter file is incomplete")
            continue
        a, b = tensors[slots["lora_A"]], tensors[slots["lora_B"]]
        if a.dim() != 2 or b.dim() != 2:
            problems.append(f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not matrices "
                            "(convolution LoRA is not supported yet)")
            continue
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{module}: LoRA factors have dtype {a.dtype}/{b.dtype}; expected floating point")
            continue
        r = _pattern_value(rank_pattern, module, config["r"])
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        if a.shape[0] != b.shape[1]:
            problems.append(f"{module}: lora_A has {a.shape[0]} rows but lora_B has {b.shape[1]} columns")
            continue
        if a.shape[0] != r:
            problems.append(f"{module}: {CONFIG} gives rank {r} (r/rank_pattern) but lora_A has "
                            f"{a.shape[0]} rows; the config does not belong to these weights")
            continue
        if not targets_module(config, module):
            problems.append(f"{module}: has LoRA weights but {CONFIG}'s target_modules/layers_to_transform "
                            "do not select it (PEFT would ignore them); fix the config")
            continue
        bad = [n for n, t in (("lora_A", a), ("lora_B", b)) if not torch.isfinite(t).all()]
        bias_key = slots.get("lora_B_bias")
        if bias_key is not None:
            if not config.get("lora_bias"):
                problems.append(f"{module}: lora_B.bias present but lora_bias is not set in {CONFIG}")
                continue
            if not torch.isfinite(tensors[bias_key]).all():
                bad.append("lora_B.bias")
        if bad:
            problems.append(f"{module}: {', '.join(bad)} contain NaN or Inf; the adapter is broken "
                            "(training diverged or the file is corrupt)")
            continue
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        pairs.append(LoraPair(module=module, a_key=slots["lora_A"], b_key=slots["lora_B"], bias_key=bias_key,
                              rank=int(r), alpha=alpha, scale=scale,
                              base_shape=(b.shape[0], a.shape[1])))
    if problems:
        raise AdapterError(f"{root}: adapter weights do not match {CONFIG}", problems)
    if not pairs:
        raise AdapterError(f"{root}: the adapter holds no LoRA weights (lora_A/lora_B); nothing to merge")
    return pairs
