"""Find the initializer that holds each adapter target's base tensor in an exported ONNX graph.

Exporters rename and transpose Linear weights (TorchScript: `onnx::MatMul_123` holding W.T;
dynamo: `val_76` holding W.T, with a `folded_from` note naming the parameter), so names alone
rarely work. One function per strategy proposes candidates, in order of trust:

1. by_name: an initializer named after the target (the exporter kept the parameter as it is);
2. by_folded_from: the dynamo exporter's record that an initializer was folded from the parameter;
3. by_content: with the base checkpoint at hand, W (or W.T, for MatMul/Gemm and GPT-2 Conv1D
   layouts) cast to the initializer's dtype equals the initializer (content.py: compared in a
   canonical form that forgives how half-precision converters store tiny and huge values);
4. by_block: W as a block of a bigger initializer packed by a graph optimizer (fused QKV).

Name and folded_from matches are checked against the base's content when it is given. Several
candidates with identical content are told apart by graph position (the module path the
exporters put in node names or metadata); if that does not decide, we refuse (settle()).

A target found by none of them is `missing` (skipped, with the evidence) only when no
initializer that could hold it is left: none of its shape or transpose, and no packed
initializer with room for it, that is not accounted for by some base tensor. Otherwise it is
`unmatched`, which the fold refuses: a partly adapted graph must never pass for a whole one.

Shared initializers are sorted out after matching (shared.py decides, patch.py edits the graph).
"""

from __future__ import annotations

import torch

from ..errors import OnnxError
from ..readers.checkpoint import Checkpoint
from .content import (BlockIndex, DigestCache, content_digest, converter_note, grid, holds, orientations,
                      sampled, spread, variants)
from .graph import OnnxGraph
from .misses import explain_misses
from .targets import Match, MatchResult, Target


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


class _Context:
    """What every strategy reads: the graph, the base, and indexes built once."""

    def __init__(self, graph: OnnxGraph, base: Checkpoint | None, defer: bool = False):
        self.graph, self.base, self.defer = graph, base, defer
        self.float_inits = [n for n in graph.inits if graph.dtype(n) is not None]
        self.digest = DigestCache(graph)
        self.sources: dict[str, list[tuple[str, str]]] = {}   # source name -> [(init, how)]
        self.packed_sources: dict[str, list[str]] = {}        # folded_from with several sources
        for n in self.float_inits:
            self.sources.setdefault(n, []).append((n, "name"))
        for init, srcs in graph.folded_from.items():
            if init not in graph.inits or graph.dtype(init) is None:
                continue
            if len(srcs) == 1:
                self.sources.setdefault(srcs[0], []).append((init, "folded_from"))
            else:
                for s in srcs:
                    self.packed_sources.setdefault(s, []).append(init)
        self.names = _Names(self.sources)
        self.packed_names = _Names(self.packed_sources)
        self._w: tuple[str, torch.Tensor] | None = None

    def base_value(self, t: Target) -> torch.Tensor:
        if self._w is None or self._w[0] != t.name:
            self._w = None  # one tensor at a time
            self._w = (t.name, self.base.read(t.ref))
        return self._w[1]

    def base_grid(self, t: Target) -> torch.Tensor:
        """content.grid of the base value (or the whole value, when not sampled): SAMPLE rows read."""
        if not sampled(t.shape):
            return self.base_value(t)
        if self._w is not None and self._w[0] == t.name:
            return grid(self._w[1])
        return self.base.read_rows(t.ref, spread(t.shape[0]).tolist()).index_select(1, spread(t.shape[1]))

    def holds(self, init: str, v: torch.Tensor, proposed: bool = False) -> tuple[bool, str]:
        """Whether `init` holds `v` (a base value in the initializer's dtype and layout), compared
        element by element once the digests agree (or the caller's index `proposed` the pair); the
        note says where its bits differ from `v` (a converter's rounding of tiny or huge values)."""
        if self.graph.shape(init) != tuple(v.shape):
            return False, ""
        if not proposed and content_digest(v) != self.digest(init):
            return False, ""
        ok, k = holds(self.graph.view(init), v)
        return ok, (converter_note(k) if ok else "")


# -- strategies: each returns (candidates, reasons why a lead did not pan out) -------------------

def by_name(ctx: _Context, t: Target) -> tuple[list[Match], list[str]]:
    return _provenance(ctx, t, "name")


def by_folded_from(ctx: _Context, t: Target) -> tuple[list[Match], list[str]]:
    return _provenance(ctx, t, "folded_from")


def _orients(shape: tuple[int, ...], t: Target) -> list[bool]:
    """Whether an initializer of `shape` can hold W (False), W.T (True), or either (square)."""
    orients = []
    if shape == t.shape:
        orients.append(False)
    if len(shape) == 2 and shape == t.shape[::-1] and shape != t.shape:
        orients.append(True)
    if len(shape) == 2 and shape[0] == shape[1] == t.shape[0] == t.shape[-1]:
        orients = [False, True]
    return orients


