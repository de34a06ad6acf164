"""verify's float32 decision (verifier/compare.py, its numba kernel and its torch path) gives the
verdicts of the float64 rule (weights._check_values, the reference it replaced): the same bad
counts, max ulps and worst element, on data built to sit next to rounding midpoints of the output
grid, on outputs nudged 1 and 3 ulps, on a naive float32 merge's rounding (what an unsound bound
would let through), on float16 near its subnormals, transposed layouts and several terms; and the
delta-fidelity statistics against an independent float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cuda
from loramerge.engine.ops import round_to
from loramerge.verifier import compare, compare_kernel, weights
from loramerge.verifier.report import TensorCheck

CPU = torch.device("cpu")
DT = {"BF16": torch.bfloat16, "F16": torch.float16}


def neighbour(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """x moved `steps` places along its own (half-precision) grid."""
    x = x.clone()
    for s in range(int(steps.abs().max())):
        move = steps.abs() > s
        x[move] = torch.nextafter(x[move], torch.where(steps[move] > 0, math.inf, -math.inf).to(x.dtype))
    return x


def trap(code: str, rows: int = 40, cols: int = 48, seed: int = 0, scale: float = 0.02, shrink: float = 1.0):
    """(W, P, Q, E): W half precision [rows, cols], E = W + P @ Q exactly (float64), every element
    at eps ulp from a midpoint of the output grid, eps from 0 (a tie) through 2^-40 (only float64
    sees it) and 2^-12 (the float32 bound cannot decide) to 0.3125 (it can); `shrink` < 1 puts E far
    below W (the delta cancels most of W). P is the identity, so each element's delta is its own:
    Q = E - W, exact in float64."""
    g = torch.Generator().manual_seed(seed)
    dt = DT[code]
    w = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale).to(dt)
    near = (w.double() * shrink * (1 + 0.05 * torch.randn(rows, cols, generator=g, dtype=torch.float64))).to(dt)
    up = torch.nextafter(near, torch.full_like(near, math.inf))
    ulp = up.double() - near.double()
    tiny = 2.0 ** -40 if shrink == 1 else 2.0 ** -30  # (Q = E - W must stay exact in float64)
    eps = torch.tensor([0.0, tiny, -tiny, 2.0 ** -25, -2.0 ** -25, 2.0 ** -12, -2.0 ** -12, 2.0 ** -6,
                        -2.0 ** -6, 0.3125, -0.3125], dtype=torch.float64)
    pick = torch.randint(0, len(eps), (rows, cols), generator=g)
    e = (near.double() + up.double()) / 2 + eps[pick] * ulp
    q = e - w.double()
    assert torch.equal(w.double() + q, e)
    return w, torch.eye(rows, dtype=torch.float64), q, e


def lowrank(code: str, rows: int = 64, cols: int = 96, rank: int = 8, seed: int = 1, scale: float = 0.02):
    """A realistic merge: W + s B @ A with small random factors (most elements far from midpoints)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * scale).to(DT[code])
    p = torch.randn(rows, rank, generator=g, dtype=torch.float64) * 1e-3 * 2.0
    q = torch.randn(rank, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    return w, p, q, torch.addmm(w.double(), p, q)


def target(w: torch.Tensor, p: torch.Tensor, q: torch.Tensor, transposed: bool, split: bool = False):
    """The recipe verify builds (_Target) for E = W + P @ Q in the stored view; transposed: the
    linear orientation is W^T with effects (Q^T, P^T); split: the rank in two terms."""
    left, right = (q.T, p.T) if transposed else (p, q)
    effects = [(left, right)]
    if split and left.shape[1] > 1:
        k = left.shape[1] // 2
        effects = [(left[:, :k], right[:k]), (left[:, k:], right[k:])]
    return weights._Target(weights._lin(w, transposed), transposed, effects=effects)


def decide(code: str, tg, m: torch.Tensor, path: str, monkeypatch, dev=CPU) -> TensorCheck:
    tc = TensorCheck("t", "merge", dtype=code, shape=tuple(m.shape))
    if path == "float64":
        weights._check_values(tc, tg, m, dev, layer=False)
        return tc
    monkeypatch.setattr(compare_kernel, "AVAILABLE", path == "kernel")
    assert weights._check_fast(tc, tg, m, dev)
    return tc


def same_verdicts(new: TensorCheck, old: TensorCheck) -> None:
    assert (new.bad_elements, new.max_ulps, new.worst["index"]) == (old.bad_elements, old.max_ulps, old.worst["index"])
    assert (new.worst["merged"], new.worst["base"]) == (old.worst["merged"], old.worst["base"])
    assert new.worst["expected"] == pytest.approx(old.worst["expected"], rel=1e-15, abs=1e-300)
    assert bool(new.problems) == bool(old.problems)
    assert new.delta_loss == pytest.approx(old.delta_loss, rel=1e-6)
    assert new.delta_ratio == pytest.approx(old.delta_ratio, rel=1e-6)
    assert new.max_rel == pytest.approx(old.max_rel, rel=1e-4)


def outputs(code: str, w: torch.Tensor, e: torch.Tensor, seed: int = 2) -> dict[str, torch.Tensor]:
    """Merged tensors to judge: correctly rounded; nudged 1 ulp in a few places and 3 ulps in a few
    others (failures); rounded from float32 (a naive merge: 1 ulp off next to midpoints)."""
    dt = DT[code]
    right = round_to(e, dt)
    g = torch.Generator().manual_seed(seed)
    steps = torch.zeros(e.shape, dtype=torch.int64)
    flat = torch.randperm(e.numel(), generator=g)
    steps.view(-1)[flat[:7]] = 1
    steps.view(-1)[flat[7:12]] = -1
    steps.view(-1)[flat[12:15]] = 3
    steps.view(-1)[flat[15:17]] = -3
    return {"right": right, "nudged": neighbour(right, steps), "float32": e.to(torch.float32).to(dt)}


PATHS = ["kernel", "torch"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("code", ["BF16", "F16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "transposed"])
@pytest.mark.parametrize("data", ["trap", "cancel", "lowrank"])
def test_same_verdicts_as_float64(path, code, transposed, data, monkeypatch):
    w, p, q, e = trap(code) if data == "trap" else trap(code, shrink=2.0 ** -9) if data == "cancel" else lowrank(code)
    tg = target(w, p, q, transposed, split=data == "lowrank")
    found = {}
    for kind, m in outputs(code, w, e).items():
        old = decide(code, tg, m, "float64", monkeypatch)
        new = decide(code, tg, m, path, monkeypatch)
        same_verdicts(new, old)
        found[kind] = old
    assert found["right"].bad_elements == 0 and found["right"].max_ulps == 0
    if data == "cancel":  # the ulp is W's (the rule's magnitude max(|E|, |W|, S)): 3 of E's are fine
        assert found["nudged"].bad_elements == 0 and 0 < found["nudged"].max_ulps < 1
    else:
        assert found["nudged"].bad_elements == 5 and found["nudged"].max_ulps >= 3     # the 3-ulp ones, counted
        assert "5 of" in found["nudged"].problems[0]
    if data != "lowrank":  # the trap has power: float32 rounding lands on the wrong neighbour, 1 ulp
        assert found["float32"].max_ulps > 0 and found["float32"].bad_elements == 0


@pytest.mark.skipif(not compare_kernel.AVAILABLE, reason="numba not installed")
def test_same_verdicts_on_any_number_of_threads(monkeypatch):
    """The kernel's rows shared among threads in ranges (engine/row_threads.py; the tensors above
    are too small to be shared): every row judged once, whatever the split, as the float64 rule."""
    w, p, q, e = trap("BF16", rows=301, cols=517, seed=3)
    tg = target(w, p, q, False)
    m = outputs("BF16", w, e, seed=4)["nudged"]
    old = decide("BF16", tg, m, "float64", monkeypatch)
    assert old.bad_elements >= 3 and old.max_ulps >= 3  # the 3-ulp nudges are found: a case with failures
    saved = torch.get_num_threads()
    try:
        for t in (1, 2, 3, 7):
            torch.set_num_threads(t)
            same_verdicts(decide("BF16", tg, m, "kernel", monkeypatch), old)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("path", PATHS)
def test_most_elements_are_decided_in_float32(path, monkeypatch):
    """Realistic data: the float64 rule runs for a small share of the elements; the trap's near-
    midpoint elements all take it."""
    seen = []
    real = compare.compare

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(compare, "compare", spy)
    w, p, q, e = lowrank("BF16", rows=256, cols=512, rank=16)
    decide("BF16", target(w, p, q, False), round_to(e, torch.bfloat16), path, monkeypatch)
    assert seen[-1].redone < 0.01 * w.numel()
    w, p, q, e = trap("BF16")
    decide("BF16", target(w, p, q, False), round_to(e, torch.bfloat16), path, monkeypatch)
    assert seen[-1].redone >= 6 / 11 * 0.8 * w.numel()   # eps = 0, 2^-40, 2^-25 and 2^-12 cannot be decided


@pytest.mark.parametrize("path", PATHS)
def test_a_bound_too_small_is_caught(path, monkeypatch):
    """The comparison with the float64 rule has power: with no error bound the float32 decision
    takes a naive float32 merge's wrong roundings for right ones."""
    w, p, q, e = trap("BF16")
    tg = target(w, p, q, False)
    m = outputs("BF16", w, e)["float32"]
    old = decide("BF16", tg, m, "float64", monkeypatch)
    monkeypatch.setattr(compare, "margins", lambda rank: (0.0, 0.0, 0.0))
    new = decide("BF16", tg, m, path, monkeypatch)
    assert old.max_ulps > 0 and new.max_ulps < old.max_ulps


@pytest.mark.parametrize("path", PATHS)
def test_float16_near_its_subnormals(path, monkeypatch):
    """Float16's grid is coarser below 2^-14: weights there, deltas across the boundary."""
    w, p, q, e = lowrank("F16", scale=1e-4)
    p = p * 0.05
    e = torch.addmm(w.double(), p, q)
    assert (w.abs() < 2.0 ** -14).float().mean() > 0.4
    tg = target(w, p, q, False)
    for m in outputs("F16", w, e).values():
        same_verdicts(decide("F16", tg, m, path, monkeypatch), decide("F16", tg, m, "float64", monkeypatch))


def test_delta_fidelity_against_float64(monkeypatch):
    """delta loss = ||M - E|| / ||E - W||, delta ratio = <M - W, E - W> / ||E - W||^2, computed here
    with float64 and no loramerge code."""
    w, p, q, e = lowrank("BF16", rows=128, cols=256, rank=16)
    m = round_to(e, torch.bfloat16)
    m = neighbour(m, (torch.rand(m.shape, generator=torch.Generator().manual_seed(3)) < 0.01).long())
    md, wd = m.double(), w.double()
    loss = float(torch.linalg.vector_norm(md - e) / torch.linalg.vector_norm(e - wd))
    ratio = float(((md - wd) * (e - wd)).sum() / ((e - wd) ** 2).sum())
    for path in PATHS:
        tc = decide("BF16", target(w, p, q, False), m, path, monkeypatch)
        assert tc.delta_loss == pytest.approx(loss, rel=1e-6) and tc.delta_ratio == pytest.approx(ratio, rel=1e-6)


def test_factors_below_float32_range_take_the_float64_path():
    w, p, q, _ = lowrank("BF16")
    assert compare.eligible("BF16", w, p, q)
    p[0, 0] = 1e-40
    assert not compare.eligible("BF16", w, p, q)
    assert not compare.eligible("F32", w, p, q)


@requires_cuda
@pytest.mark.parametrize("data", ["trap", "lowrank"])
def test_cuda_same_verdicts(data, monkeypatch):
    w, p, q, e = (trap if data == "trap" else lowrank)("BF16")
    for transposed in (False, True):
        tg = target(w, p, q, transposed)
        gpu_tg = weights._Target(tg.start, transposed, effects=[(a.cuda(), b.cuda()) for a, b in tg.effects])
        for m in outputs("BF16", w, e).values():
            old = decide("BF16", tg, m, "float64", monkeypatch)
            same_verdicts(decide("BF16", gpu_tg, m, "torch", monkeypatch, dev=torch.device("cuda")), old)


@pytest.mark.parametrize("code", ["BF16", "F16"])
@pytest.mark.parametrize("path", PATHS)
def test_a_bound_that_is_nan_decides_nothing(path, code, monkeypatch):
    """A hostile adapter: a scaled B row whose entries fit float32 but whose norm does not (the
    bound's row part is inf) against a zero A, so the sum is W but the bound is inf * 0, NaN. A NaN
    bound decides nothing: the float64 rule takes those elements and finds the NaNs planted in the
    merged tensor. The planted patterns are the ones a NaN bound's cells come out as (x86's inf *
    0 is the NaN 0xFFC00000: bfloat16's cell 0xFFC0, float16's 0xFE00; torch converts a NaN to
    bfloat16 as 0xFFFF): the cell test alone passed them. Enough rows that the torch path redoes
    only the undecided, not the whole block."""
    rows, cols = 4096, 16
    w = torch.full((rows, cols), 0.5, dtype=DT[code])
    p = torch.zeros(rows, 2, dtype=torch.float64)
    p[0] = 3e38                                      # its norm, 4.2e38, is past float32's largest
    q = torch.zeros(2, cols, dtype=torch.float64)   # E = W exactly
    m = w.clone()
    planted = {"BF16": (-64, -1), "F16": (-512,)}[code]   # 0xFFC0, 0xFFFF; 0xFE00
    for k, bits in enumerate(planted):
        m.view(torch.int16)[0, 3 + 2 * k] = bits
    tc = decide(code, target(w, p, q, False), m, path, monkeypatch)
    assert tc.bad_elements == len(planted) and tc.worst["index"] == [0, 3]
    assert decide(code, target(w, p, q, False), w, path, monkeypatch).bad_elements == 0


@pytest.mark.parametrize("path", PATHS + ["float64"])
def test_a_nan_in_the_merged_tensor_fails_it(path, monkeypatch):
    """A NaN where the merge is finite: |M - E| is NaN, which no tolerance test catches as such,
    so every path counts it infinitely off (it passed as 0 ulps in the kernel's and float64 paths,
    and the torch path failed to name the worst element). An infinity where one is due still
    passes."""
    w, p, q, e = lowrank("BF16")
    m = round_to(e, torch.bfloat16).clone()
    m.view(torch.int16)[2, 3] = 0x7FC0
    tc = decide("BF16", target(w, p, q, False), m, path, monkeypatch)
    assert (tc.bad_elements, tc.max_ulps, tc.worst["index"]) == (1, math.inf, [2, 3]) and tc.problems
    assert math.isnan(tc.worst["merged"]) and tc.max_rel == math.inf
    # an expected infinity (E beyond the largest bfloat16), merged as one: right
    big = w.clone()
    big[0, 0] = 3.3e38
    q2 = q.clone()
    q2[:, 0] = 0
    p2 = p.clone()
    e2 = torch.addmm(big.double(), p2, q2)
    e2[0, 0] = 3.3e38 * 1.04       # past the largest finite value: rounds to inf
    q2[0, 0] = (e2[0, 0] - 3.3e38) / p2[0, 0]
    e2 = torch.addmm(big.double(), p2, q2)
    m2 = round_to(e2, torch.bfloat16)
    assert math.isinf(float(m2[0, 0]))
    assert decide("BF16", target(big, p2, q2, False), m2, path, monkeypatch).bad_elements == 0
    # a base with a NaN and an infinity, merged into the same (the merge's value is NaN, inf): right,
    # and no statistic turns NaN for it
    w3 = w.clone()
    w3[2, 3], w3[4, 5] = math.nan, math.inf
    m3 = round_to(torch.addmm(w3.double(), p, q), torch.bfloat16)
    tc3 = decide("BF16", target(w3, p, q, False), m3, path, monkeypatch)
    assert tc3.bad_elements == 0 and not tc3.problems and not math.isnan(tc3.max_rel)


def test_a_nan_in_a_float32_merge_fails_it(monkeypatch):
    """The float rule (float32 outputs) likewise: a NaN is off by more than any tolerance."""
    w, p, q, e = lowrank("BF16")
    w32 = w.float()
    m = e.float().clone()
    m[1, 2] = math.nan
    tc = decide("F32", target(w32, p, q, False), m, "float64", monkeypatch)
    assert tc.bad_elements == 1 and tc.worst["index"] == [1, 2] and tc.problems
