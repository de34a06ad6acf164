"""Mutation tests for verify: break apply's reading of an adapter the way real bugs do (a scale
that ignores rsLoRA, rank/alpha patterns, the fan_in_fan_out transpose, DoRA's norm, kohya's
alpha, a target dropped or moved), let apply write the wrong merge, and verify in its default
mode (no --oracle) must fail it, naming each wrong tensor.

The mutation stays in place while verify runs, as a real bug would: verify reads the adapters
through the same broken reader to plan its checks. What catches the merge is verify's own reading
of the adapter files (verifier/reference); each reader-level case also shows that without it
(apply's reading alone) verify would have passed the wrong merge.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import loramerge
from conftest import adapter_dir, base_dir
from loramerge.engine import deltas, ops
from loramerge.readers import adapters as adapters_mod
from loramerge.readers import kohya as kohya_mod
from loramerge.types import LoraPair
from loramerge.verifier.reference import Reading

CHECK = importlib.import_module("loramerge.verifier.check")


def mutate_peft_pairs(monkeypatch, change):
    """apply's PEFT reader, with change(adapter, pair) -> pair applied to every LoRA pair."""
    original = adapters_mod.read_peft_adapter

    def read(path):
        adapter = original(path)
        adapter.pairs = [change(adapter, p) for p in adapter.pairs]
        return adapter

    monkeypatch.setattr(adapters_mod, "read_peft_adapter", read)


def ignore_rslora(adapter, p):
    return dataclasses.replace(p, scale=p.alpha / p.rank)


def ignore_alpha_pattern(adapter, p):
    return dataclasses.replace(p, scale=adapter.config["lora_alpha"] / p.rank)


def config_r_in_scale(adapter, p):  # the rank pattern's r used for the shapes but not in the scale
    return dataclasses.replace(p, scale=p.alpha / adapter.config["r"])


def drop_dora(adapter, p):
    return dataclasses.replace(p, magnitude_key=None)


def fifo_without_transpose(monkeypatch):
    """deltas.factors forgetting the transpose of fan_in_fan_out layouts where the shapes allow
    it (square Conv1D weights: GPT-2's attn.c_proj): the engine and apply's factors in verify."""
    original = deltas.factors

    def factors(adapter, pair, dtype=torch.float32, device=None):
        left, right = original(adapter, pair, dtype, device)
        if pair.layout == "transposed" and left.shape[0] == right.shape[1]:
            return right.T.contiguous(), left.T.contiguous()
        return left, right

    monkeypatch.setattr(deltas, "factors", factors)


def dora_norm_of_w(monkeypatch):
    """The engine's DoRA normalizing by ||W|| instead of ||W + dW|| (per output unit)."""

    def dora_merge(w, left, right, scale, magnitude, per_column, out_dtype):
        shape = w.shape
        w2 = w.reshape(shape[0], -1).to(torch.float64)
        v = w2 + scale * left.to(torch.float64) @ right.to(torch.float64)
        m = magnitude.reshape(-1).to(torch.float64)
        dim = 0 if per_column else 1
        v = v * (m / torch.linalg.vector_norm(w2, dim=dim)).unsqueeze(dim)
        return ops.round_to(v, out_dtype).reshape(shape)

    monkeypatch.setattr(ops, "dora_merge", dora_merge)


def kohya_without_alpha(monkeypatch):
    original = kohya_mod.read_kohya

    def read(path, tensors):
        adapter = original(path, tensors)
        adapter.pairs = [dataclasses.replace(p, scale=1.0) if isinstance(p, LoraPair) else p for p in adapter.pairs]
        return adapter

    monkeypatch.setattr(kohya_mod, "read_kohya", read)


def peft(change):
    return lambda monkeypatch: mutate_peft_pairs(monkeypatch, change)


# name -> (base, adapter, mutation, what the wrong merge touches, whether verify's plan shares the bug)
MUTATIONS = {
    "rslora-scale": ("llama-fp32", "llama-rslora", peft(ignore_rslora), "self_attn", True),
    "alpha-pattern": ("llama-fp32", "llama-patterns", peft(ignore_alpha_pattern), "v_proj", True),
    "rank-pattern": ("llama-fp32", "llama-patterns", peft(config_r_in_scale), ("q_proj", "layers.1.mlp.down_proj"),
                     True),
    "fan-in-fan-out": ("gpt2", "gpt2-fifo", fifo_without_transpose, "attn.c_proj", True),
    "dora-dropped": ("llama-fp32", "llama-dora", peft(drop_dora), "", True),
    "dora-norm": ("llama-fp32", "llama-dora", dora_norm_of_w, "", False),
    "dora-norm-conv1d": ("gpt2", "gpt2-dora", dora_norm_of_w, "", False),
    "kohya-alpha": ("sd-unet", "kohya", kohya_without_alpha, "", True),
}


