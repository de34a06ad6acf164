"""Write while the process is still starting: untouched tensors, copied before the plan exists.

A cold `loramerge apply` spends seconds before its first write: importing torch (3-4.4 s on the
H200 machines, ~1 s on a 2-core VM), then numba's kernels, the adapter and the plan. A merge is
paced by its writes, so the disk's idle time then is time lost against copying the same bytes.
Most of what a merge writes is known before any of that: with the base's own sharding and dtypes
(`--dtype auto`, no `--shard-size`), each output shard has the base shard's tensors in the base's
order, so its header, and where each tensor lands, follow from the base's headers alone (JSON).
The head start reads those, guesses from the adapter's tensor names which base tensors no adapter
touches (embeddings, the LM head, norms; whole MLPs for an attention-only adapter) and copies
them into a staged shard of its own while torch imports, on a daemon thread (its reads and
O_DIRECT writes release the GIL).

It is a guess that cannot be wrong in the output: the writer takes a head-started shard over only
if the header the plan computed is byte for byte the guessed one, and moves past a range only
where the plan copies that very tensor, from the same file and offset, to that very place;
everything else it writes as always, over whatever the head start put there. A shard it does not
take over stays in the head start's own staging, removed at the end (HeadStart.close).

Where the CLI runs a premerge worker (engine/premerge.py: a process without torch that merges
the targets on the CPU meanwhile), the head start then writes its results too, in the order the
worker computes them, each freeing its slot of the worker's ring for the next: on a machine with
cores to spare, most of what a merge writes can be on its way to the disk before torch is
imported. The merge moves past such a tensor only where the worker's key is its own job's (the
same W, A, B, factors and output format: pipeline.py); else it computes the tensor and writes
over it.

The manifest's sha256 of a shard runs in file order. An untouched tensor first in its shard (the
embedding, the LM head: save_file sorts names) would otherwise be hashed from its source after
the writer moved past it, while the merged tensors behind it hold their output buffers: on the
H200 machine that stalled the merge ~1 s per such tensor (bench/trace_pipeline.py). So threads
of the head start hash each shard from its header on, in file order, as far as they can: the
tensors taken for untouched (any size) from the base, the worker's results from what was written,
each whole, keeping the state at each tensor's start. The writer's hash starts from there up to
the first tensor the plan does not copy so, and goes back to a result's state where the merge
writes over that result. Without this, the results written early were hashed from the page cache
after the plan, on the writer's time (`hash_wait` 2.2 s of an 8B merge on a 16-core H100 machine).
Standard library only: it runs before torch is imported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from ..engine.premerge import usable_cores
from ..engine.threads import switch_interval
from ..errors import OutputError
from ..readers import hub
from ..readers.prefetch import weight_files
from ..readers.st_header import raw_header
from ..readers.touched import adapter_names, touched_by
from . import shard_hash, signals
from .direct import ALIGN, aligned_buffer, direct_wanted, pread_full, set_direct
from .early import EarlyFile, EarlyMerged, EarlyRange, _file_id
from .header import METADATA, build_header
from .shard_hash import ShardHash
from .output import Staged, refuse_paths
from .writeback import Writeback

MIN_BYTES = 1 << 20   # a smaller tensor costs the writer next to nothing: not worth a head start
# (but it is hashed as untouched all the same, or a norm between two results would end a prefix)
# Bytes per read and write of a copy, and per write of a result (and shard_hash.HASH_CHUNK per read
# of a hashing thread). Large, because each system call ends with the thread taking the GIL back,
# and while torch imports the import holds it for all but a slice every switch interval: with 32
# MiB copies and 8 MiB hashes (two 4 MiB reads), a 16-core machine's head start copied at ~0.8 GB/s
# against its disk's ~1.4 (bench/RESULTS.md). The cost: stop() waits for a chunk's write in hand
# (~0.1 s at 1.4 GB/s; bytes the merge then moves past).
CHUNK = 128 << 20
# The GIL switch interval while a head start runs, and the merge in the same block (running()),
# on a machine with SWITCH_MIN_CORES usable cores or more: a thread back from a system call waits
# for the holder's slice to end, 5 ms by default. With 0.5 ms and the chunks above, the H200
# machine's CLI (16 cores, 8B bf16, --device cpu) wrote 4.5 GB before its plan against 3.0 GB and
# ended 1.0-1.6 s sooner in each of 3 paired rounds. On the 2-core VM the import is CPU-bound and
# the shorter slices slowed it (bench/RESULTS.md).
SWITCH_INTERVAL = 0.0005
SWITCH_MIN_CORES = 8
# threads hashing the shards while the premerge worker's results come (one thread hashes ~1.3 GB/s
# on the H200 machine; without the worker one thread hashes the untouched tensors that lead)
HASH_THREADS = 2


@dataclass
class _Copy:
    file: int          # index into HeadStart.shards
    src: Path
    src_offset: int    # of the tensor's first byte in src
    out_offset: int    # of the tensor's first byte in the output shard
    nbytes: int
    write: bool = True  # copied early (else only hashed: too small, or no whole block inside)
    done: int = 0       # output bytes [start, done) written

    @property
    def start(self) -> int:
        return -(-self.out_offset // ALIGN) * ALIGN

    @property
    def end(self) -> int:
        return (self.out_offset + self.nbytes) // ALIGN * ALIGN


def guess(base: Path, adapters: list[Path]) -> tuple[list[EarlyFile], list[_Copy]] | None:
    """The output shards (header guessed, in the head start's staging once it begins) and the
    tensors taken for untouched, each a copy to make into them (`write`) or only to hash (too
    small, or no whole block inside); None where no guess can be made or nothing would be copied."""
    files = weight_files(base)
    names = [adapter_names(a) for a in adapters]
    if not files or any(f.suffix != ".safetensors" for f in files) or None in names:
        return None
    touched = touched_by(names)
    shards, copies = [], []
    for fi, f in enumerate(files):
        header, data = raw_header(f)
        order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        entries = [(k, v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]) for k, v in order]
        raw = build_header(entries, METADATA)
        shard = EarlyFile(Path(f.name), raw)
        shards.append(shard)
        at = len(raw)
        for (name, _, _, nbytes), (_, info) in zip(entries, order):
            if not nbytes:  # no bytes to copy, hash or place, at the offset of the next tensor
                continue
            shard.places[name] = (at, nbytes)
            if not touched(name):
                c = _Copy(fi, f, data + info["data_offsets"][0], at, nbytes)
                c.write = nbytes >= MIN_BYTES and c.end > c.start
                copies.append(c)
            at += nbytes
    return (shards, copies) if any(c.write for c in copies) else None


class HeadStart:
    """The running head start of one output: its staging, its thread, what it has written."""

    def __init__(self, out: Path, shards: list[EarlyFile], copies: list[_Copy], premerge=None):
        """premerge: a running premerge worker (engine/premerge.py) whose results the copying
        thread writes into the shards after its copies, while the merge is still starting."""
        self.shards, self.copies, self._premerge = shards, copies, premerge
        self._stop = threading.Event()
        # notified by the copying thread at each result and at its end, and by _halt: the hashing
        # threads wait on it for the next result
        self._wrote = threading.Condition()
        self._copying = True
        self._staged = Staged(out, is_dir=True, overwrite=True)
        tmp = self._staged.__enter__()
        for s in shards:
            s.path = tmp / s.path.name
        hashing = HASH_THREADS if premerge is not None else 1
        jobs = [(self._copy, ()), *((self._hash, (range(len(shards))[k::hashing],)) for k in range(hashing))]
        self._threads = [threading.Thread(target=fn, args=args, name=f"loramerge-headstart-{fn.__name__[1:]}",
                                          daemon=True) for fn, args in jobs]
        for t in self._threads:
            t.start()

    @property
    def written(self) -> int:
        """Bytes written so far (whole blocks)."""
        return (sum(c.done - c.start for c in self.copies if c.done > c.start)
                + sum(m.end - m.start for s in self.shards for m in list(s.merged.values())))

    def _hash(self, files: range) -> None:
        """A hashing thread: the shards `files` (indices), each from its header on, in file order,
        as far as their tensors can be hashed (shard.hashed, shard.marks), going round them while
        the copying thread may still write results; it ends when none can go on."""
        _yield_cpu()
        hashes = [ShardHash(self.shards[fi], {c.out_offset: (c.src, c.src_offset) for c in self.copies if c.file == fi})
                  for fi in files]
        try:
            # one read buffer for all of this thread's shards: up to HASH_CHUNK, and no more than
            # their largest tensor's whole blocks
            largest = max((n for p in hashes for _, n in p.places), default=0)
            buf = aligned_buffer(min(shard_hash.HASH_CHUNK, -(-largest // ALIGN) * ALIGN))[1]
            while hashes and not self._stop.is_set():
                ended = not self._copying or self._premerge is None  # no result can come after this round
                moved = [p.advance(self._stop, buf) for p in hashes]
                if any(m is None for m in moved):  # stopped
                    return
                hashes = [p for p in hashes if not p.finished]
                if not any(moved):
                    if ended:
                        return
                    with self._wrote:
                        self._wrote.wait(0.05)
        except OSError:  # (update_from's too: the base ends early) the merge reports real errors
            return

    def _copy(self) -> None:
        _yield_cpu()
        fds: dict[int, tuple[int, bool, Writeback]] = {}
        try:
            if self._copy_untouched(fds) and self._premerge is not None:
                self._write_premerged()
        except OSError:
            return  # a head start only: the merge writes whatever is missing and reports real errors
        finally:
            for fd, *_ in fds.values():
                os.close(fd)
            with self._wrote:
                self._copying = False
                self._wrote.notify_all()

    def _copy_untouched(self, fds: dict[int, tuple[int, bool, Writeback]]) -> bool:
        """The copies, into the shards (opened into `fds`); False if stopped or the base is short.
        Its buffer (up to CHUNK) is freed before the results are written."""
        largest = max((c.end - c.start for c in self.copies if c.write), default=0)
        buf = aligned_buffer(min(CHUNK, largest))[1]
        for c in self.copies:
            if not c.write:
                continue
            if c.file not in fds:
                fd = os.open(self.shards[c.file].path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                direct = direct_wanted() and set_direct(fd, True)
                fds[c.file] = (fd, direct, Writeback(fd, enabled=not direct))
            with open(c.src, "rb", buffering=0) as src:
                c.done = c.start
                while c.done < c.end and not self._stop.is_set():
                    view = buf[:min(CHUNK, c.end - c.done)]
                    if not pread_full(src.fileno(), view, c.src_offset + c.done - c.out_offset):
                        return False  # the base is shorter than its header says: the merge will say so
                    if self._stop.is_set():  # the plan waits for this thread: not for a chunk's write too
                        return False
                    fds[c.file] = _pwrite_all(*fds[c.file], view, c.done)
                    c.done += len(view)
            if self._stop.is_set():
                return False
        return True

    def _write_premerged(self) -> None:
        """The premerge worker's results, written into the shards in the order it computes them
        (the merge's predicted order) until the merge stops the head start. Buffered writes: the
        hashing threads (beyond their prefix, the writer) read these bytes back from the page
        cache for the manifest's sha256 (O_DIRECT would leave them on the disk only).
        A result is recorded once all of it is written; each written one frees its slot of the
        worker's ring for the next. Ends at the first target it cannot place or wait for: its
        result would hold a slot that only the merge can free."""
        pre = self._premerge
        places = {name: (fi, at, n) for fi, s in enumerate(self.shards) for name, (at, n) in s.places.items()}
        fds: dict[int, tuple[int, Writeback]] = {}
        try:
            for name in pre.wait_targets(self._stop):
                place = places.get(name)
                if place is None:
                    return
                got = pre.early(name, self._stop)
                if got is None:
                    if pre.skipped(name):
                        continue  # the merge computes (and reports) it
                    return
                fi, at, n = place
                if got.key[0][2] != n:  # W's bytes by the worker's reading of the header: not this place
                    return
                start, end = -(-at // ALIGN) * ALIGN, (at + n) // ALIGN * ALIGN
                if end <= start:  # no whole block inside: all of it is the writer's to write
                    start = end = at + n
                if fi not in fds:
                    fd = os.open(self.shards[fi].path, os.O_WRONLY | os.O_CREAT, 0o644)
                    fds[fi] = (fd, Writeback(fd))
                fd, writeback = fds[fi]
                for done in range(start, end, CHUNK):
                    if self._stop.is_set():
                        return
                    with pre.ring_bytes(got, done - at, min(end, done + CHUNK) - at) as view:
                        _pwrite_all(fd, False, writeback, view, done)
                with pre.ring_bytes(got, 0, start - at) as head, pre.ring_bytes(got, end - at, n) as tail:
                    merged = EarlyMerged(name, self.shards[fi].path, n, start, end, bytes(head), bytes(tail),
                                         got.key, got.redone)
                pre.written_early(name, got)
                with self._wrote:
                    self.shards[fi].merged[at] = merged
                    self._wrote.notify_all()
        finally:
            for fd, writeback in fds.values():
                writeback.push()
                os.close(fd)

    def _halt(self) -> None:
        """Stop every thread after the chunks in hand."""
        self._stop.set()
        with self._wrote:  # a hashing thread waiting for the next result: now, not at its timeout
            self._wrote.notify_all()
        for t in self._threads:
            t.join()

    def stop(self) -> dict[str, EarlyFile]:
        """Stop after the chunks in hand; the shards, by name, with what each holds."""
        self._halt()
        ids: dict[Path, tuple[int, int]] = {}  # one stat per base file, not per tensor
        for c in self.copies:
            if c.src not in ids:
                try:
                    ids[c.src] = _file_id(c.src)
                except OSError:
                    ids[c.src] = (-1, -1)  # gone: matches no copy of the plan (which will not find it either)
            src = ids[c.src]
            self.shards[c.file].ranges[c.out_offset] = EarlyRange(src, c.src_offset, c.nbytes, c.start,
                                                                  max(c.done, c.start))
        return {s.path.name: s for s in self.shards}

    def close(self) -> None:
        """Stop, and remove the head start's staging with whatever the merge did not take over."""
        self._halt()
        self._staged.__exit__(None, None, None)


def _yield_cpu() -> None:
    """Lower this thread's CPU priority: on a machine with few cores the head start's page-cache
    copies and hashing would otherwise slow the import they are meant to hide behind."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # Linux: this thread only
    except (OSError, AttributeError):
        pass


def _pwrite_all(fd: int, direct: bool, writeback: Writeback, view: memoryview, at: int):
    """Write all of `view` at `at` (whole blocks: O_DIRECT where the file system takes it, else
    buffered with early writeback). Returns the file's (fd, direct, writeback) for the next write."""
    while view:
        try:
            n = os.pwrite(fd, view, at)
        except OSError as e:
            if e.errno != errno.EINVAL or not direct:
                raise
            set_direct(fd, False)
            direct, writeback = False, Writeback(fd)
            continue
        view, at = view[n:], at + n
        writeback.wrote(at)
    return fd, direct, writeback


def begin(base, adapters, out, *, dtype: str = "auto", shard_size=None, dry_run: bool = False,
          overwrite: bool = False, revision: str | None = None, premerge=None) -> HeadStart | None:
    """Start a head start for `loramerge apply BASE ADAPTERS OUT`, or None where the output's
    layout cannot be known before the plan (another dtype or sharding, one output file, a base or
    adapter that is not safetensors on this disk, or a Hub id not in the cache), nothing would be
    copied, the output would be refused anyway, the disk has no room for the base's bytes, or
    LORAMERGE_NO_HEAD_START is set. premerge: a premerge worker whose results it writes too."""
    if dry_run or dtype != "auto" or shard_size is not None or os.environ.get("LORAMERGE_NO_HEAD_START"):
        return None
    out = Path(out)
    if out.suffix == ".safetensors" or not hasattr(os, "preadv"):
        return None
    # Hub ids from the cache only: a download is resolve()'s, with its errors, once the command runs
    base, adapters = hub.cached(base, "base", revision), [hub.cached(a, "adapter", revision) for a in adapters]
    if base is None or None in adapters:
        return None
    try:
        refuse_paths(out, [base, *adapters], overwrite)
        guessed = guess(base, adapters)
        if guessed is None or shutil.disk_usage(out.parent).free < sum(f.stat().st_size for f in weight_files(base)):
            return None
        return HeadStart(out, *guessed, premerge=premerge)
    except (OSError, OutputError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error):
        return None  # whatever is wrong, the merge finds and reports it


@contextlib.contextmanager
def running(base, adapters, out, **options):
    """begin() for the block (the head start, or None), closed at its end however it ends."""
    head = None
    try:
        with signals.deferred():  # a signal between its staging's creation and `head` would leave it
            head = begin(base, adapters, out, **options)
        short = head is not None and usable_cores() >= SWITCH_MIN_CORES
        with switch_interval(SWITCH_INTERVAL if short else None):
            yield head
    finally:
        if head is not None:
            head.close()
