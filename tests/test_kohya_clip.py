"""kohya names longer than the base's (issue 11, item 4): 'lora_te_text_model_encoder_layers_0_...'
against a CLIP text encoder that transformers 5 saves without 'text_model.'. Oracle: PEFT's
merge_and_unload of the same factors saved as a PEFT adapter, and the unmerged PeftModel's outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge
from conftest import FIXTURES, load_dir, rel_err
from loramerge.errors import PlanError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = FIXTURES / "kohya-clip"
BASE, PEFT_AD, KOHYA = ROOT / "base", ROOT / "peft", ROOT / "te_lora.safetensors"


def test_fixture_is_the_case_in_question():
    assert not any(k.startswith("text_model.") for k in load_dir(BASE))
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(str(KOHYA)))


def test_kohya_te_matches_peft_merge_and_our_peft_merge(tmp_path):
    report = loramerge.apply(BASE, KOHYA, tmp_path / "k", sync=False)
    ours = load_dir(tmp_path / "k")
    loramerge.apply(BASE, PEFT_AD, tmp_path / "p", sync=False)
    via_peft_adapter = load_dir(tmp_path / "p")
    model = transformers.CLIPTextModel.from_pretrained(BASE, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(model, PEFT_AD).merge_and_unload().state_dict()
    base = load_dir(BASE)
    assert report.tensors_merged == 12  # 2 layers x (q, k, v, out_proj, fc1, fc2)
    assert set(ours) == set(base)
    changed = 0
    for name, t in ours.items():
        assert torch.equal(t, via_peft_adapter[name]), name  # same factors, same bits
        assert rel_err(t, theirs[name]) <= 1e-6, name
        changed += not torch.equal(t, base[name])
    assert changed == 12


def test_merged_kohya_reproduces_unmerged_peft_outputs(tmp_path):
    loramerge.apply(BASE, KOHYA, tmp_path / "k", sync=False)
    merged = transformers.CLIPTextModel.from_pretrained(tmp_path / "k", dtype=torch.float32).eval()
    unmerged = peft.PeftModel.from_pretrained(
        transformers.CLIPTextModel.from_pretrained(BASE, dtype=torch.float32), PEFT_AD).eval()
    plain = transformers.CLIPTextModel.from_pretrained(BASE, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).last_hidden_state for m in (merged, unmerged, plain))
    assert rel_err(a, b) <= 1e-5
    assert rel_err(c, b) > 1e-3  # the adapter does change the outputs


def test_verify_accepts_the_kohya_merge(tmp_path):
    loramerge.apply(BASE, KOHYA, tmp_path / "k", sync=False)
    report = loramerge.verify(BASE, KOHYA, tmp_path / "k", outputs=False)
    assert report.ok and len(report.targets) == 12


def _tiny(path, names):
    path.mkdir()
    save_file({n: torch.ones(2, 2) for n in names}, str(path / "model.safetensors"))


def _kohya(path, modules):
    save_file({k: v for m in modules for k, v in ((f"{m}.lora_down.weight", torch.ones(1, 2)),
                                                   (f"{m}.lora_up.weight", torch.ones(2, 1)))}, str(path))


def test_two_base_paths_flattening_alike_are_ambiguous(tmp_path):
    _tiny(tmp_path / "base", ["a_b.c.weight", "a.b_c.weight"])
    _kohya(tmp_path / "l.safetensors", ["lora_te_x_a_b_c"])
    with pytest.raises(PlanError) as e:
        loramerge.apply(tmp_path / "base", tmp_path / "l.safetensors", tmp_path / "out", dry_run=True)
    assert "ambiguous" in e.value.problems[0] and "a.b_c.weight" in e.value.problems[0]


def test_only_a_whole_base_path_matches_the_rest_of_a_longer_name(tmp_path):
    """'..._q_proj' cut down to 'proj' must not land on a base module that is just 'proj' deep
    inside another path; it may land on a base module whose whole path is the rest."""
    _tiny(tmp_path / "base", ["unet.ff.proj.weight"])
    _kohya(tmp_path / "l.safetensors", ["lora_te_text_model_q_proj"])
    with pytest.raises(PlanError, match="no base tensor"):
        loramerge.apply(tmp_path / "base", tmp_path / "l.safetensors", tmp_path / "out", dry_run=True)
    _tiny(tmp_path / "base2", ["q_proj.weight"])
    r = loramerge.apply(tmp_path / "base2", tmp_path / "l.safetensors", tmp_path / "out2", dry_run=True)
    assert "q_proj.weight [2, 2]" in r.plan_text


def test_cut_names_must_all_drop_the_same_prefix(tmp_path):
    _tiny(tmp_path / "base", ["encoder.q.weight", "k.weight"])
    _kohya(tmp_path / "l.safetensors", ["lora_te_text_model_encoder_q", "lora_te_text_model_encoder_k"])
    with pytest.raises(PlanError, match="different prefix rewrites"):
        loramerge.apply(tmp_path / "base", tmp_path / "l.safetensors", tmp_path / "out", dry_run=True)
