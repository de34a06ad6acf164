"""Correct rounding, truly: one table of adversarial cases drives every implementation of the merge
(the fused CPU kernel, the torch path's float32 and float64 first stages, CUDA), each checked bit
for bit against an exact Fraction reference (tests/exact_ref.py). Then the pieces alone: the
decision rule (rounding.decide) against brute force, the kernel's copy of it against the torch one,
and the exact stage against the reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import requires_cuda
from exact_ref import exact_merge, round_fraction
from loramerge.engine import exact, kernels, ops, rounding, rounding_kernel

BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@dataclass
class Trap:
    name: str
    w: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    f: torch.Tensor
    out: torch.dtype
    f64_enough: bool = False  # a float64 evaluation decides every element (no exact stage needed)

    def ref(self):
        if not hasattr(self, "_ref"):  # computed once per case: Fractions are slow
            self._ref = exact_merge(self.w, self.a, self.b, self.f, self.out)
        return self._ref


def _signs(g, n):
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def midpoint_trap(name, wdtype, out, nudge, n=48, trap_share=1.0, seed=0, binade=1.0, half=None):
    """Rank 2: W + B1 A1 is exactly a rounding midpoint of `out` wherever W lies in
    [binade, 2 binade) (W elsewhere: a quarter point, far from any midpoint), and the second term,
    `nudge` times the first, decides the side. nudge 2^-22 is lost in float32, 2^-52 in float64."""
    g = torch.Generator().manual_seed(seed)
    p = {BF: 8, F16: 11, F32: 24}[out]
    trap = torch.rand(n, n, generator=g) < trap_share
    mant = 1 + torch.randint(0, 2 ** (p - 1), (n, n), generator=g).double() / 2 ** (p - 1)
    w = (mant * torch.where(trap, 1.0, 2.0) * binade * _signs(g, n * n).reshape(n, n)).to(wdtype)
    if half is None:
        half = binade * 2.0 ** -p  # half an ulp of `out` in [binade, 2 binade); on a subnormal grid: given
    s1, s2, s3 = _signs(g, n), _signs(g, n), _signs(g, n)
    # the nudge's product split evenly between B and A, so that neither factor underflows float32
    e = math.frexp(half * nudge)[1] - 1 if nudge else 0
    b = torch.stack([s1 * half, s2 * (2.0 ** (e // 2) if nudge else 0.0)], 1)
    a = torch.stack([torch.ones(n, dtype=torch.float64), s3 * 2.0 ** (e - e // 2)])
    return Trap(name, w, a.float(), b.float(), torch.ones(2, dtype=torch.float64), out, f64_enough=nudge > 2.0 ** -40)


def underflow_trap():
    """bf16 subnormal grid (step 2^-133; midpoint m = 2^-134 between 0 and 2^-133). Term 1 is
    m + 2^-149; terms 2-4 are -7 * 2^-153 each: in float32 each product flushes to zero (below
    2^-150), so float32 gives m + 2^-149 (rounds up), while the sum is m - 5 * 2^-153 (rounds down).
    Outside Higham's bound: only the underflow term of the bound flags it."""
    n = 16
    w = torch.zeros(n, n, dtype=BF)
    b = torch.tensor([[(2.0 ** 15 + 1) * 2.0 ** -75] + [-7 * 2.0 ** -80] * 3] * n)
    a = torch.tensor([[2.0 ** -74] * n] + [[2.0 ** -73] * n] * 3)
    b[::2] *= -1  # both signs
    return Trap("underflow bf16", w, a, b, torch.ones(4, dtype=torch.float64), BF, f64_enough=True)


def underflow64_trap():
    """Float64-stored factors whose products underflow float64 (2^-1200 - 2^-1199): W = +-0 plus a
    tiny negative exact sum is -0 in any output format, but every float evaluation flushes the
    products to +0 and -0 and gets +0. Only the float64 bound's underflow term (2^-1074 ...) keeps
    such an element from being decided on its float64 value."""
    n = 8
    w = torch.zeros(n, n, dtype=BF)
    w[::2] = -0.0
    b = torch.tensor([[2.0 ** -600, -(2.0 ** -599)]], dtype=torch.float64).repeat(n, 1)
    a = torch.full((2, n), 2.0 ** -600, dtype=torch.float64)
    return Trap("f64-level underflow zeros bf16", w, a, b, torch.ones(2, dtype=torch.float64), BF)


