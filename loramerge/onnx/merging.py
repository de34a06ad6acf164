"""What a fold writes for each patched initializer, and the tasks graph.save runs to make it.

merged_value is the new value of one initializer: from the base checkpoint's tensor when there is
one (one rounding to the initializer's dtype), else from the initializer itself, by the same
engine.compute the safetensors path uses, laid out as the initializer is (transposed, or a block of
a packed tensor). A pending content match (match.py) is confirmed here, element by element, once
W is in memory.

For external initializers graph.save runs a Task per initializer in three stages, each on a thread
of its own, so that reading, merging and writing overlap: load (the reader: W read from the base
into a pooled buffer, a pending match confirmed), compute (the merge, into a pooled result buffer
placed so the O_DIRECT writer writes straight from it), done (after the writer wrote it: buffers
back to their pools). The pools bound memory to a few tensors; they are pinned when the merge
runs on a GPU, so the copies to and from it run at full speed.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext as _no_lock
from dataclasses import replace
from pathlib import Path

import torch

from .. import engine
from ..engine.threads import BufferPool
from ..readers.checkpoint import Checkpoint
from ..types import TORCH_TO_ST, Adapter, Job, TensorRef
from ..writers.direct import ALIGN
from . import sketch
from .content import converter_note, holds, variant
from .datafile import Clock
from .graph import OnnxGraph
from .targets import Match, MatchResult, Target, Unconfirmed


def _job(t: Target, code: str) -> Job:
    ref = t.ref or TensorRef(t.name, Path("<onnx>"), code, t.shape, None, 0)
    return Job(t.name, ref, code, t.terms)


_FLIP = {"linear": "transposed", "transposed": "linear"}


def _in_graph_layout(t: Target) -> Target | None:
    """`t` as the merge of W.T: every term's layout flipped (deltas.factors then hands out A.T and
    B.T), so a target stored transposed is merged in the initializer's own layout and the result
    needs no transposed copy. None where the terms are not plain 2-D LoRA terms."""
    if len(t.shape) != 2 or any(term.kind != "lora" or term.pair is None or term.pair.layout not in _FLIP
                                for term in t.terms):
        return None
    terms = tuple(replace(term, pair=replace(term.pair, layout=_FLIP[term.pair.layout],
                                                   base_shape=tuple(term.pair.base_shape)[::-1]))
                  for term in t.terms)
    return Target(t.name, t.shape[::-1], terms)


def merged_value(graph: OnnxGraph, init: str, ms: list[Match], adapters: list[Adapter], ck: Checkpoint | None,
                 device: torch.device, clock: Clock = Clock(None)) -> torch.Tensor:
    """The new value of initializer `init`, in its own layout and dtype (`clock`: the seconds spent
    reading, confirming and merging)."""
    dtype = graph.dtype(init)

    def new_w(m: Match, current) -> torch.Tensor:
        """`current()` reads the initializer (or its block) as stored; with a base checkpoint the
        merge starts from the base's own values instead, and the initializer is read only to
        confirm a pending match."""
        from_base = ck is not None and m.target.ref is not None
        flipped = _in_graph_layout(m.target) if m.transposed else None
        with clock("read"):
            if from_base:
                w = ck.read(m.target.ref)
            else:
                w = current().T if m.transposed and flipped is None else current()
        if from_base and m.pending:  # proposed by a sample only: compared in full now that W is in memory
            with clock("confirm"):
                confirm(graph, m, w)
        if from_base and flipped is not None:
            w = w.T  # _merge takes W in the layout it merges in
        with clock("merge"):
            return _merge(m, w, adapters, device, dtype)

    if ms[0].block is None:
        return new_w(ms[0], lambda: graph.read(init)).contiguous()
    big = graph.read(init)  # its own memory (OnnxGraph.read)
    for m in ms:
        axis, start = m.block
        size = (m.target.shape[::-1] if m.transposed else m.target.shape)[axis]
        part = big.narrow(axis, start, size)
        part.copy_(new_w(m, lambda p=part: p.clone()))
    return big


def confirm(graph: OnnxGraph, m: Match, w: torch.Tensor, stored: torch.Tensor | None = None,
            laid_out: bool = False) -> None:
    """Compare a pending match's initializer (`stored`, or read from the graph) with the base value
    `w` element by element, in the form the match says the graph holds it (laid_out: `w` already
    is W.T in the initializer's dtype); raise Unconfirmed when they differ."""
    if laid_out:
        v = w
    else:
        v = variant(w, graph.dtype(m.init), m.via)
        v = v.T if m.transposed else v
    ok, k = holds(graph.view(m.init) if stored is None else stored, v)
    if not ok:
        raise Unconfirmed(f"{m.target.name} -> {m.init}")
    m.pending, m.note = False, "; ".join(filter(None, [m.note, converter_note(k)]))


def _merge(m: Match, w: torch.Tensor, adapters: list[Adapter], device: torch.device, dtype: torch.dtype,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The merge of W (for a transposed match with plain LoRA terms, W.T: merged in the
    initializer's own layout, see _in_graph_layout) in the initializer's layout and dtype.
    One rounding, to the precision the graph holds the values in (m.via: rounded to a half type
    first, as exporting the merged half-precision checkpoint would), then an exact widening.
    `out`: a CPU tensor of the initializer's dtype and shape to receive it (used when the merge
    lands in that layout and dtype)."""
    job_code = TORCH_TO_ST[m.via] if m.via is not None else TORCH_TO_ST[dtype]
    flipped = _in_graph_layout(m.target) if m.transposed else None
    if flipped is not None:
        y, _ = engine.compute(_job(flipped, job_code), w, adapters, device, torch.float32, out=out)
        return y.to(dtype)
    y, _ = engine.compute(_job(m.target, job_code), w, adapters, device, torch.float32,
                          out=None if m.transposed else out)
    y = y.to(dtype)
    return y.T if m.transposed else y


class Task:
    """One patched initializer for graph.save: load() on the reader thread, compute(its result) on
    the compute thread, returning the new value; done() once the writer has written it."""

    def __init__(self, fn=None):
        self.fn = fn

    def load(self):
        return None

    def compute(self, loaded) -> torch.Tensor:
        return self.fn()

    def done(self) -> None:
        pass


# numba's parallel kernels (the comparison on the reader thread, the CPU merge on the compute
# thread) run one at a time: each uses every core already, and numba's workqueue threading layer
# (where neither OpenMP nor TBB is installed) must not be entered from two threads at once
_KERNELS = threading.Lock()


class _FromBase(Task):
    """A whole initializer merged from the base value, through pooled buffers. load() reads W and,
    for a pending match, the initializer's stored bytes (pread: no page faults on a mapping).
    compute() confirms a pending match and merges. On a GPU both tensors go there first: a
    bit-for-bit comparison there (exact: integers) settles the usual case, the canonical one on
    the CPU the rest, and W.T for a transposed initializer is a view there, not a CPU copy (torch's
    transposed copy ran at 0.9 GB/s on the H200's CPU). On the CPU it is laid out once by load()."""

    def __init__(self, graph: OnnxGraph, m: Match, adapters, ck: Checkpoint, device, clock: Clock, pools):
        super().__init__()
        self.graph, self.m, self.adapters, self.ck, self.device, self.clock, self.pools = (
            graph, m, adapters, ck, device, clock, pools)
        self.held: list[torch.Tensor] = []
        self.outbuf = None
        # the merge runs on W.T, in the initializer's own layout (_merge, _in_graph_layout)
        self.flips = m.transposed and _in_graph_layout(m.target) is not None

    def load(self) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        m, pools, dtype = self.m, self.pools, self.graph.dtype(self.m.init)
        try:
            with self.clock("read"):
                self.held.append(pools.inputs.get(pools.stop))
                w = self.ck.read(m.target.ref, out=self.held[-1])
            # on the CPU, W.T laid out once (into a pooled buffer: torch's blocked copy) serves both
            # the comparison, then row against row, and the merge, which would otherwise make its
            # own contiguous copy of the transposed view
            laid_out = self.device.type == "cpu" and self.flips and m.via is None and w.dtype == dtype
            if laid_out:
                with self.clock("transpose"):
                    self.held.append(pools.inputs.get(pools.stop))
                    w = _placed(self.held[-1], dtype, self.graph.shape(m.init)).copy_(w.T)
                    pools.inputs.put(self.held.pop(0))
            stored = None
            if m.pending:
                with self.clock("read"):
                    self.held.append(pools.inputs.get(pools.stop))
                    stored = self.graph.read_into(m.init, self.held[-1])
        except BaseException:
            self._release_inputs()
            raise
        return w, stored, laid_out

    def _release_inputs(self) -> None:
        for buf in self.held:
            self.pools.inputs.put(buf)
        self.held = []

    def compute(self, loaded: tuple[torch.Tensor, torch.Tensor | None, bool]) -> torch.Tensor:
        (w, stored, laid_out), m, dtype = loaded, self.m, self.graph.dtype(self.m.init)
        gpu = self.device.type != "cpu"
        try:
            with _no_lock() if gpu else _KERNELS:
                if gpu:
                    with self.clock("merge"):
                        w = w.to(self.device)
                if m.pending:
                    with self.clock("confirm"):
                        if not (gpu and _same_bits(m, w, stored.to(self.device), dtype)):
                            confirm(self.graph, m, w.cpu(), stored, laid_out)
                        m.pending = False
                with self.clock("merge"):
                    self.outbuf = self.pools.results.get(self.pools.stop)
                    out = _placed(self.outbuf, dtype, self.graph.shape(m.init))
                    if self.flips and not laid_out:
                        w = w.T
                    y = _merge(m, w, self.adapters, self.device, dtype, out if m.via is None else None)
                    return y.contiguous()
        finally:
            self._release_inputs()

    def done(self) -> None:
        self.pools.results.put(self.outbuf)
        self.outbuf = None


def _same_bits(m: Match, w: torch.Tensor, stored: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the initializer holds exactly the bits of W as the match says it stores it (on W's
    device)."""
    v = variant(w, dtype, m.via)
    return sketch.same_bits(stored, v.T if m.transposed else v)


class _Pools:
    def __init__(self, nbytes: int, inputs: int, results: int, pin: bool):
        self.stop = threading.Event()
        self.inputs = BufferPool(nbytes + ALIGN, inputs, pin)
        self.results = BufferPool(nbytes + ALIGN, results, pin)


def _placed(buf: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor of `dtype` and `shape` in the byte buffer `buf`, starting at an ALIGN boundary of
    memory (the data file's large tensors start at such a boundary of the file: written as is)."""
    skip = (-buf.data_ptr()) % ALIGN
    n = torch.Size(shape).numel() * dtype.itemsize
    return buf[skip:skip + n].view(dtype).reshape(shape)


def merge_tasks(graph: OnnxGraph, result: MatchResult, adapters: list[Adapter], ck: Checkpoint | None,
                device: torch.device, clock: Clock, ahead: int) -> dict[str, Task]:
    """A Task per external initializer the matches patch. At most `ahead` of them are in flight in
    graph.save, plus the one being written: the pools hold that many buffers of each kind."""
    tasks, whole = {}, []
    for init, ms in result.by_init().items():
        if not graph.is_external(init):
            continue
        if ck is not None and len(ms) == 1 and ms[0].block is None and ms[0].target.ref is not None \
                and ms[0].target.ref.offset is not None:
            whole.append((init, ms[0]))
        else:
            tasks[init] = Task(lambda i=init, g=ms: merged_value(graph, i, g, adapters, ck, device, clock))
    if whole:
        largest = max(max(m.target.ref.nbytes, graph.nbytes(init)) for init, m in whole)
        # inputs: two per task in flight (W or W.T, and the stored copy), and one more while W.T is
        # laid out
        pools = _Pools(largest, 2 * (ahead + 1), ahead + 1, device.type == "cuda")
        for init, m in whole:
            tasks[init] = _FromBase(graph, m, adapters, ck, device, clock, pools)
    return tasks
