"""The premerge worker: merges a plain PEFT LoRA adapter's targets with the fused kernel in a
process of its own that never imports torch, while `loramerge apply` is still importing it.

Why a process: a cold CPU apply spends its first seconds importing torch (1.2 s on the 2-core VM,
4.2-4.8 s on the H200 machine) and then numba (another ~2 s there) before its first merged tensor;
both are serial CPU work under one GIL, so no thread of the same process can overlap them
(bench/RESULTS.md). This process needs numba only: it reads the adapter and the base's headers
itself, predicts the merge's order, and fills a shared ring of result slots (a memfd the parent
passed) ahead of the merge. The parent (engine/premerge.py) takes a result only where its own job
is the same computation: the same base bytes, and A, B and factors whose digests
(kernel_inputs.digest) equal those of the arrays its own kernel would be fed; everything else it
merges itself, as without a worker. What this module guesses (names, scales, order) can only make
it useless, never wrong.

Protocol (one JSON object per line). Parent -> worker on stdin: the configuration first (base,
adapter, weight, dtype, first32, ring_fd, ring_bytes), then
{"order": [names]} (the merge's own order, once planned), {"release": slot, "name": name} (taken)
and {"drop": slot, "name": name} (not taken: compute it again when its turn comes), each about
that name only (a slot reused since is left alone); end of input ends the worker.
Worker -> parent on stdout: {"ready": [names], "slots": n, "slot_bytes": b} (what it may merge,
in its predicted order), then per target {"done": name, "slot": k, "key": ..., "redone": n} or
{"skip": name}, {"blocked": name} when a result waits for a free slot, {"end": true} when every
target of the order is settled, {"failed": message} if the worker stops on an error.

Standard library, numpy and numba only; a dead worker costs the parent nothing but its help.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..readers.peft_config import pattern_value
from ..readers.prefetch import weight_files
from ..readers.st_header import raw_header
from ..writers.direct import pread_full
from .kernel_inputs import digest
from .schedule import write_order

PREFIX = "base_model.model."
HALF = {"BF16": "bfloat16", "F16": "float16"}
FACTOR_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.uint16}
ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


@dataclass
class Target:
    """One base tensor the worker may merge: W's place, the factors' places, the factor."""

    name: str
    file: Path
    offset: int            # absolute, of W's first byte
    shape: tuple[int, int]
    w_kind: str            # "bfloat16" | "float16"
    out_kind: str
    a: tuple               # (file, absolute offset, safetensors dtype, shape)
    b: tuple
    factor: float

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 2


def file_key(path: Path) -> list:
    """What identifies a base file's bytes here and in the parent: device, inode, size, mtime and
    ctime (a copy that restores the mtime, `cp -p` or `touch -r`, still changes the ctime)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def w_key(path: Path, offset: int, nbytes: int, w_kind: str, shape, out_kind: str) -> list:
    """A result's inputs apart from the factors: W's file, place, format and shape, the output's
    format. JSON-shaped, so the parent compares it as it comes."""
    return [file_key(path), offset, nbytes, w_kind, list(shape), out_kind]


