"""Find the initializer that holds each adapter target's base tensor in an exported ONNX graph.

Exporters rename and transpose Linear weights (TorchScript: `onnx::MatMul_123` holding W.T;
dynamo: `val_76` holding W.T, with a `folded_from` note naming the parameter), so names alone
rarely work. In order of trust:

1. name: an initializer named after the target (the exporter kept the parameter as it is);
2. folded_from: the dynamo exporter's record that an initializer was folded from the parameter;
3. content: with the base checkpoint at hand, W (or W.T, for MatMul/Gemm and GPT-2 Conv1D
   layouts) cast to the initializer's dtype is byte-equal to the initializer. Initializers are
   hashed once (blake2b), so this is one pass over the graph and one over the targets.

Name and folded_from matches are checked against the base's content when it is given. Several
initializers with identical content are told apart by graph position (the module path the
exporters put in node names or metadata); if that does not decide, we refuse. A target packed
into a bigger initializer by a graph optimizer (fused QKV) is found as a block of it.
"""

from __future__ import annotations

import torch

from ..engine import ops
from ..errors import OnnxError
from ..readers.checkpoint import Checkpoint
from .graph import OnnxGraph, tensor_digest
from .targets import Match, MatchResult, Target


# -- name matching --------------------------------------------------------------------------

class _Names:
    """Source names (initializer names and folded_from parameters) looked up by exact name or
    dot-suffix either way (the graph was exported from a wrapper 'm.model.layers...' while the
    base is saved as 'model.layers...', or the reverse)."""

    def __init__(self, names):
        self.names = set(names)
        self.by_suffix: dict[str, list[str]] = {}
        for n in self.names:
            parts = n.split(".")
            for k in range(1, len(parts) - 1):  # keep at least 'module.param'
                self.by_suffix.setdefault(".".join(parts[k:]), []).append(n)

    def lookup(self, name: str) -> list[str]:
        if name in self.names:
            return [name]
        parts = name.split(".")
        for k in range(1, len(parts) - 1):
            tail = ".".join(parts[k:])
            if tail in self.names:
                return [tail]
        return sorted(self.by_suffix.get(name, []))


def _scope_matches(scopes: set[str], module: str) -> bool:
    for s in scopes:
        if s == module or s.endswith("." + module) or module.endswith("." + s):
            return True
    return False


def _consumer_orientation(graph: OnnxGraph, init: str, layout: str) -> bool | None:
    """Whether `init` holds W.T, read off how the graph uses it: MatMul's right operand is
    [in, out], Gemm's B is [out, in] with transB=1, Gather reads rows (embeddings)."""
    votes = set()
    for node, idx in graph.uses(init):
        if node.op_type == "Transpose" and len(graph.shape(init)) == 2:
            if all(n.op_type == "MatMul" and i == 1 for n, i in graph.uses(node.output[0])):
                votes.add(layout != "linear")  # MatMul sees init.T
        elif node.op_type == "MatMul" and idx == 1:
            votes.add(layout == "linear")          # [in, out] = W.T for nn.Linear, W for Conv1D
        elif node.op_type == "Gemm" and idx == 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            votes.add((layout == "linear") != bool(trans_b))
        elif node.op_type == "Gather" and idx == 0:
            votes.add(False)
    return votes.pop() if len(votes) == 1 else None


