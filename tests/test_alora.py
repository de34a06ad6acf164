"""Activated LoRA (aLoRA) stays refused (issue 11, item 5): its delta applies only to tokens after
the invocation sequence, so no weight change reproduces it. Every command says why, in one line."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import loramerge
from conftest import base_dir
from loramerge.cli import main
from loramerge.errors import AdapterError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def alora(tmp_path_factory):
    path = tmp_path_factory.mktemp("alora") / "ad"
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir("llama-fp32"), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6])
    pm = peft.get_peft_model(model, cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    pm.save_pretrained(path, save_embedding_layers=False)
    return path


def test_apply_refuses_alora_and_says_why(alora, tmp_path):
    with pytest.raises(AdapterError) as e:
        loramerge.apply(base_dir("llama-fp32"), alora, tmp_path / "out")
    text = str(e.value) + " ".join(e.value.problems)
    assert "alora_invocation_tokens" in text and "cannot be folded into the weights" in text
    assert "after its invocation tokens" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["apply", "unmerge", "verify"])
def test_every_command_gives_one_error_line(alora, tmp_path, command):
    out = base_dir("llama-fp32") if command == "verify" else tmp_path / "out"  # verify reads an existing MERGED
    args = [command, str(base_dir("llama-fp32")), str(alora), str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and "Traceback" not in r.output
    assert "cannot be folded" in r.output