def overflow_trap(dtype):
    """Exact sums at the overflow threshold max + ulp/2: a hair below (the largest finite value), on
    it (Inf: ties go up) and a hair above (Inf). The hair (2^-60 of the sum) is lost in float64."""
    top = {BF: 3.3895313892515355e38, F16: 65504.0}[dtype]
    half = {BF: 2.0 ** 119, F16: 16.0}[dtype]
    w = torch.full((3, 8), top).to(dtype)
    b = torch.tensor([[half, -half * 2.0 ** -60], [half, 0.0], [half, half * 2.0 ** -60]])
    a = torch.ones(2, 8)
    return Trap(f"overflow {dtype}", w, a, b, torch.ones(2, dtype=torch.float64), dtype)


def zero_trap():
    """Signs of zero: W - W = +0; -0 + 0 * A = +0; a sum that is a tiny negative rounds to -0; one
    that is exactly zero but found from cancelling products, +0."""
    w = torch.tensor([[1.5, -0.0, 0.0, 0.75]], dtype=BF).repeat(4, 1)
    b = torch.tensor([[-1.5, 0.0], [0.0, 0.0], [-2.0 ** -140, 2.0 ** -141], [3.0, -3.0]])
    a = torch.ones(2, 4)
    a[1, 3] = 1.0
    return Trap("zeros bf16", w, a.float(), b.float(), torch.ones(2, dtype=torch.float64), BF)


def scaled_trap():
    """A factor that is not a power of two (rsLoRA alpha/sqrt(r) = 16/sqrt(8)): the exact sum is
    defined with f as the float64 value used, and folding f into B (float64) rounds. Row i:
    f * b1_i = s_i * half-ulp + r_i exactly (b1_i = the float32 nearest s_i half / f); a second
    column with factor 1 cancels r_i to float32 precision, leaving W + midpoint + (r_i - fl32(r_i)),
    a residual of ~2^-57 relative: past float64, and not zero."""
    from fractions import Fraction
    n = 40
    g = torch.Generator().manual_seed(5)
    f = torch.tensor([16 / math.sqrt(8), 1.0], dtype=torch.float64)
    w = ((1 + torch.randint(0, 128, (n, n), generator=g).double() / 128) * _signs(g, n * n).reshape(n, n)).to(BF)
    s = _signs(g, n)
    b1 = (s * 2.0 ** -8 / f[0]).float()
    r = [Fraction(f[0].item()) * Fraction(b1[i].item()) - Fraction(s[i].item()) * Fraction(1, 2 ** 8) for i in range(n)]
    b2 = torch.tensor([-float(x) for x in r]).float()
    assert all(Fraction(b2[i].item()) != -r[i] for i in range(n))
    return Trap("rsLoRA factor bf16", w, torch.ones(2, n), torch.stack([b1, b2], 1), f, BF)


TRAPS = [
    midpoint_trap("f32-level bf16", BF, BF, 2.0 ** -22),
    midpoint_trap("f32-level fp16", F16, F16, 2.0 ** -22),
    midpoint_trap("f64-level bf16", BF, BF, 2.0 ** -52),
    midpoint_trap("f64-level fp16", F16, F16, 2.0 ** -52),
    midpoint_trap("exact ties bf16", BF, BF, 0.0),
    midpoint_trap("exact ties fp16", F16, F16, 0.0),
    midpoint_trap("f64-level bf16, 2% traps", BF, BF, 2.0 ** -52, n=64, trap_share=0.02, seed=1),
    midpoint_trap("f64-level fp16 subnormal grid", F16, F16, 2.0 ** -52, binade=2.0 ** -24 * 8, half=2.0 ** -25, seed=2),
    midpoint_trap("f64-level bf16 subnormal grid", BF, BF, 2.0 ** -52, binade=2.0 ** -133 * 8, half=2.0 ** -134,
                  seed=3),
    midpoint_trap("f64-level bf16 -> fp16", BF, F16, 2.0 ** -52, seed=4),
    midpoint_trap("f32-level fp16 subnormal grid", F16, F16, 2.0 ** -22, binade=2.0 ** -24 * 8, half=2.0 ** -25, seed=7),
    underflow_trap(),
    underflow64_trap(),
    overflow_trap(BF),
    overflow_trap(F16),
    zero_trap(),
    scaled_trap(),
]
F32_TRAPS = [  # float32 outputs: correctly rounded under --accum float64
    midpoint_trap("f64-level fp32", F32, F32, 2.0 ** -52),
    midpoint_trap("exact ties fp32", F32, F32, 0.0),
    midpoint_trap("f64-level bf16 -> fp32", BF, F32, 2.0 ** -52, seed=6),
]


