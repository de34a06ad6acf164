"""Whether an initializer holds a base tensor's values, as an exporter or a converter stored them.

Exporters cast W to the graph's dtype with one correct rounding, so W's rounded bytes usually
equal the initializer's. Converters that rewrite a graph in half precision do not always round
the way a cast does: onnxruntime's float16 converter (`convert_float_to_float16`, used after
`optimizer.optimize_model`) maps every nonzero value below float16's smallest subnormal to that
subnormal instead of to zero, and saturates overflows at 65504 instead of infinity; other tools
flush subnormals to zero. One such element in a large matrix (a 384x1536 MiniLM weight has a
one-in-three chance) made byte-equality miss the weight. So content is compared in a canonical
form that erases exactly these differences: values below the dtype's smallest normal number
become +0, values at or beyond its largest finite number become +-inf, NaNs one NaN.

A digest of the canonical form (sketch.py: one parallel pass, a transposed view read in place)
only proposes a candidate; holds() then compares the candidate with the base value element by
element, so a collision can never pass for a match. Two initializers that both hold the value are
told apart by graph position, or refused (match.settle).
"""

from __future__ import annotations

import hashlib

import torch

from ..engine import ops
from ..readers.checkpoint import Checkpoint
from . import sketch
from .graph import OnnxGraph


def canonical(t: torch.Tensor) -> torch.Tensor:
    """`t` (float) with subnormals and signed zeros as +0, overflow as +-inf, NaN as one NaN."""
    if not t.is_floating_point() or t.numel() == 0:
        return t
    return sketch.canonical_values(t)


def content_digest(t: torch.Tensor) -> bytes:
    """Digest of t's canonical values (sketch.py: one parallel pass, a transposed view read in
    place). Equal digests only propose a match; holds() confirms it element by element."""
    return sketch.digest(t, canonical=True)


SAMPLE = 32   # a SAMPLE x SAMPLE grid spread over a 2-D tensor proposes its candidates


def sampled(shape) -> bool:
    """Whether tensors of `shape` are proposed by their grid (else by their whole content): a
    condition symmetric in the two axes, so W and W.T are always digested the same way."""
    return len(shape) == 2 and min(shape) > 2 * SAMPLE


def spread(n: int) -> torch.Tensor:
    """SAMPLE indices spread evenly over 0..n-1 (the first and the last included)."""
    return torch.linspace(0, n - 1, SAMPLE, dtype=torch.float64).round().long()


def grid(t: torch.Tensor) -> torch.Tensor:
    """t[spread(rows)][:, spread(cols)] of a 2-D tensor (any view), contiguous. grid(X.T) is
    grid(X).T, so a transposed view is sampled through the memory behind it: SAMPLE of its rows,
    a few pages, whichever way the tensor is stored."""
    if sketch.transposed_view(t):
        return grid(t.T).T.contiguous()
    return t.index_select(0, spread(t.shape[0])).index_select(1, spread(t.shape[1]))


def sample_digest(t: torch.Tensor) -> bytes:
    """Digest of t's grid (any 2-D view; the whole tensor when not sampled()): equal for any two
    tensors that hold the same values, so it proposes the candidates for a base value while
    reading SAMPLE rows of each initializer, and of the base tensor, instead of all of them. Only
    a proposal: elements it skips are seen by content_digest (when several initializers share a
    sample) and by holds()."""
    return content_digest(grid(t) if sampled(t.shape) else t)


def converter_note(k: int) -> str:
    """What a match's note says when `k` elements hold other bits than a plain cast."""
    return (f"{k} element(s) differ from a plain cast, all tiny or overflowing values that the graph's "
            "half-precision converter stored its own way" if k else "")


def holds(a: torch.Tensor, v: torch.Tensor) -> tuple[bool, int]:
    """Whether `a` (an initializer) holds `v` (any view of one dtype and shape) in canonical form,
    element by element, and in how many elements the bits differ (a converter's own rounding)."""
    canon, raw = sketch.compare(a, v)
    return canon == 0, raw


def variant(w: torch.Tensor, dtype: torch.dtype, via: torch.dtype | None) -> torch.Tensor:
    """The value variants() yields for `via`."""
    return ops.cast(w, dtype) if via is None else ops.cast(w, via).to(dtype)


