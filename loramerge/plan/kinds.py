"""Which adapter terms may meet on one tensor, and with which weights.

Additive terms (LoRA, AdaLoRA, LoHa, LoKr, VeRA deltas, LoRA biases) are linear in the adapter:
W + sum_i c_i * delta_i is well defined for any weights c_i, in any order, and unmerge is c = -1.
IA3 is multiplicative, W' = W * l, so:
  - its weight is an exponent: 1 merges, -1 (what unmerge passes) divides l out again. Any other
    value has no faithful meaning (PEFT's add_weighted_adapter mixes the vectors themselves,
    which for a single adapter shrinks the whole layer), so it is refused;
  - dividing needs every entry of l to be non-zero;
  - IA3 and an additive term on one tensor do not commute ((W + D) * l != W * l + D): the right
    order is the order the adapters were trained in, which the files do not record, and PEFT
    cannot put IA3 and another tuner in one model. Refused; several IA3 vectors multiply and
    commute, so they may meet.
"""

from __future__ import annotations

from ..types import Adapter, Term


def term_problems(name: str, terms: list[Term], adapters: list[Adapter]) -> list[str]:
    problems = []
    scales = [t for t in terms if t.kind == "scale"]
    if not scales:
        return problems
    label = adapters[scales[0].adapter].label
    additive = [t for t in terms if t.kind in ("lora", "delta", "bias")]
    if additive:
        other = additive[0].pair.tuner if additive[0].kind == "delta" else "LoRA"
        problems.append(f"{name}: IA3 ({label}) multiplies this tensor and {other} "
                        f"({adapters[additive[0].adapter].label}) adds to it; the result depends on the order "
                        "they were trained in, which the adapters do not record. Merge one, then the other into "
                        "that output, in training order")
    for t in scales:
        if t.weight not in (1, -1):
            problems.append(f"{name}: IA3 ({adapters[t.adapter].label}) multiplies W by its vector l, so its "
                            f"weight is an exponent: 1 applies it, -1 divides it out (unmerge); {t.weight:g} has "
                            "no faithful meaning. Apply it with weight 1")
        elif t.weight == -1 and not name.endswith(".bias"):
            l = adapters[t.adapter].tensors[t.pair.key("l")].reshape(-1)
            zeros = (l == 0).nonzero().reshape(-1)
            if zeros.numel():
                problems.append(f"{name}: cannot divide IA3 ({adapters[t.adapter].label}) back out: its ia3_l has "
                                f"{zeros.numel()} zero entr{'y' if zeros.numel() == 1 else 'ies'} (first at index "
                                f"{int(zeros[0])}), so the merge set those {'rows' if t.pair.axis == 'out' else 'columns'}"
                                " to 0 and the original values are lost; merge again from the original base")
    return problems
