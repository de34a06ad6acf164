"""Quantized bases end to end (issue 12): FP8 in and out, bitsandbytes 4-bit bases, --qlora.

References are built here from the raw files: FP8 values as q * s in float64 by hand, the delta
from the adapter files (conftest.expected_delta64), FP8 requantization by test_codecs' float64
reference, QLoRA bases by bitsandbytes itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, correctly_rounded, expected_delta64, load_dir
from safetensors.torch import load_file, save_file
from test_codecs import _reference_quantize

from loramerge import apply, verify
from loramerge.cli import main
from loramerge.errors import CheckpointError, UsageError

Q = FIXTURES / "quantized"
A = Q / "adapters"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _dequant64(sd: dict, name: str, block=(128, 128)) -> torch.Tensor:
    q, s = sd[name].to(torch.float64), sd[name + "_scale_inv"].to(torch.float64)
    s = s.repeat_interleave(block[0], 0)[: q.shape[0]].repeat_interleave(block[1], 1)[:, : q.shape[1]]
    return q * s


def _expected(base: dict, adapter, prefix="base_model.model."):
    delta = expected_delta64(adapter)
    return {mod + ".weight": d for mod, d in delta.items()}


def test_fp8_auto_keeps_the_layout_and_requantizes_with_fresh_scales(tmp_path):
    out = tmp_path / "out"
    report = apply(Q / "fp8-partial", A / "fp8-partial", out)
    base, merged = load_file(str(Q / "fp8-partial/model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(merged) == set(base)  # same names (a merged weight's scale is written right after it)
    assert {k: (v.dtype, v.shape) for k, v in merged.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((Q / "fp8-partial/config.json").read_text())["quantization_config"]
    deltas = _expected(base, A / "fp8-partial")
    assert report.tensors_merged == len(deltas) == 3
    for name, t in base.items():
        owner = name.removesuffix("_scale_inv")
        if owner in deltas:
            continue
        assert torch.equal(merged[name].view(torch.uint8), t.view(torch.uint8)), f"{name} not copied bit for bit"
    for name, d in deltas.items():  # partial edge blocks: q_proj [192, 192], down_proj [192, 320] ...
        q_ref, s_ref = _reference_quantize((_dequant64(base, name) + d).numpy(), (128, 128))
        assert np.array_equal(merged[name + "_scale_inv"].numpy(), s_ref), name
        assert np.array_equal(merged[name].to(torch.float64).numpy(), q_ref), name


def test_fp8_to_bfloat16_is_correctly_rounded_and_plain(tmp_path):
    out = tmp_path / "out"
    apply(Q / "fp8-partial", A / "fp8-partial", out, dtype="bfloat16")
    base, merged = load_file(str(Q / "fp8-partial/model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not any(k.endswith("_scale_inv") for k in merged)
    assert set(merged) == {k for k in base if not k.endswith("_scale_inv")}
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    deltas = _expected(base, A / "fp8-partial")
    for name in merged:
        if name + "_scale_inv" not in base:
            assert torch.equal(merged[name], base[name].to(torch.bfloat16))
            continue
        exact = _dequant64(base, name) + deltas.get(name, 0)
        assert torch.equal(merged[name].view(torch.int16), correctly_rounded(exact, torch.bfloat16).view(torch.int16))


def test_fp8_output_loads_in_transformers_as_the_values_we_wrote(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    apply(Q / "fp8-llama", A / "fp8-llama", out)
    merged = load_file(str(out / "model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # CPU: dequantized
    for name, p in model.named_parameters():
        if name + "_scale_inv" in merged:
            assert torch.equal(p.detach().double(), _dequant64(merged, name).float().double()), name


def test_verify_fp8_outputs_and_delta_survival(tmp_path):
    apply(Q / "fp8-llama", A / "fp8-llama-tiny", tmp_path / "fp8")
    r = verify(Q / "fp8-llama", A / "fp8-llama-tiny", tmp_path / "fp8", outputs=False)
    assert r.ok and len(r.targets) == 7
    assert all(t.max_ulps <= 0.5 + 1e-6 and t.delta_dropped > 0.9 and t.delta_loss > 0.9 for t in r.targets)
    assert any("--dtype bfloat16" in w for w in r.warnings)
    apply(Q / "fp8-llama", A / "fp8-llama", tmp_path / "bf16", dtype="bfloat16")
    r = verify(Q / "fp8-llama", A / "fp8-llama", tmp_path / "bf16", outputs=False)
    assert r.ok and all(t.max_ulps == 0 and t.delta_loss < 0.1 for t in r.targets)


def test_verify_catches_a_stale_scale_and_a_missing_delta(tmp_path):
    out = tmp_path / "out"
    apply(Q / "fp8-llama", A / "fp8-llama", out)
    sd = load_file(str(out / "model.safetensors"))
    base = load_file(str(Q / "fp8-llama/model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name + "_scale_inv"] = base[name + "_scale_inv"]  # the values requantized, the old scales kept
    sd["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"]
    sd["model.layers.0.mlp.up_proj.weight_scale_inv"] = base["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(sd, str(out / "model.safetensors"))
    r = verify(Q / "fp8-llama", A / "fp8-llama", out, outputs=False)
    failed = {t.name for t in r.tensors if not t.ok}
    assert failed == {name, "model.layers.0.mlp.up_proj.weight"}


def _bnb_expected(w: torch.Tensor, delta: torch.Tensor, quant_type: str, double: bool) -> torch.Tensor:
    F = pytest.importorskip("bitsandbytes.functional")
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type=quant_type)
    wq = F.dequantize_4bit(packed, state)
    return correctly_rounded(wq.double() + delta, w.dtype)


@pytest.mark.parametrize("quant_type,double", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_qlora_merge_equals_bitsandbytes_round_trip_plus_delta(tmp_path, quant_type, double):
    out = tmp_path / "out"
    apply(Q / "llama-bf16", A / "qlora-llama", out, qlora=quant_type, qlora_double_quant=double, qlora_kernel="cpu")
    base, merged = load_dir(Q / "llama-bf16"), load_dir(out)
    deltas = _expected(base, A / "qlora-llama")
    assert len(deltas) == 14
    for name, t in base.items():
        if name not in deltas:
            assert torch.equal(merged[name], t)
            continue
        want = _bnb_expected(t, deltas[name], quant_type, double)
        got = merged[name]
        same = got.view(torch.int16) == want.view(torch.int16)
        assert bool(same.all()), f"{name}: {int((~same).sum())} elements differ"


@pytest.mark.parametrize("stored,opts", [("llama-bnb-nf4", dict(qlora="nf4")),
                                         ("llama-bnb-fp4", dict(qlora="fp4", qlora_double_quant=False))])
def test_bnb4_checkpoint_merge_equals_qlora_merge_of_its_source(tmp_path, stored, opts):
    """transformers + bitsandbytes quantized llama-bf16 on the CPU and saved it; merging into that
    checkpoint must give what --qlora computes from llama-bf16 itself, bit for bit."""
    apply(Q / stored, A / "qlora-llama", tmp_path / "a")
    apply(Q / "llama-bf16", A / "qlora-llama", tmp_path / "b", qlora_kernel="cpu", **opts)
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        same = (a[k].view(torch.int16) == b[k].view(torch.int16)) | ((a[k] == 0) & (b[k] == 0))
        assert bool(same.all()), k
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    assert "quantization_config" not in cfg
    r = verify(Q / stored, A / "qlora-llama", tmp_path / "a")
    assert r.ok and r.model.status == "ok"


def test_verify_qlora_reports_the_plain_merge_distance(tmp_path):
    out = tmp_path / "out"
    apply(Q / "llama-bf16", A / "qlora-llama", out, qlora="nf4", qlora_kernel="cpu")
    r = verify(Q / "llama-bf16", A / "qlora-llama", out, qlora="nf4", qlora_kernel="cpu")
    assert r.ok and r.model.status == "ok"
    assert all(t.qlora_shift > 0.1 for t in r.targets)
    assert "a plain merge into the unquantized base would differ" in r.table()
    plain = verify(Q / "llama-bf16", A / "qlora-llama", out, outputs=False)
    assert not plain.ok  # without --qlora the same output is (rightly) not the plain merge
    # ... and the manifest says why: the merge's options differ from the check's
    assert "this output was made with --qlora nf4 (loramerge_manifest.json), checked here with no --qlora: " \
           "pass the merge's options" in plain.manifest["notes"], plain.manifest
    assert not r.manifest["notes"]
    half = verify(Q / "llama-bf16", A / "qlora-llama", out, qlora="nf4", qlora_kernel="cpu", weights=[0.5],
                  outputs=False)
    assert not half.ok and any("--weights 1 (loramerge_manifest.json), checked here with 0.5" in n
                               for n in half.manifest["notes"])


def test_unsupported_fp8_layouts_are_clear_errors(tmp_path):
    def variant(name, edit_cfg=None, edit_sd=None):
        d = tmp_path / name
        shutil.copytree(Q / "fp8-partial", d)
        if edit_cfg:
            cfg = json.loads((d / "config.json").read_text())
            edit_cfg(cfg["quantization_config"])
            (d / "config.json").write_text(json.dumps(cfg))
        if edit_sd:
            sd = load_file(str(d / "model.safetensors"))
            edit_sd(sd)
            save_file(sd, str(d / "model.safetensors"))
        return d

    w = "model.layers.0.self_attn.q_proj.weight"
    cases = {
        "per-channel": (None, lambda sd: sd.__setitem__(w + "_scale_inv", torch.ones(192, 1))),
        "no-block": (lambda qc: qc.pop("weight_block_size"), None),
        "e5m2": (None, lambda sd: sd.__setitem__(w, sd[w].float().to(torch.float8_e5m2))),
        "missing-scale": (None, lambda sd: sd.pop(w + "_scale_inv")),
        "static": (lambda qc: qc.__setitem__("activation_scheme", "static"), None),
    }
    for name, (cfg, sdf) in cases.items():
        with pytest.raises(CheckpointError) as e:
            apply(variant(name, cfg, sdf), A / "fp8-partial", tmp_path / f"out-{name}")
        assert "fp8" in str(e.value).lower() or "FP8" in str(e.value), name
        assert not (tmp_path / f"out-{name}").exists()
    res = run("apply", variant("cli", None, cases["per-channel"][1]), A / "fp8-partial", tmp_path / "o")
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "per-channel" in res.output
    assert "Traceback" not in res.output


def test_qlora_option_errors(tmp_path):
    with pytest.raises(UsageError):
        apply(Q / "fp8-llama", A / "fp8-llama", tmp_path / "o", qlora="nf4")
    with pytest.raises(UsageError):
        apply(Q / "llama-bnb-nf4", A / "qlora-llama", tmp_path / "o", qlora="fp4")
    res = run("apply", Q / "llama-bf16", A / "qlora-llama", tmp_path / "o", "--no-qlora-double-quant")
    assert res.exit_code == 2 and "--qlora" in res.output and not (tmp_path / "o").exists()


def test_dry_run_names_the_codec_of_each_tensor(tmp_path):
    res = run("apply", Q / "fp8-partial", A / "fp8-partial", tmp_path / "o", "--dry-run")
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "q_proj.weight" in x)
    assert "fp8 e4m3, 128x128 blocks" in line and "fresh scales" in line
    res = run("apply", Q / "fp8-partial", A / "fp8-partial", tmp_path / "o", "--dry-run", "--dtype", "bfloat16")
    assert "dequantized (fp8 e4m3, 128x128 blocks -> BF16): 4 tensors" in res.output
    res = run("apply", Q / "llama-bf16", A / "qlora-llama", tmp_path / "o", "--dry-run", "--qlora", "nf4")
    assert "QLoRA base: nf4 round trip, blocksize 64, double-quantized absmax, cuda kernel" in res.output


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_fp8_kernel_torch_path_and_bands_give_the_same_bytes(tmp_path, monkeypatch, dtype):
    """The CPU's fused kernel (engine/fp8_kernel.py) and the torch path GPUs take, whole or in bands
    of whole block-rows (bounded memory): the same bytes."""
    from loramerge.engine import fp8_kernel, ops

    apply(Q / "fp8-partial", A / "fp8-partial", tmp_path / "kernel", dtype=dtype)
    monkeypatch.setattr(fp8_kernel, "AVAILABLE", False)
    apply(Q / "fp8-partial", A / "fp8-partial", tmp_path / "one", dtype=dtype)
    monkeypatch.setattr(ops, "BLOCK_ELEMS_CPU", 1)  # one 128-row band at a time
    apply(Q / "fp8-partial", A / "fp8-partial", tmp_path / "bands", dtype=dtype)
    k, a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("kernel", "one", "bands"))
    assert set(k) == set(a) == set(b)
    assert all(torch.equal(k[n].view(torch.uint8), a[n].view(torch.uint8)) for n in a)
    assert all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_fp8_merge_on_gpu_gives_the_cpu_bytes(tmp_path, dtype):
    apply(Q / "fp8-partial", A / "fp8-partial", tmp_path / "cpu", dtype=dtype, device="cpu")
    apply(Q / "fp8-partial", A / "fp8-partial", tmp_path / "gpu", dtype=dtype, device="cuda")
    a, b = load_file(str(tmp_path / "cpu/model.safetensors")), load_file(str(tmp_path / "gpu/model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_qlora_cuda_kernel_merge_matches_bitsandbytes_on_gpu(tmp_path):
    F = pytest.importorskip("bitsandbytes.functional")
    out = tmp_path / "out"
    apply(Q / "llama-bf16", A / "qlora-llama", out, qlora="nf4", device="cuda")
    base, merged = load_dir(Q / "llama-bf16"), load_dir(out)
    for name, d in _expected(base, A / "qlora-llama").items():
        packed, state = F.quantize_4bit(base[name].cuda(), blocksize=64, compress_statistics=True, quant_type="nf4")
        want = correctly_rounded(F.dequantize_4bit(packed, state).cpu().double() + d, torch.bfloat16)
        assert torch.equal(merged[name].view(torch.int16), want.view(torch.int16)), name
