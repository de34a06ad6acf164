"""The plan's state object and its passes (issue 16): problems found late in the plan are raised
like every other, and extra output tensors are decided once, from the resolved target names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import loramerge
from conftest import base_dir, load_dir
from loramerge.errors import PlanError


def _saved_embedding_adapter(path, rows: int, module: str = "embed_tokens"):
    """A PEFT adapter that saves a full (resized) copy of one embedding and trains q_proj."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "modules_to_save": [module]}))
    g = torch.Generator().manual_seed(0)
    save_file({
        f"base_model.model.model.{module}.weight": torch.randn(rows, 64, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 64, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 2, generator=g),
    }, str(path / "adapter_model.safetensors"))


def test_vocabulary_disagreement_is_raised_not_dropped(tmp_path):
    """An untied base whose embedding alone is resized would not load (lm_head keeps 256 rows).
    The check used to run after the plan had raised its problems, so it was never reported."""
    _saved_embedding_adapter(tmp_path / "ad", rows=264)
    with pytest.raises(PlanError) as e:
        loramerge.apply(base_dir("llama-fp32"), tmp_path / "ad", tmp_path / "out", dry_run=True)
    assert "disagree on the vocabulary size" in "\n".join(e.value.problems)
    assert "model.embed_tokens.weight: 264" in "\n".join(e.value.problems)
    assert not (tmp_path / "out").exists()


def test_same_size_replacement_keeps_untied_base_as_is(tmp_path):
    _saved_embedding_adapter(tmp_path / "ad", rows=256)
    loramerge.apply(base_dir("llama-fp32"), tmp_path / "ad", tmp_path / "out", sync=False)
    out, base = load_dir(tmp_path / "out"), load_dir(base_dir("llama-fp32"))
    assert set(out) == set(base)
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])
    assert not torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
