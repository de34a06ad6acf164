"""kernel_terms: what the fused kernel needs of A, B and the factors. The norms must never be below
the true ones (checked exactly, with fractions, on hostile magnitudes: huge, tiny, subnormal,
mixed, zero, non-finite), the float32 parts must be the float64 values rounded up, the rest the
values numpy gives; and the kernel fed by them must still give the correctly rounded merge."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from exact_ref import exact_merge
from loramerge.engine import kernel_terms, kernels, lowrank, ops

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")

U = 2.0 ** -53
TINY = 2.0 ** -126
SUB = 2.0 ** -1074


def _hostile_rows(rank: int, seed: int) -> np.ndarray:
    """Rows of B (float64) at every magnitude the scaling has to handle."""
    g = np.random.default_rng(seed)
    m = g.standard_normal((12, rank))
    rows = [
        m[0],                                              # ordinary
        m[1] * 1e300, m[2] * 2.0 ** 1020,                  # squares overflow unscaled
        m[3] * 1e-300, m[4] * 2.0 ** -1060,                # squares underflow (subnormal inputs)
        np.full(rank, SUB), np.full(rank, 3 * SUB),        # smallest subnormals: a subnormal norm
        np.where(np.arange(rank) % 2 == 0, 1e300, 1e-300),  # mixed
        np.where(np.arange(rank) == 0, 2.0 ** 399.9, 2.0 ** -520),  # at the unscaled range's edges
        np.where(np.arange(rank) == 0, 2.0 ** -500, 2.0 ** -540),
        np.where(np.arange(rank) == 0, 2.0 ** 400, 1.0),
        np.zeros(rank),                                     # dead row
        np.where(np.arange(rank) == rank - 1, -7.5, 0.0),   # one term
        np.full(rank, np.finfo(np.float64).max),            # the norm overflows: Inf is fine
        m[5] * 2.0 ** -1022,
        np.nextafter(np.full(rank, 2.0 ** -500), 0) * np.sign(m[6]),
    ]
    return np.ascontiguousarray(np.stack(rows))


def _exact_norm_at_most(v: float, x: np.ndarray) -> bool:
    """Whether ||x|| <= v, exactly."""
    if v == math.inf:
        return True
    return Fraction(v) ** 2 >= sum(Fraction(float(t)) ** 2 for t in x)


def _exact_norm(x: np.ndarray) -> float:
    """||x|| to within a rounding or two (for the test of looseness), NaN where it overflows."""
    s = sum(Fraction(float(t)) ** 2 for t in x)
    k = (s.numerator.bit_length() - s.denominator.bit_length()) // 2
    try:
        return math.ldexp(math.sqrt(float(s / Fraction(2) ** (2 * k))), k)
    except OverflowError:
        return math.nan


def _up32_ok(got: np.float32, x: float) -> bool:
    """got is the smallest float32 >= x."""
    if math.isnan(x):
        return bool(np.isnan(got))
    below = np.nextafter(got, np.float32(-np.inf))
    return float(got) >= x and (float(below) < x or got == 0)


@pytest.mark.parametrize("rank", [1, 3, 16, 37])
def test_row_norms_never_below_the_true_ones(rank):
    b = _hostile_rows(rank, rank)
    f = np.ones(rank)
    raise_ = 1 + 2 * (rank + 2) * U
    bs, bs32, row_w, row_n, rn32, ru32, live32 = kernel_terms.row_terms(b, f, True, 1.0, raise_, 1.0, 1.0)
    with np.errstate(over="ignore"):
        assert np.array_equal(bs, b) and np.array_equal(bs32, b.astype(np.float32))
    for i, x in enumerate(b):
        nb = row_n[i]  # coef 1: the norm itself (live rows)
        live = bool(np.any(x != 0))
        assert row_w[i] == float(live) and live32[i] == float(live)
        if not live:
            assert nb == 0 and rn32[i] == 0 and ru32[i] == 0
            continue
        assert _exact_norm_at_most(nb, x), (i, nb)
        # not absurdly loose either: within the raise (twice over) and a unit of underflow
        true = _exact_norm(x)
        if not math.isnan(true):
            assert nb <= true * (1 + 4 * (rank + 2) * U) + 2 * SUB, (i, nb, true)
        assert _up32_ok(rn32[i], nb) and _up32_ok(ru32[i], float(np.abs(x).sum())), i


@pytest.mark.parametrize("rank", [1, 16, 37])
def test_column_norms_never_below_the_true_ones(rank):
    a = np.ascontiguousarray(_hostile_rows(rank, 100 + rank).T)  # rank x columns, the same hostiles
    raise_ = 1 + 2 * (rank + 2) * U
    a64, a32, col_w, col_n, col_u, cn32, cu32, live32 = kernel_terms.col_terms(
        a.astype(np.float64), True, raise_, 2 * rank ** 0.5, rank + 4.0, SUB, TINY, 2.0 * rank, 3.0)
    with np.errstate(over="ignore"):
        assert np.array_equal(a64, a) and np.array_equal(a32, a.astype(np.float32))
    for j in range(a.shape[1]):
        x = a[:, j]
        live = bool(np.any(x != 0))
        assert col_w[j] == float(live) and live32[j] == float(live)
        na = col_n[j]
        if not live:
            assert na == 0 and col_u[j] == 0 and cn32[j] == 0 and cu32[j] == 0
            continue
        assert _exact_norm_at_most(na, x), (j, na)
        assert col_u[j] == (na * (2 * rank ** 0.5) + (rank + 4)) * SUB
        assert _up32_ok(cn32[j], na)
        assert _up32_ok(cu32[j], TINY * (float(np.abs(x).sum()) + 2 * rank + 3)), j


def test_non_finite_factors_give_non_finite_norms():
    """NaN or Inf in B' or A: the norm is NaN or Inf (the kernel then leaves its elements to the
    exact rule, which refuses them), as lowrank.upper_norms gives."""
    b = np.array([[1.0, np.nan, 2.0], [np.inf, 1.0, 0.0], [np.inf, np.nan, 1e-300]])
    _, _, _, row_n, _, _, _ = kernel_terms.row_terms(b, np.ones(3), False, 1.0, 1.0, 1.0, 1.0)
    assert np.isnan(row_n[0]) and np.isinf(row_n[1]) and np.isnan(row_n[2])
    ref = lowrank.upper_norms(torch.from_numpy(b), 1).numpy()
    assert np.array_equal(np.isnan(ref), np.isnan(row_n)) and np.array_equal(np.isinf(ref), np.isinf(row_n))
    _, _, _, col_n, _, _, _, _ = kernel_terms.col_terms(np.ascontiguousarray(b.T), False, 1.0, 1.0, 1.0, 1.0, 1.0,
                                                        1.0, 1.0)
    assert np.isnan(col_n[0]) and np.isinf(col_n[1]) and np.isnan(col_n[2])


def test_terms_match_numpys_formulas():
    """On ordinary data: B' = B f bit for bit (one product each), live masks where B_ik f_k are
    nonzero, the abs sums and norms as numpy's within the summation order's roundings."""
    g = np.random.default_rng(7)
    rank = 16
    b = (g.standard_normal((300, rank)) * 0.01).astype(np.float32)
    b[5] = 0
    b[9, :] = 0
    b[9, 3] = 1.0
    f = np.full(rank, 0.5)
    f[3] = 0.0  # row 9 is dead through its factor
    bs, bs32, row_w, row_n, rn32, ru32, live32 = kernel_terms.row_terms(b, f, True, 3.0, 1.0, 1.0, 1.0)
    ref = b.astype(np.float64) * f
    assert np.array_equal(bs, ref)
    live = ((b != 0) & (f != 0)).any(1)
    assert np.array_equal(row_w, 3.0 * live)
    assert not live[9] and not live[5] and live.sum() == 298
    np.testing.assert_allclose(row_n, 3.0 * np.sqrt((ref ** 2).sum(1)) * live, rtol=1e-15)
    np.testing.assert_allclose(ru32, np.abs(ref).sum(1) * live, rtol=2 ** -23)
    assert np.all(ru32.astype(np.float64) >= np.abs(ref).sum(1) * live * (1 - 1e-15))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ab_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_with_hostile_factors_is_correctly_rounded(dtype, ab_dtype):
    """The kernel fed by these terms: huge, tiny, subnormal, zero rows of B' and columns of A,
    B and A in float32, float64 or bfloat16 (widened), every element against the Fraction
    reference, through both first passes."""
    g = torch.Generator().manual_seed(3)
    rows, cols, rank = 10, 24, 5
    w = (torch.randn(rows, cols, generator=g) * 0.5).to(dtype)
    a = torch.randn(rank, cols, generator=g, dtype=torch.float64)
    b = torch.randn(rows, rank, generator=g, dtype=torch.float64)
    a[:, 3] = 0                          # dead column
    a[:, 4] *= 1e-40                     # float32 subnormal column (bfloat16 keeps it too)
    a[:, 5] *= 1e30
    b[2] = 0                             # dead row
    b[3] *= 1e-35                        # products underflow float32
    b[4] *= 1e-30
    b[6] *= 3e-39
    f = torch.tensor([1.0, 2.0 ** -30, 3.0, 2.0 ** 20, 0.25], dtype=torch.float64)
    if dtype == torch.float16:
        a[:, 5] *= 1e-30
        b[4] *= 1e25
    a, b = a.to(ab_dtype), b.to(ab_dtype)
    ref = exact_merge(w, a, b, f, dtype)
    for accum in (torch.float32, torch.float64):
        y, bad, undecided, _ = kernels.merge_half(w, a, b, f, dtype, accum=accum)
        done = torch.from_numpy(undecided == 0)
        assert torch.equal(y.view(torch.int16)[done], ref.view(torch.int16)[done])
        got, _ = ops.merge_weight(w, a, b, f, dtype, accum=accum)
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), accum
