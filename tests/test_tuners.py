"""PEFT's other tuners (AdaLoRA, IA3, LoHa, LoKr, VeRA) against PEFT itself.

fp32: every tensor within 1e-5 relative of PEFT's merge_and_unload, untouched tensors bit for bit.
bf16/fp16: bit-equal to PEFT's own merge computed on a float64 copy of the model, correctly
rounded by conftest's independent rounding (PEFT in half precision rounds twice, so its half
merge is not the reference). And the merged checkpoint reproduces the unmerged PeftModel.
Fixtures: fixtures/make_tuners.py.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import loramerge
from conftest import FIXTURES, correctly_rounded, load_dir, rel_err
from loramerge.errors import LoraMergeError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sys.path.insert(0, str(FIXTURES))
from make_tuners import ADAPTERS, TunerNet  # noqa: E402

TUNERS = FIXTURES / "tuners"
HALF = ["lokr-bf16", "loha-bf16", "adalora-fp16", "vera-fp16", "ia3-qwen2"]
FP32 = [n for n, (b, *_) in ADAPTERS.items() if n not in HALF and n != "vera-nosave"]
FP32_TOL = 1e-5


def tdir(name: str):
    return TUNERS / name


def base_of(adapter: str):
    b = ADAPTERS[adapter][0]
    return TUNERS / "bases" / "tunernet" if b == "tunernet" else FIXTURES / "bases" / b


def base_model(adapter: str, dtype=None):
    b = ADAPTERS[adapter][0]
    if b == "tunernet":
        net = TunerNet()
        net.load_state_dict(load_dir(base_of(adapter)))
        return net.eval()
    cfg = json.loads((base_of(adapter) / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    return cls.from_pretrained(base_of(adapter), dtype=dtype or getattr(torch, cfg["dtype"])).eval()


def peft_merged(adapter: str, dtype=None) -> dict[str, torch.Tensor]:
    model = base_model(adapter, dtype)
    pm = peft.PeftModel.from_pretrained(model, tdir(adapter))
    if dtype is not None:
        pm = pm.to(dtype)
    return pm.merge_and_unload().state_dict()


@pytest.mark.parametrize("adapter", FP32)
def test_fp32_matches_peft_merge(adapter, tmp_out):
    report = loramerge.apply(base_of(adapter), tdir(adapter), tmp_out, sync=False)
    ours, orig, theirs = load_dir(tmp_out), load_dir(base_of(adapter)), peft_merged(adapter)
    assert set(ours) == set(orig)
    changed = [n for n in ours if not torch.equal(ours[n], orig[n])]
    assert len(changed) == report.tensors_merged > 0
    for name, t in ours.items():
        assert t.dtype == orig[name].dtype
        assert rel_err(t, theirs[name]) <= FP32_TOL, name
        if torch.equal(theirs[name], orig[name]):
            assert torch.equal(t, orig[name]), f"{name}: PEFT leaves it alone, so must we"


@pytest.mark.parametrize("kernel", [True, False], ids=["fused-kernel", "torch-path"])
@pytest.mark.parametrize("adapter", HALF)
def test_half_precision_is_correctly_rounded(adapter, kernel, tmp_out, monkeypatch):
    """Reference: PEFT's own merge on a float64 copy of base and adapter, rounded once by conftest."""
    from loramerge.engine import kernels
    if kernel and not kernels.AVAILABLE:
        pytest.skip("numba (the `fast` extra) not installed")
    monkeypatch.setattr(kernels, "AVAILABLE", kernel)
    loramerge.apply(base_of(adapter), tdir(adapter), tmp_out, sync=False)
    ours, orig = load_dir(tmp_out), load_dir(base_of(adapter))
    ref64 = peft_merged(adapter, torch.float64)
    touched = 0
    for name, w in orig.items():
        ref = correctly_rounded(ref64[name], w.dtype)
        bad = int((ours[name].view(torch.int16) != ref.view(torch.int16)).sum())
        assert bad == 0, f"{name}: {bad} elements differ from the correctly rounded float64 merge"
        touched += not torch.equal(ref, w)
    assert touched > 0


