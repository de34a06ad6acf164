"""What the manifest's hashing costs (issue 14).

Every output file's sha256 is computed while it is written; a range the kernel copies file to
file (copy_file_range: untouched tensors never enter the process) has to be read back from its
source to be hashed. Three measurements, medians of --runs:

  sha256     hashlib's throughput on one core (the hashing itself; it releases the GIL)
  copy       one --gb GB range: copy_file_range alone vs SafetensorsWriter.copy_range (the same
             copy, with the source range read and hashed on the hashing thread beside it)
  apply      `python -m loramerge apply` end to end on bench_apply's checkpoint (--preset), this
             checkout vs --without (a checkout that writes no manifest), alternating, fsync on

  python bench/bench_manifest.py --without /path/to/checkout-before-manifest
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_apply import build  # noqa: E402


def sha256_rate(runs: int) -> float:
    buf = os.urandom(256 << 20)
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        hashlib.sha256(buf).hexdigest()
        rates.append(len(buf) / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def copy_costs(work: Path, gb: float, runs: int) -> dict:
    src = work / "range.bin"
    n = int(gb * 1e9)
    if not src.exists() or src.stat().st_size != n:
        with open(src, "wb") as f:
            for _ in range(0, n, 64 << 20):
                f.write(os.urandom(min(64 << 20, n - f.tell())))
    from loramerge.writers.safetensors import SafetensorsWriter

    out = {"copy_file_range": [], "copy_range (copy_file_range + sha256 of the source beside it)": []}
    for _ in range(runs):
        for how in out:
            dst = work / "range.out"
            t = time.perf_counter()
            if how == "copy_file_range":
                with open(src, "rb") as fi, open(dst, "wb") as fo:
                    done = 0
                    while done < n:
                        done += os.copy_file_range(fi.fileno(), fo.fileno(), n - done, done)
                    os.fsync(fo.fileno())
            else:
                w = SafetensorsWriter(dst, [("x", "U8", (n,), n)], None)
                w.copy_range("x", src, 0, n)
                w.close(sync=True)
            out[how].append(time.perf_counter() - t)
            dst.unlink()
    return {k: statistics.median(v) for k, v in out.items()}


def apply_runs(base: Path, adapter: Path, work: Path, without: str | None, runs: int) -> dict:
    results: dict[str, list[float]] = {"with manifest": [], "without": []}
    for _ in range(runs):
        for label, path in (("with manifest", str(Path(__file__).resolve().parent.parent)), ("without", without)):
            if path is None:
                continue
            out = work / "out-manifest-bench"
            shutil.rmtree(out, ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": path}
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "loramerge", "apply", str(base), str(adapter), str(out), "-q"],
                           check=True, env=env, cwd=work, stdout=subprocess.DEVNULL)
            results[label].append(time.perf_counter() - t)
            assert (out / "loramerge_manifest.json").exists() == (label == "with manifest")
            shutil.rmtree(out, ignore_errors=True)
    return {k: {"median_s": statistics.median(v), "runs_s": [round(x, 2) for x in v]} for k, v in results.items() if v}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--without", default=None, help="a checkout of loramerge that writes no manifest")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": os.getloadavg()[0],
           "sha256_GBps": round(sha256_rate(args.runs), 3)}
    res["copy_1GB_s"] = {k: round(v, 3) for k, v in copy_costs(args.workdir, args.gb, args.runs).items()}
    base, adapter = build(args.workdir, args.preset, args.rank)
    res["apply"] = apply_runs(base, adapter, args.workdir, args.without, args.runs)
    res["base_bytes"] = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    res["load_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
