"""What the fused kernel (kernels.py) needs of A, B and the factors before its passes over W: B' =
B f and A in float64 and float32, and the per-row and per-column parts of both passes' bounds
(kernels' module docstring), with the upper norms they rest on.

All of it is rows x rank plus rank x cols elements, small beside W, but numpy spent ~9 ms of
serial time per 8B MLP tensor on it in a dozen passes (on 16 cores a quarter of the merge); here
it is two numba functions, one pass over B and one over A.
"""

from __future__ import annotations

import math

import numpy as np

from .rounding_kernel import numba

_ABS = np.int64(0x7FFFFFFFFFFFFFFF)


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def terms(a, b, f, with32, coef, raise_, coef32, tiny, two_sqrt_r, r4, tiny64, two_r, three):
        """(row_terms(b, f, ...), col_terms(a, ...)) in one call: one compiled entry point, so
        that a cold process loads one function from numba's cache, not two."""
        return (row_terms(b, f, with32, coef, raise_, coef32, tiny),
                col_terms(a, with32, raise_, two_sqrt_r, r4, tiny64, tiny, two_r, three))

    @numba.njit(cache=True, nogil=True)
    def row_terms(b, f, with32, coef, raise_, coef32, tiny):
        """Per row i of B' = B f (each element one float64 product, as numpy's b * f): (B', B' in
        float32, row_w = live coef, row_n = live coef ||B'_i|| (the float64 bound's parts), then
        in float32 rounded up: rn32 = coef32 ||B'_i|| live, ru32 = tiny sum_k |B'_ik| live, live).
        live = 1.0 if some k has B_ik != 0 and f_k != 0, else 0.0 (every term is exactly zero: the
        float sum is W itself, its bound zero). The float32 arrays are empty unless with32. Each
        expression is evaluated in the order of the numpy it replaced. One thread, one pass over
        B: ~0.4 ms for 14336 x 16 (a parallel region costs more on a busy machine)."""
        rows, rank = b.shape
        n32 = rows if with32 else 0
        bs = np.empty((rows, rank), np.float64)
        bs32 = np.empty((n32, rank), np.float32)
        row_w, row_n = np.empty(rows), np.empty(rows)
        rn32, ru32, live32 = np.empty(n32, np.float32), np.empty(n32, np.float32), np.empty(n32, np.float32)
        bits = bs.view(np.int64)
        for i in range(rows):
            live = False
            s = 0.0
            q = 0.0
            for k in range(rank):
                x = np.float64(b[i, k]) * f[k]
                bs[i, k] = x
                live |= (b[i, k] != 0) & (f[k] != 0)
                s += abs(x)
                q += x * x
            top = np.int64(0)  # the largest |B'_ik| by its bits (NaN's above Inf's above the rest)
            for k in range(rank):
                top = max(top, bits[i, k] & _ABS)
            nb = _upper_norm(bs[i], top, q, raise_)
            lv = np.float64(live)
            row_w[i] = lv * coef
            row_n[i] = lv * coef * nb
            if with32:
                for k in range(rank):
                    bs32[i, k] = np.float32(bs[i, k])
                _up32(rn32, i, coef32 * nb * lv)
                _up32(ru32, i, tiny * s * lv)
                live32[i] = np.float32(lv)
        return bs, bs32, row_w, row_n, rn32, ru32, live32

    @numba.njit(cache=True, nogil=True)
    def col_terms(a, with32, raise_, two_sqrt_r, r4, tiny64, tiny, two_r, three):
        """Per column j of A: (A in float64 and in float32, col_w = live, col_n = ||A_j|| live,
        col_u = (||A_j|| 2 sqrt(R) + R + 4) 2^-1074 live (the float64 bound's parts), then in
        float32 rounded up: cn32 = ||A_j|| live, cu32 = tiny (sum_k |A_kj| + 2R + 3) live, live);
        live = 1.0 if some A_kj != 0, else 0.0. The float32 arrays are empty unless with32. A row
        of A at a time (contiguous: it vectorizes), each column's sums in k order."""
        rank, cols = a.shape
        n32 = rank if with32 else 0
        a64 = np.empty((rank, cols), np.float64)
        a32 = np.empty((n32, cols), np.float32)
        bits = a64.view(np.int64)
        top, s, q, live = np.zeros(cols, np.int64), np.zeros(cols), np.zeros(cols), np.zeros(cols, np.bool_)
        for k in range(rank):
            for j in range(cols):
                x = np.float64(a[k, j])
                a64[k, j] = x
                s[j] += abs(x)
                q[j] += x * x
                live[j] |= x != 0
                top[j] = max(top[j], bits[k, j] & _ABS)
            if with32:
                for j in range(cols):
                    a32[k, j] = np.float32(a64[k, j])
        col_w, col_n, col_u = np.empty(cols), np.empty(cols), np.empty(cols)
        m32 = cols if with32 else 0
        cn32, cu32, live32 = np.empty(m32, np.float32), np.empty(m32, np.float32), np.empty(m32, np.float32)
        for j in range(cols):
            na = _upper_norm(a64[:, j], top[j], q[j], raise_)
            lv = np.float64(live[j])
            col_w[j] = lv
            col_n[j] = na * lv
            col_u[j] = (na * two_sqrt_r + r4) * tiny64 * lv
            if with32:
                _up32(cn32, j, na * lv)
                _up32(cu32, j, tiny * (s[j] + two_r + three) * lv)
                live32[j] = np.float32(lv)
        return a64, a32, col_w, col_n, col_u, cn32, cu32, live32

    @numba.njit(cache=True, inline="always")
    def _upper_norm(x, top, q, raise_):
        """||x|| in float64, never below the true norm (lowrank.upper_norms' twin), given top,
        the bits of max |x_k| (NaN's above Inf's above every finite one's), and q, the float64
        sum of the squares x_k^2 in any order.

        Why it is an upper bound: take x scaled by 2^-e (exact), e chosen so that the largest
        scaled square lies in [2^-1000, 2^800]: then none overflows, and what underflows (less
        than 2^-1074 each) is nothing beside the sum. The n squares and n - 1 additions are then
        within gamma_n of the exact sum of squares in ANY order (this loop, numpy's pairwise sum
        and torch's reduction alike), the root halves that and adds one rounding, the raise one
        more: raise_ = 1 + 2(n+2)u covers them all with room to spare. Scaling back is exact in
        float64's normal range, goes to Inf (an upper bound) past it, and below it rounds to
        nearest: a subnormal result is moved up by 2^-1074 (exact there).
        With max |x_k| in [2^-500, 2^400), e = 0 does (q itself, no second pass: the usual
        case); otherwise the squares are summed again with e = top's frexp exponent, clipped to
        [-1000, 1022] (0 for zero, Inf, NaN), as lowrank.upper_norms scales."""
        ex = top >> 52  # biased exponent; 0 for zero and subnormals, 2047 for Inf and NaN
        if 523 <= ex < 1423:
            return math.sqrt(q) * raise_
        e = 0
        if ex == 0 and top != 0:
            e = -1000  # a subnormal max: the clip's floor
        elif 0 < ex < 2047:
            e = min(max(np.int64(ex) - 1022, -1000), 1022)
        scale = math.ldexp(1.0, -e)
        s = 0.0
        for k in range(x.shape[0]):
            y = abs(x[k]) * scale
            s += y * y
        v = math.sqrt(s) * raise_ * math.ldexp(1.0, e)
        if v < 2.0 ** -1022 and s > 0:
            v += 2.0 ** -1074
        return v

    @numba.njit(cache=True, inline="always")
    def _up32(out, i, x):
        """out[i] = x (float64, >= 0) in float32, rounded up (zero stays zero, NaN NaN): rounded to
        nearest, then one step up (its bits + 1: the next float32, Inf past the largest) where
        that fell below x. Branch-free: about half the roundings go each way."""
        f = np.float32(x)
        out[i] = f
        out.view(np.uint32)[i] += np.uint32(np.float64(f) < x)
