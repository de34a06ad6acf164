"""merge_half's speed with numba's code loaded from its cache (what every run but the first gets)
against the same code compiled in the process (a fresh NUMBA_CACHE_DIR), run as separate
processes, alternated: the kernel's first call (cache load or compile) and the median of 8 more.

  python bench/numba_cache_speed.py [bf16|f16] [32|64] [pairs]      # from the tree to measure

Shape as bench/ab_kernel.py (14336 x 4096, r=16), one thread.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

if os.environ.get("_CHILD"):
    import torch
    torch.set_num_threads(1)
    from loramerge.engine import kernels
    dt = {"f16": torch.float16, "bf16": torch.bfloat16}[sys.argv[1]]
    accum = torch.float64 if sys.argv[2] == "64" else torch.float32
    torch.manual_seed(0)
    r, rows, cols = 16, 14336, 4096
    w = (torch.randn(rows, cols) * 0.02).to(dt); a = torch.randn(r, cols) * 0.01
    b = torch.randn(rows, r) * (0.04 / r ** 0.5); f = torch.full((r,), 2.0)
    o = torch.empty(rows, cols, dtype=dt)
    t = time.perf_counter()
    kernels.merge_half(w, a, b, f, dt, out=o, accum=accum)
    first = time.perf_counter() - t
    ts = []
    for _ in range(8):
        t = time.perf_counter(); kernels.merge_half(w, a, b, f, dt, out=o, accum=accum); ts.append(time.perf_counter() - t)
    print("%.1f %.1f" % (1e3 * first, 1e3 * statistics.median(ts)))
    sys.exit(0)

case = sys.argv[1:3] or ["f16", "64"]
pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
env = {**os.environ, "_CHILD": "1", "PYTHONPATH": os.getcwd()}
subprocess.run([sys.executable, __file__, *case], env=env, check=True, capture_output=True)  # the cache, warm
for _ in range(pairs):
    for name in ("cached", "compiled"):
        e = dict(env) if name == "cached" else {**env, "NUMBA_CACHE_DIR": tempfile.mkdtemp(prefix="nbc_")}
        out = subprocess.run([sys.executable, __file__, *case], env=e, check=True, capture_output=True, text=True)
        first, med = out.stdout.split()
        print(f"{name:9s} {case}: first call {first} ms, median {med} ms", flush=True)
