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
