"""kernels.merge_half alone, in one process: the imported loramerge's kernels.py (A) against another
tree's copy of it (B), alternated call by call (A B, B A, ...) on the same inputs, so that both see
the same machine load; asserts the same output bytes (and counts) first. Only kernels.py is taken
from the other tree (the rest of the engine is A's), with any engine module the other tree has and
A's lacks (a helper module new in B).

  cd /work/main && T=1 REPS=16 JSON=out.jsonl python /path/to/bench/ab_kernel.py TREE bf16 32 [rank]

  args: TREE, bf16|f16 (W and output), 32|64 (the first pass's accumulation), rank (16);
  env: T threads (1), REPS calls of each (15), JSON file to append the raw times to.
Shape: 14336 x 4096 (an 8B MLP weight), b scaled so that the delta is ~4% of W.
Then the same, interleaved, with the kernel's parallel passes (_rows32, _rows64) stubbed out: the
serial setup around them alone (conversions of A, B and the factors, bounds, allocations).
Both sides are compiled in the process (NUMBA_CACHE_DIR a fresh temp dir unless set): code loaded
from numba's cache measured up to ~25% slower than the same code compiled fresh (RESULTS.md), which
would favour B, compiled fresh from its copy.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="abk_cache_"))  # before numba loads
import torch
torch.set_num_threads(int(os.environ.get("T", "1")))
import loramerge.engine.kernels as A
tmp = tempfile.mkdtemp(prefix="abk_")  # a copy, so that numba's cache of it stays out of the tree
here = os.path.dirname(A.__file__)
for fn in sorted(os.listdir(sys.argv[1] + "/loramerge/engine")):
    if fn.endswith(".py") and not os.path.exists(os.path.join(here, fn)):  # new in B: loaded from B
        shutil.copy(sys.argv[1] + "/loramerge/engine/" + fn, tmp + "/" + fn)
        spec = importlib.util.spec_from_file_location("loramerge.engine." + fn[:-3], tmp + "/" + fn)
        mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
shutil.copy(sys.argv[1] + "/loramerge/engine/kernels.py", tmp + "/kernels.py")
spec = importlib.util.spec_from_file_location("loramerge.engine.kernels_new", tmp + "/kernels.py")
B = importlib.util.module_from_spec(spec); sys.modules[spec.name] = B; spec.loader.exec_module(B)
dt = {"bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[2]]
accum = torch.float64 if sys.argv[3] == "64" else torch.float32
r = int(sys.argv[4]) if len(sys.argv) > 4 else 16
torch.manual_seed(0)
rows, cols = 14336, 4096
w = (torch.randn(rows, cols) * 0.02).to(dt); a = torch.randn(r, cols) * 0.01
b = torch.randn(rows, r) * (0.04 / r ** 0.5); f = torch.full((r,), 2.0)
KT = {"main": [], "new": []}
def wrap(m, name):
    f = m._rows32
    def g(*x):
        t = time.perf_counter(); f(*x); KT[name].append(time.perf_counter() - t)
    m._rows32 = g
wrap(A, "main"); wrap(B, "new")
outs = {}
for name, m in (("main", A), ("new", B)):
    o = torch.empty(rows, cols, dtype=dt); res = m.merge_half(w, a, b, f, dt, out=o, accum=accum)
    outs[name] = (hashlib.sha1(o.view(torch.int16).numpy().tobytes()).hexdigest(), res[3], int(res[2].sum()), int(res[1].sum()))
    print(name, m.__file__, outs[name])
assert outs["main"] == outs["new"], "outputs differ"
o = torch.empty(rows, cols, dtype=dt)
T = {"main": [], "new": []}
for rep in range(int(os.environ.get("REPS", "15"))):
    for name, m in (("main", A), ("new", B)) if rep % 2 == 0 else (("new", B), ("main", A)):
        t = time.perf_counter(); m.merge_half(w, a, b, f, dt, out=o, accum=accum); T[name].append(time.perf_counter() - t)
ratios = [n / m for n, m in zip(T["new"], T["main"])]
print(sys.argv[2:], "main %.1f ms  new %.1f ms  median pair ratio new/main %.3f" % (
    1e3 * statistics.median(T["main"]), 1e3 * statistics.median(T["new"]), statistics.median(ratios)))

for name in KT:
    ks = KT[name][2:]
    big = [x for x in ks if x > 1e-3] or [0]
    print(name, "kernel (rows after probe) median %.1f ms" % (1e3 * statistics.median(big)))

S = {"main": [], "new": []}
for m in (A, B):
    m._rows32 = m._rows64 = lambda *x: None
for rep in range(max(30, int(os.environ.get("REPS", "15")))):
    for name, m in (("main", A), ("new", B)) if rep % 2 == 0 else (("new", B), ("main", A)):
        t = time.perf_counter(); m.merge_half(w, a, b, f, dt, out=o, accum=accum); S[name].append(time.perf_counter() - t)
print(sys.argv[2:], "setup alone (kernel passes stubbed): main %.2f ms  new %.2f ms" % (
    1e3 * statistics.median(S["main"]), 1e3 * statistics.median(S["new"])))

if os.environ.get("JSON"):
    with open(os.environ["JSON"], "a") as fh:
        fh.write(json.dumps({"case": sys.argv[2:], "rows": rows, "cols": cols, "threads": torch.get_num_threads(),
                             "main_ms": [round(1e3 * x, 2) for x in T["main"]], "new_ms": [round(1e3 * x, 2) for x in T["new"]],
                             "median_pair_ratio": statistics.median(ratios), "same_output": outs["main"] == outs["new"],
                             "sha1": outs["main"][0], "setup_main_ms": [round(1e3 * x, 3) for x in S["main"]],
                             "setup_new_ms": [round(1e3 * x, 3) for x in S["new"]]}) + "\n")
