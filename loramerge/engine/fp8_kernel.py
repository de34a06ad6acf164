"""Fused CPU kernel for FP8 block-scaled weights: dequantize, add the LoRA delta, and either
requantize with fresh block scales or round to a plain float dtype, one 128x128 block at a time
(in cache) instead of a dozen torch passes over float64 temporaries.

The arithmetic is the one codecs/fp8.py and ops.round_to define (the torch path, used on GPUs and
as the reference in tests):
    y     = q * s + sum_k (f_k B[i, k]) * A[k, j]     float64 (q * s is exact: 4 + 24 bits)
    scale = float32(max |y| over the block / 448), 1.0 where that is 0
    q'    = the e4m3 value nearest to clamp(y / scale, +-448), ties to even
or, for a plain output, y correctly rounded to bfloat16/float16/float32.
Rounding a float64 x to a grid of p mantissa bits is exact and branch-free: with u the grid's
spacing at |x| (a power of two; fixed below the format's smallest normal) and K = 2^52 u,
(|x| + K) - K is |x| rounded to a multiple of u with ties to even, by the FPU's own rounding
(|x| < K, and numbers in [K, 2K) are spaced u apart; K's low mantissa bits are zero, so the sum's
parity is the rounded multiple's). The code is then read off the rounded value's bits. That is the
correctly rounded float64 value, as ops.round_to's round-to-odd path gives: the same bytes. One
choice where float64 arithmetic has none: an element whose delta is exactly zero keeps its value's
bits, so -0.0 stays -0.0 (BLAS gives either sign there, depending on the column).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import jit_time
from .row_threads import on_threads

try:
    import numba
except ImportError:  # pragma: no cover - numba is a core dependency; the torch path does the same math
    numba = None
else:
    jit_time.install()  # the first run after an install compiles this kernel too: apply reports it

AVAILABLE = numba is not None and not os.environ.get("LORAMERGE_NO_KERNEL")

# output dtype -> (explicit mantissa bits, smallest normal exponent, largest finite exponent,
# clamp |value| to this first (e4m3 saturates; 0 = no clamp: beyond range is non-finite))
_FORMATS = {torch.float8_e4m3fn: (3, -6, 8, 448.0), torch.bfloat16: (7, -126, 127, 0.0),
            torch.float16: (10, -14, 15, 0.0)}
# |value| from which rounding to nearest gives infinity: the largest finite value plus half its
# spacing (the tie rounds up too: the largest finite value's last mantissa bit is odd)
_LIMIT = {torch.bfloat16: (2 - 2.0 ** -8) * 2.0 ** 127, torch.float16: 65520.0,
          torch.float32: (2 - 2.0 ** -24) * 2.0 ** 127, torch.float8_e4m3fn: float("inf")}


def supports(q: torch.Tensor, out_dtype: torch.dtype, device: torch.device) -> bool:
    return (AVAILABLE and device.type == "cpu" and q.dim() == 2 and q.numel() > 0
            and (out_dtype in _FORMATS or out_dtype == torch.float32))


def merge(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], left: torch.Tensor | None,
          right: torch.Tensor | None, factors: torch.Tensor | None, out: torch.Tensor,
          scale_out: torch.Tensor | None) -> tuple[int, int, float]:
    """q [R, C] float8_e4m3fn with its scales [ceil(R/bm), ceil(C/bn)] float32; the LoRA factors
    left [R, r], right [r, C] and the per-rank factors [r] float64 (None: no delta). Writes `out`
    [R, C] (float8_e4m3fn with the fresh scales in `scale_out`, or bf16/fp16/f32). Returns the
    non-finite results as (count, first flat index, its value); (0, -1, 0.0) when there are none."""
    rows, cols = q.shape
    if left is None:
        bs, a = np.zeros((rows, 0)), np.zeros((0, cols))
    else:  # the factors folded into B in float64, as ops.merge_weight's float64 path does
        bs = (left.to(torch.float64) * factors.to(torch.float64)).contiguous().numpy()
        a = right.to(torch.float64).contiguous().numpy()
    if out.dtype == torch.float32:
        p, emin, emax, clamp, codes = 0, 0, 0, 0.0, np.zeros((0, 0), dtype=np.int64)
        f32 = out.numpy()
    else:
        p, emin, emax, clamp = _FORMATS[out.dtype]
        codes = out.view(torch.uint8 if out.dtype == torch.float8_e4m3fn else torch.int16).numpy()
        f32 = np.zeros((0, 0), dtype=np.float32)
    so = scale_out.numpy() if scale_out is not None else np.zeros((0, 0), dtype=np.float32)
    nbr = -(-rows // block[0])
    bad, first, value = np.zeros(nbr, np.int64), np.full(nbr, -1, np.int64), np.zeros(nbr)
    args = (q.contiguous().view(torch.uint8).numpy(), _fp8_values(), scale.to(torch.float32).contiguous().numpy(),
            bs, a, block[0], block[1], p, emin, emax, clamp, _LIMIT[out.dtype], scale_out is not None, codes, f32, so,
            bad, first, value)
    on_threads(_blocks, args, 0, nbr, block[0] * cols)  # bands of bm rows
    if not bad.any():
        return 0, -1, 0.0
    i = int(np.where(first >= 0, first, rows * cols).argmin())
    return int(bad.sum()), int(first[i]), float(value[i])


_VALUES: list[np.ndarray] = []


def _fp8_values() -> np.ndarray:
    """float64 value of every e4m3 byte (0x7F and 0xFF are NaN): dequantizing is a lookup."""
    if not _VALUES:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _VALUES.append(codes.view(torch.float8_e4m3fn).to(torch.float64).numpy())
    return _VALUES[0]


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True, error_model="numpy")  # no per-division zero checks
    _ABS = 0x7FFFFFFFFFFFFFFF

    @_jit
    def _first_bad(y, nr, w, r0, c0, cols, limit):
        """(flat index, value) of the first element, in row-major order, that is not finite or
        whose magnitude rounds beyond the format (|y| >= limit): the value is then +-inf."""
        for i in range(nr):
            for c in range(w):
                x = y[i * w + c]
                if not abs(x) < limit:
                    return (r0 + i) * cols + c0 + c, (x if not np.isfinite(x) else np.copysign(np.inf, x))
        return -1, 0.0

    @_jit
    def _to_codes(y, yi, k, ki, sg, n, p, emin, emax, clamp):
        """Round y[:n] (float64 values; yi their bits) to the grid of p mantissa bits, in place: yi
        then holds the codes, sign included. k/ki and sg are scratch. Values are finite and within
        the format's range (the caller checked). Every loop is branch-free, so it vectorizes, and
        reads and writes a buffer through one view only (mixing the float and integer views of one
        buffer in one loop is an order of magnitude slower)."""
        sign = np.int64(0x80) if p == 3 else np.int64(0x8000)
        mant = (np.int64(1) << p) - 1
        sub = 2.0 ** (p - emin)  # a subnormal's code is |x| / 2^(emin - p)
        top = clamp if clamp > 0.0 else np.inf
        for t in range(n):
            sg[t] = (yi[t] >> 63) & sign
        for t in range(n):
            y[t] = min(abs(y[t]), top)
        for t in range(n):  # K = 2^52 * the grid's spacing at |x|
            ki[t] = (min(max((yi[t] >> 52) - 1023, emin), emax) - p + 52 + 1023) << 52
        for t in range(n):
            y[t] = (y[t] + k[t]) - k[t]
        for t in range(n):
            ki[t] = np.int64(y[t] * sub)
        for t in range(n):
            x = yi[t]
            e = (x >> 52) - 1023
            normal = ((e - emin + 1) << p) | ((x >> (52 - p)) & mant)
            yi[t] = (ki[t] if e < emin else normal) | sg[t]

    @_jit
    def _divide(y, n, d):
        for t in range(n):
            y[t] = y[t] / d

    @_jit
    def _count_at_least(y, n, limit):
        over = 0
        for t in range(n):
            over += abs(y[t]) >= limit
        return over

    @_jit
    def _amax_bits(yi, n):
        """(the bits of max |y|, how many are not finite): in integers the bits of |y| order like
        |y|, NaN above inf, and an integer max vectorizes where a float one may not."""
        top, nonfinite = np.int64(0), 0
        for t in range(n):
            m = yi[t] & _ABS
            top = max(top, m)
            nonfinite += m >= 0x7FF0000000000000
        return top, nonfinite

    @_jit  # nogil: the other bands' threads (row_threads) and the pipeline's run meanwhile
    def _blocks(q8, values, s32, bs, a, bm, bn, p, emin, emax, clamp, limit, requantize, codes, f32, scale_out,
                bad, first, value, b0, b1):
        """Bands b0..b1 of bm rows (one thread's share), a bm x bn block at a time."""
        rows, cols = q8.shape
        rank = a.shape[0]
        nbc = (cols + bn - 1) // bn
        y = np.empty(bm * bn, dtype=np.float64)
        yi = y.view(np.int64)
        k = np.empty(bm * bn, dtype=np.float64)
        ki = k.view(np.int64)
        sg = np.empty(bm * bn, dtype=np.int64)
        acc = np.empty(bn, dtype=np.float64)
        for bi in range(b0, b1):
            r0 = bi * bm
            r1 = min(rows, r0 + bm)
            nr = r1 - r0
            for bj in range(nbc):
                c0 = bj * bn
                w = min(cols, c0 + bn) - c0
                n = nr * w
                s = np.float64(s32[bi, bj])
                for i in range(nr):  # 1-D row slices: 2-D indexing in these loops is ~7x slower
                    r = r0 + i
                    for c in range(w):
                        acc[c] = 0.0
                    j = 0
                    while j + 4 <= rank:  # four ranks per pass over acc: the same sums, in the same order
                        b0, b1, b2, b3 = bs[r, j], bs[r, j + 1], bs[r, j + 2], bs[r, j + 3]
                        a0, a1, a2, a3 = a[j, c0:c0 + w], a[j + 1, c0:c0 + w], a[j + 2, c0:c0 + w], a[j + 3, c0:c0 + w]
                        for c in range(w):
                            acc[c] = (((acc[c] + b0 * a0[c]) + b1 * a1[c]) + b2 * a2[c]) + b3 * a3[c]
                        j += 4
                    while j < rank:
                        b, aj = bs[r, j], a[j, c0:c0 + w]
                        for c in range(w):
                            acc[c] += b * aj[c]
                        j += 1
                    qr = q8[r, c0:c0 + w]
                    yr = y[i * w:(i + 1) * w]
                    for c in range(w):
                        v = values[qr[c]] * s
                        # a zero delta leaves the value's bits alone (-0.0 stays -0.0)
                        yr[c] = v + acc[c] if acc[c] != 0.0 else v
                # non-finite values: counted and the first one found here, raised by the caller
                top, nonfinite = _amax_bits(yi, n)
                if nonfinite:
                    idx, val = _first_bad(y, nr, w, r0, c0, cols, np.inf)
                    if first[bi] < 0 or idx < first[bi]:
                        first[bi], value[bi] = idx, val
                    bad[bi] += nonfinite
                    continue
                if requantize:
                    ki[0] = top
                    sc = np.float32(k[0] / 448.0)
                    if not sc > 0:
                        sc = np.float32(1.0)
                    scale_out[bi, bj] = sc
                    _divide(y, n, np.float64(sc))
                over = _count_at_least(y, n, limit)  # values that round beyond the format's largest
                if over:
                    idx, val = _first_bad(y, nr, w, r0, c0, cols, limit)
                    if first[bi] < 0 or idx < first[bi]:
                        first[bi], value[bi] = idx, val
                    bad[bi] += over
                    continue
                if p == 0:  # float32 output: the conversion rounds to nearest even
                    for i in range(nr):
                        fr, yr = f32[r0 + i, c0:c0 + w], y[i * w:(i + 1) * w]
                        for c in range(w):
                            fr[c] = np.float32(yr[c])
                else:
                    _to_codes(y, yi, k, ki, sg, n, p, emin, emax, clamp)
                    for i in range(nr):
                        cr, yr = codes[r0 + i, c0:c0 + w], yi[i * w:(i + 1) * w]
                        for c in range(w):
                            cr[c] = yr[c]
