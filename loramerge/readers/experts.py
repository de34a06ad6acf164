"""MoE experts: how transformers 5 holds them in memory and how checkpoints store them. DATA.

transformers 5 fuses each layer's experts into 3-D parameters (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]); that is what PEFT's target_parameters adapt.
Checkpoints on the Hub mostly keep one tensor per expert (`block_sparse_moe.experts.N.w1.weight`,
`mlp.experts.N.gate_proj.weight`), and transformers converts on load (conversion_mapping.py:
MergeModulelist(dim=0) stacks the experts, Concatenate(dim=1) joins gate and up) and converts
back on save. A model saved with save_original_format=False, or one whose checkpoints are fused
(gpt-oss), stores the in-memory tensors as they are.

Each ExpertLayout below is transcribed from transformers' conversion mapping and modeling code
(tests/test_moe.py checks every entry against the installed transformers: parameter order,
orientation, and which expert rows each checkpoint tensor holds, by value). An architecture not
listed here is refused by name: its correspondence is never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertParam:
    """One parameter of an experts module. `parts`: the per-expert checkpoint tensors it is the
    concatenation of along the expert's output rows, in order (checkpoint name
    '<experts module>.<e>.<part>.weight'); empty when checkpoints only ever store it fused."""

    name: str
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertLayout:
    """`params`: the experts module's parameters in the order it registers them (PEFT nests one
    ParamWrapper per targeted parameter in that order: the first is innermost). `transposed`:
    each expert is held [in, out] (transformers' is_transposed; PEFT then does not swap in/out).
    `renames`: (in-memory, checkpoint) substrings of module paths that the conversion renames
    (Mixtral's block_sparse_moe is 'mlp' in memory)."""

    label: str
    params: tuple[ExpertParam, ...]
    transposed: bool = False
    renames: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> ExpertParam | None:
        return next((p for p in self.params if p.name == name), None)

    def to_checkpoint(self, path: str) -> str:
        for mem, disk in self.renames:
            path = path.replace(mem, disk)
        return path


_GLU = (ExpertParam("gate_up_proj"), ExpertParam("down_proj"))

MIXTRAL = ExpertLayout(
    "Mixtral (block_sparse_moe.experts.N.w1/w2/w3)",
    (ExpertParam("gate_up_proj", ("w1", "w3")), ExpertParam("down_proj", ("w2",))),
    renames=((".mlp.", ".block_sparse_moe."),))
PHIMOE = ExpertLayout(MIXTRAL.label, MIXTRAL.params,
                      renames=((".mlp.", ".block_sparse_moe."), (".router.weight", ".gate.weight")))
QWEN2_MOE = ExpertLayout(
    "Qwen2-MoE (mlp.experts.N.gate_proj/up_proj/down_proj)",
    (ExpertParam("gate_up_proj", ("gate_proj", "up_proj")), ExpertParam("down_proj", ("down_proj",))))
GPT_OSS = ExpertLayout(
    "gpt-oss (fused, [E, in, out])",
    (ExpertParam("gate_up_proj"), ExpertParam("gate_up_proj_bias"), ExpertParam("down_proj"),
     ExpertParam("down_proj_bias")),
    transposed=True)

# config.json model_type -> layout. Only architectures whose transformers code was checked.
ARCHITECTURES: dict[str, ExpertLayout] = {
    "mixtral": MIXTRAL,
    "minimax": MIXTRAL,
    "phimoe": PHIMOE,
    "qwen2_moe": QWEN2_MOE,
    "qwen3_moe": QWEN2_MOE,
    "qwen3_next": QWEN2_MOE,
    "olmoe": QWEN2_MOE,
    "hunyuan_v1_moe": QWEN2_MOE,
    "gpt_oss": GPT_OSS,
}

# The order every layout above registers its parameters in: how the reader tells which nested
# ParamWrapper (keys with 0, 1, .. '.base_layer') adapts which parameter before the base is known.
NESTING_ORDER = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def model_type(config: dict) -> str | None:
    """The architecture of a checkpoint's config.json (a multimodal model's text model's)."""
    mt = config.get("model_type")
    if mt in ARCHITECTURES:
        return mt
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("model_type") in ARCHITECTURES:
        return text["model_type"]
    return mt if isinstance(mt, str) else None


def layout_for(config: dict) -> ExpertLayout | None:
    return ARCHITECTURES.get(model_type(config) or "")


def expert_tensor(layout: ExpertLayout, module: str, expert: int, part: str) -> str:
    """Checkpoint module path of one expert's part, from the in-memory experts module path."""
    return f"{layout.to_checkpoint(module)}.{expert}.{part}"


def nesting(params: list[str]) -> list[str] | None:
    """`params` (the targeted parameters of one module) innermost first, or None when one of them
    is not in NESTING_ORDER (then the order PEFT nested them in is not known)."""
    if any(p not in NESTING_ORDER for p in params):
        return None
    return sorted(params, key=NESTING_ORDER.index)


def matches_target(module: str, target: str) -> str | None:
    """PEFT's target_parameters rule for a module path: the parameter name `target` selects on this
    module (f'{module}.{param}' equals the target or ends with '.' + target), else None. A bare
    name ('down_proj') selects that parameter on every module that has one."""
    mod, _, param = target.rpartition(".")
    if not mod or module == mod or module.endswith("." + mod):
        return param
    return None


def natural_experts(names, module: str) -> list[int]:
    """The expert numbers N of '<module>.N.*' among checkpoint tensor names."""
    pat = re.compile(re.escape(module) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pat.match(n))})
