"""A slow machine's import, simulated (issue 15): the premerge worker and the head start begun as the
CLI begins them, SECONDS of sleep where the CLI would import torch, then `loramerge.apply` in-process.
Prints what the head start hashed before the plan, what the writer moved past, the premerged count
and the writer's wait for the manifest's hash. Compare two codes by running it under each one's
PYTHONPATH from a directory that holds no `loramerge` package.

    LORAMERGE_PREMERGE=1 python bench/sim_slow_import.py BASE ADAPTER OUT SECONDS   # OUT: new
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from loramerge.engine import premerge
from loramerge.writers import headstart


def main(base: str, adapter: str, out: str, seconds: str) -> None:
    t0 = time.perf_counter()
    pre = premerge.begin(base, [adapter], device="cpu")
    head = headstart.begin(base, [adapter], Path(out), premerge=pre)
    time.sleep(float(seconds))
    hashed = sum(s.hashed[1] for s in head.shards if s.hashed) if head is not None else 0
    from loramerge import apply  # (imports torch: after the sleep, as the CLI's import would be)
    try:
        r = apply(base, [adapter], out, device="cpu", _head_start=head, _premerge=pre)
    finally:
        if head is not None:
            head.close()
        if pre is not None:
            pre.close()
    print(json.dumps({"hashed_before_plan_gb": hashed / 1e9, "early_gb": r.bytes_early / 1e9,
                      "premerged": r.tensors_premerged, "merged": r.tensors_merged,
                      "hash_wait": r.stage_seconds.get("hash_wait"), "wall": time.perf_counter() - t0}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
