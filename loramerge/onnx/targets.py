"""What an ONNX fold works on: the base tensors the adapters change (Target), where each was
found in the graph (Match), and the outcome of matching (MatchResult)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import OnnxError, PlanError
from ..plan import build_plan
from ..readers.checkpoint import Checkpoint
from ..types import Adapter, ParamTarget, Term, TensorRef, TunerTarget


@dataclass
class Target:
    """One base tensor the adapters change. `shape` is W's own layout (as in the checkpoint)."""

    name: str
    shape: tuple[int, ...]
    terms: tuple[Term, ...]
    ref: TensorRef | None = None      # the base tensor, when a base checkpoint is given

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def layout(self) -> str:
        pairs = [t.pair for t in self.terms if t.pair is not None]
        return pairs[0].layout if pairs else "linear"


@dataclass
class Match:
    """`init` holds `target` (transposed: the initializer is W.T). `block` = (axis, start) when the
    target is a slice of a bigger (packed) initializer along `axis` of the initializer."""

    target: Target
    init: str
    transposed: bool
    how: str                          # 'name' | 'folded_from' | 'content'
    block: tuple[int, int] | None = None
    note: str = ""
    via: torch.dtype | None = None    # the initializer holds values rounded to this dtype first
    # proposed by a sampled digest alone: the fold compares it with the base value element by
    # element when it reads that value to merge (merging.confirm), and starts over without
    # deferring (every candidate compared up front) if they differ
    pending: bool = False

    def describe(self) -> str:
        where = f"{self.init}" + (f" [block at {self.block[1]} on axis {self.block[0]}]" if self.block else "")
        via = f", via {str(self.via).removeprefix('torch.')}" if self.via is not None else ""
        return (f"{self.target.name} -> {where} ({self.how}{', transposed' if self.transposed else ''}{via}"
                f"{'; ' + self.note if self.note else ''})")


class Unconfirmed(Exception):
    """A pending match's initializer turned out not to hold the base value."""


@dataclass
class MatchResult:
    matches: list[Match] = field(default_factory=list)
    # (target, why): not in the graph, and no initializer is left that could hold it (an exporter
    # dropped it, e.g. a pooler the graph's outputs never use); folding the rest is complete
    missing: list[tuple[Target, str]] = field(default_factory=list)
    # (target, why): not found, although initializers that could hold it are left: an error
    unmatched: list[tuple[Target, str]] = field(default_factory=list)

    def by_init(self) -> dict[str, list[Match]]:
        out: dict[str, list[Match]] = {}
        for m in self.matches:
            out.setdefault(m.init, []).append(m)
        return out


def collect_targets(adapters: list[Adapter], weights: list[float] | None, base: Checkpoint | None) -> list[Target]:
    """Base tensors the adapters change, with their terms. With a base checkpoint the core plan
    decides (prefix mismatches, layouts, tied embeddings); without one, the adapters' own target
    names are all we have."""
    params = [f"{a.label}: {p.module}" for a in adapters for p in a.pairs if isinstance(p, ParamTarget)]
    if params:
        raise OnnxError(f"{params[0]}: the adapter targets parameters (target_parameters: MoE experts); an exported "
                        "graph holds experts in an exporter's own layout, which loramerge does not fold into or "
                        "branch from: export the merged model instead (loramerge export-onnx MODEL_DIR OUT.onnx "
                        "--adapter ADAPTER, without --keep-lora, merges first)"
                        + (f" ({len(params)} such targets)" if len(params) > 1 else ""))
    if base is not None:
        plan = build_plan(base, adapters, weights=weights)
        targets = []
        for job in plan.jobs:
            if not job.terms:
                continue
            if job.out_shape is not None and job.out_shape != job.source.shape:
                raise OnnxError(f"{job.name}: the adapter changes its shape {list(job.source.shape)} -> "
                                f"{list(job.out_shape)} (a resized vocabulary); an existing graph's shapes cannot "
                                "change: export the merged model instead (loramerge export-onnx MODEL_DIR OUT.onnx "
                                "--adapter ...)")
            targets.append(Target(job.name, job.source.shape, job.terms, job.source))
        for alias, origin in plan.aliases.items():  # a tied lm_head sharing the embedding's token rows
            targets += [Target(alias, t.shape, t.terms, t.ref) for t in targets if t.name == origin]
        return targets

    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise PlanError(f"--weights has {len(weights)} value(s) for {len(adapters)} adapter(s); give one per adapter")
    found: dict[str, tuple[tuple[int, ...], list[Term]]] = {}
    problems = []

    def add(name, shape, term):
        entry = found.setdefault(name, (shape, []))
        entry[1].append(term)

    for ai, (adapter, w) in enumerate(zip(adapters, weights)):
        for tr in adapter.tokens:
            problems.append(f"{adapter.label}: {tr.target}: trained token rows (trainable_token_indices) are placed "
                            "against the base checkpoint (tied embeddings decide where they go); pass --base "
                            "BASE_CHECKPOINT")
        for name, key in adapter.replacements.items():
            add(name, tuple(adapter.tensors[key].shape), Term(ai, None, w, kind="replace", key=key))
        for pair in adapter.pairs:
            if isinstance(pair, TunerTarget):
                problems.append(f"{adapter.label}: {pair.module}: a {pair.tuner} target's base tensor shape is "
                                "decided against the base checkpoint; pass --base BASE_CHECKPOINT")
                continue
            if pair.layout not in ("linear", "transposed", "conv") or pair.target_name.startswith("flat:"):
                problems.append(f"{adapter.label}: {pair.module}: which base tensor this targets (and in which "
                                "layout) is decided against the base checkpoint; pass --base BASE_CHECKPOINT")
                continue
            add(pair.target_name, tuple(pair.base_shape), Term(ai, pair, w))
            if pair.bias_key is not None:
                add(pair.target_name.rsplit(".", 1)[0] + ".bias", (pair.base_shape[0],), Term(ai, pair, w, kind="bias"))
    if problems:
        raise PlanError(f"{len(problems)} adapter target(s) cannot be placed without the base checkpoint", problems)
    return [Target(n, shape, tuple(terms)) for n, (shape, terms) in found.items()]
