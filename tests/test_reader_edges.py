"""Hostile inputs the fuzzer (test_fuzz_readers.py) found or the issue named, pinned as plain tests:
each is one `Error:` line (exit 1) naming the file and what is wrong, never a traceback, and the
first one was a silent wrong merge before (issue 14)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import adapter_dir, base_dir

from loramerge.cli import main
from loramerge.errors import AdapterError, CheckpointError
from loramerge.readers.adapters import read_adapter
from loramerge.readers.checkpoint import open_checkpoint


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in res.output
    return res


def test_one_slot_under_two_adapter_names_is_an_error_not_an_overwrite(tmp_path):
    """PEFT names factors `.lora_A.<adapter>.weight` in memory; a file that holds a module's
    lora_A under two names (two adapters saved into one file by hand) used to keep whichever came
    last, silently merging half of each."""
    src = adapter_dir("llama-basic")
    d = tmp_path / "two-names"
    shutil.copytree(src, d)
    sd = load_file(src / "adapter_model.safetensors")
    both = {}
    for k, v in sd.items():
        both[k.replace(".weight", ".default.weight")] = v
        both[k.replace(".weight", ".style.weight")] = v * 2
    save_file(both, d / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="the same tensor under two adapter names") as e:
        read_adapter(d)
    first = e.value.problems[0]
    assert "stored twice" in first and ".default.weight" in first and ".style.weight" in first
    res = run("apply", base_dir("llama-fp32"), d, tmp_path / "out")
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "two adapter names" in res.output
    assert not (tmp_path / "out").exists()
    # one name throughout is fine: it is how PEFT itself saves a named adapter
    save_file({k.replace(".weight", ".default.weight"): v for k, v in sd.items()}, d / "adapter_model.safetensors")
    assert len(read_adapter(d).pairs) == len(read_adapter(src).pairs)


@pytest.mark.parametrize("target", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", None, 3, ""])
def test_an_index_may_only_name_files_beside_it(target, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(base_dir("llama-bf16-sharded"), d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = target
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name in the model's directory"):
        open_checkpoint(d)


def test_a_single_file_beside_an_index_of_other_shards_is_ambiguous(tmp_path):
    """transformers loads model.safetensors where both are present; the index's reader the shards:
    which one is the model is refused, not guessed. An index that names model.safetensors itself is
    one model."""
    d = tmp_path / "m"
    shutil.copytree(base_dir("llama-bf16-sharded"), d)
    shutil.copy(base_dir("llama-fp32") / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index.json"):
        open_checkpoint(d)
    res = run("apply", d, adapter_dir("llama-bf16"), tmp_path / "out")
    assert res.exit_code == 1 and res.output.startswith(f"Error: {d}: holds both") and "remove the stale one" in \
        res.output
    assert not (tmp_path / "out").exists()
    one = tmp_path / "one"
    shutil.copytree(base_dir("llama-fp32"), one)
    names = load_file(one / "model.safetensors")
    (one / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in names}}))
    assert set(open_checkpoint(one).tensors) == set(names)


@pytest.mark.parametrize("field,value,says", [
    ("target_modules", 7, "target_modules=7: expected a regular expression or a list of module names"),
    ("target_modules", "(", "a regular expression that compiles"),
    ("rank_pattern", {"q_proj": "eight"}, "rank_pattern="),
    ("alpha_pattern", {"[": 4}, "alpha_pattern="),
    ("layers_to_transform", "0", "layers_to_transform='0': expected a layer number"),
    ("lora_alpha", float("nan"), "lora_alpha=nan: expected a finite number"),
    ("use_dora", "yes", "use_dora='yes': expected true or false"),
])
def test_config_fields_of_the_wrong_type_are_named(field, value, says, tmp_path):
    d = tmp_path / "a"
    shutil.copytree(adapter_dir("llama-basic"), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[field] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    res = run("apply", base_dir("llama-fp32"), d, tmp_path / "out")
    assert res.exit_code == 1 and res.output.startswith(f"Error: {d / 'adapter_config.json'}: "), res.output
    assert says in res.output


def test_kohya_and_loralib_shapes_that_are_no_lora(tmp_path):
    kohya = tmp_path / "k.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_x.alpha": torch.ones(3)}, kohya)
    with pytest.raises(AdapterError, match="alpha must be one finite number"):
        read_adapter(kohya)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(()), "lora_unet_x.lora_up.weight": torch.zeros(8)}, kohya)
    with pytest.raises(AdapterError, match="do not form a pair"):
        read_adapter(kohya)
    loralib = tmp_path / "l.pt"
    torch.save({"q.lora_A": torch.zeros(0, 8), "q.lora_B": torch.zeros(8, 0)}, loralib)
    with pytest.raises(AdapterError, match="rank 0"):
        read_adapter(loralib, lora_alpha=8.0)


def test_an_adapter_file_safetensors_refuses_is_an_adapter_error(tmp_path):
    """Bytes after the last tensor: our header check allows them, the safetensors loader does not."""
    p = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, p)
    with open(p, "ab") as f:
        f.write(os.urandom(3))
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        read_adapter(p)
