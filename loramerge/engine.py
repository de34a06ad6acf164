"""Execute a plan: read W -> math on the device -> cast once -> write, one tensor at a time.

Knows nothing of file formats beyond "the checkpoint reads a TensorRef" and "the writer takes
tensors in header order". Three stages overlap: a reader thread reads ahead, the calling thread
does the math, a writer thread writes behind. Queues are bounded, so memory stays near a few
tensors whatever the model size. Untouched tensors are copied file-to-file by the writer.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import deltas, ops
from .errors import LoraMergeError, NumericsError
from .readers.checkpoint import Checkpoint
from .types import ST_TO_TORCH, Adapter, Job, Plan
from .writers.safetensors import SafetensorsWriter

_DONE = object()
_REPLACED = object()


@dataclass
class EngineStats:
    merged: int = 0
    copied: int = 0
    cast: int = 0
    bytes_written: int = 0
    exact_fixups: int = 0          # elements recomputed in float64 for a correctly rounded result
    seconds_read: float = 0.0
    seconds_math: float = 0.0
    seconds_write: float = 0.0
    merged_names: list[str] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LoraMergeError(f"--device {device!r}: not a device name; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoraMergeError(f"--device {device}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoraMergeError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present")
    elif dev.type != "cpu":
        raise LoraMergeError(f"--device {device}: only cpu and cuda are supported")
    return dev


class _Stage(threading.Thread):
    """A daemon thread whose exception is re-raised in the caller by join_checked()."""

    def __init__(self, target, name):
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.error: BaseException | None = None

    def run(self):
        try:
            self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event, *others: _Stage):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            for t in others:
                if t.error is not None:
                    raise t.error
            if stop.is_set():
                raise RuntimeError("pipeline stopped")


def compute(job: Job, w: torch.Tensor, adapters: list[Adapter], device: torch.device,
            accum: torch.dtype, stats: EngineStats) -> torch.Tensor:
    """The output tensor for one job (not a plain copy), on the CPU."""
    out_dtype = ST_TO_TORCH[job.dtype]
    rep = job.replacement
    if rep is not None:  # a full tensor saved in the adapter stands in for the base tensor
        w = adapters[rep.adapter].tensors[rep.key]
    w = w.to(device, non_blocking=True)
    lora = [t for t in job.terms if t.kind == "lora"]
    bias = [t for t in job.terms if t.kind == "bias"]
    if lora and lora[0].pair.magnitude_key:
        t = lora[0]  # the plan allows DoRA only alone on its tensor
        left, right = deltas.factors(adapters[t.adapter], t.pair, torch.float64, device)
        y = ops.dora_merge(w, left, right, t.pair.scale, adapters[t.adapter].tensors[t.pair.magnitude_key],
                           t.pair.layout == "transposed", out_dtype)
    elif lora:
        # All adapters' terms for this tensor in one product: [B1 B2 ..] @ [A1; A2; ..], each
        # rank column carrying its own factor c_i * s_i, so the sum is rounded once.
        lefts, rights = zip(*(deltas.factors(adapters[t.adapter], t.pair, torch.float32, device) for t in lora))
        factors = torch.cat([torch.full((t.pair.rank,), t.factor, dtype=torch.float64) for t in lora])
        w2 = w.reshape(w.shape[0], -1)
        y, fixed = ops.merge_weight(w2, torch.cat(rights), torch.cat(lefts, dim=1), factors, out_dtype, accum=accum)
        y = y.reshape(w.shape)
        stats.exact_fixups += fixed
    elif bias:
        y = ops.merge_bias(w, [(t.factor, adapters[t.adapter].tensors[t.pair.bias_key]) for t in bias], out_dtype)
    elif rep is not None:
        y = ops.cast(w, out_dtype)
    else:
        y = ops.cast(w, out_dtype)
    try:
        ops.check_finite(y)
    except ops.NonFinite as e:
        count, idx, value = e.args
        src = "; ".join(f"{adapters[t.adapter].label}: {t.pair.module if t.pair else t.key}"
                        for t in job.terms) or "cast only"
        hint = ""
        if job.dtype == "F16" and value in (float("inf"), float("-inf")):
            hint = "; the value overflows float16 (max 65504): use --dtype bfloat16 or float32"
        raise NumericsError(f"{job.name}: merged result has {count} non-finite value(s) (first at flat index "
                            f"{idx}: {value}) from {src}{hint}; nothing was written") from None
    return y.cpu()


def run(plan: Plan, base: Checkpoint, adapters: list[Adapter], out_dir: Path, device: torch.device,
        accum: torch.dtype = torch.float32, progress=None, sync: bool = True) -> EngineStats:
    stats = EngineStats()
    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(maxsize=2)
    write_q: queue.Queue = queue.Queue(maxsize=2)
    order = [(fi, job) for fi, f in enumerate(plan.files) for job in f.jobs]

    def direct_copy(job: Job) -> bool:
        return job.kind == "copy" and job.source.offset is not None

    def reader():
        for fi, job in order:
            if direct_copy(job):
                item = (fi, job, None)
            elif job.replacement is not None:
                item = (fi, job, _REPLACED)  # the base tensor is not needed
            else:
                t0 = time.perf_counter()
                item = (fi, job, base.read(job.source))
                stats.seconds_read += time.perf_counter() - t0
            if not _put(read_q, item, stop):
                return
        _put(read_q, _DONE, stop)

    def writer():
        writers: dict[int, SafetensorsWriter] = {}
        try:
            while True:
                item = _get(write_q, stop)
                if item is _DONE:
                    break
                fi, job, tensor = item
                t0 = time.perf_counter()
                w = writers.get(fi)
                if w is None:
                    f = plan.files[fi]
                    entries = [(j.name, j.dtype, j.shape, j.nbytes) for j in f.jobs]
                    w = writers[fi] = SafetensorsWriter(out_dir / f.name, entries, {"format": "pt"})
                if tensor is None:
                    w.copy_range(job.name, job.source.file, job.source.offset, job.nbytes)
                else:
                    w.write(job.name, tensor)
                if w._next == len(w.entries):
                    w.close(sync=sync)
                    writers.pop(fi)
                stats.bytes_written += job.nbytes
                stats.seconds_write += time.perf_counter() - t0
                if progress is not None:
                    progress(job.nbytes)
        finally:
            for w in writers.values():
                w.abort()

    threads = [_Stage(reader, "loramerge-reader"), _Stage(writer, "loramerge-writer")]
    for t in threads:
        t.start()
    try:
        while True:
            item = _get(read_q, stop, *threads)
            if item is _DONE:
                break
            fi, job, w = item
            if w is None:
                stats.copied += 1
                out = None
            else:
                if w is _REPLACED:
                    w = None
                t0 = time.perf_counter()
                out = compute(job, w, adapters, device, accum, stats)
                stats.seconds_math += time.perf_counter() - t0
                if job.terms:
                    stats.merged += 1
                    stats.merged_names.append(job.name)
                elif job.kind == "cast":
                    stats.cast += 1
                else:
                    stats.copied += 1
            del w
            if not _put(write_q, (fi, job, out), stop):
                break
            if threads[1].error is not None:
                raise threads[1].error
        _put(write_q, _DONE, stop)
        threads[1].join()
        if threads[1].error is not None:
            raise threads[1].error
    except BaseException:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        raise
    finally:
        stop.set()
    for t in threads:
        t.join()
        if t.error is not None:
            raise t.error
    return stats