OUTPUTS = ["adalora-llama", "adalora-gpt2", "ia3-llama", "ia3-qwen2", "ia3-gpt2", "loha-llama", "lokr-llama",
           "vera-llama", "vera-gpt2", "adalora-tunernet", "ia3-tunernet", "loha-tunernet", "loha-tunernet-flat",
           "lokr-tunernet"]


@pytest.mark.parametrize("adapter", OUTPUTS)
def test_merged_checkpoint_reproduces_unmerged_peft_outputs(adapter, tmp_out):
    loramerge.apply(base_of(adapter), tdir(adapter), tmp_out, dtype="float32", sync=False)
    unmerged = peft.PeftModel.from_pretrained(base_model(adapter, torch.float32), tdir(adapter)).eval()
    if ADAPTERS[adapter][0] == "tunernet":
        merged = TunerNet()
        merged.load_state_dict(load_dir(tmp_out))
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = merged.eval()(x), unmerged(x)
            with unmerged.disable_adapter():
                c = unmerged(x)
    else:
        merged = type(unmerged.get_base_model()).from_pretrained(tmp_out, dtype=torch.float32).eval()
        ids = torch.randint(0, merged.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = merged(input_ids=ids).logits, unmerged(input_ids=ids).logits
            with unmerged.disable_adapter():
                c = unmerged(input_ids=ids).logits
    assert rel_err(a, b) < 1e-4
    assert rel_err(c, b) > 1e-3, "the adapter must change the outputs (else this test proves nothing)"


# -- verify, unmerge ----------------------------------------------------------------------------

VERIFY = ["adalora-gpt2", "ia3-qwen2", "ia3-gpt2", "loha-tunernet", "lokr-llama", "vera-llama", "loha-bf16"]


@pytest.mark.parametrize("adapter", VERIFY)
def test_verify_accepts_our_merge_and_peft_merge(adapter, tmp_path):
    ours = tmp_path / "ours"
    loramerge.apply(base_of(adapter), tdir(adapter), ours, sync=False)
    r = loramerge.verify(base_of(adapter), tdir(adapter), ours)
    assert r.ok, r.table()
    assert r.targets and all(t.max_ulps == 0 for t in r.targets if t.dtype in ("BF16", "F16"))
    if ADAPTERS[adapter][0] != "tunernet":
        assert r.model.status == "ok", r.model.reason  # the hooks reproduce the unmerged tuner
        # PEFT's own merge, saved by transformers, passes too
        theirs = tmp_path / "theirs"
        model = peft.PeftModel.from_pretrained(base_model(adapter), tdir(adapter)).merge_and_unload()
        model.save_pretrained(theirs)
        r = loramerge.verify(base_of(adapter), tdir(adapter), theirs, outputs=False)
        assert r.ok, r.table()


@pytest.mark.parametrize("adapter", ["ia3-gpt2", "lokr-tunernet", "vera-gpt2", "adalora-llama"])
def test_verify_catches_a_merge_applied_twice(adapter, tmp_path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    loramerge.apply(base_of(adapter), tdir(adapter), once, sync=False)
    loramerge.apply(once, tdir(adapter), twice, sync=False)
    r = loramerge.verify(base_of(adapter), tdir(adapter), twice, outputs=False)
    assert not r.ok and len(r.failures()) == len(r.targets)
    r = loramerge.verify(base_of(adapter), tdir(adapter), base_of(adapter), outputs=False)  # not merged at all
    assert not r.ok


@pytest.mark.parametrize("adapter", ["ia3-gpt2", "ia3-qwen2", "loha-llama", "lokr-bf16", "vera-fp16", "adalora-gpt2"])
def test_unmerge_gives_the_base_back(adapter, tmp_path):
    merged, back = tmp_path / "merged", tmp_path / "back"
    loramerge.apply(base_of(adapter), tdir(adapter), merged, sync=False)
    report = loramerge.unmerge(merged, tdir(adapter), back, sync=False)
    orig, got = load_dir(base_of(adapter)), load_dir(back)
    for name, w in orig.items():
        if w.dtype == torch.float32:
            assert rel_err(got[name], w) <= 1e-6, name
        else:  # half precision: at most one ulp of the merged value away (api.recovery_notes); IA3
            # divides the merge's rounding error by l: ulp(M) / |l| <= 2^(1-p) |W| (1 + u) < 2 ulp(W)
            m = (w if adapter.startswith("ia3") else load_dir(merged)[name]).double()
            bf = w.dtype == torch.bfloat16
            ulp = (2.0 ** (torch.frexp(m)[1] - (8 if bf else 11))).clamp_min(2.0 ** (-133 if bf else -24))
            ulp = 2 * ulp if adapter.startswith("ia3") else ulp
            err = (got[name].double() - w.double()).abs()
            assert bool((err <= ulp * 1.0001 + 1e-30).all()), name
            assert float((err == 0).double().mean()) > 0.9, name  # most come back bit for bit
    assert any("divided back by ia3_l" in n for n in report.recovery) == adapter.startswith("ia3")


def test_ia3_with_a_zero_cannot_be_divided_out(tmp_path):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "ia3"
    shutil.copytree(tdir("ia3-gpt2"), bad)
    sd = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("h.1.attn.c_attn.ia3_l"))
    sd[key][3, 0] = 0.0
    save_file(sd, str(bad / "adapter_model.safetensors"))
    merged = tmp_path / "merged"
    loramerge.apply(base_of("ia3-gpt2"), bad, merged, sync=False)  # merging is fine
    with pytest.raises(LoraMergeError, match=r"cannot divide IA3 .* 1 zero entry \(first at index 3\)"):
        loramerge.unmerge(merged, bad, tmp_path / "back", sync=False)
    assert not (tmp_path / "back").exists()


# -- refusals -----------------------------------------------------------------------------------

def test_vera_without_saved_projections_regenerates_them_as_peft_does(tmp_out):
    """save_projection=False: PEFT draws vera_A/vera_B from projection_prng_key on load, sized by the
    largest adapted layer; so do we (same torch generator calls), and the merge equals PEFT's."""
    report = loramerge.apply(base_of("vera-nosave"), tdir("vera-nosave"), tmp_out, sync=False)
    assert any("regenerated from projection_prng_key=0" in w for w in report.warnings)
    ours, theirs, orig = load_dir(tmp_out), peft_merged("vera-nosave"), load_dir(base_of("vera-nosave"))
    changed = [k for k in ours if not torch.equal(ours[k], orig[k])]
    assert len(changed) == 9  # q [64, 64], v [32, 64], down [64, 128]: projections sized [4, 128], [64, 4]
    for k in ours:
        assert rel_err(ours[k], theirs[k]) <= FP32_TOL, k
    # sizing needs every layer: merging part of the adapter cannot know the largest
    with pytest.raises(LoraMergeError, match="only 3 of 9 are merged"):
        loramerge.apply(base_of("vera-nosave"), tdir("vera-nosave"), tmp_out.with_name("part"),
                        only="model.layers.0.")


def test_ia3_weights_are_exponents(tmp_out):
    with pytest.raises(LoraMergeError, match="its weight is an exponent"):
        loramerge.apply(base_of("ia3-llama"), tdir("ia3-llama"), tmp_out, weights=[0.5])
    # additive tuners are linear: any weight, and summing with LoRA on one tensor, is fine
    report = loramerge.apply(base_of("loha-llama"), [tdir("loha-llama"), FIXTURES / "adapters" / "llama-basic"],
                             tmp_out, weights=[0.5, -2.0], sync=False)
    assert report.tensors_merged > 0


def test_ia3_and_an_additive_adapter_on_one_tensor_is_refused(tmp_out):
    with pytest.raises(LoraMergeError, match="IA3 .* multiplies this tensor and loha .* training order"):
        loramerge.apply(base_of("ia3-llama"), [tdir("ia3-llama"), tdir("loha-llama")], tmp_out)
    assert not tmp_out.exists()


def test_sum_of_tuners_and_lora_matches_fp64(tmp_out):
    """LoHa (dense) + LoKr + VeRA + AdaLoRA (low-rank) + LoRA on shared tensors, weighted: one
    float64 sum, rounded once (the reference is each adapter's own merge delta from PEFT)."""
    names = ["loha-llama", "lokr-llama", "vera-llama", "adalora-llama"]
    weights = [0.7, -1.3, 2.0, 0.5]
    loramerge.apply(base_of(names[0]), [tdir(n) for n in names], tmp_out, weights=weights, dtype="float64",
                    sync=False)
    orig = load_dir(base_of(names[0]))
    expected = {k: v.double() for k, v in orig.items()}
    for n, c in zip(names, weights):
        merged = peft_merged(n, torch.float64)
        for k in expected:
            expected[k] += c * (merged[k] - orig[k].double())
    ours = load_dir(tmp_out)
    for k, v in expected.items():  # (AdaLoRA divides by PEFT's float32 ranknum + 1e-5, PEFT in
        assert rel_err(ours[k], v) <= 1e-9, k  # float64 by the float64 one: 1e-8 of the delta)


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    bad = tmp_path / "loha"
    shutil.copytree(tdir("loha-llama"), bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraMergeError, match=r"gives rank 4 .* have rank 2"):
        loramerge.apply(base_of("loha-llama"), bad, tmp_path / "o")
    cfg = json.loads((tdir("ia3-llama") / "adapter_config.json").read_text())
    cfg["feedforward_modules"] = ["up_proj"]
    bad = tmp_path / "ia3"
    shutil.copytree(tdir("ia3-llama"), bad)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraMergeError, match=r"feedforward_modules (selects|does not select) this module"):
        loramerge.apply(base_of("ia3-llama"), bad, tmp_path / "o")


