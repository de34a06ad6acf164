"""verify's own reading of the adapter files (loramerge/verifier/reference).

It must be independent of apply's reading: no import of loramerge.readers, .plan or .engine, and
it runs with no loramerge code importable at all. And it must be right on its own: the merge it
implies (W plus its terms, computed here from nothing but what it returns) equals the merge of
the format's own implementation: PEFT's merge_and_unload for every PEFT layout (rsLoRA, patterns,
fan_in_fan_out, DoRA on Linear/Conv1D/Embedding/Conv, embeddings, lora_B bias, saved tensors and
a resized vocabulary, an adapter saved under its own name in a subfolder), loralib's eval() merge,
and the kohya file whose PEFT twin PEFT merges.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge
from conftest import FIXTURES, adapter_dir, base_dir, expected_delta64, load_dir, rel_err
from loramerge.verifier.reference import read_adapters
from test_structure import PKG, import_graph

REFERENCE = "loramerge.verifier.reference"
ALLOWED = {"__future__", "dataclasses", "json", "math", "pathlib", "re", "torch", "safetensors"}
FP32_PAIRS = [("llama-fp32", "llama-basic"), ("llama-fp32", "llama-rslora"), ("llama-fp32", "llama-patterns"),
              ("llama-fp32", "llama-layers"), ("llama-bin", "llama-bin"), ("bert", "bert"),
              ("bert", "bert-seqcls-wrapper"), ("llama-bare", "llama-patterns"), ("gpt2", "gpt2-fifo"),
              ("gpt2", "gpt2-dora"), ("llama-fp32", "llama-embed"), ("llama-fp32", "llama-dora"),
              ("llama-fp32", "llama-resized")]


def test_own_reading_imports_nothing_of_apply():
    graph = import_graph()
    ours = {m for m in graph if m == REFERENCE or m.startswith(REFERENCE + ".")}
    reached, todo = set(), list(ours)
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += graph[m]
    assert len(ours) >= 4 and reached == ours, sorted(reached - ours)
    # and not through a side door: every import is of its own modules (relative, one level),
    # the standard library, torch or safetensors
    for path in (PKG / "verifier" / "reference").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, (path.name, ast.unparse(node))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert all(n.split(".")[0] in ALLOWED for n in names), (path.name, ast.unparse(node))


def test_own_reading_runs_with_no_loramerge_code(tmp_path):
    """Loaded as a package of its own in a process where `import loramerge` fails, it reads the
    rsLoRA + patterns adapters; its deltas equal conftest's hand-written float64 reference."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import torch
        from safetensors.torch import save_file
        sys.modules["loramerge"] = None  # any import of loramerge now raises ImportError
        root = {str(PKG / "verifier" / "reference")!r}
        spec = importlib.util.spec_from_file_location("ownreading", root + "/__init__.py",
                                                      submodule_search_locations=[root])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["ownreading"] = pkg
        spec.loader.exec_module(pkg)
        from safetensors import safe_open
        with safe_open({str(base_dir("llama-fp32") / "model.safetensors")!r}, "pt") as f:
            shapes = {{k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}}
        out = {{}}
        for name in ("llama-rslora", "llama-patterns"):
            reading = pkg.read_adapters([{str(FIXTURES / "adapters")!r} + "/" + name], shapes)
            for tensor, terms in reading.terms.items():
                (t,) = terms
                out[name + "/" + tensor] = (t.scale * t.left.double() @ t.right.double()).contiguous()
        save_file(out, {str(tmp_path / "deltas.safetensors")!r})
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    got = load_file(tmp_path / "deltas.safetensors")
    for name in ("llama-rslora", "llama-patterns"):
        want = expected_delta64(adapter_dir(name))
        mine = {k.split("/", 1)[1].removesuffix(".weight"): v for k, v in got.items() if k.startswith(name + "/")}
        assert set(mine) == set(want) and want
        for mod, d in want.items():
            assert rel_err(mine[mod], d) <= 1e-12, mod


