"""MoE experts adapted through PEFT target_parameters (ParamWrapper; issue 11, item 1).

Oracles, independent of loramerge's mapping code: PEFT's own merge_and_unload (float32, and in
float64 for the correctly rounded bf16 reference), saved by transformers' save_pretrained in the
base's own layout (its reverse conversion writes the per-expert tensors); the unmerged PeftModel's
outputs; transformers' models and conversion for the layout tables. Fixtures: fixtures/moe/."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loramerge
from conftest import FIXTURES, correctly_rounded, load_dir, rel_err
from loramerge.cli import main as cli_main
from loramerge.errors import LoraMergeError
from loramerge.readers.experts import ARCHITECTURES, NESTING_ORDER, expert_tensor

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

M = FIXTURES / "moe"
INDEX = json.loads((M / "INDEX.json").read_text())
PAIRS = [(a, b) for a, info in INDEX["adapters"].items() for b, binfo in INDEX["bases"].items()
         if binfo["model"] == INDEX["bases"][info["base"]]["model"]]


def _base(name):
    return M / "bases" / name


def _adapter(name):
    return M / "adapters" / name


def _peft_merged(base: str, adapter: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload in `dtype`, saved by transformers in the base's layout."""
    model = transformers.AutoModelForCausalLM.from_pretrained(_base(base), dtype=dtype)
    merged = peft.PeftModel.from_pretrained(model, _adapter(adapter)).merge_and_unload()
    with tempfile.TemporaryDirectory() as d:
        merged.save_pretrained(d, save_original_format=INDEX["bases"][base]["per_expert"])
        return load_dir(d)


@pytest.mark.parametrize("adapter,base", PAIRS)
def test_matches_peft_merge_float32(adapter, base, tmp_out):
    loramerge.apply(_base(base), _adapter(adapter), tmp_out, dtype="float32", sync=False)
    ours, theirs, orig = load_dir(tmp_out), _peft_merged(base, adapter, torch.float32), load_dir(_base(base))
    assert set(ours) == set(theirs) == set(orig)
    for name, t in theirs.items():
        assert rel_err(ours[name], t) <= 1e-5, name
    # the same tensors changed (no silently skipped target), experts and others
    changed = {n for n, t in theirs.items() if not torch.equal(t, orig[n].float())}
    assert changed == {n for n, t in ours.items() if not torch.equal(t, orig[n].float())}
    assert len(changed) >= 4 and any("experts" in n for n in changed)


@pytest.mark.parametrize("adapter,base", PAIRS)
def test_correctly_rounded_in_the_base_dtype(adapter, base, tmp_out):
    """Default dtype (the base's: bf16 for qwen2-moe): every tensor is the float64 merge (PEFT's,
    in float64) correctly rounded once; fp32 within 1e-6 of it."""
    loramerge.apply(_base(base), _adapter(adapter), tmp_out, sync=False)
    ours, ref = load_dir(tmp_out), _peft_merged(base, adapter, torch.float64)
    for name, x64 in ref.items():
        if ours[name].dtype == torch.float32:
            assert rel_err(ours[name], x64) <= 1e-6, name
        else:
            assert torch.equal(ours[name], correctly_rounded(x64, ours[name].dtype)), name


