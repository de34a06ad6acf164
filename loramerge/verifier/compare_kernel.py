"""compare.py's decision as one fused CPU pass (numba): for each row of the stored view, r = W + P @ Q
in float32 in a cache-resident buffer, the bound b' and the rounding cells of r -/+ b' from their
float32 bits, M compared there, the statistics summed in float64; the few elements the bound leaves
open are evaluated in float64 on the spot. W and M are read once, as apply's kernel reads W once.

The rounding cell of a float32 x for an output format with s dropped mantissa bits is
(bits(x) + 2^(s-1) - 1 + ((bits(x) >> s) & 1)) >> s: x rounded to nearest even at bit s, i.e. the
output value's bits up to a constant exponent offset (bfloat16: exactly its 16 bits, subnormals
included). M is on the output grid, so its cell is its top bits; lo, hi and M in one cell is
compare.py's decision (lo and hi round to M). Below 2^-14 float16's grid is coarser than the cell,
but a cell around a grid value lies inside that value's rounding interval, so the test holds there
too; above 65504 the cells of values float16 rounds to inf are never M's.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..engine.kernels import MAX_COLS   # (a row's count of undecided elements is int32 here too)
from ..engine.rounding_kernel import lut32
from ..engine.row_threads import on_threads

try:  # numba is a core dependency, but the torch path does the same where it is missing
    import numba
except ImportError:  # pragma: no cover
    numba = None

AVAILABLE = numba is not None and not os.environ.get("LORAMERGE_NO_KERNEL")
# output dtype code -> (dropped float32 mantissa bits, precision p, emin, largest finite value)
_FORMATS = {"BF16": (16, 8, -126, float.fromhex("0x1.fep127")), "F16": (13, 11, -14, 65504.0)}
_HALF = (torch.bfloat16, torch.float16)


def supports(w2: torch.Tensor, m2: torch.Tensor) -> bool:
    return (AVAILABLE and w2.device.type == "cpu" and w2.dtype in _HALF and m2.dtype in _HALF
            and w2.dim() == 2 and w2.numel() > 0 and w2.shape[1] < MAX_COLS)


def _lut(dtype: torch.dtype) -> np.ndarray:
    """float32 value of every 16-bit pattern of `dtype` (exact: both half formats fit in float32),
    built from the bits (rounding_kernel.lut32: a float conversion in a thread that flushes
    subnormals would cache bfloat16's subnormals as 0)."""
    return lut32(dtype)


def compare(w2: torch.Tensor, m2: torch.Tensor, p: torch.Tensor, q: torch.Tensor, nb: torch.Tensor,
            na: torch.Tensor, code: str, transposed: bool, margins: tuple[float, float, float], tol: float):
    """(bad, max_ulps, worst (row, col) in linear orientation, sq_err, sq_delta, dot, max_err, max_e,
    redone) over the stored views w2, m2 with E = w2 + p @ q (float64, stored orientation); `margins`
    are compare.margins(rank), `tol` the ulps beyond which an element is bad."""
    rows, cols = w2.shape
    shift, prec, emin, maxfin = _FORMATS[code]
    w16 = w2.contiguous().view(torch.int16).numpy().view(np.uint16)
    m16 = m2.contiguous().view(torch.int16).numpy().view(np.uint16)
    p64, q64 = p.to(torch.float64).contiguous().numpy(), q.to(torch.float64).contiguous().numpy()
    fo = np.zeros((rows, 6), np.float64)   # max ulps, sq_err, sq_delta, dot, max_err, max_e
    io = np.zeros((rows, 3), np.int64)     # bad, first col with the row's max ulps, redone
    mlut = _lut(m2.dtype)
    args = (w16, _lut(w2.dtype), w2.dtype == torch.bfloat16, m16, mlut, p64.astype(np.float32),
            q64.astype(np.float32), p64, q64, nb.numpy(), na.numpy(), *margins, shift, prec, emin, maxfin, tol, fo, io)
    on_threads(_rows, args, 0, rows, cols)
    max_ulps = float(fo[:, 0].max())
    top = np.flatnonzero(fo[:, 0] == max_ulps)
    if max_ulps == 0:
        worst = (0, 0)
    elif transposed:  # linear row-major order is the stored column first, then the stored row
        i = int(top[np.argmin(io[top, 1] * rows + top)])
        worst = (int(io[i, 1]), i)
    else:
        worst = (int(top[0]), int(io[top[0], 1]))
    return (int(io[:, 0].sum()), max_ulps, worst, float(fo[:, 1].sum()), float(fo[:, 2].sum()),
            float(fo[:, 3].sum()), float(fo[:, 4].max()), float(fo[:, 5].max()), int(io[:, 2].sum()))


if numba is not None:
    from ..engine.kernel64 import accumulate, accumulate_pair
    from ..engine.rounding_kernel import aligned, flag_row, next_flag

    @numba.njit(cache=True)
    def _round_grid(x, prec, emin, maxfin):
        """x (float64) correctly rounded to the grid of p bits, minimum exponent emin (ties to even)."""
        ax = abs(x)
        if ax == 0.0 or not math.isfinite(ax):
            return x
        _, ex = math.frexp(ax)
        g = math.ldexp(1.0, max(ex - 1, emin) - (prec - 1))
        v = np.rint(ax / g) * g   # ax / g is exact: a power-of-two scaling
        if v > maxfin:
            v = math.inf
        return math.copysign(v, x)

    @numba.njit(cache=True)
    def _ulp(mag, prec, emin):
        e = emin
        if mag > 0.0:
            _, ex = math.frexp(mag)
            e = max(ex - 1, emin)
        return math.ldexp(1.0, e - (prec - 1))

    @numba.njit(cache=True, inline="always")
    def _off(x, ref):
        """compare.off for one element: |x - ref|, 0 where x is ref (an infinity, or a NaN, where one
        is due), infinite where only one of them is NaN (a NaN distance passes any tolerance test)."""
        if x == ref or (math.isnan(x) and math.isnan(ref)):
            return 0.0
        d = abs(x - ref)
        return math.inf if math.isnan(d) else d

    @numba.njit(cache=True)
    def _float64_rule(wv, mv, p64, q64, i, j, prec, emin, maxfin):
        """(E, ulps) of one element by verify's float64 rule: |M - round(E)| / ulp(max(|E|, |W|, S)),
        as compare.off has it (0 where M is round(E), infinite where only one of them is NaN)."""
        e = wv
        s = 0.0
        for k in range(q64.shape[0]):
            t = p64[i, k] * q64[k, j]
            e += t
            s += abs(t)
        mag = max(abs(e), abs(wv), s)
        return e, _off(mv, _round_grid(e, prec, emin, maxfin)) / _ulp(mag, prec, emin)  # (_ulp: finite, > 0)

    @numba.njit(cache=True, inline="always")
    def _values(bits, lut, bf16, out):
        """One row of 16-bit patterns as float32 values: bfloat16 by a shift (into out's bits: no
        second pass), float16 by the table."""
        if bf16:
            ob = out.view(np.uint32)
            for j in range(bits.shape[0]):
                ob[j] = np.uint32(bits[j]) << 16
        else:
            for j in range(bits.shape[0]):
                out[j] = lut[bits[j]]

    @numba.njit(cache=True, nogil=True)  # nogil: the other row ranges' threads and the readers run meanwhile
    def _rows(w, wlut, w_bf16, m, mlut, p32, q32, p64, q64, nb, na, c, eta, rel, shift, prec, emin, maxfin, tol,
              fo, io, r0, r1):
        """Rows r0..r1 (one thread's share: engine/row_threads.py) into fo and io. D = P @ Q two
        rows at a time (each row of Q loaded once per pair: engine/kernel64.accumulate_pair), each
        row's sum in k order from zero as one row alone would have it."""
        cols = w.shape[1]
        # scratch rows, once per range
        wv, mv = aligned(cols, np.float32), aligned(cols, np.float32)
        dv, dv2 = aligned(cols, np.float32), aligned(cols, np.float32)
        acc, lo, hi = aligned(cols, np.float32), aligned(cols, np.float32), aligned(cols, np.float32)
        ad, ae = aligned(cols, np.float64), aligned(cols, np.float64)
        und = flag_row(cols)  # the elements the float32 decision leaves (_row finds them with next_flag)
        i = r0
        while i < r1:
            pair = i + 1 < r1
            dv[:] = 0
            if pair:
                dv2[:] = 0
                accumulate_pair(dv, dv2, q32, p32, i, 0)
            else:
                accumulate(dv, q32, p32, i, 0)
            _row(i, dv, w, wlut, w_bf16, m, mlut, p64, q64, nb, na, c, eta, rel, shift, prec, emin,
                 maxfin, tol, fo, io, wv, mv, acc, lo, hi, und, ad, ae)
            if pair:
                _row(i + 1, dv2, w, wlut, w_bf16, m, mlut, p64, q64, nb, na, c, eta, rel, shift, prec,
                     emin, maxfin, tol, fo, io, wv, mv, acc, lo, hi, und, ad, ae)
            i += 2 if pair else 1

    @numba.njit(cache=True)
    def _row(i, dv, w, wlut, w_bf16, m, mlut, p64, q64, nb, na, c, eta, rel, shift, prec, emin, maxfin,
             tol, fo, io, wv, mv, acc, lo, hi, und, ad, ae):
        """Row i into fo[i] and io[i], given D = P @ Q of the row in dv (_rows); the rest are
        scratch rows."""
        cols = w.shape[1]
        half = np.uint32((1 << (shift - 1)) - 1)
        f16 = shift == 13
        c32, eta32, rel32 = np.float32(c), np.float32(eta), np.float32(rel)
        _values(w[i], wlut, w_bf16, wv)
        _values(m[i], mlut, not f16, mv)
        # D = P @ Q first (dv), then r = W + D: one summation order of the R + 1 terms (the bound
        # holds for any); D itself, accurate relative to |P| @ |Q| rather than to W, feeds the
        # statistics
        # b' in float32 (compare.margins covers its own rounding), then the cells
        nbi = nb[i]
        for j in range(cols):
            r = wv[j] + dv[j]
            acc[j] = r
            b = c32 * (abs(wv[j]) + nbi * na[j]) + eta32 + abs(r) * rel32
            lo[j] = r - b
            hi[j] = r + b
        lob, hib, rb, mb = lo.view(np.uint32), hi.view(np.uint32), acc.view(np.uint32), mv.view(np.uint32)
        # in 32-bit lanes (numba computes uint32 and Python-int arithmetic in 64 bits, and the loop
        # ran at half the vector width): a sum below wraps only for a NaN's pattern (the largest
        # other is -Inf's, 0xFF800000), and a NaN bound decides nothing
        u32 = np.uint32
        # (inf: also the exponent's mask; sign_off: a pattern without its sign bit)
        sh, one, sign_off, inf = u32(shift), u32(1), u32(0x7FFFFFFF), u32(0x7F800000)
        undecided = np.int32(0)
        for j in range(cols):
            lj, hj = lob[j], hib[j]
            cl = u32(u32(lj + half) + u32((lj >> sh) & one)) >> sh
            ch = u32(u32(hj + half) + u32((hj >> sh) & one)) >> sh
            bounded = (u32(lj & sign_off) <= inf) & (u32(hj & sign_off) <= inf)
            # M is on the grid: its cell is the top bits of its float32 value
            und[j] = not ((cl == ch) & (cl == (mb[j] >> sh)) & (u32(rb[j] & inf) != inf) & bounded)
            undecided = np.int32(undecided + np.int32(und[j]))
        # statistics with E = W + D (in float64) where decided, then the undecided redone in float64
        sq_err, sq_delta, dot, max_err, max_e = _decided_stats(dv, wv, mv, und, ad, ae)
        maxu = 0.0
        argc = bad = redone = 0
        words = und.view(np.uint64)
        j = -1
        for _ in range(undecided):  # the undecided (next_flag: 8 flags at a time)
            j = next_flag(und, words, j + 1)
            e, u = _float64_rule(np.float64(wv[j]), np.float64(mv[j]), p64, q64, i, j, prec, emin, maxfin)
            redone += 1
            if u > tol:
                bad += 1
            if u > maxu:
                maxu = u
                argc = j
            sq_err, sq_delta, dot, max_err, max_e = _add(np.float64(mv[j]), np.float64(wv[j]), e, sq_err, sq_delta,
                                                         dot, max_err, max_e)
        fo[i, 0], fo[i, 1], fo[i, 2], fo[i, 3], fo[i, 4], fo[i, 5] = maxu, sq_err, sq_delta, dot, max_err, max_e
        io[i, 0], io[i, 1], io[i, 2] = bad, argc, redone

    # reassoc lets LLVM sum in vector lanes: in order, the sums were chains of dependent float64
    # adds, half of this kernel's time (5632 x 2048, r=16, the VM's 2 threads: bf16 20 -> 14 ms,
    # float16 28 -> 22 ms). These are reported figures (delta loss and ratio, to a few digits), not
    # the decision; every term is finite (the undecided enter as 0), and regrouping moves their
    # last bits only (relative ~2^-44 at worst: M - W - D regrouped).
    @numba.njit(cache=True, fastmath={"reassoc"})
    def _decided_stats(dv, wv, mv, und, ad, ae):
        """(sq_err, sq_delta, dot, max_err, max_e) over the row's decided elements with E = W + D;
        ad, ae: scratch rows (|M - E| and |E| per element)."""
        sq_err = sq_delta = dot = 0.0
        adb, aeb = ad.view(np.int64), ae.view(np.int64)
        top_d = top_e = np.int64(0)
        for j in range(dv.shape[0]):
            # the undecided count as 0 here (a select: D may be inf there): _row adds them
            delta = 0.0 if und[j] else np.float64(dv[j])
            y = 0.0 if und[j] else np.float64(wv[j])
            moved = 0.0 if und[j] else np.float64(mv[j]) - np.float64(wv[j])   # M - W, exact
            d = moved - delta
            sq_err += d * d
            sq_delta += delta * delta
            dot += moved * delta
            # the maxima by their bits, through the scratch rows: a float max does not vectorize
            # (NaN rules), and the bits of finite non-negative doubles order as their values
            ad[j] = abs(d)
            ae[j] = abs(y + delta)
            top_d = max(top_d, adb[j])
            top_e = max(top_e, aeb[j])
        adb[0], aeb[0] = top_d, top_e
        return sq_err, sq_delta, dot, ad[0], ae[0]

    @numba.njit(cache=True, inline="always")
    def _add(x, y, e, sq_err, sq_delta, dot, max_err, max_e):
        """The statistics with one more element: M's value x, W's y, the expected E's e."""
        d = x - e
        # the largest error by _off (max() would pass a NaN over)
        return (sq_err + d * d, sq_delta + (e - y) * (e - y), dot + (x - y) * (e - y), max(max_err, _off(x, e)),
                max(max_e, abs(e)))
