"""Why a target was not found in a graph: `missing` (nothing left in the graph could hold it: an
exporter dropped it) or `unmatched` (something could, which the fold refuses), with the evidence
either way. Used by match.py once every strategy has had its turn; `ctx` is match._Context."""

from __future__ import annotations

from .content import block_holders, whole_holders
from .graph import OnnxGraph
from .targets import MatchResult, Target


def _fits(shape: tuple[int, ...], t: Target) -> bool:
    return shape == t.shape or (len(shape) == 2 and shape == t.shape[::-1])


def explain_misses(ctx, left: list[Target], reasons: dict[str, list[str]], result: MatchResult) -> None:
    """Sort the targets no strategy found into `missing` (nothing left in the graph could hold
    them) and `unmatched` (something could), with the evidence either way. An initializer could
    hold a target when it has its shape (or the transpose), or is a 2-D initializer with a long
    enough run not covered by known blocks (a packed weight), and no base tensor accounts for it."""
    graph = ctx.graph
    claimed_whole = {m.init for m in result.matches if m.block is None}
    spans: dict[str, list[tuple[int, int, int]]] = {}  # init -> (axis, start, end) of known blocks
    for m in result.matches:
        if m.block is not None:
            size = (m.target.shape[::-1] if m.transposed else m.target.shape)[m.block[0]]
            spans.setdefault(m.init, []).append((m.block[0], m.block[1], m.block[1] + size))
    free = [n for n in ctx.float_inits if n not in claimed_whole]
    whole = [n for n in free if any(_fits(graph.shape(n), t) for t in left)]
    roomy = [n for n in free if n not in whole and any(_room(graph.shape(n), spans.get(n, []), t) for t in left)]
    held: dict[str, list[str]] = {}   # init -> the base tensors (or parameter names) it holds whole
    in_blocks: dict[str, list[str]] = {}   # packed init -> base tensors found as its blocks
    unknown_blocks = False
    if ctx.base is not None:
        held = whole_holders(graph, ctx.base, whole + roomy, ctx.digest)
        packed = [n for n in roomy if n not in held]
        if packed:
            found = block_holders(graph, ctx.base, packed)
            unknown_blocks = found is None
            for n, blocks in (found or {}).items():
                spans.setdefault(n, []).extend((axis, s, e) for _, axis, s, e in blocks)
                in_blocks[n] = [name for name, *_ in blocks]
    else:  # no content to go by: an initializer named after (or folded from) a parameter holds it
        for n in whole + roomy:
            srcs = [s for s, entries in ctx.sources.items() if any(i == n for i, _ in entries)]
            srcs += [s for s, inits in ctx.packed_sources.items() if n in inits]
            named = [s for s in srcs if "." in s and "/" not in s and "::" not in s]
            if named:
                held[n] = named
    for t in left:
        # without a base, an initializer named after (or folded from) t itself is t's, not another's
        mine = set(ctx.names.lookup(t.name)) | set(ctx.packed_names.lookup(t.name))
        others = {n for n, names in held.items() if not mine & set(names)}
        could = [n for n in whole if n not in others and _fits(graph.shape(n), t)]
        could += [n for n in roomy if n not in others
                  and (unknown_blocks or _room(graph.shape(n), spans.get(n, []), t))]
        packed_src = sorted({i for s in ctx.packed_names.lookup(t.name) for i in ctx.packed_sources[s]})
        why = "; ".join(reasons.get(t.name, []))
        if could:
            result.unmatched.append((t, _unmatched_text(ctx, t, could, why, packed_src)))
        else:
            packed = {n: in_blocks.get(n, []) for n in roomy if n not in held and _room(graph.shape(n), [], t)}
            result.missing.append((t, _absent_text(graph, t, held, packed, why)))


def _room(shape: tuple[int, ...], spans: list[tuple[int, int, int]], t: Target) -> bool:
    """Whether a packed 2-D initializer has an uncovered run long enough for W or W.T."""
    if len(shape) != 2 or len(t.shape) != 2:
        return False
    for rows, cols in (t.shape, t.shape[::-1]):
        for axis, length, other in ((0, rows, cols), (1, cols, rows)):
            if shape[1 - axis] != other or shape[axis] <= length:
                continue
            pos, best = 0, 0
            for a, s, e in sorted(x for x in spans if x[0] == axis):
                best, pos = max(best, s - pos), max(pos, e)
            if max(best, shape[axis] - pos) >= length:
                return True
    return False


def _unmatched_text(ctx, t: Target, could: list[str], why: str, packed_src: list[str]) -> str:
    def kind(n: str) -> str:
        if _fits(ctx.graph.shape(n), t):
            return "its shape or transpose" + (", holding no base tensor" if ctx.base is not None else "")
        return "packed, with room" + (" that no base tensor accounts for" if ctx.base is not None else "")

    shown = ", ".join(f"{n} {list(ctx.graph.shape(n))} ({kind(n)})" for n in could[:4]) + (
        f" and {len(could) - 4} more" if len(could) > 4 else "")
    if ctx.base is None:
        how = ("packed with other tensors by a graph optimizer (folded_from lists several sources)" if packed_src
               else "no initializer is named after it or folded from it")
        return (f"{how}, but {shown} could hold it; pass --base BASE_CHECKPOINT so it is identified by content"
                + (f" ({why})" if why else ""))
    return (f"not found by name, provenance or content, but {shown} could hold it"
            + (f": {why}" if why else ": the graph's copy differs from the base checkpoint beyond rounding (another "
               "checkpoint, or an adapter already folded in)"))


def _absent_text(graph: OnnxGraph, t: Target, held: dict[str, list[str]], packed: dict[str, list[str]],
                 why: str) -> str:
    """The evidence that nothing in the graph could hold t: what its look-alikes hold instead."""

    def listed(names) -> str:
        names = sorted(set(names))
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    same = [n for n in held if _fits(graph.shape(n), t)]
    evidence = [f"the {len(same)} initializer(s) of shape {list(t.shape)} or its transpose not matched to other "
                f"targets hold other base tensors ({listed(x for n in same for x in held[n])})" if same else
                f"no initializer of shape {list(t.shape)} or its transpose is left unmatched"]
    if packed:
        evidence.append(f"the rest of the {len(packed)} packed initializer(s) big enough for it hold other base "
                        f"tensors ({listed(x for v in packed.values() for x in v)})")
    return (f"absent from the graph: {'; '.join(evidence)}. Exporters drop what the graph's outputs never use "
            "(e.g. a pooler)" + (f" ({why})" if why else ""))