@pytest.mark.parametrize("adapter,base", PAIRS)
def test_outputs_match_unmerged_peft(adapter, base, tmp_out):
    loramerge.apply(_base(base), _adapter(adapter), tmp_out, dtype="float32", sync=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_out, dtype=torch.float32).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(_base(base), dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        unmerged = peft.PeftModel.from_pretrained(model, _adapter(adapter)).eval()
        a, b = merged(input_ids=ids).logits, unmerged(input_ids=ids).logits
    assert rel_err(a, b) <= 1e-5
    assert rel_err(plain, b) > 1e-3  # the adapter matters: the comparison can fail


@pytest.mark.parametrize("per,fused", [("mixtral", "mixtral-fused"), ("qwen2-moe", "qwen2-moe-fused")])
def test_per_expert_and_fused_layouts_agree(per, fused, tmp_path):
    """The same weights stored both ways merge to the same values: gate rows first, then up, as
    transformers' Concatenate(dim=1) joins them; expert e is slice e."""
    adapter = next(a for a, info in INDEX["adapters"].items() if info["base"] == per and "experts" in a)
    loramerge.apply(_base(per), _adapter(adapter), tmp_path / "p", sync=False)
    loramerge.apply(_base(fused), _adapter(adapter), tmp_path / "f", sync=False)
    p, f = load_dir(tmp_path / "p"), load_dir(tmp_path / "f")
    gate, up, down = ("w1", "w3", "w2") if per == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    mod = "block_sparse_moe" if per == "mixtral" else "mlp"
    for layer in range(2):
        gu, dn = f[f"model.layers.{layer}.mlp.experts.gate_up_proj"], f[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(gu.shape[0]):
            stem = f"model.layers.{layer}.{mod}.experts.{e}"
            assert torch.equal(gu[e], torch.cat([p[f"{stem}.{gate}.weight"], p[f"{stem}.{up}.weight"]])), stem
            assert torch.equal(dn[e], p[f"{stem}.{down}.weight"]), stem


def _experts_modules(model):
    return [(n, m) for n, m in model.named_modules() if n.endswith("experts") and any(
        p.dim() == 3 for p in m.parameters(recurse=False))]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_layout_tables_agree_with_transformers(model_type, tmp_path):
    """Each table entry against the installed transformers: the experts module's parameters in
    registration order (PEFT's nesting), is_transposed, and, by value, which rows of the fused
    parameter each per-expert checkpoint tensor save_pretrained writes holds."""
    from loramerge.readers.experts_hf import derive

    layout = ARCHITECTURES[model_type]
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
                 shared_expert_intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                 max_position_embeddings=64, head_dim=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **small))
    (name, experts), = _experts_modules(model)
    params = [n for n, _ in experts.named_parameters(recurse=False)]
    assert params == [p.name for p in layout.params]
    assert params == sorted(params, key=NESTING_ORDER.index)
    assert getattr(experts, "is_transposed", False) == layout.transposed
    model.save_pretrained(tmp_path)
    disk = load_dir(tmp_path)
    memory = dict(model.named_parameters())
    for p in layout.params:
        fused = memory[f"{name}.{p.name}"].detach()
        if not p.parts:
            assert torch.equal(disk[f"{name}.{p.name}"], fused)
            continue
        for e in range(fused.shape[0]):
            stacked = torch.cat([disk[expert_tensor(layout, name, e, part) + ".weight"] for part in p.parts])
            assert torch.equal(stacked, fused[e]), (p.name, e)
    derived = derive(model_type)
    if any(p.parts for p in layout.params):  # a conversion mapping exists: it must read the same
        assert derived is not None and (derived.params, derived.transposed, derived.renames) == \
            (layout.params, layout.transposed, layout.renames)


def test_core_merge_imports_no_transformers(tmp_path):
    """Dense merges and MoE merges of listed architectures need neither transformers nor PEFT."""
    code = (
        "import sys, loramerge\n"
        f"loramerge.apply({str(FIXTURES / 'bases' / 'llama-fp32')!r}, {str(FIXTURES / 'adapters' / 'llama-basic')!r}, "
        f"{str(tmp_path / 'a')!r}, sync=False)\n"
        f"loramerge.apply({str(_base('mixtral'))!r}, {str(_adapter('mixtral-experts'))!r}, {str(tmp_path / 'b')!r}, "
        "sync=False)\n"
        "bad = [m for m in ('transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_unknown_architecture_is_one_error_line(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for f in _base("mixtral").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"] = "somemoe"
    (base / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli_main, ["apply", str(base), str(_adapter("mixtral-experts")),
                                                str(tmp_path / "out")])
    assert r.exit_code == 1
    problems = [ln for ln in r.output.splitlines() if ln.startswith("  - ")]
    assert r.output.startswith("Error: ") and len(problems) == 1, r.output
    assert "'somemoe'" in problems[0] and "no mapping" in problems[0] and "mixtral" in problems[0]
    assert not (tmp_path / "out").exists()