def merged_by_reading(base: dict[str, torch.Tensor], reading) -> dict[str, torch.Tensor]:
    """The merge verify's reading implies, in float64, computed here from its terms alone."""
    out = {}
    for name, terms in reading.terms.items():
        rep = [t.value for t in terms if t.kind == "replace"]
        w = (rep[0] if rep else base[name]).double()
        for t in terms:
            if t.kind == "bias":
                w = w + t.scale * t.value
            elif t.kind == "lora":
                flip = t.layout == "transposed"
                v = w.reshape(w.shape[0], -1)
                v = (v.T if flip else v) + t.scale * (t.left.double() @ t.right.double())
                if t.magnitude is not None:  # DoRA: each output unit rescaled to its magnitude
                    v = v * (t.magnitude / v.norm(dim=1)).unsqueeze(1)
                w = (v.T if flip else v).reshape(w.shape)
        out[name] = w
    return out


def assert_same_merge(theirs: dict[str, torch.Tensor], base: dict[str, torch.Tensor], reading, tol: float):
    mine = merged_by_reading(base, reading)
    changed = {n for n in base if n in theirs and (theirs[n].shape != base[n].shape
                                                   or not torch.equal(theirs[n].to(base[n].dtype), base[n]))}
    assert changed and changed == set(mine), sorted(changed ^ set(mine))
    for name, w in mine.items():
        assert w.shape == theirs[name].shape and rel_err(w, theirs[name]) <= tol, name


@pytest.mark.parametrize("base,adapter", FP32_PAIRS, ids=[f"{b}+{a}" for b, a in FP32_PAIRS])
def test_own_reading_is_peft_s_merge(base, adapter):
    pytest.importorskip("peft")
    from test_oracle_peft import peft_merged

    theirs = peft_merged(base, adapter)
    orig = load_dir(base_dir(base))
    reading = read_adapters([adapter_dir(adapter)], {n: tuple(theirs[n].shape) for n in orig if n in theirs})
    assert reading.covered == {0} and not reading.unplaced and not reading.skipped
    assert_same_merge(theirs, orig, reading, 1e-5 if "dora" in adapter else 1e-6)


@pytest.mark.parametrize("adapter", ["convnet-lora", "convnet-dora"])
def test_own_reading_is_peft_s_conv_merge(adapter):
    peft = pytest.importorskip("peft")
    sys.path.insert(0, str(FIXTURES))
    from layouts import ConvNet

    net = ConvNet()
    orig = load_dir(base_dir("convnet"))
    net.load_state_dict(orig)
    theirs = peft.PeftModel.from_pretrained(net, adapter_dir(adapter)).merge_and_unload().state_dict()
    reading = read_adapters([adapter_dir(adapter)], {n: tuple(t.shape) for n, t in orig.items()})
    assert {t.layout for ts in reading.terms.values() for t in ts} >= {"conv"}
    assert_same_merge(theirs, orig, reading, 1e-5 if "dora" in adapter else 1e-6)


