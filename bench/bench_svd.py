"""combine --method svd: the factored SVD (QR of the stacked factors + SVD of the small core)
against a dense SVD of the full delta, on one Llama-3-8B-sized MLP target (4096 x 14336) with
three rank-16 adapters stacked (k = 48) truncated to rank 16.

Each run is a fresh subprocess, so its peak RSS (ru_maxrss) belongs to that method alone; the
reported memory is the peak minus the RSS just before the method starts (the inputs, torch and
the interpreter are excluded). torch allocations are invisible to tracemalloc, hence RSS.

    .venv/bin/python bench/bench_svd.py                 # prints a markdown section
    .venv/bin/python bench/bench_svd.py --dense-runs 1  # quicker
    .venv/bin/python bench/bench_svd.py --dense-runs 0 --threads 1   # factored only, one thread
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

OUT, IN, RANKS, TARGET = 4096, 14336, (16, 16, 16), 16


def child(method: str) -> None:
    import psutil
    import torch

    from loramerge.arithmetic import algebra

    g = torch.Generator().manual_seed(0)
    terms = [algebra.FactorTerm(torch.randn(OUT, r, generator=g) * 0.01, torch.randn(r, IN, generator=g) * 0.01,
                                w * 2.0) for r, w in zip(RANKS, (1.0, -0.5, 0.7))]
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if method == "factored":
        low = algebra.svd(terms, TARGET)
        sigma = low.sigma[:TARGET]
    else:  # what a dense tool does: form the delta, SVD it, keep the top TARGET triplets
        delta = algebra.dense(terms, torch.float32)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        left, right = u[:, :TARGET] * s[:TARGET], vh[:TARGET]
        sigma = s[:TARGET]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_bytes": max(0, peak - rss0),
                      "sigma": [float(x) for x in sigma]}))


def run(method: str, threads: int | None = None) -> dict:
    env = dict(os.environ)
    if threads:
        # On a busy machine torch's multi-threaded kernels lose far more to contention than a
        # 30 ms factored SVD is worth: --threads 1 measures the work, not the scheduler.
        env["OMP_NUM_THREADS"] = str(threads)
    res = subprocess.run([sys.executable, __file__, "--child", method], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--dense-runs", type=int, default=3)
    ap.add_argument("--factored-runs", type=int, default=20)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the measured processes (default: torch's)")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    results = {}
    for method, n in (("factored", args.factored_runs), ("dense", args.dense_runs)):
        runs = [run(method, args.threads) for _ in range(n)]
        if not runs:
            results[method] = None
            continue
        results[method] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "min_seconds": min(r["seconds"] for r in runs),
            "all_seconds": [r["seconds"] for r in runs],
            "peak_mb": statistics.median(r["peak_bytes"] for r in runs) / 1e6,
            "sigma": runs[0]["sigma"],
        }
        print(f"{method}: {results[method]}", file=sys.stderr)
    f, d = results["factored"], results["dense"]
    if not args.dense_runs:  # factored only (e.g. to re-measure it on a quieter machine)
        print(json.dumps(f))
        return
    sig_err = max(abs(a - b) / b for a, b in zip(f["sigma"], d["sigma"]))
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    import torch

    print(f"""
## combine --method svd

Date: {subprocess.run(['date'], capture_output=True, text=True).stdout.strip()}.
Machine: {os.cpu_count()} cores, threads {args.threads or torch.get_num_threads()} (`nproc`: {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}), {cpu.split(':', 1)[-1].strip()}; Python {platform.python_version()}, torch {torch.__version__}, CPU only; cores shared with other jobs, so times are noisy.

One {OUT} x {IN} target (a Llama-3-8B MLP projection), three rank-16 adapters (weights 1, -0.5, 0.7)
stacked to k = 48, truncated to rank 16. Median of {args.factored_runs} (factored) and {args.dense_runs} (dense) runs,
each in a fresh process; memory = peak RSS minus RSS before the method (inputs excluded).

| method | time (s) | peak extra memory (MB) |
|---|---:|---:|
| loramerge factored (QR of [c_i B_i] and [A_i]^T, SVD of the 48 x 48 core; float64 work) | {f['seconds']:.3f} (min {f['min_seconds']:.3f}) | {f['peak_mb']:.1f} |
| dense: form the float32 delta, torch.linalg.svd(full_matrices=False) | {d['seconds']:.1f} (min {d['min_seconds']:.1f}) | {d['peak_mb']:.0f} |
| ratio dense / factored | {d['seconds'] / f['seconds']:.0f}x | {d['peak_mb'] / max(f['peak_mb'], 1e-9):.0f}x |

Both find the same top-16 singular values (max relative difference {sig_err:.1e}; the dense SVD is
float32). Cost: factored O((out + in) k^2 + k^3) time and O((out + in) k) memory; dense
O(out * in * min(out, in)) time and O(out * in) memory.
Runs: factored {', '.join(f'{x:.3f}' for x in f['all_seconds'])} s; dense {', '.join(f'{x:.1f}' for x in d['all_seconds'])} s.

Reproduce: `.venv/bin/python bench/bench_svd.py`
""")


if __name__ == "__main__":
    main()
