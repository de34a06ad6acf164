"""Side-by-side benchmark: loramerge apply vs PEFT merge_and_unload vs copying the same bytes.

Builds (once, cached under --workdir) a Llama-shaped bf16 checkpoint with random weights in ~1 GB
shards and an r=16 all-linear PEFT adapter, then runs, alternating, --runs times each:
  loramerge  python -m loramerge apply BASE ADAPTER OUT (fsyncs its files)
  peft       transformers from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  floor      cat of each shard into OUT, then `sync` of those files (read once, write once, durable)
and, when named in --methods:
  cli        the command as users run it, a cold process: python -m loramerge apply BASE ADAPTER OUT -q
  cli:K=V+K2=V2  the same with environment variables set (an A/B in one run: --methods cli,cli:OMP_NUM_THREADS=12)
  torchpath  loramerge with LORAMERGE_NO_KERNEL=1: the torch fallback an install without numba runs
  cat        cat of each shard into OUT without sync (the page-cache copy)
  ddirect    dd of each shard into OUT with O_DIRECT writes and fsync (oflag=direct conv=fsync): the
             floor for a writer that bypasses the page cache, as loramerge does where it can
  verify     python -m loramerge verify BASE ADAPTER MERGED --no-outputs on a merged output made once
             before the timed runs (reads twice apply's bytes; the issue's target: <= 1.5x apply)
and reports medians of wall time and of peak anonymous memory (RssAnon, polled every 10 ms, so
the page cache of mmapped files is not counted), and the ratios the issues set targets for.

  python bench/bench_apply.py                      # 1.1B, 3 runs each, CPU
  python bench/bench_apply.py --preset 8b --device cuda --peft-device cuda   # on a GPU machine
  python bench/bench_apply.py --methods loramerge,cli,torchpath,peft,floor,cat   # every variant
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def llama_shapes(c: dict) -> list[tuple[str, tuple[int, int]]]:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"])
    shapes = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return shapes


def build(work: Path, preset: str, rank: int, gen_device: str = "cpu") -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    base, adapter = work / f"base-{preset}", work / f"adapter-{preset}-r{rank}"
    if (base / "DONE").exists() and (adapter / "DONE").exists():
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    cfg = dict(PRESETS[preset], architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16",
               rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0,
               hidden_act="silu", bos_token_id=1, eos_token_id=2)
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator(device=gen_device).manual_seed(0)
    shapes = llama_shapes(cfg)
    shards, cur, size = [], {}, 0
    for name, shape in shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float32, device=gen_device).mul_(0.02).to(torch.bfloat16).cpu() \
            if len(shape) == 2 else torch.ones(shape, dtype=torch.bfloat16)
        cur[name] = t
        size += t.numel() * 2
        if size >= 1_000_000_000:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    weight_map, total = {}, 0
    for k, sd in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(base / fname), metadata={"format": "pt"})
        for n, t in sd.items():
            weight_map[n] = fname
            total += t.numel() * 2
        log(f"  wrote {fname}")
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    # the adapter: PEFT's own config class writes adapter_config.json; factors with PEFT's key names
    from peft import LoraConfig

    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(str(adapter))
    lora = {}
    for name, shape in shapes:
        if len(shape) == 2 and name.rsplit(".", 2)[-2] in TARGETS:
            mod = "base_model.model." + name[: -len(".weight")]
            lora[mod + ".lora_A.weight"] = (torch.randn(rank, shape[1], generator=g, device=gen_device)
                                            / shape[1] ** 0.5).cpu()
            lora[mod + ".lora_B.weight"] = (torch.randn(shape[0], rank, generator=g, device=gen_device) * 1e-3).cpu()
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (base / "DONE").touch()
    (adapter / "DONE").touch()
    return base, adapter


PEFT_SCRIPT = r"""
import sys, torch, transformers, peft
base, adapter, out, device = sys.argv[1:5]
m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
m = peft.PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(out)
if torch.cuda.is_available():
    print("GPUMEM", torch.cuda.max_memory_allocated())
