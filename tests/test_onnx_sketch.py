"""The content digest ONNX matching uses (onnx/sketch.py): equal exactly for equal bits (or equal
canonical values), any view digested like its contiguous copy, a single changed element always
seen; checked against blake2b of the bytes and against torch's own canonicalization."""

from __future__ import annotations

import pytest
import torch

from loramerge.onnx import sketch

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
numba_only = pytest.mark.skipif(sketch._numba_kernel() is None, reason="numba not installed")


def _rand(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@numba_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_views_digest_like_their_contiguous_copies(dtype):
    w = _rand((300, 260), dtype)
    assert w.numel() >= sketch.SMALL
    d = sketch.digest(w)
    assert sketch.digest(w.clone()) == d
    t = w.T.contiguous()  # a graph storing W.T ...
    assert sketch.digest(t.T) == d  # ... seen through a transposed view: no copy, same digest
    assert sketch.digest(w.T) == sketch.digest(t)
    assert sketch.digest(w.T) != d  # W and W.T are different contents
    big = _rand((300, 600), dtype, seed=1)
    block = big.narrow(1, 100, 260)  # a strided block of a packed tensor
    assert sketch.digest(block) == sketch.digest(block.contiguous())


@numba_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_changed_element_changes_the_digest(dtype):
    w = _rand((257, 256), dtype)
    d = sketch.digest(w)
    flat = w.view(-1)
    for idx in (0, 1, 255, 256, 40000, flat.numel() - 1):
        for bit in (0, w.element_size() * 8 - 2):  # the lowest bit and a high exponent bit
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
            v = w.clone()
            v.view(-1).view(ints)[idx] ^= 1 << bit
            assert sketch.digest(v) != d, (idx, bit)


@numba_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_canonical_classes_match_torchs_canonicalization(dtype):
    fi = torch.finfo(dtype)
    w = _rand((260, 256), dtype, seed=2)
    specials = torch.tensor([0.0, -0.0, fi.tiny / 4, -fi.tiny / 2, fi.tiny, fi.max, -fi.max, float("inf"),
                             float("-inf"), float("nan")], dtype=torch.float64).to(dtype)
    flat = w.view(-1)
    flat[: len(specials)] = specials
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    flat.view(ints)[20] = flat[len(specials) - 1:len(specials)].view(ints)[0] | 1  # a NaN with another payload
    ref = sketch.canonical_values(w)
    assert sketch.digest(w, canonical=True) == sketch.digest(ref)  # the kernel's classes are torch's
    assert sketch.digest(w) != sketch.digest(ref)  # raw digests still see the difference
    v = w.clone()
    v.view(-1)[3] = 0.0  # a subnormal flushed to zero: same canonical content
    assert sketch.digest(v, canonical=True) == sketch.digest(w, canonical=True)
    v.view(-1)[30] += 1  # a real change stays a change
    assert sketch.digest(v, canonical=True) != sketch.digest(w, canonical=True)


def test_small_tensors_and_the_fallback_are_blake2b(monkeypatch):
    import hashlib
    small = _rand((10, 10), torch.float16)
    assert sketch.digest(small) == hashlib.blake2b(small.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
    monkeypatch.setattr(sketch, "_kernel", False)  # as without numba
    w = _rand((300, 260), torch.float16)
    assert sketch.digest(w.T) == sketch.digest(w.T.contiguous()) != sketch.digest(w)


def _differences_reference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(canonical, raw) differences by torch, on contiguous copies."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]

    def bits(x):
        return x.contiguous().view(ints)

    raw = int((bits(a) != bits(b)).sum())
    return int((bits(sketch.canonical_values(a)) != bits(sketch.canonical_values(b))).sum()), raw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 260), (20, 3, 1100), (40, 30)])  # kernel; conv-shaped; torch path
def test_compare_counts_every_difference_exactly(dtype, shape):
    """compare() confirms content matches: it must see one changed element anywhere, in either
    layout, and forgive exactly the canonical classes (subnormal/zero, overflow/inf, NaNs)."""
    fi = torch.finfo(dtype)
    w = _rand(shape, dtype)
    flat = w.view(-1)
    v = w.clone()
    vf = v.view(-1)
    n = flat.numel()
    vf[n - 1] = -flat[n - 1]                     # a real difference, in the last element
    vf.view(torch.uint8)[(n // 3) * w.element_size()] ^= 1   # one ulp, in the middle
    flat[7], vf[7] = fi.tiny / 4, 0.0            # subnormal vs zero: the same class
    flat[11], vf[11] = -0.0, 0.0
    flat[13], vf[13] = fi.max, float("inf")      # largest finite vs infinity: the same class
    flat[17], vf[17] = float("nan"), -float("nan")
    flat[19], vf[19] = fi.max, -fi.max           # opposite overflows: different
    canon, raw = sketch.compare(w, v)
    assert (canon, raw) == _differences_reference(w, v)
    assert canon == 3 and raw >= 6  # (-nan may keep nan's bits)
    assert sketch.compare(w, w.clone()) == (0, 0)
    if len(shape) == 2:  # the graph stores W.T; v.T is read in place
        wt = w.T.contiguous()
        assert sketch.compare(wt, v.T) == _differences_reference(wt, v.T) == sketch.compare(w, v)
        assert sketch.compare(wt, w.T) == (0, 0)
        assert sketch.compare(wt, v.T.contiguous()) == sketch.compare(w, v)
    with pytest.raises(ValueError):
        sketch.compare(w, v.to(torch.float32 if dtype != torch.float32 else torch.float64))


@numba_only
def test_compare_sees_one_changed_element_in_every_tile():
    """A transposed comparison walks tiles: a difference in any of them (edges included) counts."""
    w = _rand((130, 1000), torch.float16)
    wt = w.T.contiguous()
    for i, j in [(0, 0), (129, 999), (64, 63), (63, 64), (100, 500), (129, 0)]:
        v = w.clone()
        v.view(torch.int16)[i, j] ^= 1
        assert sketch.compare(wt, v.T) == (1, 1), (i, j)
        assert sketch.compare(w, v) == (1, 1), (i, j)


@numba_only
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_same_answers_on_any_number_of_threads(threads):
    """The kernels' rows (and row blocks) are shared among threads (engine/row_threads.py): every
    row counted once whatever the split, so digests and counts equal the one-thread answers and
    the reference."""
    w = _rand((600, 2048), torch.float16)
    v = w.clone()
    vf = v.view(-1)
    for idx in range(0, vf.numel(), 4099):  # a difference in every few rows, blocks' edges included
        vf.view(torch.int16)[idx] ^= 1
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (sketch.digest(w), sketch.digest(w.T.contiguous().T), sketch.compare(w, v),
               sketch.compare(w.T.contiguous(), v.T))
        torch.set_num_threads(threads)
        many = (sketch.digest(w), sketch.digest(w.T.contiguous().T), sketch.compare(w, v),
                sketch.compare(w.T.contiguous(), v.T))
    finally:
        torch.set_num_threads(old)
    assert many == one
    assert one[0] == one[1] and one[2] == one[3] == _differences_reference(w, v)
