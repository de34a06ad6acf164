"""`loramerge inspect`: checked against independent readers. Adapter targets against the LoRA
layers PEFT itself builds (rank, alpha, scaling per module); --base matches against the module
PEFT wraps; checkpoints against the safetensors library; ONNX graphs built here with onnx.helper;
.onnx_adapter files written here with onnxruntime.AdapterFormat."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import MANIFEST, adapter_dir, base_dir
from loramerge.cli import main

ADAPTER_KEYS = {"command", "ok", "path", "kind", "format", "targets", "replacements", "tokens", "tensors", "bytes", "dtypes",
                "base_model", "config", "warnings", "seconds"}
TARGET_KEYS = {"module", "rank", "alpha", "scale", "target", "dora", "bias", "base_shape", "layout", "groups"}
CHECKPOINT_KEYS = {"command", "ok", "path", "kind", "format", "files", "index", "tensors", "parameters", "bytes",
                   "dtypes", "quantization", "config", "carried_over", "not_carried_over", "warnings", "seconds"}
ONNX_KEYS = {"command", "ok", "path", "kind", "format", "ir_version", "opset", "producer", "inputs", "outputs", "nodes",
             "ops", "initializers", "initializer_bytes", "external_data", "lora_branches", "lora_inputs", "loramerge",
             "warnings", "seconds"}


def inspect(*args) -> dict:
    r = CliRunner().invoke(main, ["inspect", *map(str, args), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def peft_layers(adapter: str) -> dict[str, tuple[int, float, float]]:
    """module path -> (r, lora_alpha, scaling) of the LoRA layers PEFT builds for the adapter."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft.tuners.lora import LoraLayer

    base = MANIFEST["adapters"][adapter]["trained_on"]
    cls = getattr(transformers, MANIFEST["bases"][base]["model_class"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(cls.from_pretrained(base_dir(base)), adapter_dir(adapter))
    return {name.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
            for name, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.r}


@pytest.mark.parametrize("adapter", ["llama-patterns", "llama-rslora", "qwen2-bias"])
def test_adapter_targets_match_peft_layers(adapter):
    d = inspect(adapter_dir(adapter))
    assert set(d) == ADAPTER_KEYS and (d["kind"], d["format"]) == ("adapter", "peft")
    assert all(set(t) >= TARGET_KEYS for t in d["targets"])
    want = peft_layers(adapter)
    got = {t["module"]: (t["rank"], t["alpha"], t["scale"]) for t in d["targets"]}
    assert got.keys() == want.keys()
    for module, (r, alpha, scale) in want.items():
        assert got[module][0] == r and got[module][1] == alpha and got[module][2] == pytest.approx(scale, rel=1e-12)
    weights = adapter_dir(adapter) / "adapter_model.safetensors"
    assert d["bytes"] == weights.stat().st_size - _header_bytes(weights)  # the data region: every tensor's bytes
    assert d["config"]["peft_type"] == "LORA" and d["base_model"] == d["config"]["base_model_name_or_path"]
    assert any(t["bias"] for t in d["targets"]) == (adapter == "qwen2-bias")


def _header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_base_matching_is_the_plans(tmp_path):
    # the bare base names its tensors layers.N... while the adapter says model.layers.N...: the plan's
    # suffix matching finds them; a BERT base matches nothing, and says why per target
    d = inspect(adapter_dir("llama-basic"), "--base", base_dir("llama-bare"))
    assert d["matched"] == 21 and d["unmatched"] == [] and d["base"] == str(base_dir("llama-bare"))
    for t in d["targets"]:
        assert t["base_tensor"] == t["module"].removeprefix("model.") + ".weight"
    d = inspect(adapter_dir("llama-layers"), "--base", base_dir("bert"))
    assert d["matched"] == 0 and all(t["base_tensor"] is None for t in d["targets"])
    assert len(d["unmatched"]) == len(d["targets"]) == 4
    assert all("no base tensor named" in p for p in d["unmatched"])
    # exactly what apply says when it refuses
    r = CliRunner().invoke(main, ["apply", str(base_dir("bert")), str(adapter_dir("llama-layers")), str(tmp_path / "o")])
    assert r.exit_code == 1 and all(p in r.stderr for p in d["unmatched"])
    # a lora_bias target reports where its bias goes too
    d = inspect(adapter_dir("qwen2-bias"), "--base", base_dir("qwen2"))
    assert all(t["base_bias"] == t["module"] + ".bias" for t in d["targets"])


def test_loralib_without_alpha_and_resolved_against_the_base():
    lora = adapter_dir("loralib") / "lora.pt"
    d = inspect(lora)
    assert d["format"] == "loralib" and all(t["alpha"] is None and t["scale"] is None for t in d["targets"])
    assert any("--lora-alpha" in w for w in d["warnings"])
    d = inspect(lora, "--base", base_dir("loralib"), "--lora-alpha", "16", "--enable-lora", "1,0,1")
    by = {t["module"]: t for t in d["targets"]}
    sd = torch.load(lora, weights_only=True)
    assert by["fc"]["rank"] == sd["fc.lora_B"].shape[1] and by["fc"]["scale"] == 16 / sd["fc.lora_B"].shape[1]
    assert by["c_attn"]["groups"] == [True, False, True] and d["matched"] == 3
    with safe_open(str(base_dir("loralib") / "model.safetensors"), "pt") as f:
        wte = f.get_slice("wte.weight").get_shape()
    # an embedding stores its weight [vocab, dim]: the plan finds the adapter's delta transposed
    assert by["wte"]["layout"] == "transposed" and by["wte"]["base_shape"] == wte


def test_kohya_file():
    d = inspect(adapter_dir("kohya") / "sd_lora.safetensors", "--base", base_dir("sd-unet"))
    assert d["format"] == "kohya" and d["matched"] == len(d["targets"]) == 5
    with safe_open(str(adapter_dir("kohya") / "sd_lora.safetensors"), "pt") as f:
        for t in d["targets"]:
            rank = f.get_slice(t["module"] + ".lora_down.weight").get_shape()[0]
            alpha = float(f.get_tensor(t["module"] + ".alpha"))
            assert (t["rank"], t["alpha"], t["scale"]) == (rank, alpha, alpha / rank)
            assert t["base_tensor"].replace(".", "_").endswith(t["module"].removeprefix("lora_unet_") + "_weight")


@pytest.mark.parametrize("name", ["llama-bf16-sharded", "qwen2", "llama-bin-sharded"])
def test_checkpoints(name):
    d = inspect(base_dir(name))
    assert set(d) == CHECKPOINT_KEYS and d["kind"] == "checkpoint"
    fmt = MANIFEST["bases"][name]["format"]
    files = sorted(p.name for p in base_dir(name).iterdir() if p.suffix in (".safetensors", ".bin"))
    assert [f["name"] for f in d["files"]] == files  # in shard order
    from conftest import load_dir
    sd = load_dir(base_dir(name))
    assert d["tensors"] == len(sd) and sum(f["tensors"] for f in d["files"]) == len(sd)
    assert d["parameters"] == sum(t.numel() for t in sd.values())
    assert d["bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    assert sum(d["dtypes"].values()) == len(sd) and set(d["dtypes"]) == {codes[t.dtype] for t in sd.values()}
    assert d["quantization"] is None and d["format"] in ("safetensors", "bin") and fmt
    assert d["index"] == ("model.safetensors.index.json" if name == "llama-bf16-sharded" else
                          "pytorch_model.bin.index.json" if name == "llama-bin-sharded" else None)
    assert "config.json" in d["carried_over"]
    assert d["config"]["model_type"] == json.loads((base_dir(name) / "config.json").read_text())["model_type"]


def test_quantized_checkpoints(tmp_path):
    q = tmp_path / "bnb"
    q.mkdir()
    save_file({"l.weight": torch.zeros(32, 1, dtype=torch.uint8), "l.weight.absmax": torch.ones(1),
               "l.weight.quant_map": torch.ones(16), "l.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8),
               "l.bias": torch.zeros(8)}, str(q / "model.safetensors"))
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (q / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    d = inspect(q)
    assert d["quantization"] == {"method": "bitsandbytes", "config": qc, "tensors": {"bitsandbytes-4bit": 3},
                                 "example": "l.weight.absmax"}
    fp8 = tmp_path / "fp8.safetensors"  # no config: the dtypes and scales say it
    save_file({"l.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn), "l.weight_scale": torch.ones(1)}, str(fp8))
    d = inspect(fp8)
    assert d["quantization"]["method"] == "fp8" and d["quantization"]["tensors"] == {"fp8": 2}
    assert d["dtypes"] == {"F32": 1, "F8_E4M3": 1}


def test_onnx_graph_and_adapter_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(torch.randn(4, 3).numpy(), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    d = inspect(path)
    assert set(d) == ONNX_KEYS and (d["kind"], d["format"]) == ("onnx", "onnx")
    assert (d["ir_version"], d["opset"], d["producer"]) == (8, {"ai.onnx": 17}, "test")
    assert d["inputs"] == [{"name": "x", "type": "float", "shape": ["n", 4]}]
    assert d["outputs"] == [{"name": "y", "type": "float", "shape": ["n", 3]}]
    assert (d["nodes"], d["ops"], d["initializers"], d["initializer_bytes"]) == (1, {"MatMul": 1}, 1, 48)
    assert d["external_data"] == ["g.onnx.data"] and d["lora_branches"] == 0

    if not hasattr(ort, "AdapterFormat"):
        pytest.skip("onnxruntime without AdapterFormat")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(3)
    fmt.set_parameters({"lora_down.q": ort.OrtValue.ortvalue_from_numpy(torch.zeros(4, 2).numpy()),
                        "lora_up.q": ort.OrtValue.ortvalue_from_numpy(torch.zeros(2, 3).numpy())})
    fmt.export_adapter(str(tmp_path / "a.onnx_adapter"))
    d = inspect(tmp_path / "a.onnx_adapter")
    assert (d["kind"], d["adapter_version"]) == ("onnx_adapter", 3)
    assert d["parameters"] == [{"name": "lora_down.q", "type": "tensor(float)", "shape": [4, 2]},
                               {"name": "lora_up.q", "type": "tensor(float)", "shape": [2, 3]}]


def test_hub_id_and_errors(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    from test_hub import cache_repo, tree

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    commit = cache_repo(cache, "me/adapter", tree(adapter_dir("llama-patterns")))
    local = inspect(adapter_dir("llama-patterns"))
    d = inspect("me/adapter")
    assert d["path"] == "me/adapter" and d["resolved"] == str(cache / "models--me--adapter" / "snapshots" / commit)
    assert d["targets"] == local["targets"]
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and "not found" in r.stderr
    (tmp_path / "notes.txt").write_text("hello")
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "notes.txt"), "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["type"] == "UsageError"
    r = CliRunner().invoke(main, ["inspect", str(base_dir("qwen2")), "--base", str(base_dir("qwen2"))])
    assert r.exit_code == 2 and "--base: only used to match an adapter's targets" in r.stderr


def test_text_output_lists_targets_and_matches():
    r = CliRunner().invoke(main, ["inspect", str(adapter_dir("qwen2-lmhead")), "--base", str(base_dir("qwen2"))])
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0] == f"{adapter_dir('qwen2-lmhead')}: peft adapter"
    assert "  lm_head: r=4 alpha=8 scale=2 linear -> lm_head.weight" in lines  # tied base: lm_head gets its own
    assert lines[-1] == f"against {base_dir('qwen2')}: 4 of 4 target(s) match"


@pytest.mark.parametrize("command", ["inspect", "apply", "verify"])
@pytest.mark.parametrize("value", ["q,v", "2,0,1", "-1,1", ""])
def test_a_bad_enable_lora_is_a_usage_error(tmp_path, command, value):
    """--enable-lora takes 0 or 1 per row group: anything else is one `Error:` line and exit 2 (and
    --json's error object), never a traceback from outside the command, never a 2 read as 1."""
    lora = adapter_dir("loralib") / "lora.pt"
    paths = {"inspect": [lora], "apply": [base_dir("loralib"), lora, tmp_path / "out"],
             "verify": [base_dir("loralib"), lora, base_dir("loralib")]}[command]
    r = CliRunner().invoke(main, [command, *map(str, paths), "--lora-alpha", "16", "--enable-lora", value])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, (SystemExit, type(None))), r.output
    assert "Error: Invalid value for '--enable-lora'" in r.output and "expected 0 or 1 per row group" in r.output
    r = CliRunner().invoke(main, [command, *map(str, paths), "--enable-lora", value, "--json"])
    assert r.exit_code == 2
    assert json.loads(r.stdout)["error"]["type"] == "UsageError"
    assert not (tmp_path / "out").exists()
