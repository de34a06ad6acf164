"""Merge math alone (no I/O): ops.merge_weight on one 1.1B (TinyLlama-shaped) layer's seven LoRA
targets, through the fused CPU kernel and through the torch path, in two regimes:

  bf16-r16   bf16 base, r=16 float32 factors, delta ~1% of W (a typical fine-tune)
  fp16-r256  fp16 base, r=256, delta ~10% of W (large rank and delta: many elements near a
             midpoint of the float32 stage's bound; the case issue 10 asks to keep fast)

Reports per case and path the median wall time of a full layer merge and the share of elements that
needed more than the first evaluation (float64 or exact). To compare code versions, --trees runs
this script from each tree in turn (A B A B ...), so both see the same machine load:

  python bench/bench_rounding.py                          # this tree
  python bench/bench_rounding.py --trees /work/main .     # before/after, interleaved
  python bench/bench_rounding.py --rates                  # each stage's undecided share

On a shared 2-core VM the default two threads run in two speed modes (~3x apart, whichever the
neighbours allow); --threads 1 gives steadier A/B numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]
CASES = {"bf16-r16": ("bfloat16", 16, 0.01), "fp16-r256": ("float16", 256, 0.10)}


def build(case: str, seed: int = 0):
    import torch
    dtype, rank, ratio = CASES[case]
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    tensors = []
    f = torch.full((rank,), 2.0, dtype=torch.float64)  # alpha / r = 2
    for rows, cols in SHAPES:
        w = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
        a = torch.randn(rank, cols, generator=g)
        # delta element std = |b| |a| sqrt(rank) f = ratio * 0.02
        b = torch.randn(rows, rank, generator=g) * (ratio * 0.02 / (rank ** 0.5 * 2.0))
        tensors.append((w, a, b, f, dtype))
    return tensors


def measure(case: str, path: str, runs: int) -> dict:
    import torch
    from loramerge.engine import ops
    tensors = build(case)
    elems = sum(w.numel() for w, *_ in tensors)
    kw = {} if path == "kernel" else {"block_elems": ops.BLOCK_ELEMS_CPU}
    times, fixed = [], 0
    for _ in range(runs):
        fixed = 0
        t0 = time.perf_counter()
        for w, a, b, f, dtype in tensors:
            _, n = ops.merge_weight(w, a, b, f, dtype, **kw)
            fixed += n
        times.append(time.perf_counter() - t0)
    return {"case": case, "path": path, "elements": elems, "median_s": statistics.median(times),
            "runs_s": [round(t, 3) for t in times], "redone_share": fixed / elems,
            "ns_per_element": statistics.median(times) / elems * 1e9, "threads": torch.get_num_threads()}


def rates(case: str) -> dict:
    """Share of elements each stage leaves undecided, stage by stage: the float32 stage on every
    block (lowrank's and the kernel's switches to float64 where most is undecided turned off), the float64
    stage on its own (what goes to exact integer sums), and the fused kernel's float32 pass (what it
    evaluates again in float64) and float64 pass (what goes on to exact integer sums)."""
    import torch
    from loramerge.engine import kernels, lowrank, ops
    tensors = build(case)
    elems = sum(w.numel() for w, *_ in tensors)
    s32 = s64 = sk = sk64 = 0
    dense, lowrank.DENSE_REDO = lowrank.DENSE_REDO, 1.0
    dense_row, kernels.DENSE_ROW = kernels.DENSE_ROW, 1.0
    try:
        for w, a, b, f, dtype in tensors:
            s32 += lowrank.merge(w, a, b, f, dtype, torch.float32, ops.BLOCK_ELEMS_CPU)[1]
            s64 += lowrank.merge(w, a, b, f, dtype, torch.float64, ops.BLOCK_ELEMS_CPU)[1]
            if kernels.AVAILABLE:
                sk += kernels.merge_half(w, a, b, f, dtype, accum=torch.float32)[3]
                sk64 += int(kernels.merge_half(w, a, b, f, dtype, accum=torch.float64)[2].sum())
    finally:
        lowrank.DENSE_REDO, kernels.DENSE_ROW = dense, dense_row
    return {"case": case, "elements": elems, "stage32_undecided": s32 / elems, "stage64_undecided": s64 / elems,
            "kernel32_undecided": sk / elems, "kernel64_undecided": sk64 / elems}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--paths", default="kernel,torch")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--trees", nargs="*", help="run from each of these source trees in turn, interleaved")
    p.add_argument("--rounds", type=int, default=3, help="with --trees: how many A B rounds")
    p.add_argument("--threads", type=int, help="torch (and kernel) threads")
    p.add_argument("--rates", action="store_true", help="print each stage's undecided share and exit")
    args = p.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.rates:
        for case in args.cases.split(","):
            print(json.dumps(rates(case)), flush=True)
        return
    if not args.trees:
        for case in args.cases.split(","):
            for path in args.paths.split(","):
                print(json.dumps(measure(case, path, args.runs)), flush=True)
        return
    results: dict = {}
    for _ in range(args.rounds):
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--cases", args.cases, "--paths",
                                  args.paths, "--runs", str(args.runs)] +
                                 (["--threads", str(args.threads)] if args.threads else []),
                                 env=env, capture_output=True, text=True, check=True, cwd="/")
            for line in out.stdout.splitlines():
                r = json.loads(line)
                results.setdefault((tree, r["case"], r["path"]), []).append(r)
    for (tree, case, path), rs in results.items():
        print(json.dumps({"tree": tree, "case": case, "path": path,
                          "median_s": statistics.median(r["median_s"] for r in rs),
                          "all_s": [r["median_s"] for r in rs],
                          "redone_share": rs[0]["redone_share"]}))


if __name__ == "__main__":
    main()