def test_adapter_for_another_model_is_refused(tmp_out):
    """fixtures/bases/convnet has a `stem` of the same shape, a smaller `seq` and no `group`."""
    with pytest.raises(LoraMergeError, match="2 problem") as e:
        loramerge.apply(FIXTURES / "bases" / "convnet", tdir("loha-tunernet-flat"), tmp_out)
    assert "seq.weight: base tensor has shape [8, 16, 3] but the adapter's LoHa tensors imply [12, 72] (as [out, in * kernel]" in str(e.value)
    assert "group: no base tensor named group.weight" in str(e.value)


def test_combine_refuses_tuners(tmp_out):
    with pytest.raises(LoraMergeError, match="is a loha adapter, not LoRA"):
        loramerge.combine([tdir("loha-llama"), FIXTURES / "adapters" / "llama-basic"], tmp_out)


def test_dry_run_names_each_kind(tmp_out):
    text = loramerge.apply(base_of("ia3-qwen2"), tdir("ia3-qwen2"), tmp_out, dry_run=True).plan_text
    assert "q_proj.weight [64, 64] F16: ia3 scales outputs" in text
    assert "q_proj.bias [64] F16: ia3 scales the bias" in text and "down_proj.weight [64, 128] F16: ia3 scales inputs" in text
    text = loramerge.apply(base_of("lokr-tunernet"), tdir("lokr-tunernet"), tmp_out, dry_run=True).plan_text
    assert "seq.weight [12, 24, 3] F32: lokr r=8 scale=0.5" in text and "(peft-lokr, 4 targets)" in text