def _kernel(t, accum=torch.float32):
    """The fused kernel alone, then with ops' redo of its undecided rows. A row the kernel decided
    must be right as it wrote it (the redo would hide a broken kernel otherwise), and where float64
    suffices the kernel must decide every element itself (its float32 pass hands what it cannot
    decide to float64 in place)."""
    if not kernels.supports(t.w, t.out):
        pytest.skip("the fused kernel does not take this case")
    y, _, undecided, _ = kernels.merge_half(t.w, t.a, t.b, t.f, t.out, accum=accum)
    done = torch.from_numpy(undecided == 0)
    assert torch.equal(_bits(y)[done], _bits(t.ref())[done]), "the kernel decided a wrong rounding"
    if t.f64_enough:
        assert int(undecided.sum()) == 0, "the kernel left elements that float64 decides"
    return ops.merge_weight(t.w, t.a, t.b, t.f, t.out, accum=accum)[0]


def _torch_decide(t):
    """The torch path with rounding.decide itself, not its numba twin (what a GPU runs)."""
    saved, rounding_kernel.AVAILABLE = rounding_kernel.AVAILABLE, False
    try:
        return ops.merge_weight(t.w, t.a, t.b, t.f, t.out, block_elems=1 << 16)[0]
    finally:
        rounding_kernel.AVAILABLE = saved


IMPLS = {
    "kernel": _kernel,
    "kernel-f64": lambda t: _kernel(t, torch.float64),
    "torch-f32-sparse": lambda t: ops.merge_weight(t.w, t.a, t.b, t.f, t.out, block_elems=1 << 16)[0],
    "torch-f32-blocks": lambda t: ops.merge_weight(t.w, t.a, t.b, t.f, t.out, block_elems=97)[0],
    "torch-f64": lambda t: ops.merge_weight(t.w, t.a, t.b, t.f, t.out, accum=torch.float64, block_elems=1 << 16)[0],
    "torch-decide": _torch_decide,
}


def _bits(x):
    return x.view(torch.int32 if x.dtype == F32 else torch.int16)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("trap", TRAPS, ids=lambda t: t.name)
def test_traps_are_correctly_rounded(trap, impl):
    if kernels.AVAILABLE is False and impl.startswith("kernel"):
        pytest.skip("numba not installed")
    got = IMPLS[impl](trap)
    ref = trap.ref()
    wrong = int((_bits(got) != _bits(ref)).sum())
    assert wrong == 0, f"{trap.name} via {impl}: {wrong} of {ref.numel()} elements not correctly rounded"


@pytest.mark.parametrize("trap", F32_TRAPS, ids=lambda t: t.name)
def test_float32_outputs_with_float64_accumulation(trap):
    got = ops.merge_weight(trap.w, trap.a, trap.b, trap.f, F32, accum=torch.float64)[0]
    assert torch.equal(_bits(got), _bits(trap.ref()))


@requires_cuda
@pytest.mark.parametrize("trap", TRAPS + F32_TRAPS, ids=lambda t: t.name)
def test_traps_on_cuda(trap):
    dev = torch.device("cuda")
    accum = torch.float64 if trap.out == F32 else torch.float32
    got = ops.merge_weight(trap.w.to(dev), trap.a.to(dev), trap.b.to(dev), trap.f, trap.out, accum=accum)[0]
    assert torch.equal(_bits(got.cpu()), _bits(trap.ref()))