def _provenance_sampled(ctx: _Context, t: Target, kind: str) -> Match | None:
    """With a base and ctx.defer: the one initializer named after (or folded from) t, in the one
    layout and rounding whose sampled digest equals the base value's, as a pending match (the
    fold compares it in full when it merges). None when that is not the whole story (no such
    lead, a lead that does not sample alike, several): _provenance then compares in full."""
    hits, g = [], None
    for src in ctx.names.lookup(t.name):
        for init, how in ctx.sources[src]:
            orients = _orients(ctx.graph.shape(init), t) if how == kind else []
            if not orients:
                continue
            g = ctx.base_grid(t) if g is None else g
            want = ctx.digest(init, sample=True)
            found = [(o, via) for o in orients for via, gc in variants(g, ctx.graph.dtype(init))
                     if content_digest(gc.T if o else gc) == want][:1]
            if not found:
                return None
            hits += [(init, how, *found[0])]
    if len(hits) != 1:
        return None
    init, how, o, via = hits[0]
    return Match(t, init, o, how, via=via, pending=True)


def _provenance(ctx: _Context, t: Target, kind: str) -> tuple[list[Match], list[str]]:
    if ctx.base is not None and ctx.defer:
        m = _provenance_sampled(ctx, t, kind)
        if m is not None:
            return [m], []
    graph, cands, why = ctx.graph, [], []
    for src in ctx.names.lookup(t.name):
        for init, how in ctx.sources[src]:
            if how != kind:
                continue
            shape = graph.shape(init)
            orients = _orients(shape, t)
            if not orients:
                why.append(f"initializer {init} ({how} match) has shape {list(shape)}, not {list(t.shape)} or its "
                           "transpose")
                continue
            if ctx.base is not None:
                found = []
                for o in orients:
                    for via, wc in variants(ctx.base_value(t), graph.dtype(init)):
                        ok, note = ctx.holds(init, wc.T if o else wc)
                        if ok:
                            found.append(Match(t, init, o, how, via=via, note=note))
                            break
                if not found:
                    why.append(f"initializer {init} ({how} match) holds other values than the base tensor {t.name}: "
                               "the graph was exported from another checkpoint, or already has an adapter folded in")
                cands += found
                continue
            if len(orients) == 2:
                if how == "name":
                    orients = [False]  # a kept parameter name means the parameter itself
                else:
                    o = consumer_orientation(graph, init, t.layout)
                    orients = [o] if o is not None else []
                    if o is None:
                        why.append(f"initializer {init} is square and folded from {src}; whether it is W or W.T "
                                   "cannot be told: pass --base BASE_CHECKPOINT")
            cands += [Match(t, init, o, how) for o in orients]
    return cands, why


class _ContentIndex:
    """Initializers whose shape fits one of `targets`, by (dtype, shape, sampled canonical digest):
    building it reads a few rows of each, not the graph."""

    def __init__(self, ctx: _Context, targets: list[Target]):
        shapes = {s for t in targets for s in ({t.shape, t.shape[::-1]} if len(t.shape) == 2 else {t.shape})}
        self.index: dict[tuple, list[str]] = {}
        for n in ctx.float_inits:
            shape = ctx.graph.shape(n)
            if shape in shapes:
                self.index.setdefault((ctx.graph.dtype(n), shape, ctx.digest(n, sample=True)), []).append(n)
        self.dtypes = {k[0] for k in self.index}
        self.kinds = {k[:2] for k in self.index}   # (dtype, shape): a layout no initializer has is not digested


def _proposals(index: _ContentIndex, t: Target, dt: torch.dtype, g: torch.Tensor) -> list[tuple[bool, str]]:
    """(transposed, initializer) whose sampled digest equals that of the base value cast to `dt`
    (`g`: its grid, or whole value) in either layout."""
    out = []
    for transposed, gv in orientations(g):
        shape = tuple(t.shape[::-1] if transposed else t.shape)
        if (dt, shape) in index.kinds:
            out += [(transposed, n) for n in index.index.get((dt, shape, content_digest(gv)), ())]
    return out


def by_content(ctx: _Context, index: _ContentIndex, t: Target) -> list[Match]:
    if ctx.defer:
        # proposals from the base value's grid alone (SAMPLE rows read); one proposal in all is
        # taken pending: the fold compares it in full when it reads the value to merge it
        g, found = ctx.base_grid(t), []
        for dt in index.dtypes:
            for via, gc in variants(g, dt):
                hits = _proposals(index, t, dt, gc)
                if hits:
                    found += [(dt, via, transposed, n) for transposed, n in hits]
                    break
        if len(found) == 1:
            _, via, transposed, init = found[0]
            return [Match(t, init, transposed, "content", via=via, pending=True)]
        if not found:
            return []
    w = ctx.base_value(t)
    cands = []
    for dt in index.dtypes:
        for via, wc in variants(w, dt):
            hits = _proposals(index, t, dt, grid(wc) if sampled(t.shape) else wc)
            for transposed, v in orientations(wc):
                proposed = [n for tr, n in hits if tr == transposed]
                if len(proposed) > 1:  # elements the sample skipped decide (e.g. layers alike but for pruned rows)
                    d = content_digest(v)
                    proposed = [n for n in proposed if ctx.digest(n) == d]
                for init in proposed:
                    ok, note = ctx.holds(init, v, proposed=True)
                    if ok:
                        cands.append(Match(t, init, transposed, "content", via=via, note=note))
            if cands:
                break  # the plain cast first; rounding through a half type only if that fails
    return cands