# -- ONNX ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", ["adalora-llama", "ia3-llama", "loha-llama", "lokr-llama", "vera-llama"])
def test_onnx_fold_matches_unmerged_peft(adapter, tmp_path):
    pytest.importorskip("onnxruntime")
    from test_onnx import Wrapper, export_graph, feeds, rel, run

    from loramerge.errors import OnnxError
    from loramerge.onnx import fold
    g = export_graph(base_model(adapter, torch.float32), "logits", "torchscript", tmp_path / "base.onnx")
    out = tmp_path / "o.onnx"
    report = fold(g, out, [tdir(adapter)], base=base_of(adapter))
    assert not report.missing and len(report.matched) > 0
    pm = peft.PeftModel.from_pretrained(base_model(adapter, torch.float32), tdir(adapter)).eval()
    f = feeds()
    with torch.no_grad():
        ref = Wrapper(pm, "logits")(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]))
    assert rel(run(out), ref) <= 1e-4
    kept = tmp_path / "k.onnx"
    if adapter in ("adalora-llama", "vera-llama"):  # low-rank: a side branch
        fold(g, kept, [tdir(adapter)], base=base_of(adapter), keep_lora=True)
        assert rel(run(kept), ref) <= 1e-4
    else:
        with pytest.raises(OnnxError, match="no low-rank side branch"):
            fold(g, kept, [tdir(adapter)], base=base_of(adapter), keep_lora=True)
    with pytest.raises(LoraMergeError, match="pass --base"):
        fold(g, tmp_path / "n.onnx", [tdir(adapter)])