def test_traps_are_traps():
    """The table's cases do defeat plain float evaluation (else they would test nothing)."""
    for t in [t for t in TRAPS if "level" in t.name or "underflow" in t.name]:
        naive32 = (torch.mm((t.b.double() * t.f).float(), t.a.float()) + t.w.float()).to(t.out)
        naive64 = ops.round_to(torch.addmm(t.w.double(), t.b.double() * t.f, t.a.double()), t.out)
        wrong32 = int((_bits(naive32) != _bits(t.ref())).sum())
        wrong64 = int((_bits(naive64) != _bits(t.ref())).sum())
        share = 0.005 if "2%" in t.name else 0.2
        assert wrong32 > share * t.w.numel(), t.name
        if "f64-level" in t.name:
            assert wrong64 > share * t.w.numel(), t.name


def test_overflow_is_refused_only_where_the_exact_sum_overflows():
    for dtype in (BF, F16):
        t = overflow_trap(dtype)
        y, _ = ops.merge_weight(t.w, t.a, t.b, t.f, dtype)
        assert torch.isfinite(y[0]).all() and torch.isinf(y[1:]).all()
        with pytest.raises(ops.NonFinite):
            ops.merge_weight(t.w, t.a, t.b, t.f, dtype, check=True)
        finite = ops.merge_weight(t.w[:1], t.a, t.b[:1], t.f, dtype, check=True)[0]  # no error
        assert torch.equal(_bits(finite), _bits(t.ref()[:1]))


# -- the decision rule alone ------------------------------------------------------------------------

def _boundaries(y_bits: int, dtype):
    """Exact rounding boundaries around the grid value with pattern y_bits (magnitude): the
    midpoints to its neighbours (the overflow threshold above the largest value) and zero."""
    from fractions import Fraction
    from exact_ref import _MAX, _ULP_TOP, _value
    y = _value(y_bits, dtype)
    hi = y + _ULP_TOP[dtype] / 2 if y_bits == _MAX[dtype] else (y + _value(y_bits + 1, dtype)) / 2
    lo = Fraction(0) if y_bits == 0 else (y + _value(y_bits - 1, dtype)) / 2
    return lo, hi


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decide_is_sound_and_tight(data):
    """undecided <=> some boundary lies within the bound (up to BOUND_SLACK), checked with Fractions."""
    from fractions import Fraction
    dtype = data.draw(st.sampled_from([BF, F16]))
    approx_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    top = 0x7F7F if dtype == BF else 0x7BFF
    h = data.draw(st.integers(0, top))
    lo, hi = _boundaries(h, dtype)
    # a point near a boundary (or anywhere between), and a bound near its distance
    at = data.draw(st.sampled_from(["lo", "hi", "mid"]))
    base = {"lo": lo, "hi": hi, "mid": (lo + hi) / 2}[at]
    x = float(base) * (1 + data.draw(st.floats(-1e-6, 1e-6)))
    x = float(torch.tensor(x, dtype=torch.float64).to(approx_dtype).double())
    if not (lo <= Fraction(x) <= hi) or x == 0 and h != 0:
        return
    dist = min(Fraction(x) - lo, hi - Fraction(x))
    e = float(dist) * data.draw(st.sampled_from([0.0, 0.5, 0.999, 1.0, 1.001, 2.0])) \
        if dist > 0 else data.draw(st.sampled_from([0.0, 1e-30]))
    e = float(torch.tensor(e, dtype=torch.float64).to(approx_dtype).double())  # the bound as passed
    y, und = rounding.decide(torch.tensor([x], dtype=approx_dtype), torch.tensor([e], dtype=approx_dtype), dtype)
    und = bool(und[0])
    if e == 0:
        assert not und  # the value itself: its rounding is right
        return
    if Fraction(e) >= dist:
        assert und, (x, e, float(dist))  # sound: a boundary within reach is never decided
    elif Fraction(e) * Fraction(rounding.BOUND_SLACK) * (1 + Fraction(1, 2 ** 20)) < dist:
        assert not und, (x, e, float(dist))  # tight: decides everything else
    if not und:
        assert _bits(y)[0].item() & 0x7FFF == h or Fraction(x) in (lo, hi)


@pytest.mark.parametrize("fd,dtype", [(torch.float32, BF), (torch.float32, F16), (torch.float64, BF),
                                      (torch.float64, F16), (torch.float64, F32)])
