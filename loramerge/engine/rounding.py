"""Rounding to the output grid, and the rule that decides when an approximation rounds right.

Pure tensor functions, no merge logic: round_to (correct rounding from float64), cast, and
decide(approx, bound, dtype), the one decision rule every merge path uses:

    the true value x is unknown, but |x - approx| <= bound. round(x) == round(approx) is proven
    when the interval [approx - bound, approx + bound] holds no rounding boundary of the output
    grid: no midpoint between two neighbours, no overflow threshold (max + ulp/2), and not zero
    (rounding to +0 or -0 differs in its bits, so the sign of x must be known).

Elements the rule cannot decide are handed to a more precise stage (float64, then exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grids import BOUND_SLACK, LAYOUTS, OVERFLOW  # noqa: F401  (BOUND_SLACK re-exported)


@dataclass(frozen=True)
class Grid:
    """An output format's bit layout (grids.LAYOUTS), with torch's integer type of its width."""
    itype: torch.dtype    # integer type of the same width, for bit views
    mbits: int            # stored mantissa bits
    mag_mask: int         # all bits but the sign
    inf_bits: int         # the +Inf pattern (exponent all ones, mantissa 0)
    top_ulp: float        # spacing just below the largest finite value: max + top_ulp/2 overflows


def _grid(dtype: torch.dtype, itype: torch.dtype) -> Grid:
    g = LAYOUTS[str(dtype).removeprefix("torch.")]
    return Grid(itype, g.mbits, g.mag_mask, g.inf_bits, g.top_ulp)


GRIDS = {torch.bfloat16: _grid(torch.bfloat16, torch.int16), torch.float16: _grid(torch.float16, torch.int16),
         torch.float32: _grid(torch.float32, torch.int32)}
# What decide() may round to from which approximation: the approximation's format must hold the
# output grid's midpoints exactly (bf16/fp16 from float32 or float64; float32 from float64 only).
_APPROX = {torch.bfloat16: (torch.float32, torch.float64), torch.float16: (torch.float32, torch.float64),
           torch.float32: (torch.float64,)}


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correctly round a float64 (or float32) tensor to `dtype` (round to nearest, ties to even)."""
    if x.dtype == dtype:
        return x
    if dtype in (torch.float64, torch.float32) or x.dtype == torch.float32:
        return x.to(dtype)  # one rounding
    return round_to_odd_f32(x).to(dtype)


