"""Who set the pace, second by second: a merge's writes, hashes and buffer waits on one timeline.

apply's stage_seconds say how busy each thread was in all; this says when. It runs one merge in
this process with the writer, the hashing threads and the buffer pools wrapped to log each event,
and prints per-interval totals: bytes the writer wrote or copied, bytes moved past (a head start's),
bytes hashed, read and merged, the seconds the writer, the reader and the math were busy, and the
seconds the reader and the math waited for a free buffer. With --head-start the head start is
begun first and given --start-delay seconds (what the CLI's imports would give it).

  python bench/trace_pipeline.py BASE ADAPTER OUT [--device cpu] [--head-start] [--start-delay 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loramerge import api  # noqa: E402  (imports torch: the head start below gets a delay instead)
from loramerge.engine import pipeline, threads  # noqa: E402
from loramerge.readers import checkpoint  # noqa: E402
from loramerge.writers import headstart, manifest, safetensors  # noqa: E402

T0 = time.perf_counter()
EVENTS: list[tuple] = []   # (kind, start, end, nbytes, file)
_lock = threading.Lock()


def _log(kind, start, end, nbytes, file=""):
    with _lock:
        EVENTS.append((kind, start - T0, end - T0, nbytes, file))


def _wrap_writer():
    write, copy_range = safetensors.SafetensorsWriter.write, safetensors.SafetensorsWriter.copy_range

    def traced_write(self, name, t, defer_hash=False):
        t0 = time.perf_counter()
        out = write(self, name, t, defer_hash)
        _log("write", t0, time.perf_counter(), t.numel() * t.element_size(), self.path.name)
        return out

    def traced_copy(self, name, src, offset, nbytes):
        t0, early = time.perf_counter(), self.bytes_early
        copy_range(self, name, src, offset, nbytes)
        moved = self.bytes_early - early
        _log("copy", t0, time.perf_counter(), nbytes - moved, self.path.name)
        if moved:
            _log("skip", t0, t0, moved, self.path.name)

    safetensors.SafetensorsWriter.write, safetensors.SafetensorsWriter.copy_range = traced_write, traced_copy


def _wrap_hasher():
    update = manifest.Hasher.update

    def traced_update(self, data):
        t0 = time.perf_counter()
        update(self, data)
        _log("hash", t0, time.perf_counter(), len(data), str(id(self)))

    manifest.Hasher.update = traced_update


def _wrap_pool():
    get = threads.BufferPool.get

    def traced_get(self, stop):
        t0 = time.perf_counter()
        out = get(self, stop)
        # the reader waits for a read buffer (the math's pace), the math for an output buffer (the writer's)
        who = "read" if "reader" in threading.current_thread().name else "out"
        _log(f"pool-{who}", t0, time.perf_counter(), 0)
        return out

    threads.BufferPool.get = traced_get


def _wrap_stages():
    """The math (one compute call per tensor) and the reader's reads, each with its bytes."""
    compute, read = pipeline.compute, checkpoint.Checkpoint.read

    def traced_compute(job, *args, **kw):
        t0 = time.perf_counter()
        out = compute(job, *args, **kw)
        _log("math", t0, time.perf_counter(), job.nbytes)
        return out

    def traced_read(self, ref, out=None):
        t0 = time.perf_counter()
        t = read(self, ref, out)
        _log("read", t0, time.perf_counter(), ref.nbytes)
        return t

    pipeline.compute, checkpoint.Checkpoint.read = traced_compute, traced_read


def summary(step: float) -> list[dict]:
    end = max(e[2] for e in EVENTS)
    bins = [{"t": round(i * step, 2), "write_gb": 0.0, "copy_gb": 0.0, "skip_gb": 0.0, "hash_gb": 0.0,
             "read_gb": 0.0, "math_gb": 0.0,
             "read_pool_wait_s": 0.0, "out_pool_wait_s": 0.0, "writer_busy_s": 0.0, "math_busy_s": 0.0,
             "reader_busy_s": 0.0} for i in range(int(end / step) + 1)]

    def spread(start, stop, key, amount):
        """Add `amount` over [start, stop] to the bins it overlaps, in proportion."""
        if stop <= start:
            bins[int(start / step)][key] += amount
            return
        for i in range(int(start / step), int(stop / step) + 1):
            lo, hi = max(start, i * step), min(stop, (i + 1) * step)
            if hi > lo:
                bins[i][key] += amount * (hi - lo) / (stop - start)

    for kind, start, stop, nbytes, _ in EVENTS:
        if kind in ("write", "copy", "skip", "hash", "read", "math"):
            spread(start, stop, kind + "_gb", nbytes / 1e9)
        if kind in ("write", "copy"):
            spread(start, stop, "writer_busy_s", stop - start)
        if kind in ("read", "math"):
            spread(start, stop, {"read": "reader", "math": "math"}[kind] + "_busy_s", stop - start)
        if kind.startswith("pool-"):
            spread(start, stop, kind[5:] + "_pool_wait_s", stop - start)
    return [{k: round(v, 2) if isinstance(v, float) else v for k, v in b.items()} for b in bins]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--head-start", action="store_true")
    ap.add_argument("--start-delay", type=float, default=4.0)
    ap.add_argument("--step", type=float, default=0.5)
    ap.add_argument("--events", type=Path, help="write every event here (JSON lines)")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    _wrap_writer()
    _wrap_hasher()
    _wrap_pool()
    _wrap_stages()
    global T0
    T0 = time.perf_counter()
    head = headstart.begin(args.base, [args.adapter], args.out) if args.head_start else None
    if head is not None:
        time.sleep(args.start_delay)
    try:
        report = api.apply(args.base, [args.adapter], args.out, device=args.device, _head_start=head)
    finally:
        if head is not None:
            head.close()
    wall = time.perf_counter() - T0
    print(json.dumps({"wall": round(wall, 2), "bytes_early": report.bytes_early,
                      "stage_seconds": {k: round(v, 2) for k, v in report.stage_seconds.items()}}))
    for b in summary(args.step):
        print(json.dumps(b))
    if args.events:
        args.events.write_text("\n".join(json.dumps(e) for e in EVENTS))


if __name__ == "__main__":
    main()
