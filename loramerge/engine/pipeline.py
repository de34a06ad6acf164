"""Execute a plan: read W -> math on the device -> cast once -> write, one tensor at a time.

Knows nothing of file formats beyond "the checkpoint reads a TensorRef" and "the writer takes
tensors in header order". The stages overlap: a reader thread reads ahead, one compute worker per
device does the math, a writer thread writes behind in plan order. Queues and buffer pools are
bounded, so memory stays near a few tensors whatever the model size. Untouched tensors are
copied file-to-file by the writer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..readers.checkpoint import Checkpoint
from ..types import ST_TO_TORCH, Adapter, Job, OutputFile, Plan
from ..writers.direct import ALIGN
from ..writers.header import METADATA, build_header, data_offsets
from ..writers.early import EarlyFile, EarlyMerged
from ..writers.safetensors import SafetensorsWriter
from .job_math import compute, premerged_key, premergeable, take_premerged
from .precision import guarded
from .schedule import write_order
from .threads import BufferPool, Stage, Workers, get_or_stop, put_or_stop, switch_interval, when_done
from .timeline import since_start

_DONE = object()
_REPLACED = object()
_LATER = object()  # read only if the premerge worker's result is not taken
_EARLY = object()  # read only if what the head start wrote (the worker's result) is not the job's
_PLACED = object()  # the result: the head start's bytes, confirmed
# The interpreter's GIL switch interval while a CPU merge runs (the default is 5 ms). The writer,
# the reader and the hashing threads each take the GIL back after every system call; while the
# compute thread runs Python between kernels, a waiting thread gets it only after the interval.
# On the H200 machine (16 cores, 8B bf16, --device cpu) the writer's busy time fell from 10.86 to
# 9.37 s with 0.5 ms, and the CLI's wall by 0.6-1.0 s in each of 3 paired rounds (bench/RESULTS.md).
# (The CLI's head start sets as much for its whole block, merge included, on any device, on 8+
# cores: writers/headstart.py running(); the block here then leaves it as it finds it.)
CPU_SWITCH_INTERVAL = 0.0005


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
    seconds_hash_wait: float = 0.0  # of seconds_write: waiting for the manifest's sha256 to catch up
    # where the stages waited for each other: the math for a free output buffer (the writer and
    # the hashing threads set the pace), the writer for a result (the math sets the pace)
    seconds_buffer_wait: float = 0.0
    seconds_result_wait: float = 0.0
    bytes_early: int = 0            # of bytes_written: written by a head start before the plan existed
    premerged_early: int = 0        # of merged: the premerge worker's results the head start wrote
    files: dict = field(default_factory=dict)   # output file name -> {"sha256", "bytes"} (manifest)
    marks: dict = field(default_factory=dict)   # "first_write", "last_write", "synced": timeline.since_start()


def _copied_by_writer(job: Job) -> bool:
    """Untouched tensors of a safetensors base go file-to-file; nothing reads or computes them."""
    return job.kind == "copy" and job.source.offset is not None


def _write_order(plan: Plan) -> list[tuple[int, Job]]:
    """(file index, job) in the order they are read, computed and written (schedule.write_order)."""
    return [(fi, plan.files[fi].jobs[k]) for fi, k in write_order([[j.nbytes for j in f.jobs] for f in plan.files])]


def _placed_jobs(f: OutputFile) -> list[tuple[int, Job]]:
    """(file offset of its main tensor, job) for each job of an output file."""
    offsets = iter(data_offsets([e for j in f.jobs for e in j.entries], METADATA))
    placed = []
    for j in f.jobs:
        placed.append((next(offsets), j))
        for _ in j.entries[1:]:
            next(offsets)
    return placed


def _phases(plan: Plan) -> dict[int, int]:
    """id(job) -> where its main tensor lands in its file, modulo direct.ALIGN. A result placed at
    that phase in a page-aligned buffer is written to the disk straight from it (O_DIRECT needs
    the memory and the file offset aligned alike); 0 where the offset is not a multiple of the
    dtype's size, whose elements must stay aligned (the writer then stages the bytes)."""
    return {id(j): at % ALIGN if at % ST_TO_TORCH[j.dtype].itemsize == 0 else 0
            for f in plan.files for at, j in _placed_jobs(f)}


