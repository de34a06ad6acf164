"""FP8 path benchmark: loramerge apply on an FP8 block-scaled checkpoint vs copying the same bytes.

Builds (once, cached under --workdir) a Llama-shaped checkpoint whose linear weights are
float8_e4m3fn with float32 weight_scale_inv per 128x128 block (quantization_config fp8, as
DeepSeek-V3 ships), in ~1 GB shards, and an r=16 all-linear PEFT adapter, then runs, alternating,
--runs times each:
  fp8        python -c loramerge.apply(BASE, ADAPTER, OUT): every linear weight dequantized exactly,
             merged in float64 band by band, requantized with fresh scales (stays FP8)
  fp8-bf16   the same with dtype='bfloat16': a plain bf16 checkpoint (writes twice the bytes)
  floor      cat of each shard into OUT, then `sync` of those files (read once, write once, durable)
and reports medians of wall time and peak anonymous memory, and fp8 / floor. On the CPU the FP8
path is a fused numba kernel (engine/fp8_kernel.py); the methods fp8-torch and fp8-bf16-torch run
the same merges with LORAMERGE_NO_KERNEL=1, i.e. the torch path GPUs take (the CPU path before the
kernel), for an interleaved before/after; the output files' sha256 (from loramerge_manifest.json)
of a method and its -torch twin are compared: `identical_bytes`.

  python bench/bench_fp8.py                                   # 'small' (0.4 GB), CPU
  python bench/bench_fp8.py --preset dsv3 --device cuda       # DeepSeek-V3-sized layers on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_apply import TARGETS, log, measure  # noqa: E402

PRESETS = {
    # hidden, intermediate, layers, kv width, vocab
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, kv=64, vocab_size=1000),
    "small": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, kv=512, vocab_size=32000),
    # DeepSeek-V3's hidden and MoE-free intermediate sizes (one dense layer is ~0.46 GB of FP8)
    "dsv3": dict(hidden_size=7168, intermediate_size=18432, num_hidden_layers=16, kv=1024, vocab_size=129280),
}

SCRIPT = r"""
import json, sys, loramerge
base, adapter, out, device, dtype = sys.argv[1:6]
r = loramerge.apply(base, adapter, out, device=device, dtype=dtype, overwrite=True)
import torch
print("STAGES " + json.dumps(r.stage_seconds))
print("GPUMEM", torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
"""


def shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["kv"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def build(work: Path, preset: str, rank: int, device: str) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from loramerge.codecs import fp8

    base, adapter = work / f"fp8-{preset}", work / f"fp8-adapter-{preset}-r{rank}"
    if (base / "DONE").exists() and (adapter / "DONE").exists():
        return base, adapter
    for d in (base, adapter):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    c = PRESETS[preset]
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16",
               hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
               num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["hidden_size"] // 128,
               num_key_value_heads=c["kv"] // 128 or 1, head_dim=128, vocab_size=c["vocab_size"],
               rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu",
               quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [128, 128]})
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator(device=device).manual_seed(0)
    shards, cur, size = [], {}, 0
    for name, shape in shapes(c):
        if len(shape) == 1:
            cur[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            w = torch.randn(shape, generator=g, device=device).mul_(0.02)
            if name.rsplit(".", 2)[-2] in TARGETS:
                q, s = fp8.quantize(w, (128, 128))
                cur[name], cur[name + "_scale_inv"] = q.cpu(), s.cpu()
            else:
                cur[name] = w.to(torch.bfloat16).cpu()
        size += sum(t.numel() * t.element_size() for t in (cur[name], cur.get(name + "_scale_inv", cur[name])))
        if size >= 1_000_000_000:
            shards.append(cur)
            cur, size = {}, 0
    shards.append(cur)
    weight_map, total = {}, 0
    for k, sd in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(base / fname), metadata={"format": "pt"})
        for n, t in sd.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        log(f"  wrote {fname}")
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(str(adapter))
    lora = {}
    for name, shape in shapes(c):
        if len(shape) == 2 and name.rsplit(".", 2)[-2] in TARGETS:
            mod = "base_model.model." + name[: -len(".weight")]
            lora[mod + ".lora_A.weight"] = (torch.randn(rank, shape[1], generator=g, device=device) / shape[1] ** 0.5).cpu()
            lora[mod + ".lora_B.weight"] = (torch.randn(shape[0], rank, generator=g, device=device) * 1e-3).cpu()
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (base / "DONE").touch()
    (adapter / "DONE").touch()
    return base, adapter


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    ap.add_argument("--device", default="cpu", help="loramerge --device (and where the fixture is built)")
    ap.add_argument("--methods", default="fp8,fp8-bf16,floor")
    ap.add_argument("--results", type=Path, default=None, help="write the JSON results here")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    log(f"building FP8 {args.preset} checkpoint in {args.workdir} (cached)")
    base, adapter = build(args.workdir, args.preset, args.rank, "cuda" if "cuda" in args.device else "cpu")
    shards = sorted(base.glob("*.safetensors"))
    nbytes = sum(p.stat().st_size for p in shards)
    methods = args.methods.split(",")
    results = {m: {"wall": [], "anon": [], "gpu": []} for m in methods}
    stages: dict[str, list] = {}
    hashes: dict[str, dict] = {}
    for run in range(args.runs):
        for m in methods[run % len(methods):] + methods[:run % len(methods)]:
            out = args.workdir / f"out-{m}"
            shutil.rmtree(out, ignore_errors=True)
            stdout = ""
            if m.startswith("fp8"):
                dtype = "bfloat16" if m.startswith("fp8-bf16") else "auto"
                env = {**os.environ, "LORAMERGE_NO_KERNEL": "1"} if m.endswith("-torch") else None
                wall, anon, stdout = measure([sys.executable, "-c", SCRIPT, str(base), str(adapter), str(out),
                                              args.device, dtype], env=env)
                stages.setdefault(m, []).append(json.loads(stdout.split("STAGES ", 1)[1].splitlines()[0]))
                files = json.loads((out / "loramerge_manifest.json").read_text())["files"]
                hashes.setdefault(m, {k: v["sha256"] for k, v in files.items()})
            else:
                out.mkdir()
                script = "; ".join(f"cat '{s}' > '{out / s.name}'" for s in shards)
                wall, anon, _ = measure(["sh", "-c", script + "; sync " + " ".join(f"'{out / s.name}'" for s in shards)])
            gpu = int(stdout.split("GPUMEM ", 1)[1].split()[0]) if "GPUMEM " in stdout else 0
            for k, v in (("wall", wall), ("anon", anon), ("gpu", gpu)):
                results[m][k].append(v)
            log(f"run {run + 1} {m:9s} wall {wall:7.2f} s   peak anon {anon / 2**20:8.0f} MiB   peak GPU {gpu / 2**30:6.2f} GiB")
            shutil.rmtree(out, ignore_errors=True)
    med = {m: {k: statistics.median(v[k]) for k in ("wall", "anon", "gpu")} for m, v in results.items()}
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "preset": args.preset, "bytes": nbytes, "runs": args.runs, "device": args.device, "medians": med,
        "raw": results,
        "stage_seconds_median": {m: {k: statistics.median(s[k] for s in v) for k in v[0]} for m, v in stages.items()},
    }
    if "floor" in med:
        for m in med:
            if m != "floor":
                summary[f"{m}_wall_vs_floor"] = med[m]["wall"] / med["floor"]["wall"]
    summary["identical_bytes"] = {m: hashes[m] == hashes[m + "-torch"] for m in hashes if m + "-torch" in hashes}
    print(json.dumps(summary, indent=2))
    if args.results:
        args.results.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
