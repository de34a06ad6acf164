"""combine, multi-adapter apply and unmerge on the real-format fixtures.

The adapters differ in rank (8, 4 with rsLoRA, per-module 2/4/8 via rank_pattern) and in their
target sets (all linear layers; q/v only; layers 1-2 only), so every combination below has
targets covered by some adapters and not others, and per-target ranks that need rank_pattern.
References are float64 sums computed from the raw adapter files (conftest.expected_delta64).
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from click.testing import CliRunner

import loramerge
from loramerge import LoraMergeError
from loramerge.readers.adapters import load_adapters
from conftest import (adapter_dir, base_dir, correctly_rounded, dare_masks, dare_np, elect_np, expected_delta64,
                      load_dir, rel_err, ties_np, truncate_np)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ADAPTERS = ["llama-basic", "llama-rslora", "llama-patterns", "llama-layers"]
WEIGHTS = [1.0, -0.5, 0.7, 2.0]
METHODS = {  # method -> extra options
    "cat": {},
    "linear": {},
    "svd": {"rank": 6},
    "ties": {"rank": 6, "density": 0.5},
    "dare_linear": {"rank": 6, "density": 0.5, "seed": 3},
    "dare_ties": {"rank": 6, "density": 0.4, "seed": 3},
}


def weighted_deltas(names=ADAPTERS, weights=WEIGHTS) -> dict[str, list[torch.Tensor]]:
    """module -> the weighted float64 deltas w_i s_i B_i A_i of the adapters that target it."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, w in zip(names, weights):
        for mod, d in expected_delta64(adapter_dir(name)).items():
            out.setdefault(mod, []).append(w * d)
    return out


