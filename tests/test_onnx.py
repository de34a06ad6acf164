"""ONNX: folding adapters into graphs exported by both torch exporters (dynamo, TorchScript), for
Llama, GPT-2 (Conv1D) and BERT, checked with onnxruntime against the UNMERGED PeftModel; the
--keep-lora graph; fp16 and external-data graphs; packed (fused QKV) and duplicate weights; bad
inputs; and export of a merged checkpoint with its onnxruntime-vs-PyTorch validation.

Graphs are exported here, the way a user would (a plain torch.onnx.export of a thin wrapper), once
per test session.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import MANIFEST, adapter_dir, base_dir, correctly_rounded, expected_delta64, load_dir

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, external_data_helper, helper, numpy_helper  # noqa: E402

import loramerge  # noqa: E402
from loramerge.cli import main  # noqa: E402
from loramerge.errors import OnnxError, UsageError  # noqa: E402
from loramerge.onnx import compare_graphs, fold  # noqa: E402
from loramerge.onnx.runtime import fit_ir_version, runtime_limits  # noqa: E402

CASES = {  # model -> (adapter, output)
    "llama-fp32": ("llama-basic", "logits"),
    "bert": ("bert", "last_hidden_state"),
    "gpt2": ("gpt2-fifo", "logits"),
    "qwen2": ("qwen2-lmhead", "logits"),  # tied embeddings; the adapter trains lm_head (and q_proj)
}
EXPORTERS = ("dynamo", "torchscript")


def _have(model: str) -> bool:
    return model in MANIFEST["bases"] and base_dir(model).is_dir() and adapter_dir(CASES[model][0]).is_dir()


def _skip_missing(model: str):
    if not _have(model):
        pytest.skip(f"fixture {model} / {CASES[model][0]} not present")


class Wrapper(torch.nn.Module):
    def __init__(self, model, output):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return getattr(out, self.output)


def _load(model: str, path: Path | None = None):
    cls = getattr(transformers, MANIFEST["bases"][model]["model_class"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path or base_dir(model), dtype=torch.float32).eval()


def export_graph(model_obj, output: str, exporter: str, dst: Path) -> Path:
    w = Wrapper(model_obj, output).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    args = (ids, torch.ones_like(ids))
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(w, args, str(dst), dynamo=True, input_names=names, output_names=[output], verbose=False,
                              dynamic_shapes={n: {0: b, 1: s} for n in names}, external_data=False)
        else:
            torch.onnx.export(w, args, str(dst), dynamo=False, input_names=names, output_names=[output],
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + [output]}, opset_version=17)
    model_obj.eval()
    return dst


FEEDS = None


def feeds() -> dict:
    global FEEDS
    if FEEDS is None:
        ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        FEEDS = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    return FEEDS


def run(path: Path, extra: dict | None = None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {**feeds(), **(extra or {})})[0].copy())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def io(path: Path):
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    return ([(i.name, i.type.SerializeToString()) for i in g.input if i.name not in inits],
            [(o.name, o.type.SerializeToString()) for o in g.output])


@pytest.fixture(scope="session")
def graphs(tmp_path_factory):
    """(model, exporter) -> base graph path, exported on first use."""
    root = tmp_path_factory.mktemp("graphs")
    cache: dict = {}

    def get(model: str, exporter: str) -> Path:
        _skip_missing(model)
        if (model, exporter) not in cache:
            cache[(model, exporter)] = export_graph(_load(model), CASES[model][1], exporter,
                                                    root / f"{model}-{exporter}.onnx")
        return cache[(model, exporter)]

    return get


@pytest.fixture(scope="session")
def peft_out():
    """model -> outputs of the UNMERGED PeftModel (base + adapter) on feeds()."""
    cache: dict = {}

    def get(model: str) -> torch.Tensor:
        if model not in cache:
            pm = peft.PeftModel.from_pretrained(_load(model), adapter_dir(CASES[model][0])).eval()
            f = feeds()
            with torch.no_grad():
                cache[model] = Wrapper(pm, CASES[model][1])(torch.from_numpy(f["input_ids"]),
                                                            torch.from_numpy(f["attention_mask"]))
        return cache[model]

    return get


# -- fold: outputs, structure ----------------------------------------------------------------

@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("model", list(CASES))
def test_fold_matches_unmerged_peft(model, exporter, graphs, peft_out, tmp_path):
    g = graphs(model, exporter)
    out = tmp_path / "folded.onnx"
    report = fold(g, out, [adapter_dir(CASES[model][0])], base=base_dir(model))
    assert report.matched and report.mode == "fold"
    ref = peft_out(model)
    assert rel(run(out), ref) <= 1e-4
    assert rel(run(g), ref) > 1e-3, "the adapter must change the outputs, or this test proves nothing"
    assert ops(out) == ops(g), "folding must not add, remove or change nodes"
    assert io(out) == io(g)
    if model == "bert":  # BertModel's pooler feeds pooler_output, which this graph does not output
        assert [m.split(":")[0] for m in report.missing] == ["pooler.dense.weight"]
        assert any("pooler.dense.weight" in w for w in report.warnings)
    else:
        assert not report.missing


def test_fold_without_base_uses_names_and_folded_from(graphs, peft_out, tmp_path):
    # dynamo keeps provenance (folded_from); GPT-2's Conv1D weights keep their names in both exporters
    for model, exporter in (("llama-fp32", "dynamo"), ("gpt2", "torchscript")):
        if not _have(model):
            continue
        out = tmp_path / f"{model}.onnx"
        report = fold(graphs(model, exporter), out, [adapter_dir(CASES[model][0])])
        assert set(report.how) <= {"name", "folded_from"}
        assert rel(run(out), peft_out(model)) <= 1e-4


def test_renamed_weights_without_base_ask_for_it(graphs, tmp_path):
    g = graphs("llama-fp32", "torchscript")  # onnx::MatMul_N holding W.T, no provenance
    with pytest.raises(OnnxError, match="pass --base BASE_CHECKPOINT") as e:
        fold(g, tmp_path / "o.onnx", [adapter_dir("llama-basic")])
    assert "none of the 21 adapter target(s)" in str(e.value)
    assert not (tmp_path / "o.onnx").exists()


def test_multiple_adapters_and_weights(graphs, tmp_path):
    g = graphs("llama-fp32", "torchscript")
    # +1 and -1 of the same adapter cancel: the graph's values come back (within fp32 rounding)
    out = tmp_path / "o.onnx"
    fold(g, out, [adapter_dir("llama-basic"), adapter_dir("llama-basic")], weights=[1.0, -1.0],
         base=base_dir("llama-fp32"))
    assert rel(run(out), run(g)) <= 1e-6


def test_tied_embeddings_lm_head_lora_does_not_leak(graphs, peft_out, tmp_path):
    # dynamo shares the tied table between the embedding Gather and lm_head (via Transpose); the
    # lm_head LoRA must change only the lm_head use, as PEFT does, with or without --base
    _skip_missing("qwen2")
    g = graphs("qwen2", "dynamo")
    out = tmp_path / "o.onnx"
    report = fold(g, out, [adapter_dir("qwen2-lmhead")])
    assert any(x.startswith("lm_head.weight") and "own copy" in x for x in report.matched), report.matched
    assert rel(run(out), peft_out("qwen2")) <= 1e-4
    assert ops(out) == ops(g)
    kept = tmp_path / "k.onnx"
    fold(g, kept, [adapter_dir("qwen2-lmhead")], keep_lora=True)
    assert rel(run(kept), peft_out("qwen2")) <= 1e-4
    # without node names/metadata the two uses cannot be told apart: refused, not leaked
    m = onnx.load(str(g))
    for n in m.graph.node:
        n.name = ""
        del n.metadata_props[:]
    anon = tmp_path / "anon.onnx"
    onnx.save(m, str(anon))
    with pytest.raises(OnnxError, match="tied input/output embeddings"):
        fold(anon, tmp_path / "o2.onnx", [adapter_dir("qwen2-lmhead")])


# -- keep-lora ------------------------------------------------------------------------------

@pytest.mark.parametrize("model,exporter", [("llama-fp32", "dynamo"), ("llama-fp32", "torchscript"),
                                            ("bert", "torchscript"), ("gpt2", "dynamo")])
def test_keep_lora_graph_equals_folded(model, exporter, graphs, tmp_path):
    _skip_missing(model)
    g = graphs(model, exporter)
    folded, kept = tmp_path / "f.onnx", tmp_path / "k.onnx"
    fold(g, folded, [adapter_dir(CASES[model][0])], base=base_dir(model))
    report = fold(g, kept, [adapter_dir(CASES[model][0])], base=base_dir(model), keep_lora=True)
    assert report.mode == "keep-lora"
    assert rel(run(kept), run(folded)) <= 1e-4
    added = ops(kept) - ops(g)
    n = len(report.matched)
    assert added["MatMul"] == 2 * n and added["Add"] == n and sum(added.values()) == 3 * n
    assert io(kept) == io(g)
    cmp = compare_graphs(folded, kept, feeds())  # what --verify and bench use
    assert cmp.max_rel <= 1e-4


def test_keep_lora_inputs_can_be_swapped(graphs, tmp_path):
    g = graphs("llama-fp32", "torchscript")
    kept = tmp_path / "k.onnx"
    fold(g, kept, [adapter_dir("llama-basic")], base=base_dir("llama-fp32"), keep_lora=True, lora_inputs=True)
    model = onnx.load(str(kept))
    ups = [i for i in model.graph.input if i.name.startswith("lora_up.")]
    assert len(ups) == 21
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zeros = {i.name: 0 * inits[i.name] for i in ups}
    assert rel(run(kept, zeros), run(g)) == 0.0  # no adapter: exactly the base graph's outputs
    # another rank at run time: the rank axis is symbolic
    rank2 = {}
    for i in model.graph.input:
        if i.name.startswith("lora_"):
            v = inits[i.name]
            rank2[i.name] = (v[:, :2] if i.name.startswith("lora_down.") else 0 * v[:2]).copy()
    assert rel(run(kept, rank2), run(g)) == 0.0


def test_lora_feeds_swap_in_another_adapter(graphs, tmp_path):
    from loramerge.onnx import lora_feeds

    g = graphs("llama-fp32", "torchscript")
    kept = tmp_path / "k.onnx"
    fold(g, kept, [adapter_dir("llama-basic")], base=base_dir("llama-fp32"), keep_lora=True, lora_inputs=True)
    folded = tmp_path / "f.onnx"  # llama-patterns: other targets subset, per-module ranks
    fold(g, folded, [adapter_dir("llama-patterns")], base=base_dir("llama-fp32"))
    swap = lora_feeds(kept, [adapter_dir("llama-patterns")], base=base_dir("llama-fp32"))
    assert rel(run(kept, swap), run(folded)) <= 1e-4
    with pytest.raises(OnnxError, match="not a graph made with --keep-lora --lora-inputs"):
        lora_feeds(g, [adapter_dir("llama-patterns")], base=base_dir("llama-fp32"))


@pytest.mark.parametrize("adapter", ["llama-rslora", "llama-patterns", "llama-layers", "llama-embed", "llama-dora"])
def test_other_adapter_kinds_fold_like_peft(adapter, graphs, tmp_path):
    if not adapter_dir(adapter).is_dir():
        pytest.skip(f"fixture {adapter} not present")
    g = graphs("llama-fp32", "torchscript")
    out = tmp_path / "o.onnx"
    report = fold(g, out, [adapter_dir(adapter)], base=base_dir("llama-fp32"))
    assert not report.missing and ops(out) == ops(g)
    pm = peft.PeftModel.from_pretrained(_load("llama-fp32"), adapter_dir(adapter)).eval()
    f = feeds()
    with torch.no_grad():
        ref = Wrapper(pm, "logits")(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]))
    assert rel(run(out), ref) <= 1e-4
    if adapter == "llama-dora":
        with pytest.raises(OnnxError, match="DoRA"):
            fold(g, tmp_path / "k.onnx", [adapter_dir(adapter)], base=base_dir("llama-fp32"), keep_lora=True)
    else:  # embeddings get a Gather branch
        kept = tmp_path / "k.onnx"
        fold(g, kept, [adapter_dir(adapter)], base=base_dir("llama-fp32"), keep_lora=True)
        assert rel(run(kept), ref) <= 1e-4


def test_resized_vocabulary_cannot_fold_into_a_graph(graphs, tmp_path):
    if not adapter_dir("llama-resized").is_dir():
        pytest.skip("fixture llama-resized not present")
    with pytest.raises(OnnxError, match="resized vocabulary"):
        fold(graphs("llama-fp32", "torchscript"), tmp_path / "o.onnx", [adapter_dir("llama-resized")],
             base=base_dir("llama-fp32"))


# -- dtypes, external data, verify ------------------------------------------------------------

def _to_fp16_weights(src: Path, dst: Path) -> None:
    """Store every 2-D float initializer as fp16 behind a Cast (weights fp16, math fp32)."""
    m = onnx.load(str(src))
    g = m.graph
    casts, renamed = [], {}
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
            a = numpy_helper.to_array(t).astype("float16")
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            renamed[t.name] = t.name + "__f32"
            casts.append(helper.make_node("Cast", [t.name], [t.name + "__f32"], to=TensorProto.FLOAT))
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in renamed:
                n.input[i] = renamed[x]
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(dst))


@pytest.mark.parametrize("how", ["fp16-weights-fp32-math", "exported-in-fp16"])
def test_fp16_initializers_are_correctly_rounded(how, graphs, peft_out, tmp_path):
    g16 = tmp_path / "fp16.onnx"
    if how == "exported-in-fp16":
        export_graph(_load("llama-fp32").half(), "logits", "torchscript", g16)
    else:
        _to_fp16_weights(graphs("llama-fp32", "torchscript"), g16)
    out = tmp_path / "o.onnx"
    report = fold(g16, out, [adapter_dir("llama-basic")], base=base_dir("llama-fp32"))
    assert len(report.matched) == 21 and ops(out) == ops(g16)
    # every folded value is the correctly rounded fp16 of the fp64 W + delta: ONE rounding
    deltas = expected_delta64(adapter_dir("llama-basic"))
    base = load_dir(base_dir("llama-fp32"))
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(out)).graph.initializer}
    for line in report.matched:
        name, init = line.split(" -> ")[0], line.split(" -> ")[1].split(" (")[0]
        exact = correctly_rounded(base[name].double() + deltas[name.removesuffix(".weight")], torch.float16).T
        if inits[init].dtype == torch.float32:  # the exporter folded an upcast into this weight
            assert "via float16" in line, line
            exact = exact.float()
        assert torch.equal(inits[init], exact), name
        assert torch.equal(inits[init].view(torch.int16 if exact.dtype == torch.float16 else torch.int32),
                           exact.contiguous().view(torch.int16 if exact.dtype == torch.float16 else torch.int32))
    if how == "exported-in-fp16":
        assert sum("via float16" in x for x in report.matched) == 3  # TorchScript's fp32 o_proj weights
    assert rel(run(out), peft_out("llama-fp32")) <= 1e-2  # fp16 weights: fp16 tolerance


def test_external_data_streamed_and_equal(graphs, tmp_path):
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    m = onnx.load(str(graphs("llama-fp32", "dynamo")))
    for t in m.graph.initializer:  # weights external, small shape tensors inline (as exporters do:
        if len(t.dims) >= 2:       # onnxruntime's shape inference cannot read external shape tensors)
            external_data_helper.set_external_data(t, "weights.bin")
    onnx.save(m, str(src))
    data_before = hashlib.sha256((src.parent / "weights.bin").read_bytes()).hexdigest()
    out = tmp_path / "out" / "merged.onnx"
    out.parent.mkdir()
    report = fold(src, out, [adapter_dir("llama-basic")], base=base_dir("llama-fp32"), verify=True)
    assert report.files == ["merged.onnx", "merged.onnx.data"] and report.comparison.max_rel <= 1e-4
    assert (out.parent / "merged.onnx.data").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.onnx", "merged.onnx.data"], "no temporaries left"
    assert hashlib.sha256((src.parent / "weights.bin").read_bytes()).hexdigest() == data_before, "input untouched"
    # the weights live in the new data file, the rest stays in the proto, as in the input
    proto = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer if len(t.dims) >= 2)
    assert all(t.data_location != TensorProto.EXTERNAL for t in proto.graph.initializer if len(t.dims) < 2)
    inline = tmp_path / "inline.onnx"
    fold(graphs("llama-fp32", "dynamo"), inline, [adapter_dir("llama-basic")], base=base_dir("llama-fp32"))
    assert torch.equal(run(out), run(inline))


# -- packed and duplicate weights --------------------------------------------------------------

def _pack_qkv(src: Path, dst: Path) -> int:
    """Replace each layer's q/k/v MatMuls (same input) by one MatMul on a packed [in, q+k+v]
    initializer and a Split, as graph optimizers do. Returns the number of packs."""
    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    groups: dict[str, list] = {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and any(p in n.name for p in ("q_proj", "k_proj", "v_proj")):
            groups.setdefault(n.input[0], []).append(n)
    packs = 0
    for x, nodes in groups.items():
        nodes.sort(key=lambda n: ["q_proj", "k_proj", "v_proj"].index(next(p for p in ("q_proj", "k_proj", "v_proj") if p in n.name)))
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        import numpy as np
        name = f"packed_qkv_{packs}"
        g.initializer.append(numpy_helper.from_array(np.concatenate(ws, axis=1), name))
        split = numpy_helper.from_array(np.array([w.shape[1] for w in ws], dtype=np.int64), name + "_split")
        g.initializer.append(split)
        first = list(g.node).index(nodes[0])
        mm = helper.make_node("MatMul", [x, name], [name + "_out"], name=f"/packed/{packs}/MatMul")
        sp = helper.make_node("Split", [name + "_out", split.name], [n.output[0] for n in nodes], axis=-1,
                              name=f"/packed/{packs}/Split")
        for n in nodes:
            g.node.remove(n)
            g.initializer.remove(inits[n.input[1]])
        g.node.insert(first, sp)
        g.node.insert(first, mm)
        packs += 1
    onnx.save(m, str(dst))
    return packs


def test_packed_qkv_blocks_are_found_and_folded(graphs, peft_out, tmp_path):
    packed = tmp_path / "packed.onnx"
    assert _pack_qkv(graphs("llama-fp32", "torchscript"), packed) == 3
    out = tmp_path / "o.onnx"
    report = fold(packed, out, [adapter_dir("llama-basic")], base=base_dir("llama-fp32"))
    assert report.how.get("content (packed block)") == 9 and not report.missing
    assert ops(out) == ops(packed)
    assert rel(run(out), peft_out("llama-fp32")) <= 1e-4
    kept = tmp_path / "k.onnx"
    fold(packed, kept, [adapter_dir("llama-basic")], base=base_dir("llama-fp32"), keep_lora=True)
    assert rel(run(kept), run(out)) <= 1e-4


@pytest.fixture(scope="module")
def twin_base(tmp_path_factory):
    """llama-fp32 with layer 1's q_proj made identical to layer 0's, and its TorchScript graph."""
    d = tmp_path_factory.mktemp("twin") / "base"
    shutil.copytree(base_dir("llama-fp32"), d)
    from safetensors.torch import save_file
    sd = load_dir(d)
    sd["model.layers.1.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].clone()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    g = export_graph(_load("llama-fp32", d), "logits", "torchscript", d.parent / "twin.onnx")
    return d, g


def _twin_reference(base: Path) -> torch.Tensor:
    pm = peft.PeftModel.from_pretrained(_load("llama-fp32", base), adapter_dir("llama-basic")).eval()
    f = feeds()
    with torch.no_grad():
        return Wrapper(pm, "logits")(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]))


def test_shared_identical_weights_are_unshared_by_graph_position(twin_base, tmp_path):
    base, g = twin_base
    m = onnx.load(str(g))  # TorchScript stored the identical q_proj weights once, layer 1 via Identity
    assert any(n.op_type == "Identity" for n in m.graph.node)
    out = tmp_path / "o.onnx"
    report = fold(g, out, [adapter_dir("llama-basic")], base=base)
    q = [x for x in report.matched if "self_attn.q_proj" in x and x.split(".")[2] in ("0", "1")]
    assert len(q) == 2 and sum("own copy of initializer" in x for x in q) == 1, report.matched
    assert len({x.split(" -> ")[1].split(" ")[0] for x in q}) == 2, "each layer must get its own initializer"
    assert ops(out) == ops(g) and io(out) == io(g)
    assert rel(run(out), _twin_reference(base)) <= 1e-4
    kept = tmp_path / "k.onnx"
    fold(g, kept, [adapter_dir("llama-basic")], base=base, keep_lora=True)
    assert rel(run(kept), run(out)) <= 1e-4


def test_identical_weights_resolved_by_graph_position(twin_base, tmp_path):
    base, g = twin_base
    m = onnx.load(str(g))  # give layer 1 its own (identical) initializer, as other exporters do
    ident = next(n for n in m.graph.node if n.op_type == "Identity")
    src = next(t for t in m.graph.initializer if t.name == ident.input[0])
    copy = m.graph.initializer.add()
    copy.CopyFrom(src)
    copy.name = "twin_copy"
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x == ident.output[0]:
                n.input[i] = "twin_copy"
    m.graph.node.remove(ident)
    separate = tmp_path / "separate.onnx"
    onnx.save(m, str(separate))
    out = tmp_path / "o.onnx"
    report = fold(separate, out, [adapter_dir("llama-basic")], base=base)
    assert sum("resolved by graph position among 2 identical" in x for x in report.matched) == 2, report.matched
    assert rel(run(out), _twin_reference(base)) <= 1e-4


def test_identical_weights_without_position_are_refused(twin_base, tmp_path):
    base, g = twin_base
    m = onnx.load(str(g))
    for n in m.graph.node:
        n.name = ""
    anon = tmp_path / "anon.onnx"
    onnx.save(m, str(anon))
    with pytest.raises(OnnxError, match="identical content") as e:
        fold(anon, tmp_path / "o.onnx", [adapter_dir("llama-basic")], base=base)
    assert "layers.0.self_attn.q_proj" in str(e.value) and "layers.1.self_attn.q_proj" in str(e.value)
    assert not (tmp_path / "o.onnx").exists()


# -- bad inputs -----------------------------------------------------------------------------------

def test_graph_of_another_model(graphs, tmp_path):
    g = graphs("bert", "torchscript")
    with pytest.raises(OnnxError, match="none of the 21 adapter target"):
        fold(g, tmp_path / "o.onnx", [adapter_dir("llama-basic")], base=base_dir("llama-fp32"))
    # a folded graph is not the base's: found by name/provenance, but the values differ
    folded = tmp_path / "f.onnx"
    fold(graphs("llama-fp32", "dynamo"), folded, [adapter_dir("llama-basic")])
    with pytest.raises(OnnxError, match="already has an adapter folded in"):
        fold(folded, tmp_path / "o2.onnx", [adapter_dir("llama-basic")], base=base_dir("llama-fp32"))


def test_strict_makes_missing_targets_errors(graphs, tmp_path):
    g = graphs("bert", "torchscript")
    res = CliRunner().invoke(main, ["export-onnx", str(g), str(tmp_path / "o.onnx"), "-a", str(adapter_dir("bert")),
                                    "--base", str(base_dir("bert")), "--strict"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and "--strict" in res.output and "pooler.dense.weight" in res.output
    assert not (tmp_path / "o.onnx").exists()
    res = CliRunner().invoke(main, ["export-onnx", str(g), str(tmp_path / "o.onnx"), "-a", str(adapter_dir("bert")),
                                    "--base", str(base_dir("bert"))])
    assert res.exit_code == 0, res.output
    assert "warning: not in the graph, left out: pooler.dense.weight" in res.output


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 40, b"ir_version: 8\ngraph { node {} }"])
def test_corrupt_onnx_is_a_clear_error(content, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    res = CliRunner().invoke(main, ["export-onnx", str(bad), str(tmp_path / "o.onnx"), "-a",
                                    str(adapter_dir("llama-basic"))])
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: {bad}: not a valid ONNX model")
    assert "Traceback" not in res.output


def test_truncated_onnx_and_missing_external_data(graphs, tmp_path):
    data = graphs("llama-fp32", "torchscript").read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxError, match="not a valid ONNX model"):
        fold(bad, tmp_path / "o.onnx", [adapter_dir("llama-basic")], base=base_dir("llama-fp32"))
    src = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(graphs("llama-fp32", "torchscript"))), str(src), save_as_external_data=True,
              location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").write_bytes((tmp_path / "ext.data").read_bytes()[:1000])
    with pytest.raises(OnnxError, match="truncated"):
        fold(src, tmp_path / "o.onnx", [adapter_dir("llama-basic")], base=base_dir("llama-fp32"))


def test_cli_usage_errors(graphs, tmp_path):
    g = graphs("llama-fp32", "torchscript")
    r = CliRunner().invoke(main, ["export-onnx", str(g), str(tmp_path / "o.onnx"), "-a", str(adapter_dir("llama-basic")),
                                  "--opset", "17"])
    assert r.exit_code == 2 and "--opset: not used when folding" in r.output
    r = CliRunner().invoke(main, ["export-onnx", str(g), str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "no adapter given" in r.output
    r = CliRunner().invoke(main, ["export-onnx", str(g), str(g), "-a", str(adapter_dir("llama-basic"))])
    assert r.exit_code == 1 and "same path as the input" in r.output
    with pytest.raises(UsageError):
        fold(g, tmp_path / "o.onnx", [adapter_dir("llama-basic")], lora_inputs=True)


# -- export mode ------------------------------------------------------------------------------

def test_export_merged_checkpoint_cli(peft_out, tmp_path):
    out = tmp_path / "llama.onnx"
    r = CliRunner().invoke(main, ["export-onnx", str(base_dir("llama-fp32")), str(out), "-a",
                                  str(adapter_dir("llama-basic")), "--exporter", "torchscript"])
    assert r.exit_code == 0, r.output
    assert "checked with onnxruntime" in r.output and "rtol" in r.output
    assert rel(run(out), peft_out("llama-fp32")) <= 1e-4
    model = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.ir_version <= runtime_limits()[0]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert all(isinstance(d, str) for ds in dims for d in ds), f"batch and sequence must be dynamic: {dims}"


def test_export_encoder_dynamo_with_token_types_and_external_data(tmp_path, monkeypatch):
    import loramerge.onnx.export as ex

    monkeypatch.setattr(ex, "TWO_GB", 0)  # as if the model were over 2 GB: weights go to external data
    out = tmp_path / "bert.onnx"
    report = loramerge.export_onnx(base_dir("bert"), out, [adapter_dir("bert")], exporter="dynamo")
    model = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    assert report.comparison.max_rel <= 1e-4
    assert report.files == ["bert.onnx", "bert.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx", "bert.onnx.data"]
    assert any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    assert model.opset_import[0].version <= runtime_limits()[1]


def test_export_validation_mismatch_fails(tmp_path, monkeypatch):
    import loramerge.onnx.export as ex

    real = ex.session

    class Perturbed:
        def __init__(self, s):
            self.s = s

        def run(self, names, feeds):
            return [o + 1e-2 for o in self.s.run(names, feeds)]

        def get_providers(self):
            return self.s.get_providers()

    monkeypatch.setattr(ex, "session", lambda *a, **k: Perturbed(real(*a, **k)))
    out = tmp_path / "llama.onnx"
    r = CliRunner().invoke(main, ["export-onnx", str(base_dir("llama-fp32")), str(out), "--exporter", "torchscript"])
    assert r.exit_code == 1
    assert "disagree" in r.output and "atol 0.0001" in r.output and "rtol 0.001" in r.output
    assert not out.exists() and not list(tmp_path.iterdir()), "nothing is left behind"
    r = CliRunner().invoke(main, ["export-onnx", str(base_dir("llama-fp32")), str(out), "--exporter", "torchscript",
                                  "--atol", "0.02"])
    assert r.exit_code == 0, r.output


def test_ir_version_is_lowered_to_what_onnxruntime_loads(graphs, tmp_path):
    max_ir, max_opset = runtime_limits()
    assert 8 <= max_ir and 17 <= max_opset
    m = onnx.load(str(graphs("llama-fp32", "torchscript")))
    m.ir_version = max_ir + 1
    assert "IR version" in fit_ir_version(m)
    assert m.ir_version == max_ir


def test_cuda_provider_when_onnxruntime_gpu_and_a_gpu(monkeypatch):
    from loramerge.onnx import runtime

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.providers() == ["CPUExecutionProvider"]
    with pytest.raises(OnnxError, match="onnxruntime-gpu"):
        runtime.providers("cuda")


def test_loralib_adapter_with_reader_options_cli(tmp_path):
    """A loralib checkpoint (alpha not stored; MergedLinear q/v groups of a fused [in, out] qkv)
    folded through the CLI's reader options, against loralib's own unmerged forward."""
    pytest.importorskip("loralib")
    import sys

    from conftest import FIXTURES
    sys.path.insert(0, str(FIXTURES))
    from layouts import LORALIB_ALPHA, LoralibNet

    net = LoralibNet(alpha=LORALIB_ALPHA)
    net.load_state_dict(load_dir(base_dir("loralib")), strict=False)
    net.eval()  # lora_B is still zero: loralib's eval-time merge changes nothing, the graph is the base
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    g = tmp_path / "base.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (ids,), str(g), dynamo=False, input_names=["ids"], opset_version=17,
                          dynamic_axes={"ids": {0: "b", 1: "s"}})
    net = LoralibNet(alpha=LORALIB_ALPHA)
    net.load_state_dict(load_dir(base_dir("loralib")), strict=False)
    net.load_state_dict(torch.load(adapter_dir("loralib") / "lora.pt", weights_only=True), strict=False)
    net.train()
    with torch.no_grad():
        ref = net(ids)
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["export-onnx", str(g), str(out), "-a", str(adapter_dir("loralib") / "lora.pt"),
                                  "--base", str(base_dir("loralib")), "--lora-alpha", str(LORALIB_ALPHA),
                                  "--enable-lora", "1,0,1", "--verify"])
    assert r.exit_code == 0, r.output
    assert ops(out) == ops(g)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"ids": ids.numpy()})[0]
    assert rel(torch.from_numpy(got), ref) <= 1e-4
