"""onnxruntime multi-LoRA: one --keep-lora --lora-inputs graph plus one .onnx_adapter file per
adapter (onnxruntime.AdapterFormat), switched per run with RunOptions.add_active_adapter. The
oracle is PEFT: each adapter, activated on the shared graph, must give the outputs of its own
unmerged PeftModel."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import adapter_dir, base_dir

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
if not hasattr(ort, "AdapterFormat"):
    pytest.skip("onnxruntime without AdapterFormat (< 1.20)", allow_module_level=True)

from loramerge.cli import main  # noqa: E402
from loramerge.onnx import lora_feeds  # noqa: E402

BASE = "llama-fp32"
A, B, LATE = "llama-basic", "llama-patterns", "llama-rslora"


def _model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(base_dir(BASE), dtype=torch.float32).eval()


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits


def _feeds() -> dict:
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _peft_logits(adapter: str) -> np.ndarray:
    pm = peft.PeftModel.from_pretrained(_model(), adapter_dir(adapter)).eval()
    f = _feeds()
    with torch.no_grad():
        return _Logits(pm)(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).numpy()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The base graph (TorchScript export) and a --keep-lora --lora-inputs graph made for A and B."""
    root = tmp_path_factory.mktemp("ort")
    graph = root / "base.onnx"
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(_model()), (ids, torch.ones_like(ids)), str(graph), dynamo=False,
                          input_names=names, output_names=["logits"], opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["logits"]})
    out = root / "served.onnx"
    r = _cli("export-onnx", graph, out, "-a", adapter_dir(A), "-a", adapter_dir(B), "--base", base_dir(BASE),
             "--keep-lora", "--lora-inputs", "--json")
    assert r.exit_code == 0, r.output
    return graph, out, json.loads(r.stdout)


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess, adapter_file=None):
    ro = None
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
    return sess.run(None, _feeds(), ro)[0]


def test_one_graph_many_adapters_each_matches_its_peft_model(served):
    graph, out, report = served
    names = [f"served.{A}.onnx_adapter", f"served.{B}.onnx_adapter"]
    assert report["mode"] == "keep-lora" and report["adapter_files"] == names
    files = [out.parent / n for n in names]
    assert all(f.is_file() for f in files)
    sess = _session(out)
    got_a, got_b = _run(sess, files[0]), _run(sess, files[1])
    ref_a, ref_b = _peft_logits(A), _peft_logits(B)
    assert _rel(got_a, ref_a) <= 1e-5 and _rel(got_b, ref_b) <= 1e-5
    assert _rel(ref_a, ref_b) > 1e-2  # the two adapters really do differ ...
    assert _rel(got_a, got_b) > 1e-2  # ... and switching the file switches the outputs
    assert np.array_equal(_run(sess, files[0]), got_a)  # back to A in the same session: nothing sticks
    base = _run(_session(graph))
    assert _rel(got_a, base) > 1e-2


def test_adapter_file_holds_every_lora_input(served):
    graph, out, _ = served
    fmt = ort.AdapterFormat.read_adapter(str(out.parent / f"served.{B}.onnx_adapter"))
    params = {k: v.numpy() for k, v in fmt.get_parameters().items()}
    model = onnx.load(str(out), load_external_data=False)
    lora_inputs = {i.name for i in model.graph.input if i.name.startswith(("lora_down.", "lora_up."))}
    assert set(params) == lora_inputs and len(lora_inputs) == 42  # 21 branches (A's targets), 2 factors each
    expected = lora_feeds(out, [adapter_dir(B)], base=base_dir(BASE))
    assert all(np.array_equal(params[k], expected[k]) for k in expected)
    # B has no gate/up projections: their branches get zero factors, not A's defaults
    zeros = [k for k in params if ".mlp.gate_proj" in k]
    assert zeros and all(not params[k].any() for k in zeros)


def test_adapter_file_for_an_existing_graph(served, tmp_path):
    _, out, _ = served
    late = tmp_path / "late.onnx_adapter"
    r = _cli("export-onnx", out, late, "-a", adapter_dir(LATE), "--base", base_dir(BASE), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["mode"] == "onnx-adapter" and d["adapter_files"] == ["late.onnx_adapter"]
    assert _rel(_run(_session(out), late), _peft_logits(LATE)) <= 1e-5
    r = _cli("export-onnx", out, late, "-a", adapter_dir(LATE), "--base", base_dir(BASE))
    assert r.exit_code == 1 and "already exists" in r.stderr  # never clobbered silently


def test_adapter_files_are_refused_where_they_cannot_be_right(served, tmp_path):
    graph, out, _ = served
    # an adapter with a target the graph has no branch for (embeddings)
    r = _cli("export-onnx", out, tmp_path / "e.onnx_adapter", "-a", adapter_dir("llama-embed"), "--base", base_dir(BASE))
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "no LoRA branch in this graph" in r.stderr
    assert not (tmp_path / "e.onnx_adapter").exists()
    # a graph without LoRA inputs
    r = _cli("export-onnx", graph, tmp_path / "g.onnx_adapter", "-a", adapter_dir(A))
    assert r.exit_code == 1 and "not a graph made with --keep-lora --lora-inputs" in r.stderr
    r = _cli("export-onnx", out, tmp_path / "s.onnx_adapter", "-a", adapter_dir(A), "--strict")
    assert r.exit_code == 2 and "--strict: not used when writing an onnxruntime adapter file" in r.stderr
