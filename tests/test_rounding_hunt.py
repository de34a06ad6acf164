"""Hunting midpoints: merges built so that every exact sum lies near a rounding midpoint of the
output grid, at distances from far past float32's reach down to below float64's, with sums that
cancel (terms up to 2^12 times the result), so that each first pass's error approaches its bound.
Every path must give the correctly rounded value (tests/exact_ref.py), and the float32 passes must
decide some of those elements themselves: what the bound claims is put to the test, not bypassed."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from exact_ref import exact_merge
from loramerge.engine import kernels, ops, rounding
from test_rounding import quick_cases

BF, F16 = torch.bfloat16, torch.float16


def hunt(seed: int, dtype: torch.dtype, blocks: int, cancel: int, scale: float):
    """W [8, 8] on `dtype`'s grid; A = blocks copies of (scale * I) (R = 8 blocks), B chosen so
    that W + (B f) A is, per element, a midpoint of the grid plus 2^-k of a step (k random from 3
    to 60, mostly below 31; either side), the delta split into `blocks` terms that cancel down from 2^cancel times
    its size."""
    g = torch.Generator().manual_seed(seed)
    n = 8
    p = 8 if dtype == BF else 11
    w = ((1 + torch.randint(0, 2 ** (p - 1), (n, n), generator=g).double() / 2 ** (p - 1)) *
         torch.exp2(torch.randint(-6, 6, (n, n), generator=g).double()) *
         torch.where(torch.rand(n, n, generator=g) < 0.5, -1.0, 1.0).double()).to(dtype)
    w64 = w.double()
    step = torch.nextafter(w, torch.full_like(w, math.inf)).double() - w64
    k = torch.where(torch.rand(n, n, generator=g) < 0.75, torch.randint(3, 31, (n, n), generator=g),
                    torch.randint(31, 61, (n, n), generator=g)).double()
    side = torch.where(torch.rand(n, n, generator=g) < 0.5, -1.0, 1.0).double()
    moves = torch.randint(-3, 4, (n, n), generator=g).double()  # a few steps away from W
    target = step * (moves + 0.5 + side * torch.exp2(-k))  # the delta, as a float64 intent
    f = torch.full((blocks * n,), 1.0, dtype=torch.float64)
    s = torch.tensor(scale, dtype=torch.float32).item()  # the value A holds
    a = torch.cat([torch.eye(n) * s] * blocks)
    parts, rest = [], target / s
    for m in range(blocks - 1):  # big terms that cancel, then what is left
        big = (rest * 2.0 ** cancel * (1 if m % 2 == 0 else -1)).float()
        parts.append(big)
        rest = rest - big.double()
    parts.append(rest.float())
    b = torch.cat(parts, dim=1)  # b[i, m * n + j] multiplies a[m * n + j, j] = s
    return w, a, b, f


def biased_hunt(seed: int, dtype: torch.dtype, rank: int = 256):
    """Near the bound itself: D's first `rank` terms are all p = 1 + delta, delta just below half an
    ulp of the sum's last binade, so that each addition there rounds down by almost half an ulp:
    the float32 sum loses about rank^2 u / 4, a quarter of what the bound allows (Cauchy-Schwarz is
    exact for equal terms). Then an identity block moves each element to a midpoint of the grid
    plus t, |t| from 2^-16 to 2^-6: some beyond the bound, some between the loss and the bound,
    some within the loss (float32 would round those wrong)."""
    g = torch.Generator().manual_seed(seed)
    n = 8
    u = 2.0 ** -24
    p = 1 + rank * u / 2 * (1 - 2.0 ** -8)  # float32: rank a power of two
    w = (256 + torch.randint(0, 256, (n, n), generator=g).double()).to(dtype)
    d_exact = rank * float(torch.tensor(p, dtype=torch.float32))
    total = w.double() + d_exact
    step = torch.nextafter(total.to(dtype), torch.full_like(total, math.inf).to(dtype)).double() - total.to(dtype).double()
    mid = total.to(dtype).double() + step / 2
    t = torch.exp2(-torch.randint(6, 17, (n, n), generator=g).double()) * torch.where(
        torch.rand(n, n, generator=g) < 0.5, -1.0, 1.0).double()
    corr = mid + t - total  # the identity block's values (small: rounding them to float32 costs ~2^-22)
    b = torch.cat([torch.ones(n, rank), corr.float()], dim=1)
    a = torch.cat([torch.full((rank, n), p), torch.eye(n)])
    return w, a, b, torch.ones(rank + n, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [BF, F16])
def test_float32_passes_near_their_bound(dtype, monkeypatch):
    """biased_hunt: every path correctly rounded; the float32 passes decide some elements and
    leave others (so the bound is neither ignored nor loose enough to hide a factor of 4)."""
    monkeypatch.setattr(kernels, "DENSE_ROW", 1.0)  # 8 columns: no whole-row redo, element by element
    for seed in range(6):
        w, a, b, f = biased_hunt(seed, dtype)
        ref = exact_merge(w, a, b, f, dtype)
        naive = ((b.double() @ a.double()).float() + w.float()).to(dtype)  # float32 alone
        assert int((_bits(naive) != _bits(ref)).sum()) > 0 or seed  # the loss does flip some
        got, fixed = ops.merge_weight(w, a, b, f, dtype, block_elems=1 << 12)
        assert torch.equal(_bits(got), _bits(ref))
        assert 0 < fixed < w.numel()
        if kernels.AVAILABLE:
            y, _, undecided, redone = kernels.merge_half(w, a, b, f, dtype, accum=torch.float32)
            done = torch.from_numpy(undecided == 0)
            assert torch.equal(_bits(y)[done], _bits(ref)[done])
            assert 0 < redone < w.numel()


CASES = st.tuples(st.integers(0, 2 ** 20), st.sampled_from([BF, F16]), st.integers(1, 6), st.integers(0, 12),
                  st.sampled_from([1.0, 0.3, 3.0 / 7.0, 1.7e-3, 2.0 ** -20]))


def _bits(x):
    return x.view(torch.int16)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")
@settings(max_examples=60, deadline=None)
@given(CASES)
def test_kernel_float32_pass_near_midpoints(case):
    seed, dtype, blocks, cancel, scale = case
    w, a, b, f = hunt(seed, dtype, blocks, cancel, scale)
    ref = exact_merge(w, a, b, f, dtype)
    y, _, undecided, redone = kernels.merge_half(w, a, b, f, dtype, accum=torch.float32)
    done = torch.from_numpy(undecided == 0)
    assert torch.equal(_bits(y)[done], _bits(ref)[done]), "the kernel decided a wrong rounding"
    assert torch.equal(_bits(ops.merge_weight(w, a, b, f, dtype)[0]), _bits(ref))


@pytest.mark.parametrize("dtype", [BF, F16])
def test_float32_passes_decide_some_near_midpoints_themselves(dtype):
    """Across many hunts, the float32 passes decide a good share of the elements (those whose
    distance to the midpoint beats the bound) and leave the rest: both branches are exercised."""
    decided32 = total = 0
    for seed in range(40):
        w, a, b, f = hunt(seed, dtype, 1 + seed % 4, seed % 9, 1.0 if seed % 2 else 0.3)
        ref = exact_merge(w, a, b, f, dtype)
        got, fixed = ops.merge_weight(w, a, b, f, dtype, block_elems=1 << 12)  # lowrank's stage 1
        assert torch.equal(_bits(got), _bits(ref))
        decided32 += w.numel() - fixed
        total += w.numel()
        if kernels.AVAILABLE:
            y, _, _, redone = kernels.merge_half(w, a, b, f, dtype, accum=torch.float32)
            decided32 += w.numel() - redone
            total += w.numel()
    assert 0.1 * total < decided32 < 0.9 * total, (decided32, total)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("dtype", [BF, F16])
def test_kernel_float32_quick_test_decides_only_what_the_exact_rule_decides(dtype):
    """The kernel's 32-bit quick test, element by element, against the exact distances."""
    import numpy as np
    x, e = quick_cases(torch.float32, dtype)
    keep = e != 0
    x, e = x[keep], e[keep]
    exact_und = rounding._exact_rule(x, rounding.round_to(x, dtype), e * rounding.BOUND_SLACK, dtype)
    drop = 23 - rounding.GRIDS[dtype].mbits
    lo, hi = rounding.QUICK_RANGE[dtype]
    args = (np.uint32((1 << drop) - 1), np.int32(1 << (drop - 1)), np.float32(2.0 ** -24 * (1 - 2.0 ** -15)),
            np.float32(lo), np.float32(hi if hi < 2.0 ** 128 else np.inf))
    bits, mag, ev = x.view(torch.int32).numpy().view(np.uint32), x.abs().numpy(), e.numpy()
    quick = torch.tensor([bool(kernels._quick32(bits[i], mag[i], ev[i], *args)) for i in range(len(bits))])
    assert int(quick.sum()) > len(bits) // 4
    bad = quick & exact_und
    assert not bool(bad.any()), (x[bad][:4].tolist(), e[bad][:4].tolist())