def test_inspect_names_the_tuner_and_its_base_tensors():
    from loramerge.inspector import inspect
    r = inspect(tdir("ia3-qwen2"), base=base_of("ia3-qwen2"))
    q = next(t for t in r.details["targets"] if t["module"] == "model.layers.0.self_attn.q_proj")
    assert (q["tuner"], q["axis"], q["base_tensor"], q["base_bias"]) == \
        ("ia3", "out", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias")
    assert "keys" not in q and r.details["matched"] == 9
    assert "model.layers.0.mlp.down_proj: ia3 scales inputs linear" in r.summary()


# -- LoHa / LoKr in kohya naming, as LyCORIS writes them (fixtures/make_lycoris.py) --------------

LYCORIS = FIXTURES / "lycoris"


@pytest.mark.parametrize("name", ["loha", "lokr", "lokr-full"])
def test_lycoris_kohya_files_match_lycoris(name, tmp_path):
    """Oracle: LyCORIS' own delta (its modules' get_weight, checked against its unmerged forward
    when the fixture was made), W + delta in float64. fp32 within 1e-6; fp16 correctly rounded."""
    base, adapter = LYCORIS / "base", LYCORIS / f"{name}.safetensors"
    expected = load_dir(LYCORIS / f"expected-{name}.safetensors")
    orig = load_dir(base)
    report = loramerge.apply(base, adapter, tmp_path / "fp32", sync=False)
    assert report.tensors_merged == len(expected) == 6
    ours = load_dir(tmp_path / "fp32")
    for k, w in orig.items():
        if k in expected:
            assert rel_err(ours[k], expected[k]) <= 1e-6, k
        else:
            assert torch.equal(ours[k], w), k
    loramerge.apply(base, adapter, tmp_path / "fp16", dtype="float16", sync=False)
    ours = load_dir(tmp_path / "fp16")
    for k, e in expected.items():
        assert torch.equal(ours[k].view(torch.int16), correctly_rounded(e, torch.float16).view(torch.int16)), k
    r = loramerge.verify(base, adapter, tmp_path / "fp32", outputs=False)
    assert r.ok and len(r.targets) == 6, r.table()


def test_lycoris_dora_and_unknown_algorithms_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(LYCORIS / "loha.safetensors"))
    sd["lora_unet_proj_in.dora_scale"] = torch.ones(64, 1)
    sd["lora_unet_attn1_to_q.oft_blocks"] = torch.zeros(4, 16, 16)
    save_file(sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraMergeError, match="not a usable kohya LoRA file") as e:
        loramerge.apply(LYCORIS / "base", tmp_path / "x.safetensors", tmp_path / "o")
    assert "lora_unet_proj_in.dora_scale: a LyCORIS/DoRA 'dora_scale' tensor; only LoRA, LoHa and LoKr" in str(e.value)
    assert "lora_unet_attn1_to_q.oft_blocks: a LyCORIS/DoRA 'oft' tensor" in str(e.value)
