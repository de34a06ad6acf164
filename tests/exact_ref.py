"""An independent exact reference for the merge: W + sum_k f_k b_ik a_kj with fractions.Fraction,
rounded to the output grid by comparing with the neighbouring grid values (a different algorithm
from loramerge's integer rounding in engine/exact.py and from its round-to-odd)."""

from __future__ import annotations

from fractions import Fraction

import torch

_ITYPE = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_MAX = {torch.bfloat16: 0x7F7F, torch.float16: 0x7BFF, torch.float32: 0x7F7FFFFF}
_ULP_TOP = {torch.bfloat16: Fraction(2) ** 120, torch.float16: Fraction(32), torch.float32: Fraction(2) ** 104}


def _value(bits: int, dtype) -> Fraction:
    return Fraction(torch.tensor(bits, dtype=torch.int64).to(_ITYPE[dtype]).view(dtype).double().item())


def round_fraction(s: Fraction, dtype, zero_negative: bool = False) -> int:
    """The bit pattern of s rounded to nearest, ties to even, on dtype's grid; Inf past
    max + ulp/2 (where ties go up: max's mantissa is odd). zero_negative: the sign of an exact
    zero (IEEE: -0 only when every addend was -0)."""
    sign = 0x8000 if dtype != torch.float32 else 0x80000000
    neg = s < 0 or (s == 0 and zero_negative)
    m = abs(s)
    top = _value(_MAX[dtype], dtype)
    if m >= top + _ULP_TOP[dtype] / 2:
        return (0x7F80 if dtype == torch.bfloat16 else 0x7C00 if dtype == torch.float16 else 0x7F800000) | (sign if neg else 0)
    # a first guess from float64 (any neighbour will do), then walk to the nearest grid value
    guess = torch.tensor(float(m), dtype=torch.float64).to(torch.float32).to(dtype)
    h = min(int(guess.view(_ITYPE[dtype]).item()) & (sign - 1), _MAX[dtype])
    while h > 0 and _value(h, dtype) > m:
        h -= 1
    while h < _MAX[dtype] and _value(h + 1, dtype) <= m:
        h += 1
    lo = _value(h, dtype)
    if lo != m and h < _MAX[dtype]:
        hi = _value(h + 1, dtype)
        if m - lo > hi - m or (m - lo == hi - m and h & 1):
            h += 1
    return h | (sign if neg else 0)


def exact_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, dtype) -> torch.Tensor:
    """Correctly rounded W + (B f) @ A, element by element, as a tensor of dtype."""
    rows, cols = w.shape
    wv, av, bv, fv = w.double().tolist(), a.double().tolist(), b.double().tolist(), f.double().tolist()
    af = [[Fraction(x) for x in row] for row in av]
    bf = [[Fraction(x) * Fraction(fk) for x, fk in zip(row, fv)] for row in bv]
    out = []
    for i in range(rows):
        for j in range(cols):
            s = Fraction(wv[i][j]) + sum(bf[i][k] * af[k][j] for k in range(len(fv)))
            terms = [wv[i][j]] + [fv[k] * bv[i][k] * av[k][j] for k in range(len(fv))]
            neg_zero = all(str(t).startswith("-") and t == 0 for t in terms)
            out.append(round_fraction(s, dtype, neg_zero))
    bits = torch.tensor(out, dtype=torch.int64).to(_ITYPE[dtype])
    return bits.view(dtype).reshape(rows, cols)