"""

LORAMERGE_SCRIPT = r"""
import json, sys, loramerge
base, adapter, out, device = sys.argv[1:5]
r = loramerge.apply(base, adapter, out, device=device, overwrite=True)
import torch
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
from loramerge.engine.timeline import since_start
print("STAGES " + json.dumps(dict(r.stage_seconds, at_script_end=since_start())))
print("GPUMEM", gpu)
"""


def measure(cmd: list[str], env=None) -> tuple[float, int, str]:
    """(wall seconds, peak RssAnon bytes over the process tree's main process, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # the pipes are drained meanwhile: a command that prints more than a pipe holds (--json)
    # would otherwise block on its write and never exit
    streams = {}
    drain = threading.Thread(target=lambda: streams.update(zip(("out", "err"), p.communicate())), daemon=True)
    drain.start()
    peak = 0
    status = f"/proc/{p.pid}/status"
    while p.poll() is None:
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    drain.join()
    out, err = streams["out"], streams["err"]
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return wall, peak, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    ap.add_argument("--device", default="cpu", help="loramerge --device")
    ap.add_argument("--peft-device", default="cpu", help="device_map for PEFT's model load")
    ap.add_argument("--methods", default="loramerge,peft,floor")
    ap.add_argument("--results", type=Path, default=None, help="write the JSON results here")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    log(f"building {args.preset} checkpoint in {args.workdir} (cached)")
    t = time.perf_counter()
    # random weights drawn on a GPU wherever there is one (the 8B's 8 G values take a minute on 16
    # CPU cores, device time on a lent machine); the values differ from a CPU draw, not their kind
    import torch
    base, adapter = build(args.workdir, args.preset, args.rank, "cuda" if torch.cuda.is_available() else "cpu")
    log(f"  ready in {time.perf_counter() - t:.1f} s")
    shards = sorted(base.glob("*.safetensors"))
    nbytes = sum(p.stat().st_size for p in shards)
    py = sys.executable
    methods = args.methods.split(",")
    results = {m: {"wall": [], "anon": [], "gpu": []} for m in methods}
    stages, cli_stages = [], {m: [] for m in methods if m.split(":")[0] == "cli"}
    for run in range(args.runs):
        order = methods[run % len(methods):] + methods[:run % len(methods)]  # rotate who goes first
        for m in order:
            out = args.workdir / f"out-{m.split(':')[0]}"
            shutil.rmtree(out, ignore_errors=True)
            stdout = ""
            if m in ("loramerge", "torchpath"):
                env = dict(os.environ, LORAMERGE_NO_KERNEL="1") if m == "torchpath" else None
                wall, anon, stdout = measure([py, "-c", LORAMERGE_SCRIPT, str(base), str(adapter), str(out),
                                              args.device], env=env)
                if m == "loramerge":
                    # at_*: seconds since the process started; at_exit: the wall, i.e. when it was gone
                    stages.append(dict(json.loads(stdout.split("STAGES ", 1)[1].splitlines()[0]), at_exit=wall))
            elif m == "verify":
                merged = args.workdir / "out-verify-src"
                if not (merged / "DONE").exists():
                    shutil.rmtree(merged, ignore_errors=True)
                    measure([py, "-c", LORAMERGE_SCRIPT, str(base), str(adapter), str(merged), args.device])
                    (merged / "DONE").touch()
                wall, anon, stdout = measure([py, "-m", "loramerge", "verify", str(base), str(adapter), str(merged),
                                              "--no-outputs", "--device", args.device])
            elif m.split(":")[0] == "cli":
                env = dict(os.environ, **dict(kv.split("=", 1) for kv in m.split(":", 1)[1].split("+"))) \
                    if ":" in m else None
                wall, anon, stdout = measure([py, "-m", "loramerge", "apply", str(base), str(adapter), str(out),
                                              "--device", args.device, "-q", "--json"], env=env)
                report = json.loads(stdout)
                # early_gb: what the head start wrote while the process started (writers/headstart.py);
                # premerged: tensors taken from the premerge worker (engine/premerge.py)
                cli_stages[m].append(dict(report["stage_seconds"], at_exit=wall,
                                          early_gb=report.get("bytes_early", 0) / 1e9,
                                          premerged=report.get("tensors_premerged", 0)))
            elif m == "peft":
                wall, anon, stdout = measure([py, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out), args.peft_device])
            else:
                out.mkdir()
                script = "; ".join(f"cat '{s}' > '{out / s.name}'" for s in shards)
                if m == "ddirect":
                    script = "; ".join(f"dd if='{s}' of='{out / s.name}' bs=64M oflag=direct conv=fsync status=none"
                                       for s in shards)
                if m == "floor":
                    script += "; sync " + " ".join(f"'{out / s.name}'" for s in shards)
                wall, anon, _ = measure(["sh", "-c", script])
            gpu = int(stdout.split("GPUMEM ", 1)[1].split()[0]) if "GPUMEM " in stdout else 0
            results[m]["wall"].append(wall)
            results[m]["anon"].append(anon)
            results[m]["gpu"].append(gpu)
            log(f"run {run + 1} {m:9s} wall {wall:7.2f} s   peak anon {anon / 2**20:8.0f} MiB   "
                f"peak GPU {gpu / 2**30:6.2f} GiB")
            shutil.rmtree(out, ignore_errors=True)
            if args.results:  # keep what we have if a time limit cuts the run short
                args.results.write_text(json.dumps({"partial": True, "raw": results, "stages": stages}, indent=2))

    med = {m: {k: statistics.median(v[k]) for k in ("wall", "anon", "gpu")} for m, v in results.items()}
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "preset": args.preset, "bytes": nbytes, "runs": args.runs, "device": args.device,
        "medians": med, "raw": results,
        "loramerge_stage_seconds_median": {k: statistics.median(s[k] for s in stages) for k in stages[0]} if stages else {},
        **{f"{m}_stage_seconds_median": {k: statistics.median(s[k] for s in st) for k in st[0]}
           for m, st in cli_stages.items() if st},
    }
    if "verify" in med and "loramerge" in med:
        summary["verify_vs_apply"] = med["verify"]["wall"] / med["loramerge"]["wall"]
    for name in ("loramerge", "torchpath", *cli_stages):
        if name not in med:
            continue
        lm, key = med[name], "" if name == "loramerge" else name + "_"
        if "peft" in med:
            summary[key + "wall_vs_peft"] = lm["wall"] / med["peft"]["wall"]
            summary[key + "anon_vs_peft"] = lm["anon"] / med["peft"]["anon"]
        if "floor" in med:
            summary[key + "wall_vs_floor"] = lm["wall"] / med["floor"]["wall"]
        if "cat" in med:
            summary[key + "wall_vs_cat"] = lm["wall"] / med["cat"]["wall"]
        if "ddirect" in med:
            summary[key + "wall_vs_ddirect"] = lm["wall"] / med["ddirect"]["wall"]
    shutil.rmtree(args.workdir / "out-verify-src", ignore_errors=True)
    print(json.dumps(summary, indent=2))
    if args.results:
        args.results.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
