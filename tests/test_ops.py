"""The numerics contract of ops.py, against float64 math and an independent rounding algorithm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import correctly_rounded, rel_err, requires_cuda
from loramerge.engine import kernels, ops


def _case(seed, rows, cols, rank, w_scale, delta_scale, wdtype):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * w_scale).to(wdtype)
    a = torch.randn(rank, cols, generator=g)
    b = torch.randn(rows, rank, generator=g) * delta_scale
    f = torch.rand(rank, generator=g, dtype=torch.float64) * 4 - 1  # scales, some negative
    ref64 = w.double() + (b.double() * f) @ a.double()
    return w, a, b, f, ref64


def _half_cases(max_rows: int, max_cols: int) -> dict:
    """Hypothesis strategies for _case with a half-precision base: magnitudes from zero weights to
    deltas far larger than W, so both the common and the rare rounding paths are hit."""
    return dict(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, max_rows), cols=st.integers(1, max_cols),
                rank=st.integers(1, 24), w_scale=st.sampled_from([0.0, 1e-3, 0.02, 1.0, 300.0]),
                delta_scale=st.sampled_from([1e-6, 1e-3, 0.1, 10.0]),
                dtype=st.sampled_from([torch.bfloat16, torch.float16]))


@settings(max_examples=40, deadline=None)
@given(**_half_cases(max_rows=70, max_cols=70))
def test_half_outputs_are_correctly_rounded(seed, rows, cols, rank, w_scale, delta_scale, dtype):
    w, a, b, f, ref64 = _case(seed, rows, cols, rank, w_scale, delta_scale, dtype)
    # small blocks (which also bypass the fused kernel) so the row-block loop and the sparse/dense
    # fix-up paths of the torch implementation are all exercised
    y, _ = ops.merge_weight(w, a, b, f, dtype, block_elems=257)
    ref = correctly_rounded(ref64, dtype)
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))


def test_float32_fast_path_alone_would_misround_and_fixups_repair_it():
    """Guards the reason the fix-up exists: plain float32 then one cast misrounds some elements."""
    w, a, b, f, ref64 = _case(1, 512, 512, 16, 0.02, 0.01, torch.bfloat16)
    ref = correctly_rounded(ref64, torch.bfloat16)
    naive = torch.addmm(w.float(), (b.double() * f).float(), a).to(torch.bfloat16)
    assert int((naive.view(torch.int16) != ref.view(torch.int16)).sum()) > 0
    y, fixed = ops.merge_weight(w, a, b, f, torch.bfloat16, block_elems=1 << 22)  # torch path
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))
    assert 0 < fixed < 0.01 * w.numel(), "fix-ups should be rare"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 32))
def test_float32_output_within_1e6(seed, rank):
    w, a, b, f, ref64 = _case(seed, 40, 33, rank, 0.02, 0.01, torch.float32)
    y, _ = ops.merge_weight(w, a, b, f, torch.float32)
    assert y.dtype == torch.float32
    assert rel_err(y, ref64) < 1e-6


def test_float64_accumulation_rounds_once():
    w, a, b, f, ref64 = _case(3, 64, 48, 8, 0.02, 0.01, torch.bfloat16)
    y, _ = ops.merge_weight(w, a, b, f, torch.bfloat16, accum=torch.float64)
    assert torch.equal(y.view(torch.int16), correctly_rounded(ref64, torch.bfloat16).view(torch.int16))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-3e38, max_value=3e38),
                min_size=1, max_size=64),
       st.sampled_from([torch.bfloat16, torch.float16]))
def test_round_to_matches_nearest_neighbour_rounding(values, dtype):
    x = torch.tensor(values, dtype=torch.float64)
    if dtype == torch.float16:
        x = x.clamp(-65000, 65000)
    got = ops.round_to(x, dtype)
    assert torch.equal(got.view(torch.int16), correctly_rounded(x, dtype).view(torch.int16))


def test_round_to_handles_double_rounding_trap():
    # 1 + 2^-8 + 2^-30: rounding to float32 first gives the bf16 midpoint 1 + 2^-8 (ties to even: 1.0),
    # but the true value is above the midpoint, so bf16 must round up.
    x = torch.tensor([1 + 2**-8 + 2**-30], dtype=torch.float64)
    assert x.to(torch.bfloat16).item() == 1.0  # torch's own conversion double-rounds
    assert ops.round_to(x, torch.bfloat16).item() == 1 + 2**-7


def test_merge_bias_and_cast():
    b = torch.randn(10, dtype=torch.float16)
    d1, d2 = torch.randn(10), torch.randn(10)
    got = ops.merge_bias(b, [(0.5, d1), (-2.0, d2)], torch.float16)
    ref = correctly_rounded(b.double() + 0.5 * d1.double() - 2.0 * d2.double(), torch.float16)
    assert torch.equal(got, ref)
    x = torch.randn(100, dtype=torch.float64)
    assert torch.equal(ops.cast(x, torch.bfloat16).view(torch.int16),
                       correctly_rounded(x, torch.bfloat16).view(torch.int16))


def test_check_finite_reports_first_bad_element():
    t = torch.zeros(5)
    t[3] = float("nan")
    t[4] = float("inf")
    try:
        ops.check_finite(t)
    except ops.NonFinite as e:
        count, idx, _ = e.args
        assert (count, idx) == (2, 3)
    else:
        raise AssertionError("NaN not detected")


@requires_cuda
def test_cuda_merge_is_bit_identical_to_cpu():
    w, a, b, f, ref64 = _case(5, 300, 200, 16, 0.02, 0.01, torch.bfloat16)
    cpu, _ = ops.merge_weight(w, a, b, f, torch.bfloat16)
    gpu, _ = ops.merge_weight(w.cuda(), a.cuda(), b.cuda(), f, torch.bfloat16)
    assert torch.equal(cpu.view(torch.int16), gpu.cpu().view(torch.int16))


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba (the `fast` extra) not installed")
@settings(max_examples=40, deadline=None)
@given(**_half_cases(max_rows=40, max_cols=300))  # wide rows: the kernel vectorizes along them
def test_fused_cpu_kernel_is_correctly_rounded(seed, rows, cols, rank, w_scale, delta_scale, dtype):
    w, a, b, f, ref64 = _case(seed, rows, cols, rank, w_scale, delta_scale, dtype)
    ref = correctly_rounded(ref64, dtype)
    for accum in (torch.float32, torch.float64):  # the kernel's two first passes
        y, bad, undecided, _ = kernels.merge_half(w, a, b, f, dtype, accum=accum)
        y2, _ = ops.merge_weight(w, a, b, f, dtype, accum=accum)  # and lowrank for its undecided rows
        assert torch.equal(y2.view(torch.int16), ref.view(torch.int16))
        # rows the kernel decided are final as it wrote them
        done = torch.from_numpy(undecided == 0)
        assert torch.equal(y.view(torch.int16)[done], ref.view(torch.int16)[done])
        assert int(bad.sum()) == int((~torch.isfinite(ref)).sum())


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba (the `fast` extra) not installed")
def test_fused_kernel_rounds_edge_values():
    """Subnormals, overflow to Inf and NaN through the kernel's bit-level rounding."""
    for dtype, big in ((torch.float16, 70000.0), (torch.bfloat16, 3.0e38)):
        w = torch.tensor([[0.0, 1e-7, -3e-8, 6e-8, 1.0, -2.0, big / 2, float("nan")]]).to(dtype)
        a = torch.ones(1, 8)
        f = torch.tensor([1e-8], dtype=torch.float64)
        f2 = torch.tensor([big], dtype=torch.float64)  # pushes column 6 past the largest finite value
        a2 = torch.zeros(1, 8)
        a2[0, 6] = 1.0
        ref = correctly_rounded(w.double() + 1e-8 + big * a2.double(), dtype)
        for accum in (torch.float32, torch.float64):
            y, bad, _, _ = kernels.merge_half(w, torch.cat([a, a2]), torch.ones(1, 2), torch.cat([f, f2]), dtype,
                                              accum=accum)
            bad = int(bad.sum())
            # the reference only searches finite neighbours, so it covers the finite columns
            assert torch.equal(y.view(torch.int16)[0, :6], ref.view(torch.int16)[0, :6])
            assert torch.isinf(y[0, 6]) and torch.isnan(y[0, 7]) and bad == 2