def by_block(ctx: _Context, blocks: BlockIndex, t: Target) -> list[Match]:
    return [Match(t, n, transposed, "content", block=block, note="a block of a packed initializer")
            for n, transposed, block in blocks.find(ctx.base_value(t))]


# -- putting it together ------------------------------------------------------------------------

def match_targets(graph: OnnxGraph, targets: list[Target], base: Checkpoint | None,
                  defer: bool = False) -> MatchResult:
    """Where each target lives in `graph`. Raises OnnxError only for ambiguity (identical
    candidates that graph position cannot tell apart); misses are in result.missing/unmatched.
    defer (with a base): a match by content, name or folded_from that the sampled digest alone
    proposes, with no other candidate, is returned pending (Match.pending), for the caller to
    confirm element by element when it reads the base value to merge it."""
    try:
        return _match(graph, targets, base, defer)
    finally:
        graph.release_views()


def _match(graph: OnnxGraph, targets: list[Target], base: Checkpoint | None, defer: bool) -> MatchResult:
    ctx = _Context(graph, base, defer)
    result = MatchResult()
    reasons: dict[str, list[str]] = {}
    left = []
    for t in targets:
        cands, why = [], []
        for strategy in (by_name, by_folded_from):
            c, w = strategy(ctx, t)
            cands, why = cands + c, why + w
        if len(cands) > 1 and any(m.pending for m in cands):  # several leads: all compared in full
            ctx.defer, cands, why = False, [], []
            for strategy in (by_name, by_folded_from):
                c, w = strategy(ctx, t)
                cands, why = cands + c, why + w
            ctx.defer = defer
        if cands:
            settle(graph, t, cands, result)
        else:
            left.append(t)
            reasons[t.name] = why
    if left and base is not None:
        index = _ContentIndex(ctx, left)
        left = [t for t in left if not settle(graph, t, by_content(ctx, index, t), result)]
        flat = [t for t in left if len(t.shape) == 2]
        if flat:
            claimed = {m.init for m in result.matches}
            dims = {d for t in flat for d in t.shape}
            blocks = BlockIndex(graph, [n for n in ctx.float_inits if n not in claimed], dims)
            left = [t for t in left if len(t.shape) != 2 or not settle(graph, t, by_block(ctx, blocks, t), result)]
    if left:
        explain_misses(ctx, left, reasons, result)
    return result


def settle(graph: OnnxGraph, t: Target, cands: list[Match], result: MatchResult) -> bool:
    """One candidate: take it. Several: the graph position decides, or we refuse. False if none."""
    if not cands:
        return False
    uniq = {(m.init, m.transposed, m.block): m for m in cands}
    cands = list(uniq.values())
    if len({(m.init, m.block) for m in cands}) == 1 and len(cands) == 2:
        # a square initializer that equals both W and W.T (symmetric, e.g. all zeros): the layout
        # is read off its consumer
        o = consumer_orientation(graph, cands[0].init, t.layout)
        cands = [m for m in cands if m.transposed == o] or cands[:1]
    if len(cands) == 1:
        result.matches.append(cands[0])
        return True
    placed = [m for m in cands if scope_matches(graph.scopes(m.init), t.module)]
    if len(placed) == 1:
        placed[0].note = "; ".join(filter(None, [f"resolved by graph position among {len(cands)} identical "
                                                 "initializers", placed[0].note]))
        result.matches.append(placed[0])
        return True
    listed = ", ".join(sorted(m.init for m in cands)[:6])
    raise OnnxError(f"{graph.path}: base tensor {t.name} matches {len(cands)} initializers with identical content "
                    f"({listed}) and the graph's node names/metadata do not say which one belongs to module "
                    f"{t.module}; folding into the wrong one would silently change another layer. Re-export the "
                    "graph with node names kept (torch.onnx.export does by default), or fold into a graph where "
                    "these weights differ")


# -- reading the graph's structure ------------------------------------------------------------

def scope_matches(scopes: set[str], module: str) -> bool:
    for s in scopes:
        if s == module or s.endswith("." + module) or module.endswith("." + s):
            return True
    return False


def consumer_orientation(graph: OnnxGraph, init: str, layout: str) -> bool | None:
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