def test_quick_test_decides_only_what_the_exact_rule_decides(fd, dtype):
    """rounding.decide's quick test (a lower bound of the distance from the dropped bits) never
    decides an element the exact distances leave undecided."""
    x, e = quick_cases(fd, dtype)
    y = rounding.round_to(x, dtype)
    quick = rounding._quick(x, e, dtype)
    exact_und = rounding._exact_rule(x, y, e * rounding.BOUND_SLACK, dtype)
    assert int(quick.sum()) > x.numel() // 4  # it does decide
    bad = quick & exact_und
    assert not bool(bad.any()), (x[bad][:4].tolist(), e[bad][:4].tolist())


def quick_cases(fd, dtype):
    """Random bit patterns of every magnitude, values a few ulps from the grid's midpoints and
    values, and just above powers of two, with bounds around their distances (and some zero)."""
    g = torch.Generator().manual_seed(11)
    it, mb = (torch.int32, 23) if fd == torch.float32 else (torch.int64, 52)
    n = 1 << 16
    raw = torch.randint(-(1 << 62), 1 << 62, (n,), generator=g, dtype=torch.int64)
    x = (raw >> 32).to(torch.int32).view(torch.float32).to(fd) if fd == torch.float32 else raw.view(torch.float64)
    x = x[torch.isfinite(x)]
    grid = torch.randint(0, 1 << 15, (n,), generator=g).to(torch.int16).view(dtype) if dtype != F32 else \
        torch.randint(0, 1 << 31, (n,), generator=g).to(torch.int32).view(F32)
    grid = grid[torch.isfinite(grid)].to(fd)
    step = torch.nextafter(grid, torch.full_like(grid, math.inf)) - grid  # the approximation's ulp
    near = torch.cat([grid + step * torch.randint(-4, 5, grid.shape, generator=g).to(fd),
                      grid + (torch.nextafter(grid.to(dtype), torch.full_like(grid, math.inf).to(dtype)).to(fd) - grid) / 2
                      + step * torch.randint(-40, 41, grid.shape, generator=g).to(fd)])
    # just above powers of two: the midpoint below is a quarter of the step above away
    p = rounding.GRIDS[dtype].mbits + 1
    lo, hi = {BF: (-126, 127), F16: (-14, 15), F32: (-126, 127)}[dtype]
    pw = torch.exp2(torch.randint(lo, hi + 1, (4096,), generator=g).to(fd))
    above = pw + (torch.nextafter(pw, pw * 2) - pw) * torch.randint(0, 5, pw.shape, generator=g).to(fd)
    x = torch.cat([x, near[torch.isfinite(near)], above])
    e = x.abs() * torch.exp2(-torch.randint(4, mb + 4, x.shape, generator=g).to(fd))
    e[-len(above):] = pw * 2.0 ** -p * (0.5 + torch.rand(pw.shape, generator=g, dtype=fd) / 2)  # 1/4..1/2 step
    e[::7] = 0
    x = x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).to(fd)
    return x, e


@pytest.mark.skipif(not rounding_kernel.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("fd", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [BF, F16])
def test_numba_round_decide_agrees_with_decide(fd, dtype):
    """rounding_kernel.round_decide (the CPU's one-pass decide) gives rounding.decide's answers:
    values of every magnitude, on the grid, on its midpoints, zeros, Inf/NaN, the overflow
    threshold; bounds around the distances, zero bounds, with and without the relative term."""
    g = torch.Generator().manual_seed(3)
    n = 1 << 15
    x = (torch.randn(n, generator=g, dtype=torch.float64) *
         torch.exp2(torch.randint(-140, 130, (n,), generator=g).double())).to(fd)
    on = x[:2000].to(dtype)
    x[:2000] = on.to(fd)
    nxt = torch.nextafter(on, torch.full_like(on, math.inf))
    x[2000:4000] = ((on.double() + nxt.double()) / 2).to(fd)
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-40, 65519.0, 65520.0, 3.3e38, 3.3961e38]
    x[4000:4000 + len(special)] = torch.tensor(special, dtype=torch.float64).to(fd)
    e = x.abs() * torch.exp2(-torch.randint(4, 44, (n,), generator=g).to(fd))
    e[::5] = 0
    for rel in (0.0, 2.0 ** -24):
        y1, u1 = rounding.decide(x, e, dtype, rel=rel)
        y2, u2 = rounding_kernel.round_decide(x, e, dtype, rel=rel)
        assert torch.equal(u1, u2) and int(u1.sum()) > 0
        assert torch.equal(_bits(y1)[~u1], _bits(y2)[~u1])


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")
@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-3e38, 3e38, width=64), min_size=1, max_size=40),
       st.lists(st.floats(0, 1e-3), min_size=1, max_size=40), st.sampled_from([BF, F16]))