@pytest.mark.skipif(not kernels.AVAILABLE or (os.cpu_count() or 1) < 2, reason="numba, and a pool of 2+ threads")
def test_kernel_keeps_the_callers_thread_count():
    """The kernel runs on as many threads as torch.set_num_threads says (its helpers a pool of
    Python threads), leaves torch's count as it was, and never launches numba's threading layer
    (whose OpenMP start once reset the count torch reads to numba's whole pool). A fresh process:
    the pool and the layer are per process."""
    code = ("import threading, torch, numba\n"
            "torch.set_num_threads(1)\n"
            "from loramerge.engine import kernels\n"
            "def run(rows):\n"
            "    w = torch.zeros(rows, 512, dtype=torch.bfloat16); a = torch.randn(4, 512); b = torch.randn(rows, 4)\n"
            "    for _ in range(2):\n"
            "        kernels.merge_half(w, a, b, torch.ones(4, dtype=torch.float64), torch.bfloat16)\n"
            "    helpers = sum(t.name.startswith('loramerge-kernel') for t in threading.enumerate())\n"
            "    print(torch.get_num_threads(), helpers, end=' ')\n"
            "run(1024)\n"
            "torch.set_num_threads(3)\n"
            "run(4)\n"  # too small to share: no helpers yet
            "run(1024)\n"
            "try:\n"
            "    numba.threading_layer(); print('launched')\n"
            "except ValueError:\n"
            "    print('never launched')\n")
    root = Path(__file__).resolve().parent.parent
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")},
           "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         check=True).stdout
    assert out.split() == ["1", "0", "3", "0", "3", "2", "never", "launched"], out


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("accum", [torch.float32, torch.float64])
def test_kernel_gives_the_same_bits_on_any_number_of_threads(accum):
    """Rows shared among threads in ranges (engine/row_threads.py): every row merged once, whatever
    the split, the probe rows included; the same bits as one thread and as the torch path."""
    torch.manual_seed(5)
    rows, cols, r = 301, 517, 8  # uneven splits; the probe (32 rows) shared too
    w = (torch.randn(rows, cols) * 0.05).to(torch.bfloat16)
    a, b = torch.randn(r, cols) * 0.1, torch.randn(rows, r) * 0.1
    f = torch.full((r,), 0.75, dtype=torch.float64)
    saved = torch.get_num_threads()
    try:
        got = {}
        for t in (1, 2, 3, 7):
            torch.set_num_threads(t)
            y, bad, undecided, _ = kernels.merge_half(w, a, b, f, torch.bfloat16, accum=accum)
            assert int(bad.sum()) == 0
            got[t] = (y.view(torch.int16).clone(), undecided.copy())
    finally:
        torch.set_num_threads(saved)
    ref = ops.merge_weight(w, a, b, f, torch.bfloat16, accum=accum, block_elems=1 << 12)[0]
    for t, (bits, undecided) in got.items():
        assert (undecided == got[1][1]).all(), t
        done = torch.from_numpy(undecided == 0)
        assert done.any()
        assert torch.equal(bits[done], ref.view(torch.int16)[done]), t
        assert torch.equal(bits, got[1][0]), t


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba (the `fast` extra) not installed")
@pytest.mark.parametrize("threads", [1, 3])
def test_rows_left_to_float64_whole_are_done_after_the_float32_pass(threads):
    """A row whose terms cancel (B_i0 = -B_i1 = 1e3, A_0 = A_1) has a float32 bound far above its
    grid's spacing: the float32 pass leaves it whole to the float64 pass, which merge_bits runs
    after it (rows 40, 41, 77: past the probe rows, one alone, two in a pair). The result is the
    correctly rounded one, those rows counted as redone whole."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 100, 256
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    a = torch.randn(4, cols, generator=g) * 0.01
    a[1] = a[0]
    b = torch.randn(rows, 4, generator=g) * 0.001
    dense = [40, 41, 77]
    b[dense, 0], b[dense, 1] = 1e3, -1e3
    f = torch.ones(4, dtype=torch.float64)
    ref = correctly_rounded(w.double() + (b.double() * f) @ a.double(), torch.bfloat16)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y, bad, undecided, redone = kernels.merge_half(w, a, b, f, torch.bfloat16)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))
    assert int(undecided.sum()) == 0 and int(bad.sum()) == 0
    assert len(dense) * cols <= redone < (len(dense) + 1) * cols
