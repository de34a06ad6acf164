"""The CPU kernel loads on a thread of its own (engine/kernel_load.py): while numba compiles it,
the merge goes on on the torch path with the same bits; a load from the cache is waited for."""

import json
import threading

import pytest
import torch

from conftest import adapter_dir, base_dir, load_dir
from loramerge import api
from loramerge.engine import jit_time, kernel_load, kernels, lowrank, rounding_kernel

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")

BASE, ADAPTER = "llama-bf16-sharded", "llama-bf16"


@pytest.fixture
def fresh(monkeypatch):
    """No loader begun in this process yet (others' runs began one): each test starts its own."""
    monkeypatch.setattr(kernel_load, "_current", None)


def _merge(out):
    report = api.apply(base_dir(BASE), adapter_dir(ADAPTER), out, device="cpu", sync=False)
    return report, load_dir(out)


def test_while_numba_compiles_the_torch_path_merges_the_same_bits(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAMERGE_TEST_KERNEL_LOAD_DELAY", "600")  # compiling all run long
    bridged, got = _merge(tmp_path / "a")
    assert bridged.tensors_merged > 0
    assert bridged.merged_while_compiling == bridged.tensors_merged
    # the same run once the kernel is there: every tensor through it, and bit for bit the same
    monkeypatch.setattr(kernel_load, "_current", None)
    monkeypatch.delenv("LORAMERGE_TEST_KERNEL_LOAD_DELAY")
    plain, want = _merge(tmp_path / "b")
    assert plain.merged_while_compiling == 0 and plain.tensors_merged == bridged.tensors_merged
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k].view(torch.int16) if want[k].dtype == torch.bfloat16 else want[k],
                           got[k].view(torch.int16) if got[k].dtype == torch.bfloat16 else got[k]), k
    files = [json.loads((tmp_path / d / "loramerge_manifest.json").read_text())["files"] for d in "ab"]
    assert files[0] == files[1]  # every shard's sha256


def test_the_torch_path_keeps_off_numba_while_it_loads(fresh, monkeypatch):
    """While a load is under way, lowrank decides with rounding.decide in torch: numba's
    modules may be half-imported, and compiling their twin there would stall the merge."""
    busy = kernel_load.Loader.__new__(kernel_load.Loader)
    busy.done, busy.pretending, busy.merged_meanwhile = threading.Event(), True, 0
    monkeypatch.setattr(kernel_load, "_current", busy)

    def no(*a, **k):
        raise AssertionError("numba's round_decide used while the kernel loads")

    monkeypatch.setattr(rounding_kernel, "round_decide", no)
    torch.manual_seed(0)
    w = torch.randn(64, 96).to(torch.bfloat16)
    a, b, f = torch.randn(4, 96), torch.randn(64, 4), torch.full((4,), 0.5, dtype=torch.float64)
    from loramerge.engine import ops
    y, _ = ops.merge_weight(w, a, b, f, torch.bfloat16)
    assert busy.merged_meanwhile == 1
    busy.done.set()  # loaded: the kernel again (and the same bits)
    monkeypatch.undo()
    z, _ = ops.merge_weight(w, a, b, f, torch.bfloat16)
    assert torch.equal(y.view(torch.int16), z.view(torch.int16))
    assert lowrank._decide.__doc__ and "kernel_load" in lowrank._decide.__doc__


def test_a_load_from_the_cache_is_waited_for(fresh, tmp_path):
    """In this process the kernel is compiled (or cached) already: the loader finds it, the
    compute thread waits for it, and no tensor goes the slow way."""
    report, _ = _merge(tmp_path / "o")
    assert report.tensors_merged > 0 and report.merged_while_compiling == 0
    assert kernel_load._current is not None and kernel_load._current.done.is_set()
    assert not kernel_load.loading() and kernel_load.use_kernel()


def test_no_loader_for_float32_or_without_numba(fresh, monkeypatch, tmp_path):
    api.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "f32", device="cpu", sync=False)
    assert kernel_load._current is None  # no half-precision merge: numba is not needed
    monkeypatch.setenv("LORAMERGE_NO_KERNEL", "1")
    assert kernel_load.start(torch.float32) is None and kernel_load.use_kernel() and not kernel_load.loading()


def test_compiling_counts_threads_not_nesting():
    assert not jit_time.compiling()
    jit_time._start()
    jit_time._start()  # a callee compiled inside
    jit_time._end()
    assert jit_time.compiling()
    jit_time._end()
    assert not jit_time.compiling()


def test_the_summary_says_what_merged_while_compiling(tmp_path):
    r = api.ApplyReport(out=tmp_path, dry_run=False, device="cpu", tensors_merged=9, merged_while_compiling=4,
                        stage_seconds={"compile": 12.5})
    assert "compiled the CPU kernels for this machine: 12.5 s" in r.summary()
    assert "4 tensor(s) merged meanwhile on the slower torch path" in r.summary()
    r.merged_while_compiling = 0
    assert "meanwhile" not in r.summary()
    assert r.to_json()["merged_while_compiling"] == 0
