"""The fused CPU kernel's float64 pass (kernels.py's module docstring: its sum, bound and
rounding): what --accum float64 runs, and what the float32 pass hands over for rows it cannot
decide; and the ordered k loop both passes sum with (accumulate). Rows are taken two at a time
where they can be (_sum64_pair). Standard library, numpy and numba: no torch."""

from __future__ import annotations

import numpy as np

from .rounding_kernel import (aligned, exact_undecided, f32_bits_to_f16, f32_bits_to_half, flag_row, next_flag, numba,
                              odd_f32_bits, quick_ok)


@numba.njit(cache=True)
def row64(i, args64, acc, f, maybe):
    """Row i in float64 (module docstring): writes out[i], bad[i], undecided[i]. acc, f, maybe:
    scratch rows (float64, float32, bool; scratch64), reused from row to row."""
    w, lut, a, bs = args64[0], args64[1], args64[2], args64[3]
    # W + delta for one row in a float64 buffer that stays in cache; the k loop streams
    # contiguous rows of A, which vectorizes (a register-blocked variant measured slower)
    for j in range(w.shape[1]):
        acc[j] = lut[w[i, j]]
    accumulate(acc, a, bs, i, 0)
    _round64(i, args64, acc, f, maybe)


@numba.njit(cache=True)
def _sum64_pair(acc, acc2, args64, i):
    """acc = W + delta of row i, acc2 of row i + 1 (each as row64 sums it: W, then k in order,
    accumulate's roundings), sharing the loads of A: a rank-256 float64 A does not fit in
    L2, and read once per pair instead of once per row the sums took 0.6x the time."""
    w, lut, a, b = args64[0], args64[1], args64[2], args64[3]
    for j in range(w.shape[1]):
        acc[j] = lut[w[i, j]]
        acc2[j] = lut[w[i + 1, j]]
    accumulate_pair(acc, acc2, a, b, i, 0)


