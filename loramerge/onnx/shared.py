"""Initializers that several targets (or other modules) share: who owns which use, and what
cannot be folded. Decisions only; patch.unshare() makes the copies these decisions call for."""

from __future__ import annotations

from ..errors import OnnxError
from .graph import OnnxGraph
from .match import scope_matches
from .targets import Match, MatchResult, Target


def shared_uses(graph: OnnxGraph, result: MatchResult) -> list[tuple[Match, list]]:
    """Exporters store identical weights once (TorchScript deduplicates initializers; tied
    embeddings share one tensor). When an initializer is used by several modules and the nodes'
    module paths say which use belongs to which target, each such target should get its own copy
    used by its own nodes (other modules keep the original): [(match, its (node, input) uses)]
    for patch.unshare() to carry out. Decides only; the graph is not changed here."""
    splits = []
    for init, ms in list(result.by_init().items()):
        whole = [m for m in ms if m.block is None]
        if not whole or len(whole) != len(ms):
            continue
        claimants = {m.target.module: m for m in whole}
        consumers = graph.consumers.get(init, [])
        if len(consumers) < 2:
            continue
        owner: list[Match | None] = []
        foreign = unknown = 0
        for node, _ in consumers:
            scopes = graph.node_scopes(node)
            hits = [m for mod, m in claimants.items() if scope_matches(scopes, mod)]
            if len(hits) == 1:
                owner.append(hits[0])
                continue
            owner.append(None)
            if scopes and not hits:
                foreign += 1  # a module no adapter targets (e.g. the other side of tied embeddings)
            else:
                unknown += 1
        owned = {id(m) for m in owner if m is not None}
        if len(claimants) == 1:
            if not (foreign and owned):
                kinds = {"lookup" if n.op_type == "Gather" and i == 0 else "matmul" for n, i in graph.uses(init)}
                if len(kinds) > 1:
                    t = whole[0].target
                    raise OnnxError(
                        f"{graph.path}: initializer {init} is used both as an embedding table (Gather) and as a matmul "
                        f"weight: tied input/output embeddings. The adapter changes only {t.name}, and the graph's "
                        "node names/metadata do not say which use belongs to it, so folding would change both. "
                        "Re-export with node names kept (torch.onnx.export does by default)")
                continue  # one target and no positive evidence of another user: the common case
        elif unknown or len(owned) < len(claimants):
            continue  # check_shared refuses with the full story
        keep_original = foreign > 0 or unknown > 0
        for k, m in enumerate(claimants.values()):
            if keep_original or k > 0:
                splits.append((m, [(node, idx) for (node, idx), o in zip(consumers, owner) if o is m]))
    return splits


def check_shared(graph: OnnxGraph, result: MatchResult, with_base: bool) -> None:
    """One initializer claimed by several base tensors (the exporter shared identical weights):
    one delta would land on all of them. Disjoint blocks of a packed initializer are fine.
    Without a base, two adapter names found at the same initializer are one tensor (adapters
    trained on a wrapper and on the bare model): their terms are combined."""
    for init, ms in result.by_init().items():
        if len(ms) < 2:
            continue
        names = sorted({m.target.name for m in ms})
        whole = [m for m in ms if m.block is None]
        if whole:
            same = len({(m.transposed, m.target.shape) for m in ms}) == 1 and not any(m.block for m in ms)
            if not with_base and same:
                keep = ms[0]
                keep.target = Target(keep.target.name, keep.target.shape,
                                     tuple(t for m in ms for t in m.target.terms), keep.target.ref)
                for m in ms[1:]:
                    result.matches.remove(m)
                continue
            raise OnnxError(f"{graph.path}: initializer {init} holds several base tensors with identical content "
                            f"({', '.join(names)}): the exporter stored them once and shares it, and the graph's node "
                            "names/metadata do not say which node belongs to which module. Folding different deltas "
                            "into it would change all of them; re-export with node names kept (torch.onnx.export "
                            "does by default)")
        spans = []
        for m in ms:
            size = (m.target.shape[::-1] if m.transposed else m.target.shape)[m.block[0]]
            spans.append((m.block[0], m.block[1], m.block[1] + size))
        spans.sort()
        for (a0, s0, e0), (a1, s1, e1) in zip(spans, spans[1:]):
            if a0 != a1 or s1 < e0:
                raise OnnxError(f"{graph.path}: blocks of packed initializer {init} for {', '.join(names)} overlap "
                                "or run along different axes; cannot fold into it")
