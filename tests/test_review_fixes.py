"""Regressions for problems a code review found: each test failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loramerge
from conftest import adapter_dir, base_dir, load_dir, rel_err
from loramerge.cli import main
from loramerge.errors import AdapterError, CheckpointError, OutputError, PlanError
from loramerge.readers.checkpoint import open_checkpoint, read_safetensors_header

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_read_into_a_larger_pooled_buffer_reads_only_the_tensor(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a_small": torch.zeros(4), "b_big": torch.zeros(16 << 20)}, str(f))
    ck = open_checkpoint(f)
    buf = torch.empty(64 << 20, dtype=torch.uint8)
    before = _rchar()
    t = ck.read(ck.tensors["a_small"], out=buf)
    assert _rchar() - before < 1 << 20 and t.shape == (4,)


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": "12", "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}])
def test_malformed_header_entries_are_clear_errors(tmp_path, entry):
    raw = json.dumps({"t": entry}).encode()
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(CheckpointError, match="malformed header entry"):
        read_safetensors_header(f)


def test_duplicate_header_keys_are_refused(tmp_path):
    raw = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    f = tmp_path / "dup.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match="duplicate key 't'"):
        read_safetensors_header(f)


def test_lora_ga_adapters_are_refused(tmp_path):
    d = tmp_path / "ga"
    shutil.copytree(adapter_dir("llama-basic"), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "lora_ga"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="lora_ga.*changed the base weights"):
        loramerge.apply(base_dir("llama-fp32"), d, tmp_path / "o")


def _peft_adapter(model, out, **cfg):
    torch.manual_seed(0)
    save_embedding_layers = cfg.pop("save_embedding_layers", False)
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.05)
            elif "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.01)
    pm.save_pretrained(str(out), save_embedding_layers=save_embedding_layers)


def _outputs_match_unmerged(cls, base, adapter, merged, resize=None):
    m = cls.from_pretrained(merged, dtype=torch.float32).eval()
    b = cls.from_pretrained(base, dtype=torch.float32)
    if resize:
        b.resize_token_embeddings(resize, mean_resizing=False)
    u = peft.PeftModel.from_pretrained(b, adapter).eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(m(input_ids=ids).logits, u(input_ids=ids).logits) < 1e-4


def test_tied_base_with_resized_embedding_gives_a_loadable_lm_head(tmp_path):
    """lm_head tied to a replaced (resized) embedding starts from the replacement, no LoRA delta."""
    base = tmp_path / "qwen2-32"
    m = transformers.Qwen2ForCausalLM.from_pretrained(base_dir("qwen2"), dtype=torch.float32)
    m.save_pretrained(base)
    m.resize_token_embeddings(300, mean_resizing=False)
    _peft_adapter(m, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["embed_tokens"], save_embedding_layers=True)
    loramerge.apply(base, tmp_path / "ad", tmp_path / "out", sync=False)
    out = load_dir(tmp_path / "out")
    assert out["lm_head.weight"].shape == out["model.embed_tokens.weight"].shape == (300, 64)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 300
    _outputs_match_unmerged(transformers.Qwen2ForCausalLM, base, tmp_path / "ad", tmp_path / "out", resize=300)


def test_modules_to_save_lm_head_on_a_tied_base(tmp_path):
    base = tmp_path / "qwen2-32"
    transformers.Qwen2ForCausalLM.from_pretrained(base_dir("qwen2"), dtype=torch.float32).save_pretrained(base)
    m = transformers.Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float32)
    _peft_adapter(m, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    loramerge.apply(base, tmp_path / "ad", tmp_path / "out", sync=False)
    out = load_dir(tmp_path / "out")
    assert torch.equal(out["model.embed_tokens.weight"], load_dir(base)["model.embed_tokens.weight"])
    assert not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    _outputs_match_unmerged(transformers.Qwen2ForCausalLM, base, tmp_path / "ad", tmp_path / "out")


def test_tie_is_inferred_when_the_config_omits_it(tmp_path):
    """GPT-2 ties by default; a config without the key and a checkpoint without lm_head is tied."""
    base = tmp_path / "gpt2"
    shutil.copytree(base_dir("gpt2"), base)
    cfg = json.loads((base / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (base / "config.json").write_text(json.dumps(cfg))
    assert "lm_head.weight" not in load_dir(base)
    m = transformers.GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32)
    _peft_adapter(m, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["wte"])
    loramerge.apply(base, tmp_path / "ad", tmp_path / "out", sync=False)
    out = load_dir(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], load_dir(base)["transformer.wte.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    _outputs_match_unmerged(transformers.GPT2LMHeadModel, base, tmp_path / "ad", tmp_path / "out")


def test_resized_shape_only_for_embeddings(tmp_path):
    d = tmp_path / "ad"
    shutil.copytree(adapter_dir("llama-basic"), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["norm"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(d / "adapter_model.safetensors"))
    sd["base_model.model.model.norm.weight"] = torch.ones(32)
    save_file(sd, str(d / "adapter_model.safetensors"))
    with pytest.raises(PlanError, match=r"model.norm.weight: saved tensor has shape \[32\] but the base's "
                                        r"model.norm.weight has \[64\]"):
        loramerge.apply(base_dir("llama-fp32"), d, tmp_path / "o")


def test_lora_bias_on_conv1d_uses_the_output_dimension(tmp_path):
    d = tmp_path / "ad"
    shutil.copytree(adapter_dir("gpt2-fifo"), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_bias"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(d / "adapter_model.safetensors"))
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B"
    sd[key + ".bias"] = torch.randn(sd[key + ".weight"].shape[0])
    save_file(sd, str(d / "adapter_model.safetensors"))
    loramerge.apply(base_dir("gpt2"), d, tmp_path / "o", sync=False)
    got = load_dir(tmp_path / "o")["transformer.h.0.attn.c_attn.bias"]
    want = load_dir(base_dir("gpt2"))["transformer.h.0.attn.c_attn.bias"].double() + 2.0 * sd[key + ".bias"].double()
    assert rel_err(got, want) < 1e-6


def test_dangling_symlink_output_is_refused_before_work(tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="dangling symbolic link"):
        loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), out)


def test_single_file_output_warns_about_config_changes(tmp_path):
    r = loramerge.apply(base_dir("qwen2"), adapter_dir("qwen2-lmhead"), tmp_path / "m.safetensors", sync=False)
    assert any("tie_word_embeddings=False" in w for w in r.warnings)


def test_non_finite_weights_are_usage_errors(tmp_path):
    r = CliRunner().invoke(main, ["apply", str(base_dir("llama-fp32")), str(adapter_dir("llama-basic")),
                                  str(tmp_path / "o"), "--weights", "nan"])
    assert r.exit_code == 2 and "weights must be finite" in r.output


def test_float64_base_keeps_float64_precision():
    from loramerge.engine import ops
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64) * (1 + 1e-12)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    f = torch.tensor([0.5, 2.0], dtype=torch.float64)
    y, _ = ops.merge_weight(w, a, b, f, torch.float64)
    assert (y - (w + (b.double() * f) @ a.double())).abs().max() < 1e-14


def test_copy_range_falls_back_when_copy_file_range_returns_zero(tmp_path, monkeypatch):
    from loramerge.writers.safetensors import SafetensorsWriter
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 10)
    monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: 0, raising=False)
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("t", "U8", (100,), 100)], None)
    w.copy_range("t", src, 7, 100)
    w.close()
    assert load_file(str(tmp_path / "o.safetensors"))["t"].tolist() == list(range(7, 107))


def test_loralib_options_with_a_peft_adapter_are_usage_errors(tmp_path):
    with pytest.raises(loramerge.UsageError, match="--fan-in-fan-out are for loralib checkpoints"):
        loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "o", fan_in_fan_out=True)


def test_unmerge_cli_takes_loralib_options(tmp_path):
    """apply then unmerge a loralib checkpoint from the command line: the base comes back."""
    lora = str(adapter_dir("loralib") / "lora.pt")
    opts = ["--lora-alpha", "8", "--enable-lora", "1,0,1", "--quiet"]
    r = CliRunner().invoke(main, ["apply", str(base_dir("loralib")), lora, str(tmp_path / "m"), *opts])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["unmerge", str(tmp_path / "m"), lora, str(tmp_path / "u"), *opts])
    assert r.exit_code == 0, r.output
    back, orig = load_dir(tmp_path / "u"), load_dir(base_dir("loralib"))
    assert all(rel_err(back[k], orig[k]) < 1e-6 for k in orig)
