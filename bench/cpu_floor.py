"""What any merge of BASE + ADAPTER must spend on this machine's CPUs, against `cat` of the same
bytes: a lower bound for the CLI's wall that no pipeline can beat, to judge a target like issue
15's `<= 2x cat` on the 2-core VM.

  python bench/cpu_floor.py BASE ADAPTER [--runs 3] [--json FILE]

Measured in one run, medians of --runs:
  cat        `cat` of each shard into a fresh file (no sync): wall, and its user+sys CPU; twice,
             `cat_fresh` first, then `cat` into the page cache the first one's deletion freed
             (what bench_apply.py's `cat` measures; the two differ on a ballooned VM, below)
  sha256     hashlib.sha256 over the shards' bytes, already in memory (the manifest hashes every
             output byte; the merged tensors' bytes differ, their count does not)
  kernel     kernels.merge_bits on every LoRA target, one thread (thread-seconds: the float32
             pass with its bound, as apply runs it on CPU), inputs read beforehand
  start      cold `python -c` walls: nothing; `import numpy, numba` plus the kernel's first call
             (numba's cache loaded: what a process that merges must do before its first tensor);
             `import torch`
  cli        the CLI itself, cold, for reference: python -m loramerge apply BASE ADAPTER OUT -q
and the bound: the CPU work a merge cannot skip, kernel + sha256 + start (without torch), spread
perfectly over the usable cores (no I/O cost counted at all: an O_DIRECT writer's copies are
cheaper than cat's), as a multiple of cat's wall; the same with torch's import (the CLI's path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loramerge.engine import kernels
from loramerge.readers.prefetch import weight_files
from loramerge.readers.st_header import raw_header


def shards(base: Path) -> list[Path]:
    return weight_files(base)  # the base's shards as the merge finds them (index, single file)


def load(path: Path, name: str, entry: dict, start: int) -> np.ndarray:
    """One tensor: float32 values (F32), or its 16-bit patterns (BF16, F16; as_f32 converts)."""
    lo, hi = entry["data_offsets"]
    raw = np.fromfile(path, dtype=np.uint8, count=hi - lo, offset=start + lo)
    dt = entry["dtype"]
    if dt == "F32":
        return raw.view(np.float32).reshape(entry["shape"])
    if dt in ("BF16", "F16"):
        return raw.view(np.uint16).reshape(entry["shape"])
    raise SystemExit(f"{path}: {name}: dtype {dt} not handled here")


def as_f32(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return bits.view(np.float16).astype(np.float32)
    return bits


def kernel_seconds(base: Path, adapter: Path) -> tuple[float, int, int]:
    """Thread-seconds of merge_bits (one thread) over every target, elements merged, targets."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    rank, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    scale = alpha / rank ** 0.5 if cfg.get("use_rslora") else alpha / rank
    ad_path = adapter / "adapter_model.safetensors"
    ad, ad_start = raw_header(ad_path)
    where = {}
    for p in shards(base):
        h, s = raw_header(p)
        where.update((k, (p, v, s)) for k, v in h.items())
    total, elems, n = 0.0, 0, 0
    warm = False
    for k, v in ad.items():
        if not k.endswith("lora_A.weight"):
            continue
        target = k.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        p, entry, s = where[target]
        kind = {"BF16": "bfloat16", "F16": "float16"}[entry["dtype"]]
        w16 = np.ascontiguousarray(load(p, target, entry, s))
        kb = k.replace("lora_A", "lora_B")
        a = np.ascontiguousarray(as_f32(load(ad_path, k, v, ad_start), v["dtype"]))
        b = np.ascontiguousarray(as_f32(load(ad_path, kb, ad[kb], ad_start), ad[kb]["dtype"]))
        factors = np.full(a.shape[0], scale, dtype=np.float64)
        out = np.empty_like(w16)
        if not warm:  # numba's cache loaded: counted under `start`, not here
            kernels.merge_bits(w16[:2], kind, a, b[:2], factors, kind, out[:2], True, 1)
            warm = True
        t = time.thread_time()
        kernels.merge_bits(w16, kind, a, b, factors, kind, out, True, 1)
        total += time.thread_time() - t
        elems += w16.size
        n += 1
    return total, elems, n


def sha_seconds(base: Path) -> tuple[float, int]:
    total, nbytes = 0.0, 0
    for p in shards(base):
        data = p.read_bytes()
        t = time.thread_time()
        hashlib.sha256(data).digest()
        total += time.thread_time() - t
        nbytes += len(data)
        del data
    return total, nbytes


def cold(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t


def cat_once(base: Path, out: Path) -> tuple[float, float]:
    out.mkdir()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    for p in shards(base):
        with open(out / p.name, "wb") as f:
            subprocess.run(["cat", str(p)], stdout=f, check=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def cli_once(base: Path, adapter: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loramerge", "apply", str(base), str(adapter), str(out), "-q"], check=True)
    wall = time.perf_counter() - t
    shutil.rmtree(out)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="cpu_floor_", dir=args.base.parent))
    warm_kernel = ("import numpy as np, numba; from loramerge.engine import kernels; "
                   "w = np.zeros((2, 8), np.uint16); a = np.ones((4, 8), np.float32); "
                   "kernels.merge_bits(w, 'bfloat16', a, np.ones((2, 4), np.float32), np.ones(4), 'bfloat16', "
                   "np.empty_like(w), True, 1)")
    runs = {k: [] for k in ("cat_fresh", "cat_fresh_cpu", "cat", "cat_cpu", "python", "numba_start", "torch_import", "cli", "sha256", "kernel")}
    try:
        for _ in range(args.runs):
            runs["python"].append(cold("pass"))
            runs["numba_start"].append(cold(warm_kernel))
            runs["torch_import"].append(cold("import torch"))
            runs["cli"].append(cli_once(args.base, args.adapter, tmp / "cli"))
            # twice: on a VM whose free memory goes back to the host (virtio_balloon's free page
            # reporting), a page-cache copy into fresh pages faults each one on the host first,
            # and the second copy reuses the pages the first one's deletion just freed (the
            # CLI's O_DIRECT output frees none). bench_apply.py's `cat` follows its `floor`, the
            # second case.
            for key in ("cat_fresh", "cat"):
                w, c = cat_once(args.base, tmp / "cat")
                runs[key].append(w)
                runs[key + "_cpu"].append(c)
            runs["sha256"].append(sha_seconds(args.base)[0])
            k, elems, n = kernel_seconds(args.base, args.adapter)
            runs["kernel"].append(k)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    nbytes = sum(p.stat().st_size for p in shards(args.base))
    work = med["kernel"] + med["sha256"] + med["numba_start"]
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": cores,
           "load": os.getloadavg(), "bytes": nbytes, "elements_merged": elems, "targets": n,
           "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
           "median": {k: round(v, 3) for k, v in med.items()},
           "kernel_ns_per_element_1thread": round(1e9 * med["kernel"] / elems, 3),
           "sha256_GB_per_s": round(nbytes / med["sha256"] / 1e9, 3),
           "floor_no_torch_s": round(work / cores, 3),
           "floor_with_torch_s": round((work + med["torch_import"]) / cores, 3)}
    for cat in ("cat", "cat_fresh"):
        res[f"floor_no_torch_vs_{cat}"] = round(work / cores / med[cat], 2)
        res[f"floor_with_torch_vs_{cat}"] = round((work + med["torch_import"]) / cores / med[cat], 2)
        res[f"cli_vs_{cat}"] = round(med["cli"] / med[cat], 2)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