def test_kernel_rule_agrees_with_decide(xs, rel, dtype):
    """The kernel's scalar copy of the rule gives the same answers as rounding.decide."""
    n = min(len(xs), len(rel))
    x = torch.tensor(xs[:n], dtype=torch.float64)
    if dtype == F16:
        x = x / 3e38 * 7e4
    e = x.abs() * torch.tensor(rel[:n], dtype=torch.float64) * 2.0 ** -8
    y, und = rounding.decide(x, e, dtype)
    g = rounding.GRIDS[dtype]
    lut = rounding_kernel.lut(dtype)
    hb = y.view(torch.int16).numpy().view("uint16")
    for i in range(n):
        k = rounding_kernel.exact_undecided(float(x[i]), hb[i], float(e[i]) * rounding.BOUND_SLACK, float(e[i]) == 0,
                                            lut, g.inf_bits, g.top_ulp, rounding.overflow_threshold(dtype))
        assert bool(k) == bool(und[i]), (float(x[i]), float(e[i]))


# -- the exact stage alone --------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=7, max_size=7),
       st.sampled_from([BF, F16, F32]))
def test_exact_stage_matches_fraction_reference(v, dtype):
    w = torch.tensor([[v[0]]])  # a float32 base: any output dtype may be asked of it (--dtype)
    b = torch.tensor([v[1:4]])
    a = torch.tensor([v[4:7]]).T
    f = torch.tensor([1.0, 0.5, 3.0 / 7.0], dtype=torch.float64)
    got = exact.round_elements(w.reshape(1), b, a.T, f, dtype)
    assert torch.equal(_bits(got), _bits(exact_merge(w, a, b, f, dtype).reshape(1)))


# -- summation order: W outside the GEMM ------------------------------------------------------------

def _kblock_trap():
    """fp16, rank 4096: one product brings W to 4 float32 ulps below a midpoint, 4095 tiny ones
    (each K-block of 256 of them sums to 0.31 ulp) add 5 ulps: the sum is 1 ulp above the
    midpoint. A GEMM that accumulates into C per K-block (OpenBLAS/MKL do, and cuBLAS with split-K
    may) rounds each block's sum away when W is in C: 5 ulps lost, 4 below the midpoint, more than
    the bound's u|r| + (R+3)uE allows for. With W added after the GEMM, D is accurate."""
    rank, n = 4096, 8
    g = torch.Generator().manual_seed(0)
    w = (1 + torch.randint(0, 1024, (n, n), generator=g).double() / 1024).to(F16)
    b = torch.full((n, rank), 5 * 2.0 ** -35)
    b[:, 0] = 2.0 ** -11 - 4 * 2.0 ** -23
    return Trap("K-blocked GEMM fp16", w, torch.ones(rank, n), b, torch.ones(rank, dtype=torch.float64), F16)


KBLOCK = _kblock_trap()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_w_enters_the_float32_sum_once(device):
    t = KBLOCK
    dev = torch.device(device)
    got = ops.merge_weight(t.w.to(dev), t.a.to(dev), t.b.to(dev), t.f, F16, block_elems=1 << 16)[0]
    assert torch.equal(_bits(got.cpu()), _bits(t.ref()))
    # the hazard is real where the GEMM blocks K (reported, not required: it depends on the BLAS)
    inside = torch.addmm(t.w.to(dev).float(), t.b.to(dev), t.a.to(dev)).cpu().to(F16)
    print(f"{device}: W inside the GEMM would misround {int((_bits(inside) != _bits(t.ref())).sum())} of 64")


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")
def test_w_enters_the_kernels_float32_sum_last():
    """The fused kernel's float32 pass sums D in order, then adds W: W rounded once. (Starting
    from W, the 4095 small products would each be rounded at W's scale: 5 ulps lost, as above.)"""
    t = KBLOCK
    y, _, undecided, _ = kernels.merge_half(t.w, t.a, t.b, t.f, F16, accum=torch.float32)
    done = torch.from_numpy(undecided == 0)
    assert torch.equal(_bits(y)[done], _bits(t.ref())[done])


