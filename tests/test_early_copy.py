"""Untouched tensors written while torch imports (writers/early.py, issue 15): the output is the
same bytes with the early copy as without it, whatever the child does, and a plan that disagrees
with the prediction throws the early copies away."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramerge import api
from loramerge.errors import LoraMergeError
from loramerge.writers import early

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
CASES = [("llama-fp32", "llama-basic"), ("llama-bf16-sharded", "llama-bf16")]


@pytest.fixture
def small_ranges(monkeypatch):
    """The fixtures' tensors are KBs: let ranges of 8 KiB count."""
    monkeypatch.setattr(early, "MIN_BYTES", 8192)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def _plain(base: Path, adapter: Path, out: Path, **kw) -> dict[str, bytes]:
    api.apply(base, adapter, out, device="cpu", **kw)
    return _files(out)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "loramerge-tmp" in p.name or "loramerge-trash" in p.name]


@pytest.mark.parametrize("base,adapter", CASES)
def test_early_copies_give_the_same_bytes(tmp_path, small_ranges, base, adapter):
    base, adapter = FIX / "bases" / base, FIX / "adapters" / adapter
    want = _plain(base, adapter, tmp_path / "plain")
    out = tmp_path / "early"
    e = early.start(base, adapter, out)
    assert e is not None and e.layout.ranges
    # the prediction keeps away from every module the adapter names
    targets = {"q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not [r.tensor for r in e.layout.ranges if r.tensor.split(".")[-2] in targets]
    with e:
        report = api.apply(base, adapter, out, device="cpu", _early=e)
    assert report.bytes_early == sum(r.nbytes for r in e.layout.ranges) > 0
    assert e._done == set(range(len(e.layout.ranges)))  # the child wrote them, not settle()
    assert _files(out) == want
    manifest = json.loads((out / "loramerge_manifest.json").read_text())
    for name, data in want.items():
        assert manifest["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    assert _leftovers(tmp_path) == []


def test_a_child_that_writes_nothing_costs_no_bytes(tmp_path, small_ranges, monkeypatch):
    base, adapter = FIX / "bases/llama-fp32", FIX / "adapters/llama-basic"
    want = _plain(base, adapter, tmp_path / "plain")
    monkeypatch.setenv("LORAMERGE_TEST_EARLY_FAIL", "1")
    out = tmp_path / "early"
    e = early.start(base, adapter, out)
    with e:
        report = api.apply(base, adapter, out, device="cpu", _early=e)
    assert e._done == set() and report.bytes_early > 0  # adopted, then written by settle()
    assert _files(out) == want


def test_a_plan_that_disagrees_discards_the_copies(tmp_path, small_ranges):
    # started for dtype auto, merged to float16: every header differs from the prediction
    base, adapter = FIX / "bases/llama-fp32", FIX / "adapters/llama-basic"
    want = _plain(base, adapter, tmp_path / "plain", dtype="float16")
    out = tmp_path / "early"
    e = early.start(base, adapter, out)
    with e:
        report = api.apply(base, adapter, out, device="cpu", dtype="float16", _early=e)
    assert report.bytes_early == 0 and e.made == [] and e._proc.poll() is not None
    assert _files(out) == want


def test_a_tensor_the_plan_merges_is_never_taken_from_the_child(tmp_path, small_ranges, monkeypatch):
    # a prediction that wrongly calls a merged tensor untouched (the heuristic fooled): adopt() refuses
    base, adapter = FIX / "bases/llama-fp32", FIX / "adapters/llama-basic"
    want = _plain(base, adapter, tmp_path / "plain")
    monkeypatch.setattr(early, "_adapter_names", lambda adapters: "")  # "nothing is touched"
    out = tmp_path / "early"
    e = early.start(base, adapter, out)
    assert any("q_proj" in r.tensor for r in e.layout.ranges)
    with e:
        report = api.apply(base, adapter, out, device="cpu", _early=e)
    assert report.bytes_early == 0
    assert _files(out) == want


def test_an_error_after_the_start_leaves_nothing(tmp_path, small_ranges):
    base, adapter = FIX / "bases/llama-fp32", FIX / "adapters/llama-basic"
    out = tmp_path / "early"
    e = early.start(base, adapter, out)
    assert e.tmp.is_dir()
    with pytest.raises(LoraMergeError, match="weights"):
        with e:
            api.apply(base, adapter, out, device="cpu", weights=[1.0, 2.0], _early=e)
    assert e._proc.poll() is not None
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("options", [dict(dtype="bfloat16"), dict(shard_size="1MB"), dict(dry_run=True),
                                     dict(qlora="nf4")])
def test_options_that_change_the_layout_start_nothing(tmp_path, small_ranges, options):
    assert early.start(FIX / "bases/llama-fp32", FIX / "adapters/llama-basic", tmp_path / "o", **options) is None
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_starts_nothing_and_apply_says_why(tmp_path, small_ranges):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    assert early.start(FIX / "bases/llama-fp32", FIX / "adapters/llama-basic", out) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_the_cli_writes_untouched_tensors_before_torch_is_imported(tmp_path):
    """A fresh process, as users run it, with the default threshold: a 32 MiB untouched tensor."""
    base = tmp_path / "base"
    shutil.copytree(FIX / "bases/llama-fp32", base)
    tensors = load_file(base / "model.safetensors")
    tensors["model.extra_table.weight"] = torch.randn(2048, 4096)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = FIX / "adapters/llama-basic"
    want = _plain(base, adapter, tmp_path / "plain")
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "loramerge", "apply", str(base), str(adapter), str(out), "--device",
                        "cpu", "-q", "--json"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["bytes_early"] >= 32 * 2**20 - 2 * 4096
    assert _files(out) == want