def round_to_odd_f32(x64: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding to odd: truncate, then set the last bit if anything was lost.
    Rounding that result to any format with at least 2 fewer mantissa bits is then correct
    (Boldo & Melquiond, 'When double rounding is odd', 2005); torch's own float64 -> bfloat16
    goes through float32 with round-to-nearest twice."""
    f = x64.to(torch.float32)
    back = f.to(torch.float64)
    inexact = back != x64
    away = back.abs() > x64.abs()
    f = torch.where(inexact & away, torch.nextafter(f, torch.zeros_like(f)), f)
    bits = f.view(torch.int32) | inexact.to(torch.int32)
    return bits.view(torch.float32)


def cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a base tensor with one correct rounding (torch converts half<->half via float32, which
    is exact, then rounds once; from float64 to half we must avoid its double rounding)."""
    if w.dtype == torch.float64 and dtype in (torch.bfloat16, torch.float16):
        return round_to(w, dtype)
    return w.to(dtype)


def decide(approx: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype,
           rel: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, undecided): y = approx correctly rounded to `dtype`; undecided marks the elements where
    some value within `bound + rel * |approx|` of approx could round to something else (see the
    module docstring). approx is float32 or float64 (it must hold the grid's midpoints: float32
    only for bf16/fp16 outputs); bound >= 0, broadcastable to approx. Non-finite approx or bound:
    undecided. A bound of exactly 0 (rel included) means approx IS the value: its rounding is right
    even on a midpoint or at zero.

    A quick test (_quick: integer operations on approx's bits) decides almost every element; the
    exact distances (_exact_rule) are computed for the rest only."""
    if approx.dtype not in _APPROX[dtype]:
        raise ValueError(f"decide: a {approx.dtype} approximation cannot resolve {dtype} midpoints")
    y = round_to(approx, dtype)
    e = torch.add(bound, approx.abs(), alpha=rel) if rel else bound.expand_as(approx)
    ok = _quick(approx, e, dtype)
    exact = bound.expand_as(approx) == 0  # approx is the value (not e == 0: rel |approx| may underflow)
    if rel:
        exact = exact.logical_and(approx == 0)
    if bool(exact.any()):  # decided, if finite
        ok.logical_or_(exact.logical_and(torch.isfinite(approx)))
    und = ok.logical_not_()
    if bool(und.any()):
        idx = und.nonzero(as_tuple=True)
        und[idx] = _exact_rule(approx[idx], y[idx], e[idx] * BOUND_SLACK, dtype)
    return y, und


# Output dtype -> (smallest normal, first power of two past the largest finite value): the range
# where the grid's step at x is x's binade's, which the quick test relies on.
QUICK_RANGE = {d: LAYOUTS[str(d).removeprefix("torch.")].quick for d in GRIDS}


def _quick(approx: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elements proven decided, by a lower bound of the distance to the nearest rounding boundary:
    from the bits the output format drops, in ulps of approx's own format, the distance to the
    midpoint between approx's two neighbours on the grid, or to the one below the lower neighbour
    (at least a quarter step: the step halves below a power of two); times |approx| 2^-(m+1), at
    most one ulp (m mantissa bits), and divided by BOUND_SLACK (e comes without it). Only where
    approx is normal in the output format and below the binade past its largest value (so
    finite); elsewhere the exact rule decides."""
    it, mb = (torch.int32, 23) if approx.dtype == torch.float32 else (torch.int64, 52)
    drop = mb - GRIDS[dtype].mbits
    half = 1 << (drop - 1)
    low = approx.view(it) & ((1 << drop) - 1)
    dist = torch.minimum(low.sub(half).abs_(), low.add_(half >> 1))
    del low
    mag = approx.abs()
    ok = dist.to(approx.dtype).mul_(2.0 ** -(mb + 1) / BOUND_SLACK).mul_(mag) > e  # in this order: no overflow
    del dist
    lo, hi = QUICK_RANGE[dtype]
    return ok.logical_and_(mag >= lo).logical_and_(mag < hi)


def _exact_rule(approx: torch.Tensor, y: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """decide's rule with exact distances (e: the bound with its slack): undecided elements.

    The distances are exact where they matter: |approx| - |y| is within half a grid step, so the
    subtraction is exact (Sterbenz), and grid steps and their halves are powers of two; what is
    left, a last add, is covered by BOUND_SLACK."""
    g = GRIDS[dtype]
    fd = approx.dtype
    h = y.view(g.itype) & g.mag_mask              # |y| as a bit pattern
    ya = h.view(dtype).to(fd)
    off = approx.abs().sub_(ya)                   # |approx| - |y|: exact (Sterbenz)
    top = h == g.inf_bits - 1                     # the largest finite value: its upper neighbour is Inf
    gap = (h + 1).masked_fill_(top, 0).view(dtype).to(fd).sub_(ya).masked_fill_(top, g.top_ulp)
    d_hi = gap.mul_(0.5).sub_(off)                # distance to the midpoint above (or the overflow threshold)
    down = (h - 1).clamp_min_(0).view(dtype).to(fd)
    # ... to the midpoint below, or to zero where |y| = 0 (whose sign matters): then down = ya = 0
    # and this is off = |approx|
    d_lo = ya.sub_(down).mul_(0.5).add_(off)
    inf = h == g.inf_bits
    if bool(inf.any()):  # approx at or past the overflow threshold: decided only if clearly past it
        d_lo = torch.where(inf, _overflow_distance(approx, dtype), d_lo)
        d_hi = d_hi.masked_fill_(inf, torch.inf)
    # (e == 0 where the bound is: decide has taken those where the bound is exactly zero)
    ok = (d_hi > e).logical_and_(d_lo > e).logical_and_(torch.isfinite(approx))
    return ok.logical_not_()                      # NaN anywhere: undecided


def _overflow_distance(approx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|approx| - the overflow threshold (exact in approx's precision near it)."""
    return approx.abs() - torch.tensor(overflow_threshold(dtype), dtype=approx.dtype, device=approx.device)


def overflow_threshold(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to Inf (grids.OVERFLOW)."""
    return OVERFLOW[str(dtype).removeprefix("torch.")]
