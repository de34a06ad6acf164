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
from ..types import Adapter, LoraPair, TokenRows
from .files import all_finite, load_adapter_file
from .peft_config import pattern_value as _pattern_value
from .peft_config import type_problems
from .peft_params import param_targets, split_param_modules

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# Config fields that change the merged weights and are not supported yet. Each is refused with
# its reason rather than ignored: ignoring any of them gives a silently wrong model.
UNSUPPORTED_FIELDS = {
    "layer_replication": "layer_replication duplicates layers, changing the model's structure",
    # LoRA merges these (readers/peft_params.py); the other tuners' parameter wrappers are not read
    "target_parameters": "target_parameters adapts nn.Parameters directly (e.g. MoE experts); loramerge merges "
                         "it for LoRA only",
    "use_qalora": "QA-LoRA merges into group-quantized weights",
    "alora_invocation_tokens": "activated LoRA (aLoRA) only applies after its invocation tokens, "
                               "so it cannot be folded into the weights",
    "megatron_config": "Megatron parallel layers shard the weights differently",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between several LoRA experts at run time",
    "kasa_config": "KaSA truncates the base weight's singular values during training",
    "lora_ga_config": "LoRA-GA subtracts its initial delta from the base weights during training",
}
# init_lora_weights values whose training changed the BASE weights (the adapter is only right on
# top of a residual base), unless PEFT converted the adapter at save time.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
# Parameters (not modules) in PEFT's layers: embedding factors and DoRA's magnitude vector.
# TrainableTokens beside LoRA (trainable_token_indices): the trained rows of an embedding/lm_head.
_TOKENS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.(?P<adapter>[^.]+))?$")
_EMB_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                      r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def read_peft_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    root, cfg_path, config = read_config(path)
    _check_config(cfg_path, config)
    tensors = _load_weights(root, path)
    pairs, replacements, tokens = _pairs(root, config, tensors)
    return Adapter(path=root, format="peft", pairs=pairs, tensors=tensors, config=config,
                   replacements=replacements, tokens=tokens)


def read_config(path: Path) -> tuple[Path, Path, dict]:
    """(adapter directory, its adapter_config.json, the parsed config) for a PEFT adapter path."""
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
    problems = type_problems(config)
    if problems:
        raise AdapterError(f"{cfg_path}: {len(problems)} field(s) hold values PEFT does not write; the file was "
                           "edited or is not PEFT's: fix them or re-save the adapter", problems)
    return root, cfg_path, config


def _check_config(cfg_path: Path, config: dict) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; loramerge merges the PEFT tuners whose "
                           "merge is a closed formula: LORA, ADALORA, IA3, LOHA, LOKR and VERA")
    problems = []
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            problems.append(f"{key} must be a positive number, found {config.get(key)!r}")
    for key, why in UNSUPPORTED_FIELDS.items():
        value = config.get(key)
        if value not in (None, False, [], {}, "") and key != "target_parameters":
            problems.append(f"{key}={value!r} is not supported yet: {why}")
    if config.get("bias", "none") not in ("none", "all", "lora_only", None):
        problems.append(f"bias={config.get('bias')!r}: expected 'none', 'all' or 'lora_only'")
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
        if f.is_file():
            return load_adapter_file(f)
    raise AdapterError(f"{root}: no adapter weights ({' or '.join(WEIGHTS)}) next to {CONFIG}")


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


def _strip(module: str) -> str:
    return module[len(PREFIX):] if module.startswith(PREFIX) else module


def _is_saved_module(config: dict, name: str) -> bool:
    """Is `name` (a tensor path without prefix) a full tensor PEFT saves beside the LoRA factors:
    a modules_to_save copy, or a bias trained with bias='all'/'lora_only'?"""
    module = name.rsplit(".", 1)[0]
    for m in config.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){re.escape(m)}$", module):
            return True
    return config.get("bias") in ("all", "lora_only") and name.endswith(".bias")


