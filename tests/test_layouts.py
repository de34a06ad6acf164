"""Adapter layouts beyond plain Linear: conv, loralib, kohya, tied embeddings, and the refusals.

Oracles: PEFT's own merge (conv), loralib's own eval() merge, float64 math from the raw files
(kohya, tied embeddings). The PEFT transformer layouts (Conv1D, embeddings, DoRA, resized vocab)
are in test_oracle_peft.py.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge
from conftest import FIXTURES, adapter_dir, base_dir, correctly_rounded, load_dir, rel_err
from loramerge.errors import AdapterError, PlanError

sys.path.insert(0, str(FIXTURES))
from layouts import LORALIB_ALPHA, ConvNet, LoralibNet  # noqa: E402

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("adapter,tol", [("convnet-lora", 1e-6), ("convnet-dora", 1e-5)])
def test_conv_lora_matches_peft(adapter, tol, tmp_out):
    loramerge.apply(base_dir("convnet"), adapter_dir(adapter), tmp_out, sync=False)
    ours = load_dir(tmp_out)
    net = ConvNet()
    net.load_state_dict(load_dir(base_dir("convnet")))
    pm = peft.PeftModel.from_pretrained(net, adapter_dir(adapter)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged_out = pm(x)
    theirs = pm.merge_and_unload().state_dict()
    changed = [n for n in ours if not torch.equal(ours[n], load_dir(base_dir("convnet"))[n])]
    assert len(changed) == (4 if adapter == "convnet-lora" else 2)
    for name, t in ours.items():
        assert rel_err(t, theirs[name]) <= tol, name
    merged = ConvNet()
    merged.load_state_dict(ours)
    with torch.no_grad():
        assert rel_err(merged.eval()(x), unmerged_out) < 1e-5


def test_loralib_matches_loralib_own_merge(tmp_out):
    """loralib's eval() merges in place: that is the oracle, including MergedLinear q/v groups,
    fan_in_fan_out and Embedding."""
    lora = pytest.importorskip("loralib")
    loramerge.apply(base_dir("loralib"), adapter_dir("loralib") / "lora.pt", tmp_out, lora_alpha=LORALIB_ALPHA,
                    enable_lora=(True, False, True), sync=False)
    ours = load_dir(tmp_out)
    net = LoralibNet(alpha=LORALIB_ALPHA)
    net.load_state_dict(load_dir(base_dir("loralib")), strict=False)
    net.load_state_dict(torch.load(adapter_dir("loralib") / "lora.pt", weights_only=True), strict=False)
    net.train()
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged_out = net(ids)
    net.eval()  # loralib merges here
    theirs = {k: v for k, v in net.state_dict().items() if "lora_" not in k}
    assert set(ours) == set(theirs)
    for name in ("wte.weight", "c_attn.weight", "fc.weight"):
        assert not torch.equal(ours[name], load_dir(base_dir("loralib"))[name]), name
    for name, t in ours.items():
        assert rel_err(t, theirs[name]) <= 1e-6, name
    # the k rows of the fused qkv weight (stored [in, out]: columns 32..63) must be untouched
    base_attn = load_dir(base_dir("loralib"))["c_attn.weight"]
    assert torch.equal(ours["c_attn.weight"][:, 32:64], base_attn[:, 32:64])
    with torch.no_grad():
        assert rel_err(net(ids), unmerged_out) < 1e-5
    del lora


def test_loralib_refusals(tmp_out):
    path = adapter_dir("loralib") / "lora.pt"
    with pytest.raises(AdapterError, match="does not store lora_alpha; pass --lora-alpha"):
        loramerge.apply(base_dir("loralib"), path, tmp_out)
    with pytest.raises(PlanError, match=r"c_attn.*covering 2 of 3 row groups.*--enable-lora"):
        loramerge.apply(base_dir("loralib"), path, tmp_out, lora_alpha=8)
    with pytest.raises(PlanError, match=r"--enable-lora 1,1 does not fit"):
        loramerge.apply(base_dir("loralib"), path, tmp_out, lora_alpha=8, enable_lora=(True, True))
    assert not tmp_out.exists()


def test_kohya_matches_fp64(tmp_out):
    path = adapter_dir("kohya") / "sd_lora.safetensors"
    report = loramerge.apply(base_dir("sd-unet"), path, tmp_out, sync=False)
    ours = load_dir(tmp_out)
    base = load_dir(base_dir("sd-unet"))
    lora = load_file(str(path))
    assert report.tensors_merged == 5
    checked = 0
    for name, w in base.items():
        key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        if name.endswith(".weight") and key + ".lora_down.weight" in lora:
            down, up = lora[key + ".lora_down.weight"].double(), lora[key + ".lora_up.weight"].double()
            scale = lora[key + ".alpha"].item() / down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * scale
            ref = correctly_rounded(w.double() + delta, w.dtype)
            assert torch.equal(ours[name].view(torch.int16), ref.view(torch.int16)), name
            checked += 1
        else:
            assert torch.equal(ours[name], w), name
    assert checked == 5


def test_kohya_unmatched_key_is_an_error_not_a_log_line(tmp_path):
    lora = load_file(str(adapter_dir("kohya") / "sd_lora.safetensors"))
    lora["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 32)
    lora["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 4)
    bad = tmp_path / "with_te.safetensors"
    save_file(lora, str(bad))
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"lora_te_text_model_encoder_layers_0_self_attn_q_proj: no base tensor"):
        loramerge.apply(base_dir("sd-unet"), bad, out)
    assert not out.exists()
    # choosing the UNet part explicitly works
    loramerge.apply(base_dir("sd-unet"), bad, out, only="lora_unet_", sync=False)
    assert out.is_dir()


@pytest.mark.parametrize("adapter,changed,kept", [("qwen2-lmhead", "lm_head.weight", "model.embed_tokens.weight"),
                                                  ("qwen2-embed", "model.embed_tokens.weight", "lm_head.weight")])
def test_tied_embeddings_are_untied_and_only_the_target_changes(adapter, changed, kept, tmp_out):
    """Qwen2 ties lm_head to embed_tokens and stores only the embedding. A LoRA on one of them must
    leave the other exactly as the base had it, and the config must stop tying them."""
    loramerge.apply(base_dir("qwen2"), adapter_dir(adapter), tmp_out, sync=False)
    ours = load_dir(tmp_out)
    emb = load_dir(base_dir("qwen2"))["model.embed_tokens.weight"]
    assert "lm_head.weight" in ours
    assert torch.equal(ours[kept], emb)
    sd = load_file(str(adapter_dir(adapter) / "adapter_model.safetensors"))
    if adapter == "qwen2-lmhead":
        a, b = sd["base_model.model.lm_head.lora_A.weight"], sd["base_model.model.lm_head.lora_B.weight"]
        delta = 2.0 * (b.double() @ a.double())
    else:
        a = sd["base_model.model.model.embed_tokens.lora_embedding_A"]
        b = sd["base_model.model.model.embed_tokens.lora_embedding_B"]
        delta = 2.0 * (b.double() @ a.double()).T
    ref = correctly_rounded(emb.double() + delta, emb.dtype)
    assert torch.equal(ours[changed].view(torch.int16), ref.view(torch.int16))
    cfg = json.loads((tmp_out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False


def test_resized_vocab_updates_config(tmp_out):
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-resized"), tmp_out, sync=False)
    ours = load_dir(tmp_out)
    assert ours["model.embed_tokens.weight"].shape == (264, 64)
    assert ours["lm_head.weight"].shape == (264, 64)
    assert json.loads((tmp_out / "config.json").read_text())["vocab_size"] == 264


def _edited_adapter(tmp_path, name, **changes):
    d = tmp_path / name
    shutil.copytree(adapter_dir(name), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_conv1d_adapter_without_fan_in_fan_out_is_refused(tmp_path):
    bad = _edited_adapter(tmp_path, "gpt2-fifo", fan_in_fan_out=False)
    with pytest.raises(PlanError) as e:
        loramerge.apply(base_dir("gpt2"), bad, tmp_path / "out")
    msg = str(e.value)
    # non-square c_attn: the shapes only fit transposed; square c_proj: the model type tells
    assert "transformer.h.0.attn.c_attn" in msg and "the transpose of the adapter's" in msg
    assert "transformer.h.0.attn.c_proj" in msg and "implements c_proj as Conv1D" in msg
    assert "set it to true in adapter_config.json" in msg
    assert not (tmp_path / "out").exists()


def test_dora_cannot_be_weighted_or_summed(tmp_path):
    with pytest.raises(PlanError, match="DoRA .* cannot be weighted"):
        loramerge.apply(base_dir("llama-fp32"), [adapter_dir("llama-dora")], tmp_path / "o", weights=[0.5])
    with pytest.raises(PlanError, match="DoRA .* cannot be summed with other adapters"):
        loramerge.apply(base_dir("llama-fp32"), [adapter_dir("llama-dora"), adapter_dir("llama-basic")],
                        tmp_path / "o")


def test_unsupported_peft_fields_are_refused_not_ignored(tmp_path):
    bad = _edited_adapter(tmp_path, "llama-basic", layer_replication=[[0, 2]], init_lora_weights="pissa")
    with pytest.raises(AdapterError) as e:
        loramerge.apply(base_dir("llama-fp32"), bad, tmp_path / "o")
    assert "layer_replication" in str(e.value) and "pissa" in str(e.value)
