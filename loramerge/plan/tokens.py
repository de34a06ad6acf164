"""Trained token rows (PEFT's trainable_token_indices) in the plan.

Rows are not a delta: PEFT copies the trained rows over the tensor's own (index_copy), in the
unmerged model at run time and in its merge alike. The rules, as PEFT 0.21 applies them:
- On a base whose lm_head is tied to the input embedding, PEFT wraps the lm_head with the
  embedding's own token adapter (the same ids, the same trained rows) unless the adapter names
  lm_head itself with other ids. Such shared rows go into every output tensor that holds the
  lm_head; when nothing else tells lm_head and embedding apart, the output stays tied and the
  embedding's rows serve both. An lm_head copy PEFT saved of shared rows must equal them.
- Rows are values, not a change: they cannot be weighted (nor unmerged: PEFT does not save the
  rows they overwrote). They are written first, in the tensor's own dtype: a LoRA of the same
  adapter on that layer (a tied lm_head) adds to them, as PEFT's LoRA wraps the token layer.
  PEFT refuses overlapping ids, and LoRA on an embedding that has token rows.
"""

from __future__ import annotations

import torch

from ..types import FLOAT_CODES, Adapter, Term
from .state import OUTPUT_EMBEDDING, PlanState, Target


def resolve_rows(st: PlanState, ai: int, w: float, adapter: Adapter) -> list[Target]:
    """The output tensor each of the adapter's trained-row sets lands on."""
    targets = []
    for tr in adapter.tokens:
        module, _, param = tr.target.rpartition(".")
        found, _ = st.matcher.match(module)
        name = f"{found}.{param}" if found is not None else None
        if name is None and tr.target == OUTPUT_EMBEDDING and st.tied is not None:
            name = OUTPUT_EMBEDDING  # the tied lm_head, not stored in the base
        if name is None or (name not in st.base.tensors and name != OUTPUT_EMBEDDING):
            st.problems.append(f"{adapter.label}: {tr.target}: the adapter trains token rows of {tr.target} but "
                               "the base has no such tensor")
            continue
        targets.append(Target(ai, w, name, rows=tr))
    return targets


def share_tied_rows(st: PlanState, targets: list[Target]) -> tuple[list[Target], list[Target]]:
    """(the targets less the lm_head copies of shared rows, the embedding's row targets that a
    tied lm_head shares). Needs the resolved names; runs before the output tensors are decided."""
    if st.tied is None:
        return targets, []
    embedding = st.tied[0]
    shared, copies = [], []
    for ai in sorted({t.adapter for t in targets if t.rows is not None}):
        mine = [t for t in targets if t.adapter == ai and t.rows is not None]
        emb = next((t for t in mine if t.name == embedding), None)
        head = next((t for t in mine if t.name == OUTPUT_EMBEDDING), None)
        if emb is None or (head is not None and head.rows.indices != emb.rows.indices):
            continue  # PEFT wraps each on its own: lm_head uses its own rows only
        shared.append(emb)
        if head is not None:
            tensors = st.adapters[ai].tensors
            if not torch.equal(tensors[head.rows.key], tensors[emb.rows.key]):
                st.problems.append(f"{st.adapters[ai].label}: {head.rows.key} and {emb.rows.key} are the trained "
                                   "rows of one tied token adapter (same ids) but hold different values; PEFT would "
                                   "load one over the other, so the adapter file is inconsistent")
            copies.append(head)
    return [t for t in targets if not any(t is c for c in copies)], shared


def check_rows(st: PlanState, t: Target) -> None:
    adapter = st.adapters[t.adapter]
    where = f"{adapter.label}: {t.rows.target} (trainable tokens)"
    ref, shape = st.source(t.name), st.shape(t.name)
    values = adapter.tensors[t.rows.key]
    if t.weight != 1:
        st.problems.append(f"{where}: trained token rows are new values, not a change, so they cannot be weighted "
                           f"({t.weight:g}); merge this adapter with weight 1")
    elif ref.dtype not in FLOAT_CODES:
        st.problems.append(f"{where}: base tensor {t.name} is {ref.dtype}, a quantized/integer type; merge into the "
                           "original floating-point base instead")
    elif len(shape) != 2 or shape[1] != values.shape[1]:
        st.problems.append(f"{where}: rows of width {values.shape[1]} do not fit {t.name} {list(shape)}; the "
                           "adapter was trained for another model")
    elif max(t.rows.indices) >= shape[0]:
        st.problems.append(f"{where}: token id {max(t.rows.indices)} is beyond the {shape[0]} rows of {t.name}; "
                           "the adapter was trained with a larger vocabulary (save it with save_embedding_layers)")
    else:
        st.add(t.name, Term(t.adapter, None, t.weight, kind="rows", key=t.rows.key, rows=t.rows.indices))


def rows_problems(st: PlanState, name: str, terms: list[Term]) -> list[str]:
    rows = [t for t in terms if t.kind == "rows"]
    if not rows:
        return []
    problems = []
    # One adapter's LoRA on a layer with token rows (a tied lm_head: PEFT's LoRA wraps the token
    # layer) adds to the rows; another adapter's terms have no recorded order relative to them.
    other = [t for t in terms if t.kind not in ("rows", "replace")
             and not (t.kind == "lora" and all(r.adapter == t.adapter for r in rows))]
    if other:
        problems.append(f"{name}: {st.adapters[rows[0].adapter].label} replaces trained token rows of it and "
                        f"{st.adapters[other[0].adapter].label} adds a {other[0].kind} term to it; the order they "
                        "apply in is not recorded: merge them one at a time")
    seen: set[int] = set()
    for t in rows:
        if seen & set(t.rows):
            problems.append(f"{name}: several adapters train token id {min(seen & set(t.rows))}; PEFT refuses "
                            "overlapping token ids too: merge them one at a time")
            break
        seen |= set(t.rows)
    return problems
