"""verify's reading, overlapped with its checking like apply's pipeline: one thread reads the base's
tensors and one MERGED's, each a few tensors ahead of the check, into reused buffers (pinned when
the checks run on a GPU, so the copies to it run at full speed); the main thread checks tensor k
while tensor k + 1 is read. Memory stays at a few tensors per side.

Untouched tensors (a plain copy, same dtype) never need their values: MERGED's thread compares
their bytes with the base's chunk by chunk as it reads them, and only a tensor that differs is read
whole (the check then counts what differs). Tensors that are not plain safetensors ranges (pickled
.bin checkpoints) and jobs with codecs are left to the main thread, which reads them itself.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..engine.threads import BufferPool, put_or_stop
from ..readers.checkpoint import Checkpoint
from ..types import Job, TensorRef

_CHUNK = 8 << 20
_AHEAD = 1          # tensors queued per side beyond the one being read and the one being checked
_END = object()


@dataclass
class Item:
    """One job with what was read for it. w / m are None where the main thread must read (or,
    for w, where the adapter replaces the base tensor); `same` is True when the reader found an
    untouched tensor's bytes equal to the base's."""

    job: Job
    mref: TensorRef | None
    w: torch.Tensor | None = None
    m: torch.Tensor | None = None
    same: bool = False
    _release: list = field(default_factory=list)

    def release(self) -> None:
        """Hand the buffers back (after the check: nothing may hold w or m any more)."""
        for pool, buf in self._release:
            pool.put(buf)
        self._release.clear()
        self.w = self.m = None


def is_copy(job: Job, mref: TensorRef | None) -> bool:
    """An untouched tensor that MERGED must hold bit for bit (check_tensor's 'copy' kind)."""
    return (mref is not None and not job.terms and job.decode is None and job.encode is None
            and mref.dtype == job.source.dtype and mref.shape == job.shape)


def _plain(job: Job, mref: TensorRef | None) -> bool:
    return mref is not None and job.decode is None and job.encode is None


class TensorStream:
    """Iterate Items for `jobs` in order, read ahead on two threads; close() stops the threads
    (they are daemons: an interrupted verify does not wait for a read)."""

    def __init__(self, jobs: list[Job], base: Checkpoint, merged: Checkpoint, pin: bool):
        self._jobs = [(job, merged.tensors.get(job.name)) for job in jobs]
        self._stop = threading.Event()
        base_bytes = max((j.source.nbytes for j, mr in self._jobs if self._base_read(j, mr)), default=0)
        merged_bytes = max((mr.nbytes for j, mr in self._jobs if self._merged_read(j, mr)), default=0)
        pin = pin and torch.cuda.is_available()
        self._pools = [BufferPool(base_bytes, _AHEAD + 2, pin), BufferPool(merged_bytes, _AHEAD + 2, pin)]
        self._queues = [queue.Queue(maxsize=_AHEAD), queue.Queue(maxsize=_AHEAD)]
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(side, ck), daemon=True,
                                          name=f"loramerge-verify-read{side}")
                         for side, ck in enumerate((base, merged))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _base_read(job: Job, mref: TensorRef | None) -> bool:
        return (_plain(job, mref) and not is_copy(job, mref) and job.replacement is None
                and job.source.offset is not None)

    @staticmethod
    def _merged_read(job: Job, mref: TensorRef | None) -> bool:
        return _plain(job, mref) and not is_copy(job, mref) and mref.offset is not None

    def _run(self, side: int, ck: Checkpoint) -> None:
        pool, q = self._pools[side], self._queues[side]
        try:
            for job, mref in self._jobs:
                got = None
                ref = job.source if side == 0 and self._base_read(job, mref) else \
                    mref if side == 1 and self._merged_read(job, mref) else None
                if ref is not None:
                    buf = pool.get(self._stop) if ref.nbytes else None
                    got = (ck.read(ref, out=buf), buf)
                elif side == 1 and is_copy(job, mref) and job.source.offset is not None and mref.offset is not None:
                    got = _same_bytes(job.source, mref)
                if not put_or_stop(q, got, self._stop):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            self._errors.append(e)
        put_or_stop(q, _END, self._stop)

    def _get(self, side: int):
        while True:
            try:
                got = self._queues[side].get(timeout=0.1)
            except queue.Empty:
                if self._errors:
                    raise self._errors[0]
                continue
            if got is _END:
                raise self._errors[0] if self._errors else RuntimeError("verify reader ended early")
            return got

    def __iter__(self):
        for job, mref in self._jobs:
            item = Item(job, mref)
            for side in (0, 1):
                got = self._get(side)
                if isinstance(got, bool):
                    item.same = got
                elif got is not None:
                    tensor, buf = got
                    if buf is not None:
                        item._release.append((self._pools[side], buf))
                    if side == 0:
                        item.w = tensor
                    else:
                        item.m = tensor
            yield item

    def close(self) -> None:
        self._stop.set()


def _same_bytes(a: TensorRef, b: TensorRef) -> bool:
    """Whether two safetensors ranges hold the same bytes, read in chunks (stops at the first
    difference)."""
    if a.nbytes != b.nbytes:
        return False
    with open(a.file, "rb", buffering=0) as fa, open(b.file, "rb", buffering=0) as fb:
        done = 0
        while done < a.nbytes:
            n = min(_CHUNK, a.nbytes - done)
            x, y = os.pread(fa.fileno(), n, a.offset + done), os.pread(fb.fileno(), n, b.offset + done)
            if len(x) != n or x != y:
                return False  # (a short read: the main thread's own read names the truncation)
            done += n
    return True
