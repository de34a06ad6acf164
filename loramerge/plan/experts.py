"""LoRA on nn.Parameters (PEFT target_parameters, readers/peft_params.py) in the plan: where each
expert's delta lands in the checkpoint at hand.

A ParamTarget names a parameter as transformers 5 holds it in memory. The checkpoint may store
  - that very tensor (a fused [E, d1, d2], saved with save_original_format=False, or gpt-oss):
    one LoraPair per expert, `stacked`, each adding to its slice W[e];
  - one tensor per expert and part (the Hub's usual form; readers/experts.py says which, per
    architecture): one LoraPair per expert and part, each a plain linear LoRA whose factors are
    that expert's rows of the fused delta;
  - a 2-D parameter (a router's weight) as itself, or renamed: one plain LoRA pair.
The architecture comes from the base's config.json; one the tables do not know is a problem that
names it. Every pair keeps the adapter's own factor keys (engine/deltas.py slices the expert), so
nothing is copied, and a job is one expert tensor (or one fused group): memory stays bounded.
"""

from __future__ import annotations

from ..readers import experts as tables
from ..readers import experts_hf
from ..types import Adapter, LoraPair, ParamTarget
from .state import PlanState, Target


def resolve_param(st: PlanState, ai: int, w: float, adapter: Adapter, rec: ParamTarget) -> list[Target]:
    where = f"{adapter.label}: {rec.module}"
    mt = tables.model_type(st.config)
    layout = tables.layout_for(st.config) or (experts_hf.derive(mt) if mt else None)
    found = _find(st, rec.module)
    if found is None and layout is not None:
        found = _find(st, layout.to_checkpoint(rec.module))
    if found is not None and len(st.base.tensors[found].shape) == 2:
        return _plain(st, ai, w, rec, found, where)
    if layout is None:
        _problem(st, f"{adapter.label}: the adapter targets parameters (target_parameters: MoE experts) of a "
                     f"{'model of type ' + repr(mt) if mt else 'model without a config.json model_type'}; loramerge "
                     "has no mapping from transformers' in-memory experts to its checkpoint tensors for it (known: "
                     f"{', '.join(sorted(tables.ARCHITECTURES))}; others from transformers' conversion mapping when "
                     "transformers is installed and the mapping has a form loramerge reads)"
                     + ("" if mt else "; pass the model directory"))
        return []
    if layout.param(rec.param) is None:
        st.problems.append(f"{where}: {layout.label} experts have no parameter {rec.param!r} (they have "
                           f"{', '.join(p.name for p in layout.params)})")
        return []
    if found is not None:
        return _stacked(st, ai, w, rec, found, layout.transposed, where)
    return _per_expert(st, ai, w, rec, layout, where)


def _problem(st: PlanState, line: str) -> None:
    if line not in st.problems:  # one line per adapter, not per expert tensor
        st.problems.append(line)


def _find(st: PlanState, name: str) -> str | None:
    """The base tensor `name` as stored: exactly, or the unique one that differs by leading module
    components (the same prefix rewrite rule as every other target, recorded with them)."""
    if name in st.base.tensors:
        return name
    parts = name.split(".")
    for k in range(1, len(parts) - 1):
        tail = ".".join(parts[k:])
        if tail in st.base.tensors:
            st.matcher.rewrites.setdefault((".".join(parts[:k]) + ".", ""), []).append(name)
            return tail
    longer = [n for n in st.base.tensors if n.endswith("." + name)]
    if len(longer) == 1:
        st.matcher.rewrites.setdefault(("", longer[0][: -len(name)]), []).append(name)
        return longer[0]
    return None


def _pair(rec: ParamTarget, target: str, shape: tuple[int, int], expert: int = 0, **kw) -> LoraPair:
    return LoraPair(module=rec.module, a_key=rec.a_key, b_key=rec.b_key, bias_key=None, rank=rec.rank,
                    alpha=rec.alpha, scale=rec.scale, base_shape=shape, target=target, experts=rec.experts,
                    expert=expert, **kw)