def _classify(config: dict, tensors: dict[str, torch.Tensor], where: Path):
    """Split the adapter's keys into per-module LoRA slots, full replacement tensors, and unknowns.
    A slot filled twice (one module's lora_A saved under two adapter names, e.g. `.lora_A.default.`
    and `.lora_A.style.`) is an error: which one to merge cannot be guessed, and taking the last
    would silently drop the other."""
    modules: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    tokens: dict[str, str] = {}
    unknown, clashes = [], []

    def put(table: dict, slot: str, key: str) -> None:
        held = table.get(slot)
        if held is not None and held != key:
            clashes.append(f"{slot}: stored twice, as {held!r} and {key!r}")
        else:
            table[slot] = key

    for key in tensors:
        m = _TOKENS_KEY.match(key)
        if m:
            put(tokens, _strip(m.group("module")), key)
            continue
        m = _KEY.match(key)
        if m and not (m.group("part") == "lora_A" and m.group("param") == "bias"):
            slot = m.group("part") + ("_bias" if m.group("param") == "bias" else "")
            put(modules.setdefault(_strip(m.group("module")), {}), slot, key)
            continue
        m = _EMB_KEY.match(key)
        if m:
            put(modules.setdefault(_strip(m.group("module")), {}), m.group("part"), key)
            continue
        name = _strip(key).replace(".token_adapter.base_layer.", ".base_layer.")
        if ".base_layer." in name:
            # The base weights PEFT saves for targeted embeddings (save_embedding_layers, e.g. after
            # resizing the vocabulary): they replace the base tensor, the LoRA delta goes on top.
            put(replacements, name.replace(".base_layer.", "."), key)
        elif _is_saved_module(config, name):
            put(replacements, name, key)
        else:
            unknown.append(key)
    if clashes:
        raise AdapterError(f"{where}: the adapter file holds the same tensor under two adapter names (PEFT saves "
                           "one adapter per directory); keep one name, or save each adapter on its own and pass "
                           "both (with --weights)", clashes)
    return modules, replacements, tokens, unknown


def _layout(config: dict, module: str, a: torch.Tensor, b: torch.Tensor, embedding: bool):
    """(layout, base tensor shape) of one LoRA pair, as PEFT's layer types define them."""
    if embedding:  # lora_embedding_A [r, vocab], lora_embedding_B [dim, r]: delta = (B @ A).T
        return "transposed", (a.shape[1], b.shape[0])
    if a.dim() > 2:  # ConvNd: A is a conv [r, in, *k], B a 1x1 conv [out, r, 1..]
        return "conv", (b.shape[0],) + tuple(a.shape[1:])
    if config.get("fan_in_fan_out"):  # GPT-2 Conv1D weights are stored [in, out]
        return "transposed", (a.shape[1], b.shape[0])
    return "linear", (b.shape[0], a.shape[1])


