"""Where a CPU apply's math time goes, per merged tensor: one in-process `loramerge.apply` with
timers around the compute worker's call (engine.compute), ops.merge_weight, the fused kernel
(kernels.merge_half), its numpy core (kernels.merge_bits: the threaded passes), and the torch
path's redo of undecided rows (lowrank.merge_rows64). Sums exclude each function's first call
(numba's cache loading, tables).

  python bench/time_merge_parts.py BASE ADAPTER [--json FILE]     # from the tree to measure

Run it from two trees in turn (PYTHONPATH=. from each) to compare the serial work around the
kernel: `outside` = compute - merge_half, `setup` = merge_half - its passes.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import shutil
import tempfile
import time

import loramerge
from loramerge.engine import kernels, lowrank, ops, pipeline

T: dict[str, list[float]] = collections.defaultdict(list)


def timed(mod, name: str, key: str) -> None:
    f = getattr(mod, name)

    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[key].append(time.perf_counter() - t)
    setattr(mod, name, g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("--json")
    args = ap.parse_args()
    compute = importlib.import_module("loramerge.engine.job_math")
    timed(pipeline, "compute", "compute")
    timed(compute.ops, "merge_weight", "merge_weight")
    timed(kernels, "merge_half", "merge_half")
    timed(kernels, "merge_bits", "passes")
    timed(lowrank, "merge_rows64", "redo_rows")
    assert compute.ops is ops
    out = tempfile.mkdtemp(prefix="merge_parts_")
    try:
        t = time.perf_counter()
        loramerge.apply(args.base, args.adapter, out + "/o", sync=False, device="cpu")
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(out)
    s = {k: sum(v[1:]) for k, v in T.items()}
    res = {"tree": loramerge.__file__.rsplit("/loramerge/", 1)[0], "wall_s": round(wall, 3),
           "tensors": len(T["compute"]), "first_merge_half_ms": round(1e3 * T["merge_half"][0], 1),
           **{k + "_s": round(v, 4) for k, v in s.items()},
           "outside_merge_half_s": round(s["compute"] - s["merge_half"], 4),
           "setup_s": round(s["merge_half"] - s["passes"], 4)}
    print(json.dumps(res))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