def _copies(f: OutputFile) -> dict[int, tuple[Path, int, int]]:
    """The writer's copies into an output file: file offset -> (source file, offset, nbytes); a
    zero-size tensor has none (it shares its offset with the tensor after it)."""
    return {at: (j.source.file, j.source.offset, j.main_nbytes) for at, j in _placed_jobs(f)
            if _copied_by_writer(j) and j.main_nbytes}


def _premerged_early(plan: Plan, early: dict[str, EarlyFile]) -> dict[int, EarlyMerged]:
    """id(job) -> the premerge worker's result a head start wrote where the job's tensor goes, in
    files whose guessed header is the plan's (the writer takes only those over)."""
    found = {}
    for f in plan.files:
        head = early.get(f.name)
        if head is None or not head.merged or head.header != build_header([e for j in f.jobs for e in j.entries],
                                                                          METADATA):
            continue
        for at, j in _placed_jobs(f):
            m = head.merged.get(at)
            if m is not None and (m.name, m.nbytes) == (j.name, j.main_nbytes) and len(j.entries) == 1 \
                    and premergeable(j):
                found[id(j)] = m
    return found


def _placed(buf: torch.Tensor, phase: int, nbytes: int) -> torch.Tensor:
    """nbytes of `buf` starting at the first address that is `phase` past a multiple of ALIGN
    (buffers are allocated ALIGN bytes larger for this)."""
    start = (phase - buf.data_ptr()) % ALIGN
    return buf[start: start + nbytes]


def run(plan: Plan, base: Checkpoint, adapters: list[Adapter], out_dir: Path, devices: list[torch.device],
        accum: torch.dtype = torch.float32, progress=None, sync: bool = True,
        early: dict[str, EarlyFile] | None = None, premerged=None) -> EngineStats:
    """Stream every job of the plan into its output file (_run), with a short GIL switch interval
    when the math runs on the CPU (CPU_SWITCH_INTERVAL). `early`: shards a head start began, by
    name (writers/headstart.py); each writer takes its own over if its header is the plan's.
    `premerged`: a premerge worker (premerge.py), told the order and asked for each job first."""
    with switch_interval(CPU_SWITCH_INTERVAL if any(d.type == "cpu" for d in devices) else None):
        return _run(plan, base, adapters, out_dir, devices, accum, progress, sync, early, premerged)