def _pairs(root: Path, config: dict, tensors: dict[str, torch.Tensor]):
    modules, replacements, token_keys, unknown = _classify(config, tensors, root)
    problems = []
    # LoRA on nn.Parameters (target_parameters: MoE experts), resolved against the base by the plan
    wrapped, modules = split_param_modules(config, modules, lambda m: targets_module(config, m))
    params = param_targets(config, wrapped, tensors, problems)
    tokens = _token_rows(config, token_keys, tensors, problems)
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) are neither LoRA factors nor modules_to_save copies, "
                        f"e.g. {unknown[0]!r}; this adapter format is not supported")
    for name, key in replacements.items():
        if not all_finite(tensors[key]):
            problems.append(f"{name}: saved tensor {key} contains NaN or Inf; the adapter is broken")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    pairs = []
    for module, slots in modules.items():
        embedding = "lora_embedding_A" in slots or "lora_embedding_B" in slots
        a_slot, b_slot = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_slot not in slots or b_slot not in slots:
            missing = a_slot if a_slot not in slots else b_slot
            problems.append(f"{module}: has no {missing}; the adapter file is incomplete")
            continue
        a, b = tensors[slots[a_slot]], tensors[slots[b_slot]]
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{module}: LoRA factors have dtype {a.dtype}/{b.dtype}; expected floating point")
            continue
        if a.dim() != b.dim() or a.dim() < 2 or (a.dim() > 2 and any(d != 1 for d in b.shape[2:])):
            problems.append(f"{module}: {a_slot} {list(a.shape)} and {b_slot} {list(b.shape)} do not form a "
                            "LoRA pair (expected [r, in] and [out, r], or a conv kernel and a 1x1 conv)")
            continue
        r = _pattern_value(rank_pattern, module, config["r"])
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        if a.shape[0] != b.shape[1]:
            problems.append(f"{module}: {a_slot} has {a.shape[0]} rows but {b_slot} has {b.shape[1]} columns")
            continue
        if a.shape[0] != r:
            problems.append(f"{module}: {CONFIG} gives rank {r} (r/rank_pattern) but {a_slot} has "
                            f"{a.shape[0]} rows; the config does not belong to these weights")
            continue
        if not targets_module(config, module):
            problems.append(f"{module}: has LoRA weights but {CONFIG}'s target_modules/layers_to_transform "
                            "do not select it (PEFT would ignore them); fix the config")
            continue
        bad = [n for n, k in slots.items() if not all_finite(tensors[k])]
        if bad:
            problems.append(f"{module}: {', '.join(sorted(bad))} contain NaN or Inf; the adapter is broken "
                            "(training diverged or the file is corrupt)")
            continue
        bias_key = slots.get("lora_B_bias")
        if bias_key is not None and not config.get("lora_bias"):
            problems.append(f"{module}: lora_B.bias present but lora_bias is not set in {CONFIG}")
            continue
        magnitude_key = slots.get("lora_magnitude_vector")
        if bool(config.get("use_dora")) != (magnitude_key is not None):
            problems.append(f"{module}: use_dora={config.get('use_dora')!r} in {CONFIG} but the weights "
                            f"{'lack' if magnitude_key is None else 'have'} lora_magnitude_vector")
            continue
        layout, base_shape = _layout(config, module, a, b, embedding)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        pairs.append(LoraPair(module=module, a_key=slots[a_slot], b_key=slots[b_slot], bias_key=bias_key,
                              rank=int(r), alpha=alpha, scale=scale, base_shape=base_shape, layout=layout,
                              magnitude_key=magnitude_key))
    if problems:
        raise AdapterError(f"{root}: adapter weights do not match {CONFIG}", problems)
    if not pairs and not params and not replacements and not tokens:
        raise AdapterError(f"{root}: the adapter holds no LoRA weights (lora_A/lora_B); nothing to merge")
    return pairs + params, replacements, tokens


def _token_rows(config: dict, keys: dict[str, str], tensors: dict[str, torch.Tensor],
                problems: list[str]) -> list[TokenRows]:
    """PEFT's trainable_token_indices: a list of token ids for the input embedding (PEFT ties a
    tied lm_head to it and may save that copy too), or {module name: ids}, a module matching when
    its path ends with the name. The weights hold the trained rows, [len(ids), dim], per module."""
    spec = config.get("trainable_token_indices")
    if not keys and spec in (None, [], {}):
        return []
    if isinstance(spec, list):
        by_name = None
    elif isinstance(spec, dict) and all(isinstance(k, str) for k in spec):
        by_name = spec
    else:
        problems.append(f"trainable_token_indices={spec!r}: expected a list of token ids or "
                        "{module name: [token ids]}")
        return []
    if not keys:
        problems.append(f"trainable_token_indices={spec!r} but the weights hold no trainable_tokens_delta; "
                        "the adapter file is incomplete")
        return []
    rows = []
    for module, key in keys.items():
        names = [] if by_name is None else [n for n in by_name if module == n or module.endswith("." + n)]
        if by_name is not None and len(names) != 1:
            problems.append(f"{module}: has trained token rows but trainable_token_indices names "
                            f"{'none of its' if not names else 'several of its'} module names ({list(by_name)})")
            continue
        ids = spec if by_name is None else by_name[names[0]]
        delta = tensors[key]
        if not (isinstance(ids, list) and ids and all(type(i) is int and i >= 0 for i in ids)):
            problems.append(f"{module}: trainable token ids {ids!r}: expected a non-empty list of token ids")
        elif len(set(ids)) != len(ids):
            problems.append(f"{module}: trainable token ids {ids} repeat an id; PEFT's row copy would then "
                            "depend on the order of writes")
        elif delta.dim() != 2 or delta.shape[0] != len(ids) or not delta.is_floating_point():
            problems.append(f"{module}: {key} is {delta.dtype} {list(delta.shape)}, expected floating point "
                            f"[{len(ids)}, dim] for {len(ids)} token ids")
        elif not all_finite(delta):
            problems.append(f"{module}: {key} contains NaN or Inf; the adapter is broken")
        else:
            rows.append(TokenRows(module + ".weight", key, tuple(ids)))
    return rows