def combined_deltas(path) -> dict[str, torch.Tensor]:
    """module -> float64 delta of a combined adapter, read back from its files by hand."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]
    return expected_delta64(path)


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    root = tmp_path_factory.mktemp("combined")
    paths = {}
    for method, opts in METHODS.items():
        paths[method] = root / method
        loramerge.combine([adapter_dir(a) for a in ADAPTERS], paths[method], weights=WEIGHTS,
                          method=method, **opts)
    return paths


@pytest.fixture(scope="module")
def llama():
    return transformers.LlamaForCausalLM.from_pretrained(base_dir("llama-fp32"), dtype=torch.float32)


def peft_load(model_dir, adapter, dtype=torch.float32, cls=transformers.LlamaForCausalLM):
    model = cls.from_pretrained(model_dir, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, adapter)
    complaints = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                  or "unexpected" in str(w.message).lower()]
    assert not complaints, complaints
    # every tensor in the file landed in a LoRA parameter and every LoRA parameter came from the file
    ours = load_dir(adapter / "adapter_model.safetensors")
    with warnings.catch_warnings():
        # PEFT 0.21's save-time ZeRO-3 check mistakes every 1-D lora_B.bias for an unsharded tensor
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
        theirs = peft.get_peft_model_state_dict(pm)
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        assert torch.equal(theirs[k].to(v.dtype), v), k
    return pm


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_loads_it_and_merges_like_apply(method, combined, tmp_path):
    pm = peft_load(base_dir("llama-fp32"), combined[method])
    theirs = pm.merge_and_unload().state_dict()
    loramerge.apply(base_dir("llama-fp32"), combined[method], tmp_path / "m", sync=False)
    ours = load_dir(tmp_path / "m")
    orig = load_dir(base_dir("llama-fp32"))
    changed = [n for n in ours if not torch.equal(ours[n], orig[n])]
    assert len(changed) == 21  # the union of the four target sets
    for name, t in ours.items():
        assert rel_err(t, theirs[name]) <= 1e-6, name


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_and_linear_are_the_exact_weighted_sum(method, combined):
    got = combined_deltas(combined[method])
    want = weighted_deltas()
    assert set(got) == set(want)
    cfg = json.loads((combined[method] / "adapter_config.json").read_text())
    factors = load_dir(combined[method] / "adapter_model.safetensors")
    input_ranks: dict[str, int] = {}
    for name in ADAPTERS:
        for key, a in load_dir(adapter_dir(name) / "adapter_model.safetensors").items():
            if key.endswith(".lora_A.weight"):
                input_ranks[key] = input_ranks.get(key, 0) + a.shape[0]
    for mod, parts in want.items():
        assert rel_err(got[mod], sum(parts)) <= 1e-5, mod
        # rank = sum of the ranks of the adapters that target this module, declared in the config
        key = f"base_model.model.{mod}.lora_A.weight"
        assert factors[key].shape[0] == input_ranks[key]
        assert factors[key].shape[0] == cfg["rank_pattern"].get(re.escape(mod), cfg["r"])
    assert len(set(input_ranks.values())) > 2 and cfg["rank_pattern"]


def test_svd_is_optimal_per_target(combined):
    got = combined_deltas(combined["svd"])
    for mod, parts in weighted_deltas().items():
        ref = sum(parts)
        sigma = torch.linalg.svdvals(ref)
        bound = float(sigma[6:].pow(2).sum().sqrt())
        err = float(torch.linalg.matrix_norm(got[mod] - ref))
        # float32 factors: allow their rounding on top of 1e-3 of the bound
        assert err <= bound * (1 + 1e-3) + 1e-6 * float(sigma[0]), mod


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_elementwise_methods_are_the_papers_merge_refactored(method, combined):
    """numpy float64 from the raw files (conftest: the papers' algorithms, DARE's masks redrawn
    from its documented contract, numpy's SVD for the rank-6 re-factoring): no loramerge code."""
    got = combined_deltas(combined[method])
    opts = METHODS[method]
    for mod, parts in weighted_deltas().items():
        taus = [p.numpy() for p in parts]
        if method == "ties":
            merged = ties_np(taus, opts["density"])
        else:
            dropped = dare_np(taus, dare_masks(opts["seed"], mod, len(taus), taus[0].shape, opts["density"]),
                              opts["density"])
            merged = sum(dropped) if method == "dare_linear" else elect_np(dropped)
        want = torch.from_numpy(truncate_np(merged, opts["rank"]))
        assert rel_err(got[mod], want) <= 1e-4, mod


def test_dare_is_deterministic_per_seed(combined, tmp_path):
    src = [adapter_dir(a) for a in ADAPTERS]
    for method in ("dare_linear", "dare_ties"):
        again = tmp_path / f"{method}-again"
        loramerge.combine(src, again, weights=WEIGHTS, method=method, **METHODS[method])
        a = load_dir(combined[method] / "adapter_model.safetensors")
        b = load_dir(again / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        other = tmp_path / f"{method}-other"
        loramerge.combine(src, other, weights=WEIGHTS, method=method, **{**METHODS[method], "seed": 4})
        c = load_dir(other / "adapter_model.safetensors")
        assert not all(torch.equal(a[k], c[k]) for k in a)
    # adapter order changes nothing but the order (masks are keyed by seed and target name)
    swapped = tmp_path / "swapped"
    loramerge.combine(src[::-1], swapped, weights=WEIGHTS[::-1], method="dare_linear", **METHODS["dare_linear"])
    # (the masks within one target follow the adapter order, so only single-adapter targets coincide)
    a = combined_deltas(combined["dare_linear"])
    b = combined_deltas(swapped)
    only_basic = [m for m, p in weighted_deltas().items() if len(p) == 1]
    assert only_basic and all(rel_err(b[m], a[m]) <= 1e-6 for m in only_basic)


def test_lora_bias_adapters_combine_exactly(tmp_path):
    out = tmp_path / "bias"
    loramerge.combine([adapter_dir("qwen2-bias")] * 2, out, weights=[0.5, -1.5])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True
    pm = peft_load(base_dir("qwen2"), out, cls=transformers.Qwen2ForCausalLM)
    theirs = pm.merge_and_unload().state_dict()
    loramerge.apply(base_dir("qwen2"), out, tmp_path / "m", dtype="float32", sync=False)
    ours = load_dir(tmp_path / "m")
    orig = load_dir(base_dir("qwen2"))
    deltas = expected_delta64(adapter_dir("qwen2-bias"))
    assert any(k.endswith(".bias") for k in deltas)
    for name, w in orig.items():
        mod, kind = name.rsplit(".", 1)
        key = mod if kind == "weight" else mod + ".bias"
        ref = w.double() + (-1.0 * deltas[key] if key in deltas else 0.0)
        assert rel_err(ours[name], ref) <= 1e-5, name
        if name in theirs:
            assert rel_err(ours[name], theirs[name]) <= 1e-6, name


def test_a_combined_lora_bias_adapter_merges_into_a_target_without_a_bias(tmp_path):
    """lora_bias is one flag for the whole combined adapter, so a target of the adapter without it
    (lm_head, which has no bias in the base) gets an all-zero lora_B.bias: apply merges that (it
    adds nothing) and gives the same bytes as merging the two adapters directly. A bias that is
    not zero there is still refused."""
    from safetensors.torch import load_file, save_file

    pair = [adapter_dir("qwen2-bias"), adapter_dir("qwen2-lmhead")]
    comb = tmp_path / "comb"
    loramerge.combine(pair, comb, weights=[0.7, -2.0])
    zero = [k for k, v in load_file(comb / "adapter_model.safetensors").items()
            if "lm_head" in k and k.endswith("lora_B.bias")]
    assert zero, "the case needs the zero bias"
    loramerge.apply(base_dir("qwen2"), comb, tmp_path / "a", sync=False)
    loramerge.apply(base_dir("qwen2"), pair, tmp_path / "b", weights=[0.7, -2.0], sync=False)
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sd = load_file(comb / "adapter_model.safetensors")
    sd[zero[0]][0] = 1e-3
    save_file(sd, comb / "adapter_model.safetensors")
    with pytest.raises(LoraMergeError, match=r"lm_head: the adapter trains a bias \(lora_bias\) but the base has no"):
        loramerge.apply(base_dir("qwen2"), comb, tmp_path / "c", sync=False)


# --- multi-adapter apply (engine) ---------------------------------------------------------

def test_apply_several_adapters_fp32(tmp_out):
    loramerge.apply(base_dir("llama-fp32"), [adapter_dir(a) for a in ADAPTERS], tmp_out, weights=WEIGHTS,
                    sync=False)
    ours = load_dir(tmp_out)
    orig = load_dir(base_dir("llama-fp32"))
    want = weighted_deltas()
    for name, w in orig.items():
        mod = name.rsplit(".", 1)[0]
        if mod in want:
            assert rel_err(ours[name], w.double() + sum(want[mod])) <= 1e-6, name
        else:
            assert torch.equal(ours[name], w), name


def test_apply_several_adapters_bf16_is_correctly_rounded(tmp_out):
    # llama-bf16 (r=16) everywhere, llama-patterns (ranks 2/4/8) on q/v/down, negative weight
    names, weights = ["llama-bf16", "llama-patterns"], [1.0, -1.25]
    loramerge.apply(base_dir("llama-bf16-sharded"), [adapter_dir(a) for a in names], tmp_out,
                    weights=weights, sync=False)
    ours = load_dir(tmp_out)
    orig = load_dir(base_dir("llama-bf16-sharded"))
    want = weighted_deltas(names, weights)
    assert any(len(p) == 2 for p in want.values()) and any(len(p) == 1 for p in want.values())
    for name, w in orig.items():
        mod = name.rsplit(".", 1)[0]
        ref = correctly_rounded(w.double() + sum(want[mod]), w.dtype) if mod in want else w
        assert torch.equal(ours[name].view(torch.int16), ref.view(torch.int16)), name


# --- unmerge --------------------------------------------------------------------------------

def test_unmerge_roundtrip_fp32(tmp_path):
    src = [adapter_dir(a) for a in ADAPTERS]
    loramerge.apply(base_dir("llama-fp32"), src, tmp_path / "m", weights=WEIGHTS, sync=False)
    report = loramerge.unmerge(tmp_path / "m", src, tmp_path / "u", weights=WEIGHTS, sync=False)
    assert report.tensors_merged == 21
    assert any("float32" in line and "not bit for bit" in line for line in report.recovery)
    back = load_dir(tmp_path / "u")
    orig = load_dir(base_dir("llama-fp32"))
    for name, w in orig.items():
        assert rel_err(back[name], w) <= 1e-6, name


def ulp(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Grid spacing of a binary format with `mantissa_bits` explicit bits at |x| (normal range)."""
    e = torch.floor(torch.log2(x.double().abs().clamp_min(2.0 ** -126)))
    return torch.pow(2.0, e - mantissa_bits)


def test_unmerge_fp32_claims_one_ulp_only_when_both_passes_were_exact(tmp_path):
    """float32 comes back within 1 ulp of the merged value only if the merge, too, was correctly
    rounded (--accum float64): after a default merge the note gives the float32-rounding bound
    (the 1-ulp claim failed there, by up to 640 ulps where W + delta cancels), and after an
    exact merge the 1-ulp bound holds for every element."""
    base, ad = base_dir("llama-fp32"), adapter_dir("llama-basic")
    orig = load_dir(base)
    for merge_accum in ("float32", "float64"):
        m, u = tmp_path / f"m{merge_accum}", tmp_path / f"u{merge_accum}"
        loramerge.apply(base, ad, m, accum=merge_accum, sync=False)
        report = loramerge.unmerge(m, ad, u, accum="float64", sync=False)
        text = " ".join(report.recovery)
        merged, back = load_dir(m), load_dir(u)
        over = [n for n in orig if not bool(((back[n].double() - orig[n].double()).abs()
                                             <= ulp(merged[n], 23)).all())]
        if merge_accum == "float32":
            assert "not bit for bit (the merge accumulated in float32 (its manifest)" in text, text
            assert "1 ulp of the merged value (" not in text
            assert over, "the case no longer shows why the 1-ulp claim needs an exact merge"
        else:
            assert "float32 (21 tensors): |W_rec - W| <= 1 ulp of the merged value" in text, text
            assert over == []
    (tmp_path / "mfloat64" / "loramerge_manifest.json").unlink()  # the merge's accum unknown: the safe bound
    report = loramerge.unmerge(tmp_path / "mfloat64", ad, tmp_path / "u3", accum="float64", sync=False)
    assert "the merge's --accum is not known (no manifest)" in " ".join(report.recovery)


def test_unmerge_bf16_stays_within_the_printed_bound(tmp_path):
    loramerge.apply(base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16"), tmp_path / "m", sync=False)
    report = loramerge.unmerge(tmp_path / "m", adapter_dir("llama-bf16"), tmp_path / "u", sync=False)
    text = report.summary()
    assert "NOT exactly recoverable" in text and "1 ulp of the merged value" in text
    orig, merged, back = (load_dir(p) for p in (base_dir("llama-bf16-sharded"), tmp_path / "m", tmp_path / "u"))
    exact = total = 0
    for name, w in orig.items():
        if torch.equal(merged[name].view(torch.int16), w.view(torch.int16)):
            assert torch.equal(back[name].view(torch.int16), w.view(torch.int16)), name
            continue
        err = (back[name].double() - w.double()).abs()
        assert bool((err <= ulp(merged[name], 7)).all()), name
        exact += int((err == 0).sum())
        total += err.numel()
    # the printed promise "most elements come back bit for bit" (and the rest really are lost)
    assert 0.5 < exact / total < 1.0


@pytest.mark.parametrize("adapter,message", [
    ("llama-dora", "are DoRA: the merge rescaled each output unit"),
    ("llama-resized", "were replaced by the adapter's full tensors"),
])
def test_unmerge_refuses_what_cannot_be_inverted(adapter, message, tmp_path):
    loramerge.apply(base_dir("llama-fp32"), adapter_dir(adapter), tmp_path / "m", sync=False)
    with pytest.raises(LoraMergeError, match="part of the merge is not invertible") as e:
        loramerge.unmerge(tmp_path / "m", adapter_dir(adapter), tmp_path / "u")
    assert message in str(e.value)
    assert not (tmp_path / "u").exists()


# --- refusals and the CLI -----------------------------------------------------------------------

@pytest.mark.parametrize("adapter,message", [
    ("llama-dora", "DoRA targets (model.embed_tokens, model.layers.0.self_attn.q_proj"),
    ("llama-embed", "embedding or fan_in_fan_out Conv1D targets, whose delta is stored transposed, "
                    "(model.embed_tokens): combine supports linear LoRA targets only"),
    ("gpt2-fifo", "whose delta is stored transposed, (transformer.h.0.attn.c_attn"),
    ("llama-resized", "carries full replacement tensors"),
    ("kohya/sd_lora.safetensors", "is a kohya adapter; combine reads and writes PEFT adapters"),
])
def test_combine_refuses_what_is_not_linear(adapter, message, tmp_path):
    with pytest.raises(LoraMergeError, match="cannot combine these 2 adapter") as e:
        loramerge.combine([adapter_dir("llama-basic"), adapter_dir(adapter)], tmp_path / "c")
    assert message in str(e.value)
    assert not (tmp_path / "c").exists()


def test_combine_refuses_shape_conflicts():
    from loramerge.arithmetic.combine import _group
    a, b = load_adapters([adapter_dir("llama-basic"), adapter_dir("llama-rslora")])
    pair = b.pairs[0]
    b.pairs[0] = type(pair)(**{**pair.__dict__, "base_shape": (3, 3)})
    with pytest.raises(LoraMergeError, match=rf"{pair.module}: the adapters give different weight shapes"):
        _group([a, b])


@pytest.mark.parametrize("args,message", [
    (["--method", "svd"], "--method svd needs --rank R"),
    (["--method", "ties", "--rank", "4"], "--method ties needs --density"),
    (["--method", "cat", "--rank", "4"], "--rank does not apply to --method cat"),
    (["--weights", "1,2,3"], "--weights has 3 value(s) for 2 adapter(s)"),
    (["--method", "dare_ties", "--rank", "4", "--density", "1.5"], "--density 1.5: expected a number in (0, 1]"),
])
def test_cli_combine_usage_errors(args, message, tmp_path):
    from loramerge.cli import main
    res = CliRunner().invoke(main, ["combine", str(adapter_dir("llama-basic")), str(adapter_dir("llama-rslora")),
                                    str(tmp_path / "c"), *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("Error: ") and message in res.output
    assert not (tmp_path / "c").exists()


def test_cli_combine_apply_unmerge(tmp_path):
    from loramerge.cli import main
    run = CliRunner().invoke
    a, b = str(adapter_dir("llama-basic")), str(adapter_dir("llama-patterns"))
    res = run(main, ["combine", a, b, str(tmp_path / "c"), "--weights", "1,-1", "--method", "svd", "--rank", "4"])
    assert res.exit_code == 0, res.output
    assert "rank-4 truncation" in res.output and "worst relative Frobenius error" in res.output
    res = run(main, ["apply", str(base_dir("llama-fp32")), str(tmp_path / "c"), str(tmp_path / "m"), "-q"])
    assert res.exit_code == 0, res.output
    res = run(main, ["unmerge", str(tmp_path / "m"), str(tmp_path / "c"), str(tmp_path / "u"), "-q"])
    assert res.exit_code == 0, res.output
    assert "float32 (21 tensors): recovered to float32 rounding" in res.output
    back, orig = load_dir(tmp_path / "u"), load_dir(base_dir("llama-fp32"))
    assert max(rel_err(back[n], orig[n]) for n in orig) <= 1e-6
    res = run(main, ["unmerge", str(tmp_path / "m"), a, b, str(tmp_path / "u2"), "--weights", "1"])
    assert res.exit_code == 2 and "--weights has 1 value(s) for 2 adapter(s)" in res.output
