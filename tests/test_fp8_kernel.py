"""The fused CPU kernel for FP8 weights (engine/fp8_kernel.py) against independent references:
test_codecs' float64 block quantizer (from the e4m3 bit layout) and conftest's nearest-of-three
rounding for bf16/fp16, on values built to be hard: exact ties between codes, subnormals, partial
edge blocks, all-zero blocks, overflow. And against the torch path (the GPU's) on random weights.

To make the kernel's float64 value y any chosen Y exactly, the base is all zeros and the delta is
B @ A with B the identity (one nonzero product per element): y = 0 + Y[i, j]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import correctly_rounded
from test_codecs import E4M3, _reference_quantize

from loramerge.codecs import fp8
from loramerge.engine import fp8_kernel, ops

pytestmark = pytest.mark.skipif(not fp8_kernel.AVAILABLE, reason="numba is not installed")


def run(y: torch.Tensor, out_dtype: torch.dtype, block=(128, 128)):
    """The kernel on base 0 + delta I @ y: (out, fresh scales or None, (bad count, index, value))."""
    rows, cols = y.shape
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.ones(-(-rows // block[0]), -(-cols // block[1]))
    out = torch.empty(rows, cols, dtype=out_dtype)
    scales = torch.empty_like(s) if out_dtype == torch.float8_e4m3fn else None
    eye = torch.eye(rows, dtype=torch.float64)
    bad = fp8_kernel.merge(q, s, block, eye, y, torch.ones(rows, dtype=torch.float64), out, scales)
    return out, scales, bad


def hard_values(g: torch.Generator) -> torch.Tensor:
    y = torch.randn(40, 300, generator=g, dtype=torch.float64) * 0.05
    # block (0, 0): every tie between two e4m3 codes, both signs, at scale exactly 2^-10
    mids = torch.tensor([(E4M3[i] + E4M3[i + 1]) / 2 for i in range(len(E4M3) - 1)], dtype=torch.float64)
    y[:, :128] = 0
    y[0, :mids.numel()], y[1, :mids.numel()] = mids * 2.0 ** -10, -mids * 2.0 ** -10
    y[2, 0] = 448 * 2.0 ** -10
    y[3, :16] = torch.tensor([E4M3[i] for i in range(16)]) * 2.0 ** -10  # subnormal codes themselves
    y[4, :8] = -torch.tensor([E4M3[i] for i in range(1, 9)]) * 2.0 ** -10
    # block (0, 1): random values a hair off ties
    y[5:10, 128:200] = (mids[:72] * (1 + torch.randn(72, generator=g, dtype=torch.float64) * 1e-12)).repeat(5, 1)
    # block (0, 2) (partial, 44 wide): all zeros
    y[:, 256:] = 0
    return y


def test_requantize_matches_the_float64_reference_on_ties_subnormals_and_edges():
    y = hard_values(torch.Generator().manual_seed(5))
    for block in [(128, 128), (16, 48), (7, 5)]:
        q, s, bad = run(y, torch.float8_e4m3fn, block)
        q_ref, s_ref = _reference_quantize(y.numpy(), block)
        s_ref[s_ref == 0] = 1.0  # all-zero blocks: scale 1 (the reference leaves 0)
        assert bad == (0, -1, 0.0)
        assert np.array_equal(s.numpy(), s_ref), block
        assert np.array_equal(q.to(torch.float64).numpy(), q_ref), block
        # negative values that round to zero keep their sign
        assert torch.equal(torch.signbit(q.float()), torch.signbit(y)), block
    # the torch path (GPUs) gives the same bytes
    q, s, _ = run(y, torch.float8_e4m3fn)
    q_t, s_t = fp8.quantize(y, (128, 128))
    assert torch.equal(q.view(torch.uint8), q_t.view(torch.uint8)) and torch.equal(s, s_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_plain_outputs_are_correctly_rounded(dtype):
    g = torch.Generator().manual_seed(6)
    info = torch.finfo(dtype)
    y = torch.randn(20, 130, generator=g, dtype=torch.float64)
    ulp1 = info.eps  # spacing just above 1.0
    y[0, :6] = torch.tensor([1 + ulp1 / 2, 1 + 3 * ulp1 / 2, -(1 + ulp1 / 2), 1 + ulp1 / 2 + 1e-15, 2 - ulp1 / 4, -1e-300],
                            dtype=torch.float64)
    tiny = info.smallest_normal * info.eps  # the smallest subnormal
    y[1, :5] = torch.tensor([tiny / 2, 3 * tiny / 2, -tiny / 2, tiny / 2 * (1 + 1e-9), info.smallest_normal * 0.999],
                            dtype=torch.float64)
    y[2, :2] = torch.tensor([float(info.max), -float(info.max)], dtype=torch.float64)
    y[3] *= 1e-30 if dtype != torch.float16 else 1e-6  # deep in the subnormals
    out, scales, bad = run(y, dtype)
    assert scales is None and bad == (0, -1, 0.0)
    want = correctly_rounded(y, dtype)
    assert torch.equal(out.view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype, big", [(torch.bfloat16, 3.4e38), (torch.float16, 65520.0), (torch.float32, 3.5e38)])
def test_values_beyond_the_range_are_reported_not_written(dtype, big):
    y = torch.zeros(3, 200, dtype=torch.float64)
    y[2, 150], y[1, 199], y[2, 3] = -big, big, big  # the first in row-major order is [1, 199]
    y[0, 0] = float(torch.finfo(dtype).max)
    _, _, (count, idx, value) = run(y, dtype)
    assert (count, idx, value) == (3, 1 * 200 + 199, float("inf"))


@pytest.mark.parametrize("out_dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_a_zero_delta_leaves_negative_zero_alone(out_dtype):
    """A row the adapter does not change (B's row is zero) keeps its bits, -0.0 included."""
    q = torch.zeros(4, 6, dtype=torch.float8_e4m3fn)
    q.view(torch.uint8)[:, 0] = 0x80  # -0.0
    q.view(torch.uint8)[:, 1] = 0x7E  # 448: the block's scale stays what it was
    s = torch.full((1, 1), 0.5)
    left, right = torch.zeros(4, 2), torch.randn(2, 6)
    left[3] = 1.0
    out = torch.empty(4, 6, dtype=out_dtype)
    scales = torch.empty_like(s) if out_dtype == torch.float8_e4m3fn else None
    fp8_kernel.merge(q, s, (128, 128), left, right, torch.ones(2, dtype=torch.float64), out, scales)
    assert torch.signbit(out[:3, 0].float()).all() and out[:3, 0].float().eq(0).all()


def test_a_nan_in_the_base_is_reported_with_its_index():
    q = torch.zeros(130, 140, dtype=torch.float8_e4m3fn)
    q.view(torch.uint8)[129, 2] = 0x7F  # NaN
    s = torch.ones(2, 2)
    out = torch.empty(130, 140, dtype=torch.float8_e4m3fn)
    count, idx, value = fp8_kernel.merge(q, s, (128, 128), None, None, None, out, torch.empty_like(s))
    assert count == 1 and idx == 129 * 140 + 2 and np.isnan(value)


@pytest.mark.parametrize("out_dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32])
def test_random_weights_give_the_torch_paths_bytes(out_dtype):
    g = torch.Generator().manual_seed(7)
    for rows, cols, rank, block in [(300, 257, 16, (128, 128)), (64, 64, 1, (128, 128)), (77, 130, 5, (32, 16))]:
        w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.02
        q, s = fp8.quantize(w, block)
        left, right = torch.randn(rows, rank, generator=g) * 0.01, torch.randn(rank, cols, generator=g) * 0.01
        factors = torch.full((rank,), 2.0, dtype=torch.float64)
        out = torch.empty(rows, cols, dtype=out_dtype)
        scales = torch.empty_like(s) if out_dtype == torch.float8_e4m3fn else None
        assert fp8_kernel.merge(q, s, block, left, right, factors, out, scales) == (0, -1, 0.0)
        w64 = fp8.dequantize(q, s, block)
        if out_dtype == torch.float8_e4m3fn:
            y, _ = ops.merge_weight(w64, right, left, factors, torch.float64, accum=torch.float64)
            want, want_s = fp8.quantize(y, block)
            assert torch.equal(scales, want_s)
        else:
            want, _ = ops.merge_weight(w64, right, left, factors, out_dtype, accum=torch.float64)
        assert torch.equal(out.view(torch.uint8), want.contiguous().view(torch.uint8)), (rows, cols, out_dtype)


def test_bands_shared_among_threads_give_the_same_bytes():
    """The 128-row bands go to threads in ranges (engine/row_threads.py): every band once, scales
    included, whatever the number of threads; the bytes of one thread."""
    g = torch.Generator().manual_seed(11)
    rows, cols, rank, block = 1000, 300, 8, (128, 128)  # 8 bands, the last one short
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.02
    q, s = fp8.quantize(w, block)
    left, right = torch.randn(rows, rank, generator=g) * 0.01, torch.randn(rank, cols, generator=g) * 0.01
    factors = torch.full((rank,), 2.0, dtype=torch.float64)
    saved, got = torch.get_num_threads(), []
    try:
        for t in (1, 2, 3, 7):
            torch.set_num_threads(t)
            out, scales = torch.empty(rows, cols, dtype=torch.float8_e4m3fn), torch.full_like(s, -1.0)
            assert fp8_kernel.merge(q, s, block, left, right, factors, out, scales) == (0, -1, 0.0)
            got.append((out.view(torch.uint8).clone(), scales))
    finally:
        torch.set_num_threads(saved)
    assert (got[0][1] > 0).all()  # every block got its scale
    for bits, scales in got[1:]:
        assert torch.equal(bits, got[0][0]) and torch.equal(scales, got[0][1])