def _kernel_and_torch_roundings(lows, dtype: torch.dtype):
    """Every high half of the 32 bits with each of the low halves `lows`, rounded to `dtype`'s 16
    bits by the kernels' branch-free rounding and by torch (round to nearest even): (the 32-bit
    patterns, the kernel's, torch's, where the pattern is a NaN)."""
    import numba
    import numpy as np

    @numba.njit
    def convert(bits, out, to_f16):
        for j in range(bits.shape[0]):
            out[j] = rounding_kernel.f32_bits_to_half(bits[j], to_f16)

    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    bits = (high[:, None] | np.asarray(lows, np.uint32)[None, :]).reshape(-1)
    got = np.empty(bits.shape[0], np.uint16)
    convert(bits, got, dtype == torch.float16)
    ref = torch.from_numpy(bits.view(np.float32)).to(dtype).view(torch.int16).numpy().view(np.uint16)
    return bits, got, ref, np.isnan(bits.view(np.float32))


@pytest.mark.skipif(not rounding_kernel.AVAILABLE, reason="numba not installed")
def test_branch_free_float16_conversions_match_torch():
    """The kernels' float32 -> float16 rounding (branch-free) against torch's own conversion (round
    to nearest even), on every high half of the 32 bits with the low halves where the rounding
    turns (below): every exponent, the subnormal range, overflow to Inf, NaN. And the float16 -> float32 row conversion against the table it
    replaced, on all 65536 patterns."""
    import numba
    import numpy as np

    @numba.njit
    def to_f32(h, out):
        kernels.f16_row_to_f32(h, out)

    # every multiple of 2^12 and one either side: the ties (and their neighbours) of a rounding that
    # drops 13 bits (normal float16) or 14-16 (its largest subnormals), with the kept bit odd or even
    lows = np.unique(np.clip([k * 0x1000 + d for k in range(17) for d in (-1, 0, 1)], 0, 0xFFFF))
    bits, got, ref, nan = _kernel_and_torch_roundings(lows, torch.float16)
    assert np.array_equal(got[~nan], ref[~nan])
    assert np.all((got[nan] & 0x7FFF) == 0x7E00)  # NaN: float16's quiet NaN, the sign kept
    assert np.array_equal(got[nan] >> 15, (bits[nan] >> 31).astype(np.uint16))
    h = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(1 << 16, np.float32)
    to_f32(h, out)
    assert np.array_equal(out.view(np.uint32), rounding_kernel.lut32(torch.float16).view(np.uint32))


@pytest.mark.skipif(not rounding_kernel.AVAILABLE, reason="numba not installed")
def test_branch_free_bfloat16_conversion_matches_torch():
    """The kernels' float32 -> bfloat16 rounding (32-bit lanes: its sum wraps for NaN patterns
    only) against torch's round to nearest even, on every high half of the 32 bits with the low
    halves around the ties, both kept-bit parities and the largest low halves (where a sum in
    32 bits would wrap for the patterns next to -Inf and NaN); NaN: bfloat16's quiet NaN."""
    import numpy as np

    lows = [0, 1, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF]
    _, got, ref, nan = _kernel_and_torch_roundings(lows, torch.bfloat16)
    assert np.array_equal(got[~nan], ref[~nan])
    assert np.all(got[nan] == 0x7FC0)


@pytest.mark.skipif(not rounding_kernel.AVAILABLE, reason="numba not installed")
def test_rows_too_long_for_the_kernels_int32_counts_go_elsewhere(monkeypatch):
    """The kernel counts a row's elements in int32: supports() turns away rows of MAX_COLS columns
    or more (the torch path merges them), and merge_bits refuses them rather than count wrong."""
    import numpy as np

    w = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert kernels.supports(w, torch.bfloat16)
    monkeypatch.setattr(kernels, "MAX_COLS", 8)
    assert not kernels.supports(w, torch.bfloat16)
    w16 = np.zeros((2, 8), np.uint16)
    with pytest.raises(ValueError, match="8 columns"):
        kernels.merge_bits(w16, "bfloat16", np.ones((1, 8), np.float32), np.ones((2, 1), np.float32),
                           np.ones(1), "bfloat16", np.empty_like(w16), True, 1)
