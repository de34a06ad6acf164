"""Exact rounding of W + sum_k f_k b_k a_k, for the few elements no float evaluation can decide.

Every input is a binary float, so the sum is a dyadic rational n * 2^e: it is formed here with
Python integers, then rounded once (to nearest, ties to even) to the output grid. Pure: tensors
of the selected elements in, their rounded values out. Used only where rounding.decide leaves an
element undecided after float64 evaluation (an exact hit on a midpoint, or adversarial inputs);
about 20 us per element and rank-16 term list.
"""

from __future__ import annotations

import math

import torch

# Output format: (significand bits p, smallest normal exponent, largest finite value).
_FORMATS = {
    torch.bfloat16: (8, -126, 3.3895313892515355e38),
    torch.float16: (11, -14, 65504.0),
    torch.float32: (24, -126, 3.4028234663852886e38),
}


def round_elements(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, f: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """The correctly rounded w[n] + sum_k f[k] * b[n, k] * a[n, k] for each n, in `dtype`.
    w, b, a: any float dtypes (their stored values are used exactly); f: float64 [R]. A non-finite
    input gives the float64 evaluation (NaN/Inf, which the caller refuses)."""
    fv = f.double().cpu().tolist()
    wv = w.double().cpu().tolist()
    bv = b.double().cpu().tolist()
    av = a.double().cpu().tolist()
    out = [_one(wv[n], fv, bv[n], av[n], dtype) for n in range(len(wv))]
    return torch.tensor(out, dtype=torch.float64).to(dtype).to(w.device)  # values on the grid: exact


def _one(w: float, f: list[float], b: list[float], a: list[float], dtype: torch.dtype) -> float:
    terms = [w, *(fk * bk * ak for fk, bk, ak in zip(f, b, a))]
    if not all(math.isfinite(t) for t in (w, *f, *b, *a)):
        return sum(terms)
    num, exp = _parts(w)
    parts = [(num, exp)] if num else []
    for fk, bk, ak in zip(f, b, a):
        (n1, e1), (n2, e2), (n3, e3) = _parts(fk), _parts(bk), _parts(ak)
        if n1 and n2 and n3:
            parts.append((n1 * n2 * n3, e1 + e2 + e3))
    if not parts:
        # an exact zero: -0 only if every addend is -0 (IEEE 754 sum rule, round to nearest)
        return -0.0 if all(math.copysign(1.0, t) < 0 for t in terms) else 0.0
    e0 = min(e for _, e in parts)
    total = sum(n << (e - e0) for n, e in parts)
    return _round(total, e0, dtype)


def _parts(x: float) -> tuple[int, int]:
    """x = n * 2^e exactly, n an integer of at most 53 bits."""
    m, e = math.frexp(x)
    return int(m * 9007199254740992.0), e - 53  # m * 2^53 is an integer


def _round(n: int, e0: int, dtype: torch.dtype) -> float:
    """n * 2^e0 rounded to nearest, ties to even, on `dtype`'s grid (subnormals and overflow to Inf
    included), as a float64 holding that grid value."""
    p, emin, fmax = _FORMATS[dtype]
    if n == 0:
        return 0.0
    sign = -1.0 if n < 0 else 1.0
    m = abs(n)
    e = m.bit_length() - 1 + e0                 # floor(log2 |value|)
    if e > 1000:  # far past every format's range (and past what ldexp can hold)
        return sign * math.inf
    q = max(e, emin) - (p - 1)                  # exponent of the grid step at this value
    shift = q - e0
    if shift > 0:
        kept = m >> shift
        rem = m - (kept << shift)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and kept & 1):
            kept += 1
    else:
        kept = m << -shift
    value = math.ldexp(kept, q)                 # kept <= 2^p: exact
    return sign * (math.inf if value > fmax else value)
