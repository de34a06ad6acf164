"""ONNX folding at scale: `loramerge export-onnx GRAPH OUT --adapter A --base BASE` on a Llama-8B-shaped
graph with external data, against copying the graph's files (the floor), side by side.

Builds (once, cached under --workdir) without torch.onnx: a float16 graph whose initializers have
Llama shapes and are stored the way the TorchScript exporter stores them (Linear weights transposed
to [in, out] under names like `onnx::MatMul_17`, consumed by MatMul nodes named after their module,
the embedding by Gather), all in one external data file with 64 KiB-aligned large tensors (as
onnx.save writes); a float16 safetensors checkpoint with the same values in PyTorch's layout (so
the fold must find every target by content); and an r=16 PEFT adapter on all seven projections.
Then runs, alternating which goes first, --runs times each:
  fold   python -m loramerge export-onnx GRAPH OUT/model.onnx --adapter A --base BASE
  floor  cat of the .onnx file and its data file into OUT, then `sync` of those files
and reports medians of wall time and peak anonymous memory (RssAnon, polled every 10 ms), the
ratio fold / floor (target <= 1.2) and the peak memory against the largest tensor.

  python bench/bench_onnx_scale.py                          # 8B shapes, all 32 layers (16.1 GB graph)
  python bench/bench_onnx_scale.py --layers 8               # 8B shapes, 8 layers (5.6 GB): a small disk
Disk: the graph, the base and one output exist at once (3x the graph); `--clean` removes the
generated inputs at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_apply import PRESETS, TARGETS, llama_shapes, log, measure  # noqa: E402

ALIGN_LARGE, ALIGNMENT = 1 << 20, 1 << 16   # as onnx.save aligns external data


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def build(work: Path, preset: str, layers: int | None, rank: int, gen_device: str) -> tuple[Path, Path, Path]:
    import onnx
    import torch
    from onnx import TensorProto, helper

    cfg = dict(PRESETS[preset])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    tag = f"{preset}-l{cfg['num_hidden_layers']}"
    base, adapter, gdir = work / f"onnx-base-{tag}", work / f"onnx-adapter-{tag}-r{rank}", work / f"onnx-graph-{tag}"
    graph = gdir / "model.onnx"
    if all((p / "DONE").exists() for p in (base, adapter, gdir)):
        return base, adapter, graph
    for p in (base, adapter, gdir):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float16", rms_norm_eps=1e-5,
               max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu",
               bos_token_id=1, eos_token_id=2)
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = llama_shapes(cfg)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]

    # safetensors header first (shapes are known), then the data in the same order
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    nodes, inits, outputs = [], [], []
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1]),
              helper.make_tensor_value_info("x_hidden", TensorProto.FLOAT16, [1, h]),
              helper.make_tensor_value_info("x_inter", TensorProto.FLOAT16, [1, inter])]
    g = torch.Generator(device=gen_device).manual_seed(0)
    data_path = gdir / "model.onnx.data"
    k = 0
    with open(base / "model.safetensors", "wb") as st, open(data_path, "wb") as dat:
        st.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes:
            if len(shape) == 2:
                w = torch.randn(shape, generator=g, device=gen_device).mul_(0.02).to(torch.float16).cpu()
            else:
                w = torch.ones(shape, dtype=torch.float16)
            st.write(w.numpy().tobytes())
            mod = _module(name)
            scope = "/" + mod.replace(".layers.", "/layers.").replace(".", "/")
            if name.endswith("embed_tokens.weight"):
                init_name, value, op = name, w, "Gather"
            elif len(shape) == 2:  # a Linear: the exporter stores W.T for MatMul, renamed
                k += 1
                init_name, value, op = f"onnx::MatMul_{k}", w.T.contiguous(), "MatMul"
            else:
                init_name, value, op = name, w, "Mul"
            blob = value.numpy().tobytes()
            off = dat.tell()
            if len(blob) > ALIGN_LARGE and off % ALIGNMENT:
                dat.write(b"\0" * (ALIGNMENT - off % ALIGNMENT))
                off = dat.tell()
            dat.write(blob)
            t = TensorProto(name=init_name, data_type=TensorProto.FLOAT16, dims=list(value.shape),
                            data_location=TensorProto.EXTERNAL)
            for key, val in (("location", data_path.name), ("offset", str(off)), ("length", str(len(blob)))):
                e = t.external_data.add()
                e.key, e.value = key, val
            inits.append(t)
            out = f"{mod}.out"
            if op == "Gather":
                nodes.append(helper.make_node("Gather", [init_name, "input_ids"], [out], name=scope + "/Gather"))
            elif op == "MatMul":
                x = "x_hidden" if value.shape[0] == h else "x_inter"
                nodes.append(helper.make_node("MatMul", [x, init_name], [out], name=scope + "/MatMul"))
            else:
                nodes.append(helper.make_node("Mul", ["x_hidden", init_name], [out], name=scope + "/Mul"))
            oshape = [1, 1, h] if op == "Gather" else [1, int(value.shape[1])] if op == "MatMul" else [1, h]
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT16, oshape))
            del w, value, blob
        os.fsync(st.fileno())
        os.fsync(dat.fileno())
    model = helper.make_model(helper.make_graph(nodes, "llama-shaped", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_onnx_scale")
    model.ir_version = 8
    graph.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(graph))  # structure only (external data is not loaded)
    log(f"  graph {graph} + {data_path.stat().st_size / 1e9:.2f} GB of external data; base {base}")

    from peft import LoraConfig

    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(str(adapter))
    from safetensors.torch import save_file

    lora = {}
    for name, shape in shapes:
        if len(shape) == 2 and name.rsplit(".", 2)[-2] in TARGETS:
            mod = "base_model.model." + _module(name)
            lora[mod + ".lora_A.weight"] = (torch.randn(rank, shape[1], generator=g, device=gen_device)
                                            / shape[1] ** 0.5).cpu()
            lora[mod + ".lora_B.weight"] = (torch.randn(shape[0], rank, generator=g, device=gen_device) * 1e-3).cpu()
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    for p in (base, adapter, gdir):
        (p / "DONE").touch()
    return base, adapter, graph


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count (smaller disk)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="loramerge --device")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--methods", default="fold,floor")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--clean", action="store_true", help="remove the generated graph, base and adapter at the end")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base, adapter, graph = build(args.workdir, args.preset, args.layers, args.rank,
                                 "cuda" if "cuda" in args.device else "cpu")
    log(f"  inputs ready in {time.perf_counter() - t:.1f} s")
    files = [graph, graph.with_name(graph.name + ".data")]
    nbytes = sum(p.stat().st_size for p in files)
    largest = _largest_tensor(base / "model.safetensors")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    methods = args.methods.split(",")
    raw = {m: {"wall": [], "anon": []} for m in methods}
    for run in range(args.runs):
        order = methods[run % len(methods):] + methods[:run % len(methods)]
        for m in order:
            out = args.workdir / f"onnx-out-{m}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            if m == "fold":
                cmd = [sys.executable, "-m", "loramerge", "export-onnx", str(graph), str(out / "model.onnx"),
                       "--adapter", str(adapter), "--base", str(base), "--device", args.device, "--json"]
                wall, anon, stdout = measure(cmd, env=env)
                rep = json.loads(stdout)
                stages = {k: round(v, 3) for k, v in rep.get("stages", {}).items()}
                raw[m].setdefault("in_process", []).append(round(rep["seconds"], 3))
                raw[m].setdefault("stages", []).append(stages)
                log(f"  in-process {rep['seconds']:.2f} s, stages {stages}")
            else:
                script = "; ".join(f"cat '{f}' > '{out / f.name}'" for f in files)
                script += "; sync " + " ".join(f"'{out / f.name}'" for f in files)
                wall, anon, _ = measure(["sh", "-c", script])
            raw[m]["wall"].append(wall)
            raw[m]["anon"].append(anon)
            log(f"run {run + 1} {m:6s} wall {wall:7.2f} s   peak anon {anon / 2**20:8.0f} MiB")
            shutil.rmtree(out, ignore_errors=True)
    med = {m: {k: statistics.median(v[k]) for k in ("wall", "anon")} for m, v in raw.items()}
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "preset": args.preset, "layers": args.layers, "graph_bytes": nbytes, "largest_tensor_bytes": largest,
        "runs": args.runs, "device": args.device, "medians": med, "raw": raw,
    }
    if "fold" in med and "floor" in med:
        summary["fold_vs_floor"] = med["fold"]["wall"] / med["floor"]["wall"]
    if "fold" in med:
        summary["fold_anon_vs_largest_tensor"] = med["fold"]["anon"] / largest
    print(json.dumps(summary, indent=2))
    if args.results:
        args.results.write_text(json.dumps(summary, indent=2))
    if args.clean:
        for p in (base, adapter, graph.parent):
            shutil.rmtree(p, ignore_errors=True)


def _largest_tensor(st: Path) -> int:
    with open(st, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return max(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


if __name__ == "__main__":
    main()
