"""Readers: lazy headers, safe pickle loading, and PEFT's matching semantics (PEFT is the oracle)."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import adapter_dir, base_dir, load_dir
from loramerge.errors import CheckpointError
from loramerge.plan import ModuleMatcher
from loramerge.readers.checkpoint import open_checkpoint
from loramerge.readers.peft import _pattern_value, read_peft_adapter, targets_module

peft_utils = pytest.importorskip("peft.utils.other")
tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
from peft import LoraConfig  # noqa: E402


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/loramerge-pwned",))


def test_pickled_code_never_runs(tmp_path):
    import os
    marker = "/tmp/loramerge-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    f = tmp_path / "pytorch_model.bin"
    with open(f, "wb") as fh:
        pickle.dump({"w": _Payload()}, fh)
    with pytest.raises(CheckpointError, match="loramerge never runs pickled code"):
        open_checkpoint(tmp_path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name", ["llama-fp32", "llama-bf16-sharded", "llama-bin", "llama-bin-sharded", "qwen2"])
def test_lazy_index_reads_the_same_tensors_as_the_reference_loaders(name):
    ck = open_checkpoint(base_dir(name))
    ref = load_dir(base_dir(name))
    assert set(ck.tensors) == set(ref)
    for tname, tref in ck.tensors.items():
        t = ck.read(tref)
        assert t.dtype == ref[tname].dtype and torch.equal(t, ref[tname]), tname
    assert "config.json" in [p.name for p in ck.extra_files]


def test_non_weight_subfolders_and_weights_are_not_carried(tmp_path):
    import shutil
    base = tmp_path / "base"
    shutil.copytree(base_dir("llama-fp32"), base)
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"x")
    (base / "stale.bin").write_bytes(b"x")
    ck = open_checkpoint(base)
    assert "original/" in ck.skipped_files and "stale.bin" in ck.skipped_files
    assert "stale.bin" not in [p.name for p in ck.extra_files]


def test_peft_adapter_scales_follow_config():
    ad = read_peft_adapter(adapter_dir("llama-patterns"))
    by = {p.module: p for p in ad.pairs}
    assert by["model.layers.0.self_attn.q_proj"].rank == 4 and by["model.layers.0.self_attn.q_proj"].scale == 4.0
    assert by["model.layers.1.mlp.down_proj"].rank == 2 and by["model.layers.1.mlp.down_proj"].scale == 8.0
    assert by["model.layers.0.self_attn.v_proj"].scale == 32 / 8
    rs = read_peft_adapter(adapter_dir("llama-rslora"))
    assert all(abs(p.scale - 8 / 2.0) < 1e-12 for p in rs.pairs)  # alpha / sqrt(r), r = 4


MODULES = st.lists(st.sampled_from(["model", "layers", "h", "blocks", "0", "1", "2", "11", "self_attn", "mlp",
                                    "q_proj", "v_proj", "down_proj", "attn", "c_attn"]), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(module=MODULES.map(".".join),
       targets=st.one_of(st.lists(st.sampled_from(["q_proj", "v_proj", "attn.c_attn", "down_proj", "mlp"]),
                                  min_size=1, max_size=3),
                         st.sampled_from([r".*\.q_proj", r"model\..*proj", "all-linear"])),
       layers=st.one_of(st.none(), st.lists(st.integers(0, 3), max_size=2), st.integers(0, 2)),
       pattern=st.one_of(st.none(), st.sampled_from(["layers", "h", ["blocks", "layers"]])))
def test_target_matching_agrees_with_peft(module, targets, layers, pattern):
    if targets == "all-linear":
        return  # PEFT resolves this from module types; we trust the saved weights instead
    if isinstance(targets, str) and layers is not None:
        layers = None  # PEFT rejects layers_to_transform with a regex target_modules
    cfg = LoraConfig(target_modules=targets, layers_to_transform=layers,
                     layers_pattern=pattern if layers not in (None, []) else None)
    ours = targets_module(cfg.to_dict(), module)
    theirs = bool(tuners_utils.check_target_module_exists(cfg, module))
    assert ours == theirs


@settings(max_examples=300, deadline=None)
@given(module=MODULES.map(".".join),
       keys=st.lists(st.sampled_from(["q_proj", "v_proj", "layers.1.mlp.down_proj", "proj", r"self_attn\.q_proj",
                                      "mlp", "1"]), unique=True, max_size=4))
def test_rank_pattern_lookup_agrees_with_peft(module, keys):
    patterns = {k: i + 2 for i, k in enumerate(keys)}
    want = patterns.get(peft_utils.get_pattern_key(patterns.keys(), module), 8)
    assert _pattern_value(patterns, module, 8) == want


def test_module_matcher_prefix_rules():
    m = ModuleMatcher(["model.layers.0.q.weight", "model.layers.1.q.weight", "lm_head.weight"])
    assert m.match("model.layers.0.q") == ("model.layers.0.q", [])
    assert m.match("base.model.layers.1.q")[0] == "model.layers.1.q"  # wrapper prefix stripped
    assert m.match("layers.0.q")[0] == "model.layers.0.q"  # bare-model adapter, prefixed base
    assert m.match("q") == (None, ["model.layers.0.q", "model.layers.1.q"])  # ambiguous
    assert m.match("layers.7.q") == (None, [])
