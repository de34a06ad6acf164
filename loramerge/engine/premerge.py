"""The parent's side of the premerge worker (premerge_worker.py): start it before torch is
imported, tell it the merge's order once planned, and take its results where they are the very
tensors this process would compute.

A result is taken only when the worker's key equals the job's own: the base file (device, inode,
size, mtime, ctime), W's offset, size, format and shape, the output format, and the digest of A, B and
the factors exactly as this process's kernel would be fed them (kernel_inputs). Merged results are
correctly rounded (README "Numerics"): equal inputs give equal bits whichever process, thread
count or first-pass precision computed them, so a taken result is the result. A result with a
non-finite or undecided element never comes (the worker skips it; this process computes and
reports it). Anything else (another key, a skipped target, a dead or stuck worker) and the job is
computed here as without a worker.

Only the CLI starts one (`apply`: a library caller has imported torch already), for one PEFT
adapter directory and a safetensors base on this disk: by default for a CPU merge on a machine
with MIN_CORES usable cores or more (below SPARE_CORES, of MIN_ELEMENTS or more), else with
LORAMERGE_PREMERGE=1 (=0: never). It is built for cores that would idle while torch imports: the
merge's first tensor would wait for torch and then numba, while the worker merges from its start
and the head start (writers/headstart.py) writes its results into the output meanwhile
(bench/RESULTS.md: the H200 machine's 16 cores, and since the head start writes the results, the
2-core VM too; on one core it only competes).
Standard library only at import: the CLI imports it before torch (and numpy) whether a worker is
wanted or not.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import mmap
import os
import re
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..readers import hub
from ..readers.prefetch import available_memory, weight_files
from ..readers.st_header import raw_header
from ..readers.touched import adapter_names, touched_by
from ..writers import signals

# No word from the worker for this long while a result is awaited: it is taken for stuck, and the
# merge goes on without it (a rank-16 MLP tensor of an 8B model takes it ~0.2 s on one core)
STALL_SECONDS = 60.0
# The most the plan waits for the worker's list of targets (it comes ~0.1 s after its start, from
# the headers alone): a worker not ready by then is not used
READY_SECONDS = 5.0
# The ring: as many slots of the largest target as fit in its bytes (begin() gives RING_BYTES,
# or an eighth of the memory available if less); a target larger than half of it is left to the
# parent. Merged results wait there for the parent's writer: all that the worker merges while
# the parent imports torch, unless the head start writes them meanwhile (writers/headstart.py).
RING_BYTES = 1 << 30


# Unless LORAMERGE_PREMERGE says (1: on, 0: off), a CPU merge starts a worker on a machine with
# this many usable cores or more. The 2-core VM, 1.1B bf16, cold CLI (2026-12-05): faster with the
# worker in 13 of 13 alternating pairs at r=16 (median 4.72 against 4.99 s; it merged all 154
# targets: the parent's kernel never ran), about even at r=64 (6.29 against 6.39 s, 5 pairs), less
# memory (RssAnon 272 against 379 MiB); on one core (taskset) 8.4 against 7.1 s: the worker's
# start and merge only take the import's core. Before the head start
# wrote the worker's results (2026-12-04), it was even on two cores: the results waited for the
# parent's writer. On the H200 machine's 16 cores it won from the start (8B bf16, --device cpu).
MIN_CORES = 2
# Below this many usable cores, only for a merge of at least MIN_ELEMENTS base elements: the
# worker's start (Python, numpy, numba: 0.65-0.9 s of a core on the 2-core VM) has to be repaid by
# the merging it moves into torch's import. The same VM, 1.1B bf16, 5 alternating pairs: an
# attention-only r=16 adapter (208 M elements) 3.77 s with the worker against 3.59 s without; all
# linear layers (969 M) 4.72 against 4.99 s: even at ~500 M. From 8 cores on, always.
SPARE_CORES = 8
MIN_ELEMENTS = 1 << 29


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _setting() -> str:
    """LORAMERGE_PREMERGE as set ("" where unset): "0" never, anything else always."""
    return os.environ.get("LORAMERGE_PREMERGE", "").strip()


def wanted(device: str) -> bool:
    """Whether `loramerge apply` on `device` starts a worker: LORAMERGE_PREMERGE=1 (any device) or
    0 decides; unset, a CPU merge on a machine with MIN_CORES usable cores or more (and below
    SPARE_CORES, begin() asks for MIN_ELEMENTS to merge)."""
    setting = _setting()
    if setting:
        return setting != "0"
    return cpu_merge(device) and usable_cores() >= MIN_CORES


def cpu_merge(device: str) -> bool:
    """Whether `--device` will mean the CPU, told without importing torch: "cpu", or "auto" with a
    torch build for neither CUDA nor ROCm, or no GPU device node on this machine."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    spec = importlib.util.find_spec("torch")
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except (AttributeError, TypeError, OSError):
        return False
    builds = {k: v for k, v in re.findall(r"^(cuda|hip)\s*(?::[^=\n]*)?=\s*(\S+)", text, re.M)}
    if builds.get("cuda", "None") == "None" and builds.get("hip", "None") == "None":
        return True
    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def result_key(job, a, b, factors, out_dtype) -> list | None:
    """The key a worker's result for `job` must carry to be the tensor this process would compute
    from A [R, in], B [out, R] and the factors [R] (its kernel's inputs) into `out_dtype`; None
    where the worker cannot have it (a W that is not a half-precision tensor in a file)."""
    import torch

    from .kernel_inputs import as_array, digest
    from .premerge_worker import HALF, w_key
    src = job.source
    if src.dtype not in HALF or src.offset is None:
        return None
    out_kind = str(out_dtype).removeprefix("torch.")
    return [w_key(src.file, src.offset, src.nbytes, HALF[src.dtype], src.shape, out_kind),
            digest(as_array(a), as_array(b), as_array(factors.to(torch.float64)))]


