"""The command line: exit codes and the exact error lines for bad inputs. Every failure must leave
no output behind and the inputs untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import adapter_dir, base_dir
from loramerge.cli import main


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def llama(tmp_path):
    """Private copies of a base and an adapter, so tests may corrupt them."""
    base = tmp_path / "base"
    shutil.copytree(base_dir("llama-fp32"), base)
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir("llama-basic"), adapter)
    return base, adapter


def _fails(result, out: Path, *inputs_and_hashes, first_line: str):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines[0].startswith("Error: "), result.output
    assert first_line in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists(), "a failed run must leave nothing at OUT"
    assert not [p for p in out.parent.iterdir() if ".loramerge-" in p.name]
    for path, digest in inputs_and_hashes:
        assert _tree_hash(path) == digest, f"{path} was modified"


def test_apply_succeeds_and_prints_summary(llama, tmp_path):
    base, adapter = llama
    r = run("apply", base, adapter, tmp_path / "out", "--quiet")
    assert r.exit_code == 0, r.output
    assert "merged 21 tensors, copied 9 bit for bit" in r.output
    assert "carried over: " in r.output and "config.json" in r.output


def test_dry_run_prints_plan_and_writes_nothing(llama, tmp_path):
    base, adapter = llama
    r = run("apply", base, adapter, tmp_path / "out", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "model.layers.0.self_attn.q_proj.weight [64, 64] F32: lora r=8 scale=2" in r.output
    assert "untouched tensors: 9 copied bit for bit, 0 cast" in r.output
    assert "(dry run: nothing was written)" in r.output
    assert not (tmp_path / "out").exists()


def test_truncated_shard(llama, tmp_path):
    base, adapter = llama
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    digest = _tree_hash(base)
    r = run("apply", base, adapter, tmp_path / "out")
    _fails(r, tmp_path / "out", (base, digest), first_line=f"Error: {f}: file is truncated: tensor")
    assert "re-download or re-save this shard" in r.output


def test_garbage_shard(llama, tmp_path):
    base, adapter = llama
    (base / "model.safetensors").write_bytes(b"\x89PNG garbage" * 100)
    r = run("apply", base, adapter, tmp_path / "out")
    _fails(r, tmp_path / "out", first_line="not a valid safetensors file (header length")


def test_adapter_for_another_model_shape_mismatch(llama, tmp_path):
    base, adapter = llama
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd[key] = torch.randn(8, 80)
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    digest = _tree_hash(adapter)
    r = run("apply", base, adapter, tmp_path / "out")
    _fails(r, tmp_path / "out", (adapter, digest), first_line="1 problem(s) matching the adapter(s) to the base")
    assert ("model.layers.0.self_attn.q_proj: base tensor model.layers.0.self_attn.q_proj.weight has shape "
            "[64, 64] but the adapter's lora_B @ lora_A gives [64, 80]; the adapter was trained for another model"
            ) in r.output


def test_missing_adapter_config(llama, tmp_path):
    base, adapter = llama
    (adapter / "adapter_config.json").unlink()
    r = run("apply", base, adapter, tmp_path / "out")
    _fails(r, tmp_path / "out", first_line=f"Error: {adapter}: no adapter_config.json; expected a PEFT adapter "
                                          "directory (adapter_config.json + adapter_model.safetensors)")


def test_invalid_adapter_config(llama, tmp_path):
    base, adapter = llama
    (adapter / "adapter_config.json").write_text("{not json")
    r = run("apply", base, adapter, tmp_path / "out")
    _fails(r, tmp_path / "out", first_line=f"Error: {adapter / 'adapter_config.json'}: invalid JSON")


@pytest.mark.parametrize("text", ["[]", '"lora"', "3", "null"])
def test_adapter_config_that_is_not_an_object(llama, tmp_path, text):
    """Valid JSON that is no object: the same one line as any invalid config (the head start's and
    the premerge worker's guess at the adapter's names read it first, and raised)."""
    from loramerge.readers.touched import adapter_names

    base, adapter = llama
    (adapter / "adapter_config.json").write_text(text)
    assert adapter_names(adapter) is None
    r = run("apply", base, adapter, tmp_path / "out")
    _fails(r, tmp_path / "out", first_line=f"Error: {adapter / 'adapter_config.json'}: invalid JSON (top level is "
                                          "not an object)")


def test_targets_that_match_nothing(llama, tmp_path):
    base, _ = llama
    r = run("apply", base, adapter_dir("bert"), tmp_path / "out")
    _fails(r, tmp_path / "out", first_line="problem(s) matching the adapter(s) to the base")
    assert "encoder.layer.0.attention.self.query: no base tensor named encoder.layer.0.attention.self.query.weight" \
        in r.output


def test_nan_in_adapter(llama, tmp_path):
    base, adapter = llama
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    sd[key][3, 2] = float("nan")
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    r = run("apply", base, adapter, tmp_path / "out")
    _fails(r, tmp_path / "out", first_line="adapter weights do not match adapter_config.json")
    assert "model.layers.1.mlp.up_proj: lora_B contain NaN or Inf; the adapter is broken" in r.output


def test_out_equal_to_base_or_inside_it(llama):
    base, adapter = llama
    digest = _tree_hash(base)
    for out in (base, base / "sub"):
        r = run("apply", base, adapter, out, "--overwrite")
        assert r.exit_code == 1 and r.output.startswith("Error: "), r.output
        assert "the output is" in r.output and "choose" in r.output
    assert _tree_hash(base) == digest
    assert not (base / "sub").exists()


def test_existing_out_is_not_clobbered(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    r = run("apply", base, adapter, out)
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {out}: already exists and is not empty; pass --overwrite to replace it "
                                "(it is replaced only once the new output is complete)")
    assert (out / "precious.txt").read_text() == "x"


def test_usage_errors_exit_2(llama, tmp_path):
    base, adapter = llama
    r = run("apply", base, adapter, tmp_path / "out", "--weights", "1,2")
    assert r.exit_code == 2 and "--weights has 2 value(s) for 1 adapter(s)" in r.output
    r = run("apply", base, adapter, tmp_path / "out", "--dtype", "int8")
    assert r.exit_code == 2


def test_non_finite_result_names_the_tensor(llama, tmp_path):
    """A finite adapter whose merge overflows float16 is refused, naming the tensor and the fix."""
    base, adapter = llama
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight"] *= 1e9
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    r = run("apply", base, adapter, tmp_path / "out", "--dtype", "float16")
    _fails(r, tmp_path / "out", first_line="Error: model.layers.2.self_attn.o_proj.weight: merged result has")
    assert "overflows float16 (max 65504): use --dtype bfloat16 or float32" in r.output


@pytest.mark.parametrize("base_name,adapter_name", [("llama-fp32", "llama-basic"),
                                                     ("llama-bf16-sharded", "llama-bf16")])
def test_a_non_finite_value_in_the_base_is_blamed_on_the_base(tmp_path, base_name, adapter_name):
    """A NaN the base already holds (the float32 torch path; the bfloat16 kernel, where the premerge
    worker leaves it to the merge) is the base's, not the adapter's."""
    base = tmp_path / "base"
    shutil.copytree(base_dir(base_name), base)
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = next(f for f in sorted(base.glob("*.safetensors")) if name in load_file(str(f)))
    sd = load_file(str(shard))
    sd[name].view(-1)[5] = float("nan")
    sd[name].view(-1)[9] = float("inf")
    save_file(sd, str(shard), metadata={"format": "pt"})
    r = run("apply", base, adapter_dir(adapter_name), tmp_path / "out")
    _fails(r, tmp_path / "out", first_line=f"Error: {name}: the base tensor already holds 2 non-finite value(s) "
                                          "(first at flat index 5: nan)")
    assert "adapter" not in r.output.splitlines()[0] and "repair or re-download the base checkpoint" in r.output


def test_a_nan_in_a_strided_bin_base_tensor_is_blamed_on_the_base(tmp_path):
    """torch.load keeps a .bin tensor's strides: the finiteness check reads it as it is."""
    base = tmp_path / "base"
    shutil.copytree(base_dir("llama-fp32"), base)
    sd = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").unlink()
    name = "model.layers.0.self_attn.q_proj.weight"
    w = sd[name].t().contiguous().t()  # same values, column-major
    w[0, 3] = float("nan")
    sd[name] = w
    torch.save(sd, base / "pytorch_model.bin")
    r = run("apply", base, adapter_dir("llama-basic"), tmp_path / "out")
    _fails(r, tmp_path / "out", first_line=f"Error: {name}: the base tensor already holds 1 non-finite value(s) "
                                          "(first at flat index 3: nan)")


def test_debug_shows_traceback(llama, tmp_path):
    base, adapter = llama
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT"}))
    r = run("apply", base, adapter, tmp_path / "out", "--debug")
    assert r.exit_code != 0 and isinstance(r.exception, Exception)
    assert "peft_type is 'OFT'" in str(r.exception)