def test_own_reading_is_peft_s_merge_of_lora_bias_in_float32():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = transformers.Qwen2ForCausalLM.from_pretrained(base_dir("qwen2"), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(model, adapter_dir("qwen2-bias")).merge_and_unload().state_dict()
    orig = load_dir(base_dir("qwen2"))
    reading = read_adapters([adapter_dir("qwen2-bias")], {n: tuple(t.shape) for n, t in orig.items()})
    assert sum(t.kind == "bias" for ts in reading.terms.values() for t in ts) == 9
    assert_same_merge(theirs, orig, reading, 1e-6)


def test_own_reading_is_loralib_s_merge():
    pytest.importorskip("loralib")
    sys.path.insert(0, str(FIXTURES))
    from layouts import LORALIB_ALPHA, LoralibNet

    net = LoralibNet(alpha=LORALIB_ALPHA)
    orig = load_dir(base_dir("loralib"))
    net.load_state_dict(orig, strict=False)
    net.load_state_dict(torch.load(adapter_dir("loralib") / "lora.pt", weights_only=True), strict=False)
    net.train()
    net.eval()  # loralib merges into the weights here
    theirs = {k: v for k, v in net.state_dict().items() if "lora_" not in k}
    reading = read_adapters([adapter_dir("loralib") / "lora.pt"], {n: tuple(t.shape) for n, t in orig.items()},
                            lora_alpha=LORALIB_ALPHA, enable_lora=(True, False, True))
    assert {t.layout for ts in reading.terms.values() for t in ts} == {"linear", "transposed"}
    assert_same_merge(theirs, orig, reading, 1e-6)


def test_own_reading_of_kohya_names_is_peft_s_merge_of_the_same_factors():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = FIXTURES / "kohya-clip"
    model = transformers.CLIPTextModel.from_pretrained(root / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(model, root / "peft").merge_and_unload().state_dict()
    orig = load_dir(root / "base")
    reading = read_adapters([root / "te_lora.safetensors"], {n: tuple(t.shape) for n, t in orig.items()})
    assert len(reading.terms) == 12
    assert_same_merge(theirs, orig, reading, 1e-6)


def _kohya_with_alpha(tmp_path, alpha: float) -> Path:
    sd = load_file(adapter_dir("kohya") / "sd_lora.safetensors")
    path = tmp_path / "lora.safetensors"
    save_file({k: torch.tensor(alpha) if k.endswith(".alpha") else v for k, v in sd.items()}, path)
    return path


def test_kohya_alpha_0_means_alpha_equals_rank(tmp_path):
    """kohya-ss' LoRAModule: `alpha = lora_dim if alpha is None or alpha == 0`. verify's own
    reading follows it; apply's reader once took alpha 0 at its word (scale 0: nothing merged) and
    verify's cross-check is what caught it."""
    zero, same = _kohya_with_alpha(tmp_path, 0.0), _kohya_with_alpha(tmp_path / "..", 4.0)
    loramerge.apply(base_dir("sd-unet"), zero, tmp_path / "zero", sync=False)
    loramerge.apply(base_dir("sd-unet"), same, tmp_path / "four", sync=False)
    a, b = load_dir(tmp_path / "zero"), load_dir(tmp_path / "four")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], t) for n, t in load_dir(base_dir("sd-unet")).items())
    r = loramerge.verify(base_dir("sd-unet"), zero, tmp_path / "zero", outputs=False)
    assert r.ok and all(t.reading == "own" for t in r.targets), r.table()


def test_named_adapter_in_its_subfolder_with_saved_biases(tmp_path):
    """PEFT saves a second, named adapter in a subfolder; this one is rsLoRA, trains the biases of
    its layers (bias='lora_only': saved whole) and keeps the pooler whole (modules_to_save). Made
    by PEFT; oracle: its merge. apply and verify then agree on it, through both readings."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    gen = torch.Generator().manual_seed(3)
    model = transformers.BertModel.from_pretrained(base_dir("bert"), dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"]))
    pm.add_adapter("style", peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["value", "key"],
                                            bias="lora_only", modules_to_save=["pooler.dense"]))
    pm.set_adapter("style")
    with torch.no_grad():
        for name, p in pm.named_parameters():  # trained-like factors, biases and pooler copy
            if "style" in name or name.endswith("base_layer.bias"):
                p.add_(torch.randn(p.shape, generator=gen) * (0.05 if "lora_" in name else 0.01))
    pm.save_pretrained(tmp_path / "saved")
    style = tmp_path / "saved" / "style"
    assert json.loads((style / "adapter_config.json").read_text())["use_rslora"] is True
    theirs = pm.merge_and_unload(adapter_names=["style"]).state_dict()
    orig = load_dir(base_dir("bert"))
    reading = read_adapters([style], {n: tuple(t.shape) for n, t in orig.items()})
    kinds = {t.kind for ts in reading.terms.values() for t in ts}
    assert kinds == {"lora", "replace"} and not reading.unplaced, (kinds, reading.unplaced)
    assert {n for n, ts in reading.terms.items() if ts[0].kind == "replace"} == {
        "pooler.dense.weight", "pooler.dense.bias", *(f"encoder.layer.{i}.attention.self.{m}.bias"
                                                      for i in range(3) for m in ("query", "key", "value"))}
    assert_same_merge(theirs, orig, reading, 1e-6)
    loramerge.apply(base_dir("bert"), style, tmp_path / "m", sync=False)
    r = loramerge.verify(base_dir("bert"), style, tmp_path / "m", outputs=False)
    assert r.ok and {t.reading for t in r.targets} == {"own"}, r.table()