def _adapter_path(adapter):
    return adapter_dir(adapter) / "sd_lora.safetensors" if adapter == "kohya" else adapter_dir(adapter)


@pytest.mark.parametrize("case", MUTATIONS)
def test_verify_fails_a_merge_made_by_a_broken_reading(case, monkeypatch, tmp_path):
    base, adapter, mutate, touched, shared = MUTATIONS[case]
    adapter = _adapter_path(adapter)
    good = loramerge.verify(base_dir(base), adapter, _merge(base, adapter, tmp_path / "good"), outputs=False)
    targets = {t.name for t in good.targets}
    assert good.ok and targets, good.table()
    mutate(monkeypatch)
    bad = _merge(base, adapter, tmp_path / "bad")
    r = loramerge.verify(base_dir(base), adapter, bad, outputs=False)
    assert not r.ok
    wrong = {n for n in targets if any(s in n for s in ([touched] if isinstance(touched, str) else touched))}
    failing = {line.split(":")[0].removeprefix("FAIL ") for line in r.failures()}
    assert failing == wrong, (sorted(failing ^ wrong), r.table())
    for t in r.tensors:
        if t.name in wrong:
            assert any("off by more than" in p for p in t.problems), t.problems  # the values themselves
            if shared:  # and the line that says why: the readings disagree
                assert any("verify's own reading" in p for p in t.problems), t.problems
    if shared:
        # the blind spot this closes: with apply's reading alone, verify agreed with the wrong merge
        monkeypatch.setattr(CHECK, "read_adapters", lambda *a, **k: Reading())
        assert loramerge.verify(base_dir(base), adapter, bad, outputs=False).ok


def _merge(base, adapter, out):
    loramerge.apply(base_dir(base), adapter, out, sync=False)
    return out


def test_model_outputs_check_uses_verify_s_own_reading(monkeypatch, tmp_path):
    """The rsLoRA scale ignored: the model check (hooks on the base) fails the merge too, which it
    passed when its hooks came from apply's reading."""
    pytest.importorskip("transformers")
    mutate_peft_pairs(monkeypatch, ignore_rslora)
    bad = _merge("llama-fp32", adapter_dir("llama-rslora"), tmp_path / "bad")
    r = loramerge.verify(base_dir("llama-fp32"), adapter_dir("llama-rslora"), bad)
    assert r.model.status == "FAIL" and "logits rel err" in r.model.reason
    monkeypatch.setattr(CHECK, "read_adapters", lambda *a, **k: Reading())
    r = loramerge.verify(base_dir("llama-fp32"), adapter_dir("llama-rslora"), bad)
    assert r.ok and r.model.status == "ok"


def test_a_target_apply_s_reading_drops_is_named(monkeypatch, tmp_path):
    lost = "model.layers.1.self_attn.v_proj"
    original = adapters_mod.read_peft_adapter

    def read(path):
        adapter = original(path)
        adapter.pairs = [p for p in adapter.pairs if p.module != lost]
        return adapter

    monkeypatch.setattr(adapters_mod, "read_peft_adapter", read)
    bad = _merge("llama-fp32", adapter_dir("llama-basic"), tmp_path / "bad")
    r = loramerge.verify(base_dir("llama-fp32"), adapter_dir("llama-basic"), bad, outputs=False)
    lines = r.failures()
    assert len(lines) == 1 and lines[0].startswith(f"FAIL {lost}.weight: verify's own reading of the adapter file puts")
    assert "apply's reading does not: the merge left it out" in lines[0]


def test_a_target_apply_s_reading_moves_is_named_twice(monkeypatch, tmp_path):
    """q_proj's factors read onto o_proj (both [64, 64]): both tensors are wrong, both named."""
    original = adapters_mod.read_peft_adapter
    src, dst = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"

    def read(path):
        adapter = original(path)
        adapter.pairs = [dataclasses.replace(p, module=dst) if p.module == src else p for p in adapter.pairs]
        return adapter

    monkeypatch.setattr(adapters_mod, "read_peft_adapter", read)
    bad = _merge("llama-fp32", adapter_dir("llama-rslora"), tmp_path / "bad")
    r = loramerge.verify(base_dir("llama-fp32"), adapter_dir("llama-rslora"), bad, outputs=False)
    failing = {line.split(":")[0].removeprefix("FAIL ") for line in r.failures()}
    assert failing == {src + ".weight", dst + ".weight"}
    text = "\n".join(r.failures())
    assert f"FAIL {dst}.weight: apply's reading puts" in text and "puts nothing from it here" in text
    assert f"FAIL {src}.weight: verify's own reading of the adapter file puts" in text