def plan(config: dict) -> list[Target]:
    """The targets of a single plain PEFT LoRA adapter on a safetensors base, in the merge's
    predicted order (schedule.write_order over the base's shards, the output laid out like the
    base). Empty where anything is beyond it: the parent then merges everything itself."""
    adapter = Path(config["adapter"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if (cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("fan_in_fan_out")
            or cfg.get("target_parameters")):
        return []
    a_file = adapter / "adapter_model.safetensors"
    a_header, a_data = raw_header(a_file)
    files = weight_files(Path(config["base"]))
    if not files or any(f.suffix != ".safetensors" for f in files):
        return []
    weight = float(config.get("weight", 1.0))
    dtype = config.get("dtype", "auto")
    pairs = {}
    for key in a_header:
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if key.endswith(tail):
                module = key[:-len(tail)]
                pairs.setdefault(module[len(PREFIX):] if module.startswith(PREFIX) else module, {})[part] = key
    by_file, sizes = [], []
    for f in files:
        header, data = raw_header(f)
        order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        found = []
        for name, info in order:
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            slots = pairs.get(module)
            out = _target(f, data, name, info, slots, a_file, a_header, a_data, cfg, weight, dtype, module)
            found.append(out)
        by_file.append(found)
        sizes.append([_out_nbytes(info, dtype) for _, info in order])
    return [by_file[fi][k] for fi, k in write_order(sizes) if by_file[fi][k] is not None]


def _out_nbytes(info: dict, dtype: str) -> int:
    n = math.prod(info["shape"])
    if dtype in ("bfloat16", "float16") and info["dtype"] in ("F32", "F64", "BF16", "F16"):
        return 2 * n
    if dtype == "float32" and info["dtype"] in ("F32", "F64", "BF16", "F16"):
        return 4 * n
    return info["data_offsets"][1] - info["data_offsets"][0]


def _target(f, data, name, info, slots, a_file, a_header, a_data, cfg, weight, dtype, module):
    if not slots or set(slots) != {"lora_A", "lora_B"} or info["dtype"] not in HALF or len(info["shape"]) != 2:
        return None
    out_kind = HALF[info["dtype"]] if dtype == "auto" else dtype
    if out_kind not in HALF.values():
        return None
    a, b = a_header[slots["lora_A"]], a_header[slots["lora_B"]]
    rows, cols = info["shape"]
    if (len(a["shape"]) != 2 or len(b["shape"]) != 2 or a["shape"][1] != cols or b["shape"][0] != rows
            or a["shape"][0] != b["shape"][1] or a["dtype"] not in FACTOR_DTYPES or b["dtype"] not in FACTOR_DTYPES):
        return None
    r = a["shape"][0]
    rank = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r"))
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha")))
    if rank != r or r == 0:
        return None
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return Target(name, f, data + info["data_offsets"][0], (rows, cols), HALF[info["dtype"]], out_kind,
                  (a_file, a_data + a["data_offsets"][0], a["dtype"], tuple(a["shape"])),
                  (a_file, a_data + b["data_offsets"][0], b["dtype"], tuple(b["shape"])), weight * scale)


def _page(n: int) -> int:
    """n rounded up to whole 4 KiB pages: slots start on page boundaries."""
    return -(-n // 4096) * 4096


def _read(fd_of, ref, wide: bool) -> np.ndarray:
    """A factor as the parent's kernel is fed it (job_math._factored, then kernel_inputs.as_array):
    float64 if either factor is stored so, else float32; exact either way."""
    path, offset, dtype, shape = ref
    n = math.prod(shape) * ITEMSIZE[dtype]
    raw = np.empty(n, np.uint8)
    _pread(fd_of(path), raw, offset)
    x = raw.view(FACTOR_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        x = (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(x, dtype=np.float64 if wide else np.float32)


def _pread(fd: int, buf: np.ndarray, offset: int) -> None:
    """Fill `buf` from the file at `offset` (writers.direct.pread_full); a file that ends first is
    an error (the worker stops: the merge reads it itself and reports what is wrong)."""
    if not pread_full(fd, memoryview(buf).cast("B"), offset):
        raise OSError(f"short read at {offset}")


class Worker:
    def __init__(self, config: dict, ring_fd: int, out=sys.stdout):
        self.config, self.ring_fd, self._out = config, ring_fd, out
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._fds: dict[Path, int] = {}
        self.order: list[str] | None = None
        self.state: dict[str, str] = {}      # name -> pending | ring | taken | skipped
        self.ring: dict[int, str] = {}       # slot -> name held
        self.closed = False
        self._w: np.ndarray | None = None

    def send(self, **msg) -> None:
        self._out.write(json.dumps(msg) + "\n")
        self._out.flush()

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def run(self, stdin=sys.stdin) -> None:
        ring = int(self.config["ring_bytes"])  # (premerge.begin's: RING_BYTES, or less)
        # two slots at least: a target larger than half the ring is left to the parent
        targets = [t for t in plan(self.config) if 2 * _page(t.nbytes) <= ring]
        self.targets = {t.name: t for t in targets}
        self.state = {t.name: "pending" for t in targets}
        slot_bytes = _page(max((t.nbytes for t in targets), default=0))
        n = ring // slot_bytes if slot_bytes else 0
        self.free = list(range(n))
        if n:
            os.ftruncate(self.ring_fd, n * slot_bytes)
            self.mem = mmap.mmap(self.ring_fd, n * slot_bytes)
        self.slot_bytes = slot_bytes
        threading.Thread(target=self._listen, args=(stdin,), daemon=True).start()
        self.send(ready=[t.name for t in targets], slots=n, slot_bytes=slot_bytes)
        if not targets:
            return
        from .kernels import merge_bits  # numba: after "ready", so that the parent never waits for it
        self._merge = merge_bits
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        while not self.closed:
            self._handle(block=False)
            name = self._next()
            if name is None:
                if self.order is not None and all(self.state[x] != "pending" for x in self.order):
                    self.send(end=True)
                    while not self.closed:  # releases until the parent is done
                        self._handle(block=True)
                    return
                self._handle(block=True)
                continue
            slot = self._slot(name)
            if slot is None:
                continue
            # one core left to the parent while it imports torch (one thread, GIL-bound); all of
            # them once it has planned (it sends the order then)
            self._compute(self.targets[name], slot, cores if self.order is not None else max(1, cores - 1),
                          bool(self.config.get("first32", True)))

    def _next(self) -> str | None:
        names = self.order if self.order is not None else list(self.targets)
        return next((x for x in names if self.state.get(x) == "pending"), None)

    def _slot(self, name: str) -> int | None:
        if self.free:
            return self.free.pop()
        self.send(blocked=name)
        self._handle(block=True)
        return None

    def _compute(self, t: Target, slot: int, threads: int, first32: bool) -> None:
        # the base file's identity before its bytes are read: a file changed after this has
        # another mtime (or inode) by the time the parent compares
        where = w_key(t.file, t.offset, t.nbytes, t.w_kind, t.shape, t.out_kind)
        wide = "F64" in (t.a[2], t.b[2])
        a, b = _read(self.fd, t.a, wide), _read(self.fd, t.b, wide)
        f = np.full(a.shape[0], t.factor, np.float64)
        if self._w is None or self._w.size < t.shape[0] * t.shape[1]:
            # one buffer for every W, as the pipeline's pools: a fresh one per tensor costs a page
            # fault per 4 KiB of it
            self._w = np.empty(max(x.shape[0] * x.shape[1] for x in self.targets.values()), np.uint16)
        w16 = self._w[:t.shape[0] * t.shape[1]].reshape(t.shape)
        _pread(self.fd(t.file), w16, t.offset)
        out16 = np.frombuffer(self.mem, np.uint16, t.shape[0] * t.shape[1], slot * self.slot_bytes).reshape(t.shape)
        bad, undecided, redone = self._merge(w16, t.w_kind, a, b, f, t.out_kind, out16, first32, threads=threads)
        del out16
        if bad.any() or undecided.any():  # the parent's own path handles (and reports) these
            self.free.append(slot)
            self.state[t.name] = "skipped"
            self.send(skip=t.name)
            return
        self.ring[slot] = t.name
        self.state[t.name] = "ring"
        self.send(done=t.name, slot=slot, redone=redone,
                  key=[where, digest(a, b, f)])

    def _listen(self, stdin) -> None:
        for line in stdin:
            self._inbox.put(json.loads(line))
        self._inbox.put(None)

    def _handle(self, block: bool) -> None:
        """The parent's messages waiting (at least one if `block`)."""
        while not self.closed:
            try:
                msg = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if msg is None:
                self.closed = True
            elif "order" in msg:
                self.order = [x for x in msg["order"] if x in self.targets]
                wanted = set(self.order)
                for x in msg["order"]:
                    if x not in self.targets:
                        self.send(skip=x)
                for slot, x in list(self.ring.items()):
                    if x not in wanted:  # the parent will never take it
                        self._free(slot, "skipped")
            elif "release" in msg:
                self._free(msg["release"], "taken", msg.get("name"))
            elif "drop" in msg:
                self._free(msg["drop"], "pending", msg.get("name"))

    def _free(self, slot: int, state: str, name: str | None = None) -> None:
        """The slot back, its result's name to `state`; given `name`, only if the slot holds it
        (a message about a slot since reused for another result changes nothing)."""
        held = self.ring.get(slot)
        if held is None or (name is not None and held != name):
            return
        del self.ring[slot]
        self.state[held] = state
        self.free.append(slot)


def main() -> None:
    config = json.loads(sys.stdin.readline())
    worker = Worker(config, int(config["ring_fd"]))
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001 - the parent merges on without it
        worker.send(failed=f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