def _edited_adapter(tmp_path, edit_cfg=None, edit_sd=None):
    out = tmp_path / "adapter"
    out.mkdir()
    cfg = json.loads((_adapter("mixtral-experts") / "adapter_config.json").read_text())
    sd = load_file(str(_adapter("mixtral-experts") / "adapter_model.safetensors"))
    if edit_cfg:
        edit_cfg(cfg)
    if edit_sd:
        edit_sd(sd)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(sd, str(out / "adapter_model.safetensors"))
    return out


def test_mismatches_are_refused(tmp_path):
    """Wrong expert counts, ranks and nestings are errors naming the parameter, never a guess."""
    def fewer_experts(sd):  # 3 experts' factors against a 4-expert base
        for k in [k for k in sd if "layers.0.mlp.experts.base_layer" in k]:
            sd[k] = (sd[k][:12] if "lora_A" in k else sd[k][:, :12]).contiguous()

    bad = _edited_adapter(tmp_path, edit_sd=fewer_experts)
    with pytest.raises(LoraMergeError, match=r"gate_up_proj: the base has an expert 3 .* factors hold 3 experts"):
        loramerge.apply(_base("mixtral"), bad, tmp_path / "o1", sync=False)
    with pytest.raises(LoraMergeError, match=r"gate_up_proj.* has shape \[4, 48, 32\] but the factors give \[3,"):
        loramerge.apply(_base("mixtral-fused"), bad, tmp_path / "o2", sync=False)

    def one_param(cfg):  # the config targets one parameter, the weights hold two nested wrappers
        cfg["target_parameters"] = ["mlp.experts.down_proj"]

    bad2 = tmp_path / "x"
    bad2.mkdir()
    bad2 = _edited_adapter(bad2, edit_cfg=one_param)
    with pytest.raises(LoraMergeError, match=r"select 1 parameter\(s\) .* 2 nested ParamWrapper"):
        loramerge.apply(_base("mixtral"), bad2, tmp_path / "o3", sync=False)

    def rank(cfg):
        cfg["r"] = 3

    bad3 = tmp_path / "y"
    bad3.mkdir()
    bad3 = _edited_adapter(bad3, edit_cfg=rank)
    with pytest.raises(LoraMergeError, match=r"rank 3 \(r/rank_pattern\)"):
        loramerge.apply(_base("mixtral"), bad3, tmp_path / "o4", sync=False)


@pytest.mark.parametrize("base", ["mixtral", "mixtral-fused", "qwen2-moe-fused"])
def test_verify_passes_and_catches_a_wrong_expert(base, tmp_out):
    adapter = "qwen2-moe-experts" if base.startswith("qwen") else "mixtral-experts"
    loramerge.apply(_base(base), _adapter(adapter), tmp_out, sync=False)
    report = loramerge.verify(_base(base), _adapter(adapter), tmp_out, oracle="peft")
    assert report.ok, report.summary()
    assert report.model.status == "ok" and report.model.adapter_effect["logits"] > 1e-3
    # PEFT's merge judged every tensor, per-expert ones through transformers' reverse conversion
    assert report.oracle.status == "ok" and not report.oracle.not_judged
    assert report.oracle.compared == len(load_dir(tmp_out))
    # swap the merged experts 1 and 2 of layer 0's gate/up: the weights and the model both say so
    f = tmp_out / "model.safetensors"
    sd = load_file(str(f))
    if base == "mixtral":
        a, b = "model.layers.0.block_sparse_moe.experts.1.w1.weight", "model.layers.0.block_sparse_moe.experts.2.w1.weight"
        sd[a], sd[b] = sd[b], sd[a]
    else:
        gu = sd["model.layers.0.mlp.experts.gate_up_proj"]
        sd["model.layers.0.mlp.experts.gate_up_proj"] = gu[[0, 2, 1, 3]].contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})
    (tmp_out / "loramerge_manifest.json").unlink()
    bad = loramerge.verify(_base(base), _adapter(adapter), tmp_out, oracle="peft")
    assert not bad.ok and bad.oracle.status == "FAIL"
    # float32: the model check sees it too (bf16's tolerance is coarser than two swapped experts)
    assert bad.model.status == ("FAIL" if base.startswith("mixtral") else "ok")
    failed = [t for t in bad.tensors if t.problems]
    assert len(failed) == 2 if base == "mixtral" else len(failed) == 1
    if base != "mixtral":
        assert {p.split(":")[0] for p in failed[0].problems} == {"expert 1", "expert 2", "PEFT oracle"}