def variants(w: torch.Tensor, dtype: torch.dtype):
    """(via, W as the graph may hold it in `dtype`): cast directly; or, for a wider dtype, first
    rounded to float16/bfloat16 (a model exported in half precision whose exporter folded an
    upcast into the weight, e.g. TorchScript's fp32 o_proj weights of an fp16 Llama)."""
    yield None, ops.cast(w, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    for via in (torch.float16, torch.bfloat16):
        if via != w.dtype and via != dtype and size > 2 and w.element_size() > 2:
            yield via, ops.cast(w, via).to(dtype)


def orientations(v: torch.Tensor):
    """(transposed, view) pairs under which a graph may store `v`."""
    return ((False, v), (True, v.T)) if v.dim() == 2 else ((False, v),)


class DigestCache:
    """Canonical digests of initializers, whole (one read of each) or sampled (sample_digest)."""

    def __init__(self, graph: OnnxGraph):
        self.graph = graph
        self._digests: dict[tuple[str, bool], bytes] = {}

    def __call__(self, init: str, sample: bool = False) -> bytes:
        if (init, sample) not in self._digests:
            t = self.graph.view(init)
            self._digests[init, sample] = sample_digest(t) if sample else content_digest(t)
        return self._digests[init, sample]


class BlockIndex:
    """Finds W (or W.T) as a contiguous block of a bigger 2-D initializer (a packed QKV weight).
    Every candidate initializer is read once; the canonical digest of each of its rows (or
    columns) is indexed, and a tensor's first row (column) proposes offsets that are then
    compared in full."""

    MAX_LINES = 4_000_000  # memory guard: about 400 MB of index

    def __init__(self, graph: OnnxGraph, inits: list[str], dims: set[int]):
        self.graph = graph
        self.lines: dict[tuple, list[tuple[str, int, int]]] = {}
        self.skipped = False
        todo = []
        for n in inits:
            shape = graph.shape(n)
            if len(shape) == 2 and (shape[0] in dims or shape[1] in dims):
                todo.append((n, [axis for axis in (0, 1) if shape[1 - axis] in dims]))
        if sum(graph.shape(n)[a] for n, axes in todo for a in axes) > self.MAX_LINES:
            self.skipped = True  # most of a big graph is unmatched: it is another model's graph
            return
        for n, axes in todo:
            big = canonical(graph.read(n))
            for axis in axes:
                view = big if axis == 0 else big.T
                for i in range(view.shape[0]):
                    self.lines.setdefault((big.dtype, raw_digest(view[i])), []).append((n, axis, i))

    def find(self, w: torch.Tensor) -> list[tuple[str, bool, tuple[int, int]]]:
        """(initializer, transposed, (axis, start)) for every block that holds W or W.T."""
        out = []
        for dt in {k[0] for k in self.lines}:
            wc = canonical(ops.cast(w, dt))
            for transposed, v in ((False, wc), (True, wc.T)):
                for axis in (0, 1):
                    first = v[0] if axis == 0 else v[:, 0]
                    for n, ax, start in self.lines.get((dt, raw_digest(first)), ()):
                        shape = self.graph.shape(n)
                        if ax != axis or shape[1 - axis] != v.shape[1 - axis] or start + v.shape[axis] > shape[axis]:
                            continue
                        if shape[axis] == v.shape[axis]:
                            continue
                        big = canonical(self.graph.read(n))
                        if raw_digest(big.narrow(axis, start, v.shape[axis])) == raw_digest(v):
                            out.append((n, transposed, (axis, start)))
        return out


def raw_digest(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return hashlib.blake2b(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"", digest_size=16).digest()


def whole_holders(graph: OnnxGraph, base: Checkpoint, inits: list[str],
                  digest: DigestCache) -> dict[str, list[str]]:
    """Which of `inits` hold a tensor of the base checkpoint whole (any tensor, not only adapter
    targets; any layout and dtype a graph may use): init -> [base tensor names]. Reads each base
    tensor whose shape fits once; a digest hit is confirmed element by element, as a match is (a
collision must not make a candidate look accounted for). Used only to explain a target that was
not found."""
    whole: dict[tuple, list[str]] = {}
    for n in inits:
        whole.setdefault((graph.dtype(n), graph.shape(n), digest(n)), []).append(n)
    shapes = {k[1] for k in whole}
    dtypes = {k[0] for k in whole}
    found: dict[str, list[str]] = {}
    for name, ref in _float_tensors(base):
        if not (ref.shape in shapes or (len(ref.shape) == 2 and ref.shape[::-1] in shapes)):
            continue
        w = base.read(ref)
        for dt in dtypes:
            for _, wc in variants(w, dt):
                for _, v in orientations(wc):
                    for n in whole.get((dt, tuple(v.shape), content_digest(v)), ()):
                        if name not in found.get(n, []) and holds(graph.view(n), v)[0]:
                            found.setdefault(n, []).append(name)
    return found


def block_holders(graph: OnnxGraph, base: Checkpoint,
                  inits: list[str]) -> dict[str, list[tuple[str, int, int, int]]] | None:
    """Blocks of 2-D `inits` that hold a 2-D tensor of the base checkpoint: init -> [(base tensor,
    axis, start, end)]. None when the initializers are too big to index (BlockIndex.MAX_LINES)."""
    dims = {d for n in inits for d in graph.shape(n)}
    blocks = BlockIndex(graph, inits, dims)
    if blocks.skipped:
        return None
    found: dict[str, list[tuple[str, int, int, int]]] = {}
    for name, ref in _float_tensors(base):
        if len(ref.shape) != 2 or not set(ref.shape) & dims:
            continue
        w = base.read(ref)
        for n, transposed, (axis, start) in blocks.find(w):
            size = (w.shape[::-1] if transposed else w.shape)[axis]
            found.setdefault(n, []).append((name, axis, start, start + size))
    return found


def _float_tensors(base: Checkpoint):
    return [(name, ref) for name, ref in base.tensors.items() if ref.dtype in ("F64", "F32", "F16", "BF16")]
