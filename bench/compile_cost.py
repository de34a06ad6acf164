"""Seconds numba spends compiling the CPU merge kernels on their first call (what a user's first
CPU merge after an install pays), in this process, with an empty cache of its own.

  python bench/compile_cost.py [bf16|f16] [32|64]

Run it on the tree to measure; compare variants of engine/kernels.py by running it on each.
"""
import os
import sys
import tempfile
import time

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-cold-")  # before numba is imported

import torch  # noqa: E402

from loramerge.engine import jit_time, kernels  # noqa: E402

dt = {"bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[1] if len(sys.argv) > 1 else "bf16"]
accum = torch.float64 if len(sys.argv) > 2 and sys.argv[2] == "64" else torch.float32
torch.manual_seed(0)
r, rows, cols = 16, 512, 256
w = (torch.randn(rows, cols) * 0.02).to(dt)
a, b, f = torch.randn(r, cols) * 0.01, torch.randn(rows, r) * (0.04 / r ** 0.5), torch.full((r,), 2.0)
t0 = time.perf_counter()
kernels.merge_half(w, a, b, f, dt, out=torch.empty(rows, cols, dtype=dt), accum=accum)
print(f"first call {time.perf_counter() - t0:.2f} s, of which numba compiling {jit_time.seconds():.2f} s")
