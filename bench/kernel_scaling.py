"""How the CPU merge kernel scales with threads on this machine, against the machine's own
compute scaling (a float32 torch matmul) and with the writer's hashing threads running beside it.

  python bench/kernel_scaling.py [--threads 1,2,4,8,16] [--hashers 4] [--reps 7] [--json OUT]

Prints the machine's CPU facts (os.cpu_count, affinity, cgroup cpu.max, torch's default thread
count, numba's threading layer), then per thread count the median time of kernels.merge_half on
one 8B MLP weight (14336 x 4096 bf16, r=16, float32 first pass), elements per ns, and the speed-up
over one thread; the same for a 4096^3 float32 matmul; then merge_half at the largest thread count
while H threads run hashlib.sha256 over 64 MiB buffers (the manifest's hashing during a merge).
"""
import argparse
import hashlib
import json
import os
import statistics
import threading
import time

import torch


def facts() -> dict:
    f = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
         "torch_threads_default": torch.get_num_threads()}
    for p in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        if os.path.exists(p):
            f[p] = open(p).read().strip()
    try:
        info = open("/proc/cpuinfo").read()
        f["model"] = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        f["siblings"] = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("siblings"))
        f["cpu_cores"] = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("cpu cores"))
        f["sha_ni"] = " sha_ni" in info
    except (OSError, StopIteration):
        pass
    return f


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2,4,8,12,16")
    ap.add_argument("--hashers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {"facts": facts()}
    print(out["facts"])
    from loramerge.engine import kernels
    from loramerge.engine.rounding_kernel import numba
    torch.manual_seed(0)
    rows, cols, r = 14336, 4096, 16
    w = (torch.randn(rows, cols) * 0.02).bfloat16()
    a = torch.randn(r, cols) * 0.01
    b = torch.randn(rows, r) * (0.04 / r ** 0.5)
    fac = torch.full((r,), 2.0)
    o = torch.empty(rows, cols, dtype=torch.bfloat16)
    x = torch.randn(4096, 4096)
    merge = lambda: kernels.merge_half(w, a, b, fac, torch.bfloat16, out=o)  # noqa: E731
    out["numba_layer"] = None
    rowsout = []
    for t in [int(s) for s in args.threads.split(",")]:
        torch.set_num_threads(t)
        km = timed(merge, args.reps)
        try:  # raises until a parallel numba kernel ran (the merge kernel's threads are Python's now)
            out["numba_layer"] = numba.threading_layer()
        except ValueError:
            out["numba_layer"] = None
        mm = timed(lambda: x @ x, args.reps)
        rowsout.append({"threads": t, "merge_s": km, "elem_per_ns": rows * cols / km / 1e9,
                        "matmul_s": mm, "gflops": 2 * 4096 ** 3 / mm / 1e9})
        r0 = rowsout[0]
        print(f"threads {t:2d}: merge_half {1e3 * km:7.1f} ms ({rows * cols / km / 1e9:.2f} elem/ns, x{r0['merge_s'] / km:.1f});"
              f"  matmul {1e3 * mm:7.1f} ms ({2 * 4096 ** 3 / mm / 1e9:.0f} GFLOP/s, x{r0['matmul_s'] / mm:.1f})", flush=True)
    out["scaling"] = rowsout
    print("numba threading layer:", out["numba_layer"])
    buf = os.urandom(1 << 20) * 64
    t = time.perf_counter()
    for _ in range(4):
        hashlib.sha256(buf)
    out["sha256_gbps_one_thread"] = 4 * len(buf) / (time.perf_counter() - t) / 1e9
    print("sha256 one thread: %.2f GB/s" % out["sha256_gbps_one_thread"])
    stop = threading.Event()
    done = [0]

    def burn():
        while not stop.is_set():
            hashlib.sha256(buf)
            done[0] += len(buf)
    hs = [threading.Thread(target=burn, daemon=True) for _ in range(args.hashers)]
    for h in hs:
        h.start()
    t0 = time.perf_counter()
    km = timed(merge, args.reps)
    stop.set()
    for h in hs:
        h.join()
    out["with_hashers"] = {"hashers": args.hashers, "threads": torch.get_num_threads(), "merge_s": km,
                           "hash_gbps": done[0] / (time.perf_counter() - t0) / 1e9}
    print(f"with {args.hashers} hashing threads at {torch.get_num_threads()} threads: merge_half {1e3 * km:.1f} ms;"
          f" hashing {out['with_hashers']['hash_gbps']:.2f} GB/s in all")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