def match_targets(graph: OnnxGraph, targets: list[Target], base: Checkpoint | None) -> MatchResult:
    result = MatchResult()
    float_inits = [n for n in graph.inits if graph.dtype(n) is not None]

    sources: dict[str, list[tuple[str, str]]] = {}
    packed_sources: dict[str, list[str]] = {}
    for n in float_inits:
        sources.setdefault(n, []).append((n, "name"))
    for init, srcs in graph.folded_from.items():
        if init not in graph.inits or graph.dtype(init) is None:
            continue
        if len(srcs) == 1:
            sources.setdefault(srcs[0], []).append((init, "folded_from"))
        else:
            for s in srcs:
                packed_sources.setdefault(s, []).append(init)
    names = _Names(sources)
    packed_names = _Names(packed_sources)

    w_cache: dict[str, torch.Tensor] = {}

    def base_value(t: Target) -> torch.Tensor:
        if t.name not in w_cache:
            w_cache.clear()  # one tensor at a time
            w_cache[t.name] = base.read(t.ref)
        return w_cache[t.name]

    def content_equal(t: Target, init: str, transposed: bool) -> tuple[bool, torch.dtype | None]:
        digest = graph.digest(init)
        for via, w in _variants(base_value(t), graph.dtype(init)):
            if tensor_digest(w.T if transposed else w) == digest:
                return True, via
        return False, None

    remaining: list[Target] = []
    mismatched: dict[str, str] = {}
    for t in targets:
        cands: list[Match] = []
        for src in names.lookup(t.name):
            for init, how in sources[src]:
                shape = graph.shape(init)
                orients = []
                if shape == t.shape:
                    orients.append(False)
                if len(shape) == 2 and shape == t.shape[::-1] and shape != t.shape:
                    orients.append(True)
                if len(shape) == 2 and shape[0] == shape[1] == t.shape[0] == t.shape[-1]:
                    orients = [False, True]
                if not orients:
                    mismatched[t.name] = (f"initializer {init} ({how} match) has shape {list(shape)}, not "
                                          f"{list(t.shape)} or its transpose")
                    continue
                vias = {}
                if base is not None:
                    ok = []
                    for o in orients:
                        eq, vias[o] = content_equal(t, init, o)
                        if eq:
                            ok.append(o)
                    if not ok:
                        mismatched[t.name] = (f"initializer {init} ({how} match) holds other values than the base "
                                              f"tensor {t.name}: the graph was exported from another checkpoint, "
                                              "or already has an adapter folded in")
                    orients = ok
                elif len(orients) == 2:
                    if how == "name":
                        orients = [False]  # a kept parameter name means the parameter itself
                    else:
                        o = _consumer_orientation(graph, init, t.layout)
                        orients = [o] if o is not None else []
                        if o is None:
                            mismatched[t.name] = (f"initializer {init} is square and folded from {src}; whether "
                                                  "it is W or W.T cannot be told: pass --base BASE_CHECKPOINT")
                for o in orients:
                    cands.append(Match(t, init, o, how, via=vias.get(o)))
        if cands:
            _settle(graph, t, cands, result)
        else:
            remaining.append(t)

    if remaining and base is not None:
        _match_by_content(graph, remaining, base_value, result, float_inits)
        done = {id(m.target) for m in result.matches}
        remaining = [t for t in remaining if id(t) not in done]
    for t in remaining:
        if t.name in mismatched:
            why = mismatched[t.name]
        elif packed_names.lookup(t.name):
            inits = sorted({i for s in packed_names.lookup(t.name) for i in packed_sources[s]})
            why = (f"packed with other tensors into {', '.join(inits)} by a graph optimizer (folded_from lists "
                   "several sources); pass --base BASE_CHECKPOINT so its block can be located by content")
        elif base is None:
            why = ("no initializer named after it, nor folded from it; exporters rename and transpose Linear "
                   "weights (onnx::MatMul_N, val_N): pass --base BASE_CHECKPOINT to find them by content")
        else:
            why = ("no initializer holds its values (nor their transpose, nor a block of a packed tensor); "
                   "exporters leave out what the graph's outputs never use (e.g. a pooler)")
        result.missing.append((t, why))
    _unshare(graph, result)
    _check_shared(graph, result, base is not None)
    return result


def _unshare(graph: OnnxGraph, result: MatchResult) -> None:
    """Exporters store identical weights once (TorchScript deduplicates initializers; tied
    embeddings share one tensor). When an initializer is used by several modules and the nodes'
    module paths say which use belongs to which target, each target gets its own copy of the
    initializer (same values) used by its own nodes; other modules keep the original, unchanged.
    Only initializers are added and node inputs renamed: the node multiset stays the same."""
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
            hits = [m for mod, m in claimants.items() if _scope_matches(scopes, mod)]
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
            continue  # _check_shared refuses with the full story
        keep_original = foreign > 0 or unknown > 0
        for k, m in enumerate(claimants.values()):
            if not keep_original and k == 0:
                continue
            mine = [(node, idx) for (node, idx), o in zip(consumers, owner) if o is m]
            new = graph.clone_initializer(init, f"{init}__{m.target.module}", mine)
            m.init = new
            m.note = (m.note + "; " if m.note else "") + (f"own copy of initializer {init}, which the exporter "
                                                          f"shared with other modules (resolved by graph position)")


def _settle(graph: OnnxGraph, t: Target, cands: list[Match], result: MatchResult) -> None:
    """One candidate: take it. Several: the graph position decides, or we refuse."""
    uniq = {(m.init, m.transposed, m.block): m for m in cands}
    cands = list(uniq.values())
    if len({(m.init, m.block) for m in cands}) == 1 and len(cands) == 2:
        # a square initializer that equals both W and W.T (symmetric, e.g. all zeros): the layout
        # is read off its consumer
        o = _consumer_orientation(graph, cands[0].init, t.layout)
        cands = [m for m in cands if m.transposed == o] or cands[:1]
    if len(cands) == 1:
        result.matches.append(cands[0])
        return
    placed = [m for m in cands if _scope_matches(graph.scopes(m.init), t.module)]
    if len(placed) == 1:
        placed[0].note = f"resolved by graph position among {len(cands)} identical initializers"
        result.matches.append(placed[0])
        return
    listed = ", ".join(sorted(m.init for m in cands)[:6])
    raise OnnxError(f"{graph.path}: base tensor {t.name} matches {len(cands)} initializers with identical content "
                    f"({listed}) and the graph's node names/metadata do not say which one belongs to module "
                    f"{t.module}; folding into the wrong one would silently change another layer. Re-export the "
                    "graph with node names kept (torch.onnx.export does by default), or fold into a graph where "
                    "these weights differ")


