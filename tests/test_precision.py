"""TF32 (and oneDNN bf16) must never reach merge math: every entry point runs inside
precision.exact_matmul(), and a float32 GEMM on a GPU where TF32 is forced anyway falls back to
float64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loramerge
from conftest import adapter_dir, base_dir, requires_cuda
from loramerge.engine import deltas, ops, precision

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tf32_on():
    """The caller's process prefers fast float32 matmuls (TF32 on CUDA, bf16 in oneDNN)."""
    torch.set_float32_matmul_precision("medium")
    assert not precision.flags_ieee()
    yield
    torch.set_float32_matmul_precision("highest")


def _spy(monkeypatch, module, name):
    """Record, at every call of module.name, whether the guard is active and the flags are IEEE."""
    seen = []
    real = getattr(module, name)

    def spy(*a, **k):
        seen.append((precision.active(), precision.flags_ieee()))
        return real(*a, **k)
    monkeypatch.setattr(module, name, spy)
    return seen


def test_guard_sets_ieee_and_restores(tf32_on):
    before = precision._state()
    with precision.exact_matmul():
        assert precision.flags_ieee() and precision.active()
        with precision.exact_matmul():  # nested: the inner exit must not restore early
            pass
        assert precision.flags_ieee()
    assert precision._state() == before and not precision.active()


def test_guard_restores_after_an_error(tf32_on):
    before = precision._state()
    with pytest.raises(RuntimeError):
        with precision.exact_matmul():
            raise RuntimeError("boom")
    assert precision._state() == before


def test_apply_unmerge_and_engine_merge_under_the_guard(tf32_on, monkeypatch, tmp_path):
    seen = _spy(monkeypatch, ops, "merge_weight")
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "m", sync=False)
    loramerge.unmerge(tmp_path / "m", adapter_dir("llama-basic"), tmp_path / "u", sync=False)
    assert seen and all(a and f for a, f in seen), seen[:3]
    assert not precision.flags_ieee()  # the caller's preference is back


def test_verify_and_combine_under_the_guard(tf32_on, monkeypatch, tmp_path):
    from loramerge.verifier import check
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "m", sync=False)
    seen = _spy(monkeypatch, check, "check_tensor")  # each tensor's expected values and comparison
    report = loramerge.verify(base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "m", outputs=False)
    assert report.ok and seen and all(a and f for a, f in seen), seen[:3]
    seen = _spy(monkeypatch, deltas, "factors")
    loramerge.combine([adapter_dir("llama-basic"), adapter_dir("llama-rslora")], tmp_path / "c", method="svd",
                      rank=4)
    assert seen and all(a and f for a, f in seen), seen[:3]
    assert not precision.flags_ieee()


def test_onnx_fold_under_the_guard(tf32_on, monkeypatch, tmp_path):
    pytest.importorskip("onnx")
    from loramerge.onnx import fold
    from test_onnx import _load, export_graph

    g = export_graph(_load("gpt2"), "logits", "torchscript", tmp_path / "gpt2.onnx")
    seen = _spy(monkeypatch, ops, "merge_weight")
    fold(g, tmp_path / "o.onnx", [adapter_dir("gpt2-fifo")], base=base_dir("gpt2"))
    assert seen and all(a and f for a, f in seen), seen[:3]


def test_cpu_float32_gemm_counts_as_exact_only_with_ieee_flags(tf32_on):
    cpu = torch.device("cpu")
    assert not precision.float32_gemm_exact(cpu)  # bf16 products allowed in oneDNN
    with precision.exact_matmul():
        assert precision.float32_gemm_exact(cpu)


def test_merge_outside_the_guard_with_fast_matmuls_accumulates_in_float64(tf32_on, monkeypatch):
    """A library caller with bf16 matmuls allowed in oneDNN calls the merge math directly: the torch
    path's float32 stage (whose bound assumes IEEE products) is skipped for float64."""
    from loramerge.engine import lowrank
    from test_rounding import TRAPS, _bits
    accums, real = [], lowrank.merge
    monkeypatch.setattr(lowrank, "merge", lambda *a: accums.append(a[5]) or real(*a))
    t = next(t for t in TRAPS if t.name == "f32-level bf16")
    got = ops.merge_weight(t.w, t.a, t.b, t.f, t.out, block_elems=1 << 16)[0]
    assert accums == [torch.float64] and torch.equal(_bits(got), _bits(t.ref()))
    with precision.exact_matmul():
        ops.merge_weight(t.w, t.a, t.b, t.f, t.out, block_elems=1 << 16)
    assert accums[1] == torch.float32


@requires_cuda
def test_forced_tf32_falls_back_to_float64_on_cuda():
    """TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 in a fresh process, on the GPU: the trap table still
    comes out correctly rounded (the probe finds TF32 if the flags do not, and the merge goes
    float64)."""
    code = ("import torch, sys; sys.path.insert(0, 'tests');"
            "from test_rounding import TRAPS, _bits;"
            "from loramerge.engine import ops, precision;"
            "bad = [t.name for t in TRAPS if not torch.equal(_bits(ops.merge_weight(t.w.cuda(), t.a.cuda(), "
            "t.b.cuda(), t.f, t.out)[0].cpu()), _bits(t.ref()))];"
            "print('exact?', precision.float32_gemm_exact(torch.device('cuda'))); assert not bad, bad")
    env = dict(os.environ, TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@requires_cuda
def test_tf32_left_on_by_a_caller_cannot_misround_on_cuda(tf32_on):
    """Outside any guard (a library caller with TF32 on), merge_weight itself refuses TF32."""
    from test_rounding import TRAPS, _bits
    assert not precision.float32_gemm_exact(torch.device("cuda"))
    for t in TRAPS:
        got = ops.merge_weight(t.w.cuda(), t.a.cuda(), t.b.cuda(), t.f, t.out)[0].cpu()
        assert torch.equal(_bits(got), _bits(t.ref())), t.name
