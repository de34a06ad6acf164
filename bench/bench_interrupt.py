"""How long Ctrl-C / SIGTERM / SIGHUP take to stop `loramerge apply`, and what they leave behind.

Builds (once, under --workdir) a base whose merge spends seconds inside single tensors: --size
square bf16 weights (default 3 x 12288^2 = 288 M elements each) targeted by an r=16 PEFT adapter,
plus an untouched embedding copied file to file. Then, --runs times per signal, starts
`python -m loramerge apply BASE ADAPTER OUT` as a user would, sends the signal --after seconds
later (into the middle of a tensor's computation or write), and records the time from the signal
to the process's exit, its exit status, and whether anything is left beside OUT.

  python bench/bench_interrupt.py                         # this checkout
  python bench/bench_interrupt.py --pythonpath /old/checkout --label before   # another version

The engine's threads stop within 0.1 s of noticing; one read, computation or write in progress
is not waited for (they are daemon threads of a process that is exiting).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build(workdir: Path, size: int, n: int) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    base, adapter = workdir / f"base-{size}x{n}", workdir / f"adapter-{size}x{n}"
    if (base / "model.safetensors").exists() and (adapter / "adapter_model.safetensors").exists():
        return base, adapter
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {"embed.weight": torch.randn(size // 4, size, generator=g).to(torch.bfloat16)}
    lora = {}
    for i in range(n):
        tensors[f"layers.{i}.proj.weight"] = torch.randn(size, size, generator=g).to(torch.bfloat16)
        lora[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(16, size, generator=g) * 0.01
        lora[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(size, 16, generator=g) * 0.01
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["proj"]}))
    return base, adapter


def one(base: Path, adapter: Path, out_parent: Path, sig: int, after: float, env: dict) -> dict:
    out = out_parent / "merged"
    proc = subprocess.Popen([sys.executable, "-m", "loramerge", "apply", str(base), str(adapter), str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=out_parent)  # not the checkout: -m would import the loramerge beside it
    started = time.monotonic()
    time.sleep(after)
    staged = [n for n in os.listdir(out_parent) if ".loramerge-tmp-" in n]
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate()
    took = time.monotonic() - sent
    left = [n for n in os.listdir(out_parent) if ".loramerge-" in n or n == "merged"]
    for n in left:
        subprocess.run(["rm", "-rf", str(out_parent / n)])
    return {"signal": signal.Signals(sig).name, "sent_after_s": round(sent - started, 3),
            "was_writing": bool(staged), "exit_s": round(took, 3), "status": proc.returncode,
            "left_behind": left, "stderr": err.strip().splitlines()[-1:] if err else []}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/loramerge-bench-interrupt")
    ap.add_argument("--size", type=int, default=12288)
    ap.add_argument("--tensors", type=int, default=3)
    ap.add_argument("--after", type=float, default=4.0, help="seconds between start and signal")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--signals", default="INT,TERM,HUP")
    ap.add_argument("--pythonpath", default=None, help="run the loramerge found here (another checkout)")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--out", default=None, help="append the JSON results to this file")
    args = ap.parse_args()
    work = Path(args.workdir)
    base, adapter = build(work, args.size, args.tensors)
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    results = []
    for _ in range(args.runs):
        for name in args.signals.split(","):
            r = one(base, adapter, runs, getattr(signal, "SIG" + name), args.after, env)
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = {"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "base_bytes": (base / "model.safetensors").stat().st_size, "after_s": args.after,
               "median_exit_s": statistics.median(r["exit_s"] for r in results),
               "max_exit_s": max(r["exit_s"] for r in results),
               "left_behind": sum(bool(r["left_behind"]) for r in results), "runs": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