def _variants(w: torch.Tensor, dtype: torch.dtype):
    """(via, W as the graph may hold it in `dtype`): cast directly; or, for a wider dtype, first
    rounded to float16/bfloat16 (a model exported in half precision whose exporter folded an
    upcast into the weight, e.g. TorchScript's fp32 o_proj weights of an fp16 Llama)."""
    yield None, ops.cast(w, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    for via in (torch.float16, torch.bfloat16):
        if via != w.dtype and via != dtype and size > 2 and w.element_size() > 2:
            yield via, ops.cast(w, via).to(dtype)


def _match_by_content(graph: OnnxGraph, targets: list[Target], base_value, result: MatchResult,
                      float_inits: list[str]) -> None:
    shapes = set()
    for t in targets:
        shapes.add(t.shape)
        if len(t.shape) == 2:
            shapes.add(t.shape[::-1])
    index: dict[tuple, list[str]] = {}
    dtypes = set()
    for n in float_inits:
        shape = graph.shape(n)
        if shape in shapes:
            index.setdefault((graph.dtype(n), shape, graph.digest(n)), []).append(n)
            dtypes.add(graph.dtype(n))
    blocks = None
    for t in targets:
        w = base_value(t)
        cands = []
        for dt in dtypes:
            for via, wc in _variants(w, dt):
                for transposed, v in ((False, wc), (True, wc.T)) if wc.dim() == 2 else ((False, wc),):
                    for init in index.get((dt, tuple(v.shape), tensor_digest(v)), ()):
                        cands.append(Match(t, init, transposed, "content", via=via))
                if cands:
                    break  # the plain cast first; rounding through a half type only if that fails
        if cands:
            _settle(graph, t, cands, result)
            continue
        if w.dim() == 2:
            if blocks is None:
                blocks = _BlockIndex(graph, float_inits, targets, {m.init for m in result.matches})
            cands = blocks.find(t, w)
            if cands:
                _settle(graph, t, cands, result)


class _BlockIndex:
    """Finds W (or W.T) as a contiguous block of a bigger 2-D initializer (a packed QKV weight).
    Every candidate initializer is read once; the digest of each of its rows (or columns) is
    indexed, and a target's first row (column) proposes offsets that are then compared in full."""

    MAX_LINES = 4_000_000  # memory guard: about 400 MB of index

    def __init__(self, graph: OnnxGraph, float_inits: list[str], targets: list[Target], claimed: set[str]):
        self.graph = graph
        dims = {d for t in targets if len(t.shape) == 2 for d in t.shape}
        self.lines: dict[tuple, list[tuple[str, int, int]]] = {}
        self.skipped = False
        todo = []
        for n in float_inits:
            shape = graph.shape(n)
            if len(shape) != 2 or n in claimed or not (shape[0] in dims or shape[1] in dims):
                continue
            todo.append((n, [axis for axis in (0, 1) if shape[1 - axis] in dims]))
        if sum(graph.shape(n)[a] for n, axes in todo for a in axes) > self.MAX_LINES:
            self.skipped = True  # most of a big graph is unmatched: it is another model's graph
            return
        for n, axes in todo:
            big = graph.read(n)
            for axis in axes:
                view = big if axis == 0 else big.T
                for i in range(view.shape[0]):
                    self.lines.setdefault((big.dtype, tensor_digest(view[i])), []).append((n, axis, i))

    def find(self, t: Target, w: torch.Tensor) -> list[Match]:
        out = []
        for dt in {k[0] for k in self.lines}:
            wc = ops.cast(w, dt)
            for transposed, v in ((False, wc), (True, wc.T)):
                for axis in (0, 1):
                    first = v[0] if axis == 0 else v[:, 0]
                    for n, ax, start in self.lines.get((dt, tensor_digest(first)), ()):
                        shape = self.graph.shape(n)
                        if ax != axis or shape[1 - axis] != v.shape[1 - axis] or start + v.shape[axis] > shape[axis]:
                            continue
                        if shape[axis] == v.shape[axis]:
                            continue
                        big = self.graph.read(n)
                        if tensor_digest(big.narrow(axis, start, v.shape[axis])) == tensor_digest(v):
                            out.append(Match(t, n, transposed, "content", block=(axis, start),
                                             note="a block of a packed initializer"))
        return out


def _check_shared(graph: OnnxGraph, result: MatchResult, with_base: bool) -> None:
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
