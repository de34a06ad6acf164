"""Side-by-side benchmark for MoE experts (PEFT target_parameters): loramerge apply vs PEFT
merge_and_unload vs copying the same bytes.

Builds (once, cached under --workdir) a Qwen3-MoE-shaped bf16 checkpoint with random weights,
stored as the Hub stores it (one tensor per expert: mlp.experts.N.gate_proj/up_proj/down_proj),
or with --layout fused as transformers holds it in memory (mlp.experts.gate_up_proj [E, 2I, H],
down_proj [E, H, I]; save_pretrained(save_original_format=False)), in ~1 GB shards, and an r=16
PEFT adapter on the experts (target_parameters gate_up_proj, down_proj) and attention (q/k/v/o),
with PEFT's key names (nested base_layer) and config. Then, alternating, --runs times each:
  loramerge  python -c loramerge.apply(BASE, ADAPTER, OUT) (fsyncs its files)
  peft       transformers from_pretrained + PeftModel.from_pretrained + merge_and_unload +
             save_pretrained (which converts the experts back to the checkpoint's layout)
  floor      cat of each shard into OUT, then `sync` of those files
reporting medians of wall time and of peak anonymous memory (RssAnon, 10 ms polls). After the
timed runs, one expert tensor of each output is compared (bf16: loramerge rounds once, PEFT twice,
so they may differ by 1 ulp; more would be a wrong merge).

  python bench/bench_moe.py                                  # ~1 GB, 16 experts, 3 runs, CPU
  python bench/bench_moe.py --layout fused
  python bench/bench_moe.py --preset 30b-layer --device cuda --peft-device cuda   # on a GPU machine
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
from bench_apply import LORAMERGE_SCRIPT, PEFT_SCRIPT, log, measure  # noqa: E402

PRESETS = {
    # ~1.0 GB bf16: 16 layers x 16 experts, I=512, H=1024
    "1g": dict(hidden_size=1024, moe_intermediate_size=512, num_experts=16, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000),
    # Qwen3-30B-A3B's expert shapes (128 experts, I=768, H=2048), 4 layers: ~6 GB
    "30b-layer": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_hidden_layers=4,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936),
    "tiny": dict(hidden_size=128, moe_intermediate_size=64, num_experts=8, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1000),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tensors(c: dict, fused: bool):
    """(name, shape) of every tensor, in checkpoint order."""
    h, i, e, hd = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                (p + "mlp.gate.weight", (e, h))]
        if fused:
            out += [(p + "mlp.experts.gate_up_proj", (e, 2 * i, h)), (p + "mlp.experts.down_proj", (e, h, i))]
        else:
            for x in range(e):
                out += [(p + f"mlp.experts.{x}.gate_proj.weight", (i, h)), (p + f"mlp.experts.{x}.up_proj.weight", (i, h)),
                        (p + f"mlp.experts.{x}.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def build(work: Path, preset: str, layout: str, rank: int) -> tuple[Path, Path]:
    import torch
    import transformers
    from peft import LoraConfig
    from safetensors.torch import save_file

    base, adapter = work / f"moe-{preset}-{layout}", work / f"moe-{preset}-adapter-r{rank}"
    if (base / "DONE").exists() and (adapter / "DONE").exists():
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    c = PRESETS[preset]
    cfg = transformers.Qwen3MoeConfig(**c, intermediate_size=4 * c["hidden_size"], num_experts_per_tok=8,
                                      tie_word_embeddings=False, max_position_embeddings=4096)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    (base / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}, indent=2))
    g = torch.Generator().manual_seed(0)
    shards, cur, size = [], {}, 0
    for name, shape in tensors(c, layout == "fused"):
        t = torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16) if len(shape) > 1 else \
            torch.ones(shape, dtype=torch.bfloat16)
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
        weight_map.update({n: fname for n in sd})
        total += sum(t.numel() * 2 for t in sd.values())
        log(f"  wrote {fname}")
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (base / "DONE").touch()
    if not (adapter / "DONE").exists():
        shutil.rmtree(adapter, ignore_errors=True)
        adapter.mkdir(parents=True)
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ATTENTION, task_type="CAUSAL_LM",
                   target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]).save_pretrained(str(adapter))
        h, i, e, hd = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["head_dim"]
        q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        lora = {}

        def put(mod, out_f, in_f, rows):
            lora[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rows, in_f, generator=g) / in_f ** 0.5
            lora[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, rows, generator=g) * 1e-3

        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            for name, (o, n) in zip(ATTENTION, [(q, h), (kv, h), (kv, h), (h, q)]):
                put(p + "self_attn." + name, o, n, rank)
            put(p + "mlp.experts.base_layer", 2 * i, h, rank * e)  # gate_up_proj: registered first, innermost
            put(p + "mlp.experts", h, i, rank * e)                   # down_proj
        save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
        (adapter / "DONE").touch()
    return base, adapter


def compare(work: Path, base: Path, adapter: Path, layout: str, rank: int, experts: int) -> dict:
    """Layer 0's gate_up_proj of expert 3 in loramerge's and PEFT's outputs (both kept from the
    last run) against the float64 merge computed here from the files (PEFT's ParamWrapper formula),
    in bf16 ulps at each element's magnitude: a correct rounding is <= 0.5."""
    import torch
    from safetensors.torch import load_file

    def read(out, name):
        index = out / "model.safetensors.index.json"
        fname = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
        from safetensors import safe_open

        with safe_open(str(out / fname), "pt") as f:
            return f.get_tensor(name)

    e = 3
    if layout == "fused":
        get = lambda out: read(out, "model.layers.0.mlp.experts.gate_up_proj")[e]  # noqa: E731
    else:
        get = lambda out: torch.cat([read(out, f"model.layers.0.mlp.experts.{e}.{p}.weight")  # noqa: E731
                                     for p in ("gate_proj", "up_proj")])
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    a = lora["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].double()
    b = lora["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"].double()
    a_e, b_e = a.reshape(experts, rank, -1)[e], b.reshape(b.shape[0], rank, experts)[:, :, e]
    ref = get(base).double() + 2.0 * (b_e @ a_e)   # lora_alpha = 2r: scale 2
    ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs())[1] - 8)

    def err(out):
        return float(((get(out).double() - ref).abs() / ulp).max())

    return {"tensor": f"model.layers.0 expert {e} gate_up", "max_ulps_vs_float64": {
        "loramerge": err(work / "out-loramerge"), "peft": err(work / "out-peft")}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1g", choices=sorted(PRESETS))
    ap.add_argument("--layout", default="per-expert", choices=["per-expert", "fused"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    ap.add_argument("--device", default="cpu", help="loramerge --device")
    ap.add_argument("--peft-device", default="cpu", help="device_map for PEFT's model load")
    ap.add_argument("--methods", default="loramerge,peft,floor")
    ap.add_argument("--results", type=Path, default=None, help="write the JSON results here")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base, adapter = build(args.workdir, args.preset, args.layout, args.rank)
    log(f"checkpoint {base} ready in {time.perf_counter() - t:.1f} s")
    shards = sorted(base.glob("*.safetensors"))
    nbytes = sum(p.stat().st_size for p in shards)
    py, methods = sys.executable, args.methods.split(",")
    results = {m: {"wall": [], "anon": []} for m in methods}
    for run in range(args.runs):
        for m in methods[run % len(methods):] + methods[:run % len(methods)]:  # rotate who goes first
            out = args.workdir / f"out-{m}"
            shutil.rmtree(out, ignore_errors=True)
            if m == "loramerge":
                wall, anon, _ = measure([py, "-c", LORAMERGE_SCRIPT, str(base), str(adapter), str(out), args.device])
            elif m == "peft":
                wall, anon, _ = measure([py, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out), args.peft_device])
            else:
                out.mkdir()
                script = "; ".join(f"cat '{s}' > '{out / s.name}'" for s in shards)
                wall, anon, _ = measure(["sh", "-c", script + "; sync " + " ".join(f"'{out / s.name}'" for s in shards)])
            results[m]["wall"].append(wall)
            results[m]["anon"].append(anon)
            log(f"run {run + 1} {m:9s} wall {wall:7.2f} s   peak anon {anon / 2**20:8.0f} MiB")
            if args.results:
                args.results.write_text(json.dumps({"partial": True, "raw": results}, indent=2))
    med = {m: {k: statistics.median(v[k]) for k in ("wall", "anon")} for m, v in results.items()}
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "preset": args.preset, "layout": args.layout, "config": PRESETS[args.preset], "bytes": nbytes,
        "largest_tensor_bytes": max(2 * _numel(s) for _, s in tensors(PRESETS[args.preset], args.layout == "fused")),
        "runs": args.runs, "device": args.device, "medians": med, "raw": results,
    }
    if "loramerge" in med and "peft" in med:
        summary.update(wall_vs_peft=med["loramerge"]["wall"] / med["peft"]["wall"],
                       anon_vs_peft=med["loramerge"]["anon"] / med["peft"]["anon"])
        summary["check"] = compare(args.workdir, base, adapter, args.layout, args.rank,
                                   PRESETS[args.preset]["num_experts"])
    if "loramerge" in med and "floor" in med:
        summary["wall_vs_floor"] = med["loramerge"]["wall"] / med["floor"]["wall"]
    for m in methods:
        shutil.rmtree(args.workdir / f"out-{m}", ignore_errors=True)
    print(json.dumps(summary, indent=2))
    if args.results:
        args.results.write_text(json.dumps(summary, indent=2))


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