def _plain(st, ai, w, rec: ParamTarget, found: str, where: str) -> list[Target]:
    """A 2-D parameter: PEFT treats it as one Linear weight [out, in] (E = 1)."""
    if rec.experts != 1:
        st.problems.append(f"{where}: the base's {found} is 2-D {list(st.base.tensors[found].shape)} but the "
                           f"factors hold {rec.experts} experts (lora_A {rec.rank * rec.experts} rows at rank "
                           f"{rec.rank})")
        return []
    return [Target(ai, w, found, pair=_pair(rec, found, (rec.out_features, rec.in_features)))]


def _stacked(st, ai, w, rec: ParamTarget, found: str, transposed: bool, where: str) -> list[Target]:
    shape = st.base.tensors[found].shape
    want = (rec.experts, rec.in_features, rec.out_features) if transposed else \
        (rec.experts, rec.out_features, rec.in_features)
    if tuple(shape) != want:
        st.problems.append(f"{where}: the base's {found} has shape {list(shape)} but the factors give "
                           f"{list(want)} ({rec.experts} experts, in {rec.in_features}, out {rec.out_features}, "
                           f"{'[E, in, out]' if transposed else '[E, out, in]'}); the adapter was trained for "
                           "another model")
        return []
    layout = "transposed" if transposed else "linear"
    return [Target(ai, w, found, pair=_pair(rec, found, want[1:], e, layout=layout, stacked=True))
            for e in range(rec.experts)]


def _per_expert(st, ai, w, rec: ParamTarget, layout: tables.ExpertLayout, where: str) -> list[Target]:
    param = layout.param(rec.param)
    module = rec.module.rpartition(".")[0]
    if not param.parts:
        name = layout.to_checkpoint(rec.module)
        blocks = _find(st, name + "_blocks")
        st.problems.append(f"{where}: " + (
            f"the base stores it quantized ({blocks}, MXFP4 blocks), which loramerge cannot decode; merge into "
            "the bf16 release of the model" if blocks else
            f"the base stores no tensor {name} and {layout.label} checkpoints keep {rec.param} only fused; is "
            "this the right base?"))
        return []
    targets = []
    for e in range(rec.experts + 1):  # one past the adapter's experts: the base must not have more
        rows = 0
        for part in param.parts:
            name = tables.expert_tensor(layout, module, e, part)
            found, _ = st.matcher.match(name)
            if e == rec.experts:
                if found is not None:
                    st.problems.append(f"{where}: the base has an expert {e} ({found}.weight) but the factors hold "
                                       f"{rec.experts} experts; the adapter was trained for another model")
                    return []
                break
            if found is None:
                st.problems.append(f"{where}: the base has neither the fused {rec.module} nor {name}.weight "
                                   f"({layout.label}); the checkpoint's expert layout is not the one its config "
                                   f"names ({tables.model_type(st.config)})")
                return []
            shape = st.base.tensors[found + ".weight"].shape
            if len(shape) != 2 or shape[1] != rec.in_features or rows + shape[0] > rec.out_features:
                st.problems.append(f"{where}: the base's {found}.weight has shape {list(shape)}; expert {e}'s "
                                   f"{'+'.join(param.parts)} must stack to [{rec.out_features}, {rec.in_features}] "
                                   "(the factors' out x in); the adapter was trained for another model")
                return []
            targets.append(Target(ai, w, found + ".weight", pair=_pair(
                rec, found + ".weight", tuple(shape), e, out_rows=(rows, rows + shape[0]))))
            rows += shape[0]
        if e < rec.experts and rows != rec.out_features:
            st.problems.append(f"{where}: expert {e}'s {'+'.join(param.parts)} have {rows} rows in the base, the "
                               f"factors {rec.out_features}; the adapter was trained for another model")
            return []
    return targets
