"""`verify --oracle peft`: PEFT's own merge_and_unload (float64) as a further judge of MERGED.

It passes correct merges across the PEFT layouts (and says which tensors it does not judge, and
why), fails wrong ones by name (a lost 5% of the delta, in fp32 and bf16; a wrong rsLoRA scale
even with verify's other references switched off), and refuses with one Error line what it
cannot judge. Its findings are in --json.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import json
import shutil

import pytest
from click.testing import CliRunner

import loramerge
from conftest import adapter_dir, base_dir
from loramerge.cli import main
from loramerge.readers import adapters as adapters_mod
from loramerge.verifier.reference import Reading

pytest.importorskip("transformers")
pytest.importorskip("peft")
CHECK = importlib.import_module("loramerge.verifier.check")

PASSING = [("llama-fp32", "llama-rslora"), ("llama-fp32", "llama-patterns"), ("llama-bf16-sharded", "llama-bf16"),
           ("qwen2", "qwen2-bias"), ("gpt2", "gpt2-fifo"), ("gpt2", "gpt2-dora"), ("llama-fp32", "llama-dora"),
           ("llama-fp32", "llama-resized"), ("llama-bare", "llama-patterns"), ("bert", "bert-seqcls-wrapper"),
           ("qwen2", "qwen2-embed"), ("qwen2", "qwen2-lmhead")]


def merge(base, adapters, out, **kw):
    loramerge.apply(base_dir(base), [adapter_dir(a) for a in adapters], out, sync=False, **kw)
    return out


def check(base, adapters, merged, **kw):
    return loramerge.verify(base_dir(base), [adapter_dir(a) for a in adapters], merged, outputs=False,
                            oracle="peft", **kw)


@pytest.mark.parametrize("base,adapter", PASSING, ids=[f"{b}+{a}" for b, a in PASSING])
def test_correct_merges_pass_the_oracle(base, adapter, tmp_path):
    r = check(base, [adapter], merge(base, [adapter], tmp_path / "m"))
    assert r.ok and r.oracle.status == "ok", r.table()
    judged = [t for t in r.tensors if t.oracle is not None]
    assert len(judged) == r.oracle.compared > 0
    assert {t.name for t in r.targets} - set(r.oracle.not_judged) <= {t.name for t in judged}
    if adapter in ("qwen2-embed", "qwen2-lmhead"):  # the tied twin written apart: named, not skipped
        (name, why), = r.oracle.not_judged.items()
        assert name in ("lm_head.weight", "model.embed_tokens.weight") and "PEFT keeps the tie" in why
        assert f"oracle: not judged: {name}" in r.table()
    else:
        assert not r.oracle.not_judged


def test_several_weighted_adapters(tmp_path):
    names, weights = ["llama-basic", "llama-rslora", "llama-patterns"], [1.0, -0.5, 0.7]
    m = merge("llama-fp32", names, tmp_path / "m", weights=weights)
    r = check("llama-fp32", names, m, weights=weights)
    assert r.ok and r.oracle.compared == 30, r.table()
    r = check("llama-fp32", names, m, weights=[1.0, -0.5, 0.75])  # another weight: PEFT disagrees too
    assert r.oracle.status == "FAIL" and r.oracle.failed == 9  # the 9 tensors llama-patterns targets


@pytest.mark.parametrize("base,adapter", [("llama-fp32", "llama-basic"), ("llama-bf16-sharded", "llama-bf16")])
def test_a_merge_that_lost_5_percent_of_its_delta_fails(base, adapter, tmp_path):
    """weights=[0.95]: every delta 5% short. Checked against the full adapter, the oracle names
    every target (and only them), in float32 and in bfloat16."""
    m = merge(base, [adapter], tmp_path / "m", weights=[0.95])
    (tmp_path / "m" / "loramerge_manifest.json").unlink()  # judged as a checkpoint from elsewhere
    r = check(base, [adapter], m)
    targets = {t.name for t in r.targets}
    oracle_lines = {line.split(":")[0].removeprefix("FAIL ") for line in r.failures() if "PEFT oracle:" in line}
    assert r.oracle.status == "FAIL" and oracle_lines == targets and len(targets) == 21


def test_the_oracle_alone_catches_a_reading_shared_by_apply_and_verify(monkeypatch, tmp_path):
    """A reader ignoring rsLoRA, and verify's own reading switched off: only PEFT is left to
    disagree, and it does, on every target."""
    original = adapters_mod.read_peft_adapter

    def read(path):
        adapter = original(path)
        adapter.pairs = [dataclasses.replace(p, scale=p.alpha / p.rank) for p in adapter.pairs]
        return adapter

    monkeypatch.setattr(adapters_mod, "read_peft_adapter", read)
    monkeypatch.setattr(CHECK, "read_adapters", lambda *a, **k: Reading())
    r = check("llama-fp32", ["llama-rslora"], merge("llama-fp32", ["llama-rslora"], tmp_path / "m"))
    lines = r.failures()
    assert len(lines) == 6 and all("PEFT oracle: " in line and "differ from PEFT's float64 merge" in line
                                   for line in lines)
    assert {line.split(":")[0] for line in lines} == {f"FAIL {t.name}" for t in r.targets}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_and_json(tmp_path):
    m = merge("llama-fp32", ["llama-dora"], tmp_path / "m")
    r = run("verify", base_dir("llama-fp32"), adapter_dir("llama-dora"), m, "--no-outputs", "--oracle", "peft", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["oracle"]["status"] == "ok" and data["oracle"]["compared"] == 30
    assert data["oracle"]["source"].startswith("PEFT ") and "float64" in data["oracle"]["source"]
    dora = [t for t in data["tensors"] if t["kind"] == "merge"]
    assert all(t["oracle"] is not None and t["oracle"] <= 1e-6 for t in dora)
    assert "oracle: PEFT " in r.stderr


def test_errors_are_one_line(tmp_path, monkeypatch):
    m = merge("llama-fp32", ["llama-basic"], tmp_path / "m")
    kohya = adapter_dir("kohya") / "sd_lora.safetensors"
    r = run("verify", base_dir("sd-unet"), kohya, tmp_path / "m", "--oracle", "peft")
    assert r.exit_code == 2 and r.output.startswith("Error: --oracle peft: ") and "not a PEFT adapter" in r.output
    # an adapter whose config no longer names the class it was trained on: PEFT's LoRA layers stay empty
    bare = tmp_path / "bare"
    shutil.copytree(adapter_dir("bert-seqcls-wrapper"), bare)
    cfg = json.loads((bare / "adapter_config.json").read_text())
    cfg.pop("auto_mapping")
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    loramerge.apply(base_dir("bert"), bare, tmp_path / "b", sync=False)
    r = run("verify", base_dir("bert"), bare, tmp_path / "b", "--no-outputs", "--oracle", "peft")
    assert r.exit_code == 1 and r.output.startswith("Error: --oracle peft: PEFT loaded ")
    assert "12 of its 12 tensors did not land" in r.output and len(r.output.strip().splitlines()) == 1
    # without peft installed
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft":
            raise ImportError("No module named 'peft'", name="peft")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    r = run("verify", base_dir("llama-fp32"), adapter_dir("llama-basic"), m, "--oracle", "peft")
    assert r.exit_code == 2 and r.output.startswith("Error: --oracle peft needs PEFT and transformers")