@guarded  # IEEE float32 matmuls for every compute thread (the flags are process-global): precision.py
def _run(plan: Plan, base: Checkpoint, adapters: list[Adapter], out_dir: Path, devices: list[torch.device],
        accum: torch.dtype = torch.float32, progress=None, sync: bool = True,
        early: dict[str, EarlyFile] | None = None, premerged=None) -> EngineStats:
    """Stream every job of the plan into its output file. Reader thread -> one compute worker per
    device -> writer thread; the writer takes results in plan order, so several devices can work
    on different tensors while the files are still written strictly in order."""
    stats = EngineStats()
    early = early or {}
    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(maxsize=2)
    # Each entry holds one tensor in flight (a future); the bound keeps memory near a few tensors.
    write_q: queue.Queue = queue.Queue(maxsize=2 * len(devices))
    order = _write_order(plan)
    written_early = _premerged_early(plan, early)
    if premerged is not None:
        # on a GPU the worker's results serve the head start only (written before the plan): the
        # device outpaces a CPU kernel, so the merge takes nothing more from it
        on_cpu = all(d.type == "cpu" for d in devices)
        premerged.want([j.name for _, j in order if on_cpu and premergeable(j)])
    local = threading.local()
    pin = any(d.type == "cuda" for d in devices) and torch.cuda.is_available()
    computed = [j for _, j in order if not _copied_by_writer(j)]
    read_bytes = max((j.source.nbytes for j in computed if j.source.offset is not None
                      and j.replacement is None), default=0)
    out_bytes = max((j.main_nbytes for j in computed), default=0)
    phases = _phases(plan)
    # One worker takes jobs in order, so 2 output buffers suffice (one being written, one being
    # filled). Several: enough that every job that can be in flight gets one (no deadlock). A
    # written buffer goes back once its file's hashing thread is done with it: a few more let the
    # writer go on to the next file's tensor meanwhile (hashing always ends, so at worst it waits).
    n = len(devices)
    read_pool = BufferPool(read_bytes, 2 + n, pin)
    # a buffer is held by at most the futures in write_q (2n), the one being put and the one the
    # writer holds; and those still being hashed
    hashing = 2 if len(plan.files) > 1 else 1
    out_pool = BufferPool(out_bytes + ALIGN if out_bytes else 0, (2 if n == 1 else 2 * n + 2) + hashing, pin)
    closer = Workers(1, "loramerge-fsync")
    closing = []
    free_devices: queue.Queue = queue.Queue()
    for d in devices:
        free_devices.put(d)

    def bind_device():
        local.device = free_devices.get_nowait()
        if local.device.type == "cuda":
            torch.cuda.set_device(local.device)

    def work(job: Job, w, extra, read_buf):
        if w is _EARLY:  # what the head start wrote, if it is this very tensor; else as always
            t0 = time.perf_counter()
            m = written_early[id(job)]
            if premerged_key(job, adapters) == m.key:
                return (_PLACED, m.redone, None), time.perf_counter() - t0, 0.0
            w = base.read(job.source)
        t0 = time.perf_counter()
        out_buf = out_pool.get(stop)
        waited = time.perf_counter() - t0
        out = _placed(out_buf, phases[id(job)], job.main_nbytes).view(ST_TO_TORCH[job.dtype]).view(job.shape)
        t0 = time.perf_counter()  # after the wait for a free buffer, which is the writer's time
        try:
            if w is _LATER:  # the premerge worker's result, if it is this very tensor; else as always
                got = take_premerged(job, adapters, out, premerged)
                if got is not None:
                    return (got[0], got[1], out_buf), time.perf_counter() - t0, waited
                w = base.read(job.source)
            tensor, fixed = compute(job, None if w is _REPLACED else w, adapters, local.device, accum, out, extra)
        except BaseException:
            out_pool.put(out_buf)
            raise
        finally:
            read_pool.put(read_buf)  # the input is consumed (GPU copies are complete: out is filled)
        # the seconds are summed by the writer: several compute threads would race on stats
        return (tensor, fixed, out_buf), time.perf_counter() - t0, waited

    def reader():
        for fi, job in order:
            if _copied_by_writer(job):
                item = (fi, job, None, (), None)
            elif job.replacement is not None:
                item = (fi, job, _REPLACED, (), None)  # the base tensor is not needed
            elif id(job) in written_early:
                item = (fi, job, _EARLY, (), None)
            elif premerged is not None and premerged.expects(job.name):
                item = (fi, job, _LATER, (), None)
            else:
                buf = read_pool.get(stop) if job.source.offset is not None else None
                t0 = time.perf_counter()
                # a job's further inputs (an FP8 weight's scales, a 4-bit weight's absmax) are small
                extra = tuple(base.read(ref) for ref in job.inputs)
                item = (fi, job, base.read(job.source, out=buf), extra, buf)
                stats.seconds_read += time.perf_counter() - t0
            if not put_or_stop(read_q, item, stop):
                return
        put_or_stop(read_q, _DONE, stop)

    delay = float(os.environ.get("LORAMERGE_TEST_WRITE_DELAY") or 0)

    def close(w: SafetensorsWriter, name: str) -> None:
        """A finished file, on the closer's thread: its hash, then its fsync. The writer goes on
        meanwhile: a file's last hashes can lag its writes by a second (a copied 1 GB embedding is
        hashed from its source at ~1.3 GB/s), and waiting for them idled the disk."""
        try:
            stats.files[name] = w.hasher.record()
        except BaseException:
            w.abort()
            raise
        w.close(sync)

    def writer():
        writers: dict[int, SafetensorsWriter] = {}
        try:
            while True:
                item = get_or_stop(write_q, stop)
                if item is _DONE or stop.is_set():
                    break
                fi, job, future = item
                tensor = out_buf = None
                hashed = []
                if future is not None:
                    t0 = time.perf_counter()
                    (tensor, fixed, out_buf), seconds, waited = future.result()
                    stats.seconds_result_wait += time.perf_counter() - t0
                    stats.exact_fixups += fixed
                    stats.seconds_math += seconds
                    stats.seconds_buffer_wait += waited
                t0 = time.perf_counter()
                stats.marks.setdefault("first_write", since_start())
                w = writers.get(fi)
                if w is None:
                    f = plan.files[fi]
                    entries = [e for j in f.jobs for e in j.entries]
                    head = early.get(f.name)
                    w = writers[fi] = SafetensorsWriter(out_dir / f.name, entries, METADATA, early=head,
                                                        copies=_copies(f) if head is not None else None)
                if tensor is None:
                    w.copy_range(job.name, job.source.file, job.source.offset, job.main_nbytes)
                    stats.copied += 1
                elif tensor is _PLACED:
                    w.place_premerged(job.name, written_early[id(job)])
                    stats.merged += 1
                    stats.premerged_early += 1
                else:
                    # the hash of what is written from out_buf is not waited for: out_buf goes back
                    # to the pool when it is done (below); other results are hashed before going on
                    hashed = [w.write(name, t, defer_hash=out_buf is not None)
                              for (name, *_), t in zip(job.entries, tensor if isinstance(tensor, tuple) else (tensor,))]
                    if job.terms:
                        stats.merged += 1
                    elif job.kind == "cast":
                        stats.cast += 1
                    else:
                        stats.copied += 1
                del tensor
                if out_buf is not None:
                    when_done(hashed, lambda b=out_buf: out_pool.put(b))
                if w.complete:
                    stats.seconds_hash_wait += w.hasher.waited
                    stats.bytes_early += w.bytes_early
                    # hash and fsync in the background: the next file's writes keep the disk busy meanwhile
                    closing.append(closer.submit(close, w, plan.files[fi].name))
                    writers.pop(fi)
                stats.bytes_written += job.nbytes
                stats.seconds_write += time.perf_counter() - t0
                if delay:
                    time.sleep(delay)  # test hook: a slow disk, to interrupt a merge midway
                if progress is not None:
                    progress(job.nbytes)
        finally:
            stats.marks["last_write"] = since_start()
            for w in writers.values():
                w.abort()

    threads = [Stage(reader, "loramerge-reader"), Stage(writer, "loramerge-writer")]
    pool = Workers(len(devices), "loramerge-compute", initializer=bind_device)
    for t in threads:
        t.start()
    try:
        while True:
            item = get_or_stop(read_q, stop, *threads)
            if item is _DONE:
                break
            fi, job, w, extra, read_buf = item
            future = None if w is None else pool.submit(work, job, w, extra, read_buf)
            del w, extra, read_buf
            if not put_or_stop(write_q, (fi, job, future), stop, *threads):
                break
        put_or_stop(write_q, _DONE, stop, *threads)
        threads[1].join()
        if threads[1].error is not None:
            raise threads[1].error
    except BaseException:
        # Stop at once (Ctrl-C and SIGTERM must surface within a second): the stages see `stop`
        # within 0.1 s unless inside one read, computation or write, which is not waited for
        # (daemon threads; the caller removes the staging by renaming it away first, so a
        # straggler cannot write into it).
        stop.set()
        pool.shutdown(wait=False)
        closer.shutdown(wait=False)
        raise
    stop.set()
    pool.shutdown(wait=True)
    closer.shutdown(wait=True)
    for t in threads:
        t.join()
        if t.error is not None:
            raise t.error
    for f in closing:
        f.result()  # a failed fsync is a failed run
    stats.marks["synced"] = since_start()
    return stats