@pytest.mark.parametrize("base", ["mixtral", "mixtral-fused"])
def test_unmerge_recovers_the_base(base, tmp_path):
    loramerge.apply(_base(base), _adapter("mixtral-experts"), tmp_path / "m", sync=False)
    loramerge.unmerge(tmp_path / "m", _adapter("mixtral-experts"), tmp_path / "u", sync=False)
    orig, back = load_dir(_base(base)), load_dir(tmp_path / "u")
    assert set(orig) == set(back)
    for name, t in orig.items():
        assert rel_err(back[name], t) <= 1e-6, name


def test_inspect_lists_expert_targets():
    d = json.loads(CliRunner().invoke(cli_main, [
        "inspect", str(_adapter("mixtral-experts")), "--base", str(_base("mixtral")), "--json"]).stdout)
    experts = [t for t in d["targets"] if t["layout"] == "experts"]
    assert "expert" not in d["targets"][0]  # plain targets carry no expert fields
    assert len(experts) == 4
    gate_up = next(t for t in experts if t["module"] == "model.layers.0.mlp.experts.gate_up_proj")
    assert (gate_up["experts"], gate_up["rank"], gate_up["out_features"], gate_up["in_features"]) == (4, 4, 48, 32)
    assert gate_up["base_tensors"] == [f"model.layers.0.block_sparse_moe.experts.{e}.{p}.weight"
                                       for e in range(4) for p in ("w1", "w3")]
    text = CliRunner().invoke(cli_main, ["inspect", str(_adapter("mixtral-experts"))]).stdout
    assert "model.layers.0.mlp.experts.gate_up_proj: r=4 alpha=8 scale=2 4 experts [out 48, in 32]" in text


def test_dry_run_names_each_expert(tmp_out):
    r = CliRunner().invoke(cli_main, ["apply", str(_base("mixtral")), str(_adapter("mixtral-experts")),
                                                str(tmp_out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert ("model.layers.0.block_sparse_moe.experts.2.w3.weight [24, 32] F32: lora r=4 scale=2 (expert 2 of "
            "model.layers.0.mlp.experts.gate_up_proj, rows 24:48)") in r.output


def test_combine_and_onnx_fold_refuse(tmp_path):
    with pytest.raises(LoraMergeError, match="target_parameters"):
        loramerge.combine([_adapter("mixtral-experts"), _adapter("mixtral-experts")], tmp_path / "c")
    from loramerge.onnx.targets import collect_targets
    from loramerge.readers.adapters import load_adapters

    with pytest.raises(LoraMergeError, match=r"target_parameters: MoE experts.*export-onnx MODEL_DIR OUT.onnx"):
        collect_targets(load_adapters([_adapter("mixtral-experts")]), None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("base", ["qwen2-moe", "qwen2-moe-fused"])
def test_gpu_merge_equals_cpu_merge(base, tmp_path):
    for dev in ("cpu", "cuda"):
        loramerge.apply(_base(base), _adapter("qwen2-moe-experts"), tmp_path / dev, device=dev, sync=False)
    assert load_dir(tmp_path / "cpu").keys() == load_dir(tmp_path / "cuda").keys()
    for name, t in load_dir(tmp_path / "cpu").items():
        assert torch.equal(t, load_dir(tmp_path / "cuda")[name]), name


@pytest.mark.parametrize("base", ["mixtral", "mixtral-fused"])
def test_weighted_merge_scales_every_expert(base, tmp_path):
    """--weights 0.5: every expert tensor is W + 0.5 * PEFT's delta (float64), in float32."""
    loramerge.apply(_base(base), _adapter("mixtral-experts"), tmp_path / "m", weights=[0.5], sync=False)
    ours, orig = load_dir(tmp_path / "m"), load_dir(_base(base))
    full = _peft_merged(base, "mixtral-experts", torch.float64)
    for name, x64 in full.items():
        want = orig[name].double() + 0.5 * (x64 - orig[name].double())
        assert rel_err(ours[name], want) <= 1e-6, name