@dataclass
class _Result:
    slot: int
    key: list
    redone: int


class Premerge:
    """A running worker: its process, the ring it writes results into, what it has said."""

    def __init__(self, proc: subprocess.Popen, ring_fd: int):
        self._proc, self._ring_fd = proc, ring_fd
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self.targets: list[str] | None = None   # what it may merge ("ready")
        self._slot_bytes = 0
        self._mem: mmap.mmap | None = None
        self._results: dict[str, _Result] = {}
        self.early_names: set[str] = set()    # results the head start wrote into the output
        self._skipped: set[str] = set()
        self._position: dict[str, int] = {}   # the order's names, by place
        self._blocked = False
        self._gone = False                     # failed, or its output closed
        self._ended = False                    # every name of the order settled
        self._heard = time.monotonic()
        self._ordered = False                  # want() has sent the order
        self._closed = False
        self.taken = 0
        self.dropped = 0                       # results given back for the worker to compute again
        self._listener = threading.Thread(target=self._listen, name="loramerge-premerge", daemon=True)
        self._listener.start()

    # -- the worker's messages -------------------------------------------------------------
    def _listen(self) -> None:
        try:
            for line in self._proc.stdout:
                msg = json.loads(line)
                with self._cond:
                    self._heard = time.monotonic()
                    self._on(msg)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        with self._cond:
            self._gone = True
            self._cond.notify_all()

    def _on(self, msg: dict) -> None:
        if "ready" in msg:
            self.targets = msg["ready"]
            self._slot_bytes = msg["slot_bytes"]
            if msg["slots"] and not self._closed:
                self._mem = mmap.mmap(self._ring_fd, msg["slots"] * self._slot_bytes, prot=mmap.PROT_READ)
        elif "done" in msg:
            # a result for a name outside the order was computed before the worker had it: the
            # worker frees that slot itself, so it is neither kept nor ever given back from here
            if not self._ordered or msg["done"] in self._position:
                self._results[msg["done"]] = _Result(msg["slot"], msg["key"], msg["redone"])
            self._blocked = False
        elif "skip" in msg:
            self._skipped.add(msg["skip"])
        elif "blocked" in msg:
            self._blocked = True
        elif "failed" in msg:
            self._gone = True
        elif "end" in msg:
            self._ended = True

    def _send(self, **msg) -> None:
        with self._send_lock:
            try:
                self._proc.stdin.write(json.dumps(msg) + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):
                pass  # it is gone: what it holds is not taken

    # -- the merge's side -----------------------------------------------------------------------
    def want(self, names: list[str]) -> None:
        """The merge's order: the names it may take, in the order it takes them (once; waits for
        the worker's "ready", which comes before it imports numba)."""
        with self._cond:
            self._cond.wait_for(lambda: self.targets is not None or self._gone, timeout=READY_SECONDS)
            offered = set(self.targets or ()) - self.early_names
            order = [n for n in names if n in offered]
            self._position = {n: i for i, n in enumerate(order)}
            self._ordered = True
            # what it holds for names outside the order, it frees itself on reading the order
            self._results = {n: r for n, r in self._results.items() if n in self._position}
            self._blocked = False  # a wait for a slot from before the order says nothing now
            self._send(order=order)  # under the lock: no done is taken for the old state meanwhile

    def expects(self, name: str) -> bool:
        """Whether the worker may deliver `name` (in the order, offered by it)."""
        return name in self._position

    def take(self, job, a, b, factors, out_dtype, out):
        """(out holding the merged tensor, elements the worker evaluated in float64) if the
        worker's result for `job` is the one this process would compute (result_key); else None."""
        import torch

        name = job.name
        if name not in self._position or out is None:
            return None
        key = result_key(job, a, b, factors, out_dtype)
        if key is None:
            return None
        got = self._wait(name)
        if got is None:
            return None
        if got.key != key:
            self._send(release=got.slot, name=name)
            return None
        mem = self._mem
        if mem is None:  # closed meanwhile: the merge is ending anyway
            return None
        n = out.numel() * out.element_size()
        dst = out.view(torch.uint8).reshape(-1).numpy()
        dst[:] = memoryview(mem)[got.slot * self._slot_bytes: got.slot * self._slot_bytes + n]
        self._send(release=got.slot, name=name)
        self.taken += 1
        return out, got.redone

    # -- the head start's side (writers/headstart.py), before the merge has planned -----------
    def early(self, name: str, stop: threading.Event) -> _Result | None:
        """The worker's result for `name` once it comes, for the head start to write before the
        plan exists; None if the worker skips it, is gone, the merge has sent its order, or
        `stop` is set. The result stays in its slot until written_early() or the order."""
        with self._cond:
            while True:
                if self._ordered or self._gone or stop.is_set() or (self.targets is not None and self._mem is None):
                    return None
                got = self._results.get(name)
                if got is not None:
                    return got
                if name in self._skipped:
                    return None
                if self._blocked and self._results:
                    return None  # the ring is full of results for later: this one cannot come now
                self._cond.wait(0.05)

    def wait_targets(self, stop: threading.Event) -> list[str]:
        """The names the worker may merge, in the order it merges them (empty if it says none,
        fails, or `stop` comes first)."""
        with self._cond:
            while self.targets is None and not self._gone and not stop.is_set():
                self._cond.wait(0.05)
            return list(self.targets or ())

    def skipped(self, name: str) -> bool:
        """Whether the worker left `name` to the merge (a non-finite or undecided element)."""
        with self._cond:
            return name in self._skipped

    def ring_bytes(self, got: _Result, start: int, end: int) -> memoryview:
        """Bytes [start, end) of a result; OSError once the ring is closed."""
        mem = self._mem
        if mem is None:
            raise OSError("the premerge worker's ring is closed")
        at = got.slot * self._slot_bytes
        return memoryview(mem)[at + start: at + end]

    def written_early(self, name: str, got: _Result) -> None:
        """The head start wrote the result into the output: its slot goes back, and the merge
        never waits for the name (it confirms what was written itself, or computes it)."""
        with self._cond:
            if self._results.get(name) is got:
                del self._results[name]
            self.early_names.add(name)
        self._send(release=got.slot, name=name)

    def _wait(self, name: str) -> _Result | None:
        with self._cond:
            while True:
                got = self._results.pop(name, None)
                if got is not None or name in self._skipped or self._gone or self._ended or self._mem is None:
                    return got
                if time.monotonic() - self._heard > STALL_SECONDS:
                    self._gone = True
                    self._proc.kill()  # stuck: its cores are the merge's now
                    return None
                if self._blocked and self._results:
                    # the worker needs a slot for what the merge waits for, and every slot holds a
                    # result for later: give back the latest (it computes that one again in turn)
                    late = max(self._results, key=lambda n: self._position[n])
                    self._send(drop=self._results.pop(late).slot, name=late)
                    self._blocked = False
                    self.dropped += 1
                self._cond.wait(0.5)

    def close(self) -> None:
        """End the worker (its input closed; killed if it lingers), its pipes and the ring. Once;
        a mapping a compute thread still copies from (a merge interrupted mid-tensor) is left to
        the process's end."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._gone = True
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.close()
        # killed, not waited for: it holds nothing the merge needs, and its own exit (numba's and
        # its threads' teardown) took ~0.4 s of the CLI's wall on the H200 machine
        self._proc.kill()
        self._proc.wait()
        self._listener.join(timeout=1.0)  # its pipe's end came with the process's
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdout.close()
        with self._cond:
            mem, self._mem = self._mem, None
        if mem is not None:
            with contextlib.suppress(BufferError):
                mem.close()
        os.close(self._ring_fd)


def begin(base, adapters, *, weights=None, dtype: str = "auto", device: str = "auto", accum: str = "float32",
          dry_run: bool = False, revision: str | None = None, ring_bytes: int | None = None) -> Premerge | None:
    """A worker for `loramerge apply BASE ADAPTER OUT`, or None where it is not wanted (wanted())
    or cannot help: a dry run, more than one adapter, a dtype the kernel does not write, no numba
    (or LORAMERGE_NO_KERNEL), no memfd. For a merge on a GPU, only the head start writes its
    results, while torch imports (pipeline.run then asks it for nothing more: the GPU outpaces
    it). ring_bytes: the most its results may hold (default RING_BYTES, at most an eighth of the
    memory available). accum: apply's first pass (the worker evaluates as the merge would: the same bits either way,
    and the same count of elements evaluated again)."""
    if (not wanted(device) or dry_run or len(adapters) != 1
            or (weights is not None and len(weights) != 1) or dtype not in ("auto", "bfloat16", "float16")
            or not hasattr(os, "memfd_create") or os.environ.get("LORAMERGE_NO_KERNEL")
            or importlib.util.find_spec("numba") is None):
        return None
    try:
        base, adapter = hub.cached(base, "base", revision), hub.cached(adapters[0], "adapter", revision)
        if base is None or adapter is None or not (Path(adapter) / "adapter_config.json").is_file():
            return None
        files = weight_files(Path(base))
    except (OSError, ValueError):
        return None  # the merge reports whatever is wrong with the inputs
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    if (not _setting() and usable_cores() < SPARE_CORES
            and merge_elements(files, Path(adapter)) < MIN_ELEMENTS):
        return None
    try:
        fd = os.memfd_create("loramerge-premerge")
    except OSError:
        return None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "loramerge.engine.premerge_worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(fd,), text=True,
                                bufsize=1)
    except OSError:
        os.close(fd)
        return None
    try:
        pre = Premerge(proc, fd)
    except RuntimeError:  # no thread to be had: no worker
        proc.kill()
        proc.wait()
        os.close(fd)
        return None
    pre._send(base=str(base), adapter=str(adapter), weight=1.0 if weights is None else float(weights[0]),
              dtype=dtype, first32=accum == "float32", ring_fd=fd,
              ring_bytes=ring_bytes if ring_bytes is not None else min(RING_BYTES, available_memory() // 8))
    return pre


def merge_elements(files: list[Path], adapter: Path) -> int:
    """The elements of the base's 2-D half-precision tensors the adapter's names touch (the head
    start's guess, which may count too many, never too few for PEFT's names): the worker's work.
    0 where the headers cannot be read (the merge reports why) or the adapter is no safetensors
    file (the worker would merge nothing)."""
    try:
        names = adapter_names(adapter)
        if names is None:
            return 0
        touched = touched_by([names])
        return sum(v["shape"][0] * v["shape"][1] for f in files for k, v in raw_header(f)[0].items()
                   if v.get("dtype") in ("BF16", "F16") and len(v.get("shape", ())) == 2 and touched(k))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return 0


@contextlib.contextmanager
def running(base, adapters, **options):
    """begin() for the block (the worker, or None), closed at its end however it ends."""
    pre = None
    try:
        with signals.deferred():  # a signal between the worker's start and `pre` would orphan it
            pre = begin(base, adapters, **options)
        yield pre
    finally:
        if pre is not None:
            pre.close()
