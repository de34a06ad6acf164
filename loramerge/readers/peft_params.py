"""PEFT LoRA on nn.Parameters (LoraConfig.target_parameters; PEFT's ParamWrapper), read from the
adapter alone: typically MoE experts, which transformers 5 holds as fused 3-D parameters.

What PEFT stores (peft/tuners/lora/layer.py, ParamWrapper): for a parameter of shape [E, d1, d2]
it takes in_features, out_features = d2, d1 (the expert is [out, in], as in nn.Linear) unless the
module says is_transposed ([E, in, out]); for a 2-D [out, in] parameter E = 1. Then
    lora_A [r * E, in]    rows expert-major:   A.reshape(E, r, in)[e] is expert e's A
    lora_B [out, r * E]   columns rank-major:  B.reshape(out, r, E)[:, :, e] is expert e's B
    delta[e] = scale * B_e @ A_e ([out, in]; transposed modules: its transpose), scale = alpha / r
(alpha / sqrt(r) with use_rslora), r and alpha from rank_pattern/alpha_pattern matched against
the PARAMETER's path ('model.layers.0.mlp.experts.gate_up_proj'). The factors are saved under
the module's path; targeting two parameters of one module nests two ParamWrappers, so the second
one's keys carry '.base_layer' ('mlp.experts.base_layer.lora_A.weight'). PEFT wraps them in the
order the module registers its parameters, the first innermost (most base_layers).
"""

from __future__ import annotations

import math

import torch

from ..types import ParamTarget
from .experts import matches_target, nesting
from .files import all_finite
from .peft_config import pattern_value

_NESTED = ".base_layer"


def split_param_modules(config: dict, modules: dict[str, dict[str, str]], lora_module):
    """(modules that are ParamWrappers, grouped {parameter's module path: {depth: slots}}, the rest).
    A module whose path a target_parameters entry names ('mlp.experts.down_proj' names
    'mlp.experts') is one; a bare parameter name ('down_proj') could be any module's, so with
    one, a module target_modules selects (`lora_module(path)`; PEFT refuses a module targeted both
    ways) keeps its plain LoRA unless its keys are nested."""
    targets = config.get("target_parameters") or []
    wrapped: dict[str, dict[int, dict[str, str]]] = {}
    rest = {}
    for module, slots in modules.items():
        bare, depth = module, 0
        while bare.endswith(_NESTED):
            bare, depth = bare[: -len(_NESTED)], depth + 1
        named = any("." in t and matches_target(bare, t) for t in targets)
        bare_name = any("." not in t for t in targets)
        if named or (bare_name and (depth or config.get("target_modules") is None or not lora_module(bare))):
            wrapped.setdefault(bare, {})[depth] = slots
        else:
            rest[module] = slots
    return wrapped, rest


def param_targets(config: dict, wrapped: dict, tensors: dict[str, torch.Tensor], problems: list[str]) -> list[ParamTarget]:
    out = []
    for bare, by_depth in wrapped.items():
        params = list(dict.fromkeys(p for t in config["target_parameters"] if (p := matches_target(bare, t))))
        n = len(by_depth)
        if sorted(by_depth) != list(range(n)):
            problems.append(f"{bare}: the adapter holds ParamWrapper factors at nesting depths {sorted(by_depth)} "
                            f"(count of '.base_layer'); PEFT writes depths 0..{n - 1}: the file is incomplete")
            continue
        order = nesting(params) if len(params) > 1 else params
        if len(params) != n:
            problems.append(f"{bare}: target_parameters select {len(params)} parameter(s) of this module "
                            f"({', '.join(params)}) but the weights hold {n} nested ParamWrapper(s); the config "
                            "does not belong to these weights")
            continue
        if order is None:
            problems.append(f"{bare}: target_parameters select {', '.join(params)} on one module; which nested "
                            "ParamWrapper adapts which depends on the order the module registers them, known "
                            "for the MoE experts layouts of readers/experts.py only")
            continue
        for depth, slots in by_depth.items():
            rec = _one(config, bare, order[n - 1 - depth], depth, slots, tensors, problems)
            if rec is not None:
                out.append(rec)
    return out


def _one(config: dict, bare: str, param: str, depth: int, slots: dict[str, str], tensors,
         problems: list[str]) -> ParamTarget | None:
    where = f"{bare}.{param}"
    extra = sorted(set(slots) - {"lora_A", "lora_B"})
    if extra:
        problems.append(f"{where}: {', '.join(extra)} beside a target_parameters LoRA; PEFT's ParamWrapper has "
                        "no bias, DoRA or embedding factors: the file is not PEFT's")
        return None
    if "lora_A" not in slots or "lora_B" not in slots:
        problems.append(f"{where}: has no {'lora_A' if 'lora_A' not in slots else 'lora_B'}; the adapter file is "
                        "incomplete")
        return None
    a, b = tensors[slots["lora_A"]], tensors[slots["lora_B"]]
    if a.dim() != 2 or b.dim() != 2 or not (a.is_floating_point() and b.is_floating_point()):
        problems.append(f"{where}: lora_A {a.dtype} {list(a.shape)} and lora_B {b.dtype} {list(b.shape)}: a "
                        "ParamWrapper's factors are floating-point matrices [r*E, in] and [out, r*E]")
        return None
    r = pattern_value(config.get("rank_pattern") or {}, where, config["r"])
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, where, config["lora_alpha"]))
    if a.shape[0] != b.shape[1] or a.shape[0] % r or a.shape[0] == 0:
        problems.append(f"{where}: lora_A has {a.shape[0]} rows and lora_B {b.shape[1]} columns; with rank {r} "
                        "(r/rank_pattern) both must be rank x number of experts")
        return None
    if not (all_finite(a) and all_finite(b)):
        problems.append(f"{where}: lora_A/lora_B contain NaN or Inf; the adapter is broken")
        return None
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return ParamTarget(module=where, param=param, a_key=slots["lora_A"], b_key=slots["lora_B"], rank=int(r),
                       alpha=alpha, scale=scale, experts=a.shape[0] // r, in_features=a.shape[1],
                       out_features=b.shape[0], depth=depth)