@numba.njit(cache=True)
def _round64(i, args64, acc, f, maybe):
    """Row i's rounding and decisions from its float64 sum acc (row64)."""
    (w, lut, a, bs, out, to_f16, bad, undecided, lut_out, inf_bits, top_ulp, thr, slack,
     row_w, row_n, col_w, col_n, col_u, drop, lo, hi) = args64
    cols = w.shape[1]
    low_mask = (np.int64(1) << drop) - 1
    half = np.int64(1) << (drop - 1)
    upm = 2.0 ** -53 / slack
    # round to odd into float32, then to the output's 16 bits (branch-free, so the loops
    # vectorize; one loop per format). The rounding to odd in a loop of its own (float64 lanes),
    # the 16-bit rounding and its count in one of 32-bit lanes only: fused, the second ran at
    # the float64 loop's width (float16 rounding 2.3 ns per element against 1.6 split); the count
    # fits: a row has fewer than kernels.MAX_COLS = 2^31 elements
    for j in range(cols):
        f[j] = np.float32(acc[j])
    bits = f.view(np.uint32)
    for j in range(cols):
        bits[j] = odd_f32_bits(acc[j], f[j], bits[j])
    nb = np.int32(0)
    if to_f16:
        for j in range(cols):
            h = f32_bits_to_f16(bits[j])
            out[i, j] = h
            nb = np.int32(nb + np.int32((h & np.uint16(0x7C00)) == np.uint16(0x7C00)))
    else:
        for j in range(cols):
            h = f32_bits_to_half(bits[j], False)
            out[i, j] = h
            nb = np.int32(nb + np.int32((h & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    # The quick test decides almost every element, the exact rule runs on the rest. The
    # bound, with |W| <= |x| + |x - W| <= |x| + N + bound (N = ||B'_i|| ||A_j||):
    # (c (|x| + 2N) + U) / (1 - c) covers it (the slack covers 1 / (1 - c)).
    accb = acc.view(np.int64)
    rw, rn = row_w[i], row_n[i]
    live = np.float64(rw > 0)
    nm = 0
    for j in range(cols):
        x = acc[j]
        e = rw * col_w[j] * abs(x) + 2 * rn * col_n[j] + col_u[j] * live
        ok = quick_ok(x, accb[j] & low_mask, half, upm, e, lo, hi) | ((e == 0.0) & (abs(x) < np.inf))
        maybe[j] = not ok
        nm += not ok
    nu = 0
    words = maybe.view(np.uint64)
    j = -1
    for _ in range(nm):  # the nm elements flagged (next_flag: 8 flags at a time)
        j = next_flag(maybe, words, j + 1)
        e = (rw * col_w[j] * abs(lut[w[i, j]]) + rn * col_n[j] + col_u[j] * live) * slack
        nu += exact_undecided(acc[j], out[i, j], e, e == 0.0, lut_out, inf_bits, top_ulp, thr)
    bad[i] = nb
    undecided[i] = nu


@numba.njit(cache=True, nogil=True)  # nogil: the other row ranges' threads and the pipeline's run meanwhile
def rows64(args64, r0, r1):
    """Rows r0..r1 in float64 (one thread's share: row_threads), two at a time (_sum64_pair)."""
    cols = args64[0].shape[1]
    acc, f, maybe = scratch64(cols)
    acc2 = aligned(cols, np.float64)
    i = r0
    while i + 2 <= r1:
        _sum64_pair(acc, acc2, args64, i)
        _round64(i, args64, acc, f, maybe)
        _round64(i + 1, args64, acc2, f, maybe)
        i += 2
    if i < r1:
        row64(i, args64, acc, f, maybe)


@numba.njit(cache=True, nogil=True)  # nogil: as rows64
def rows64_at(args64, rows, k0, k1):
    """Rows rows[k0..k1] in float64 (one thread's share): those the float32 pass left whole."""
    acc, f, maybe = scratch64(args64[0].shape[1])
    for k in range(k0, k1):
        row64(rows[k], args64, acc, f, maybe)


@numba.njit(cache=True)
def scratch64(cols):
    """acc, f and maybe (a flag_row: _round64 finds its flags with next_flag)."""
    return aligned(cols, np.float64), aligned(cols, np.float32), flag_row(cols)


@numba.njit(cache=True, inline="always")
def accumulate(d, a, b, i, k0):
    """d[j] += b[i, k] a[k, j] for k = k0, k0 + 1, ... in order: each element's sum is the same
    sequence of roundings as one k per pass (the order the bounds assume; numba does not
    contract to FMA), but four terms per pass over d load and store d a quarter as often
    (the float64 pass, whose row of d does not fit L1, took ~0.8x the time at rank 16)."""
    rank, cols = a.shape
    k = k0
    while k + 4 <= rank:
        b0, b1, b2, b3 = b[i, k], b[i, k + 1], b[i, k + 2], b[i, k + 3]
        for j in range(cols):
            d[j] = (((d[j] + b0 * a[k, j]) + b1 * a[k + 1, j]) + b2 * a[k + 2, j]) + b3 * a[k + 3, j]
        k += 4
    while k < rank:
        bk = b[i, k]
        for j in range(cols):
            d[j] += bk * a[k, j]
        k += 1


@numba.njit(cache=True, inline="always")
def accumulate_pair(d, e, a, b, i, k0):
    """accumulate for rows i (into d) and i + 1 (into e) at once: each row's terms in the same
    order and grouping, so each sum is the one accumulate gives; each row of A is loaded once for
    both (A's rows pass through the cache once per pair of rows, not once per row)."""
    rank, cols = a.shape
    k = k0
    while k + 4 <= rank:
        b0, b1, b2, b3 = b[i, k], b[i, k + 1], b[i, k + 2], b[i, k + 3]
        c0, c1, c2, c3 = b[i + 1, k], b[i + 1, k + 1], b[i + 1, k + 2], b[i + 1, k + 3]
        for j in range(cols):
            x0, x1, x2, x3 = a[k, j], a[k + 1, j], a[k + 2, j], a[k + 3, j]
            d[j] = (((d[j] + b0 * x0) + b1 * x1) + b2 * x2) + b3 * x3
            e[j] = (((e[j] + c0 * x0) + c1 * x1) + c2 * x2) + c3 * x3
        k += 4
    while k < rank:
        bk, ck = b[i, k], b[i + 1, k]
        for j in range(cols):
            x = a[k, j]
            d[j] += bk * x
            e[j] += ck * x
        k += 1
