"""numba kernels behind sketch.py: digest (two exact bilinear forms of a tensor's 16-bit limbs mod P;
see sketch.py for the math) and compare (bits and canonical values, element by element). Imported
only when a content match needs them. Rows (and row blocks) are shared among threads by
engine/row_threads.py, as the merge kernels' are: no numba parallel loops (their compilation
took ~5 s of the first fold after an install on the 2-core VM, and they start numba's own
threads beside torch's)."""

from __future__ import annotations

import numba
import numpy as np

from ..engine import jit_time
from ..engine.row_threads import on_threads

jit_time.install()  # the first fold after an install compiles these: apply's report counts numba's time

P = (1 << 31) - 1
CHUNK = 1 << 15  # limb (< 2^16) * weight (< 2^31) summed 2^15 times stays below 2^63


@numba.njit(inline="always")
def _canon(e, magmask, emask, fmax, nan):  # pragma: no cover - compiled
    """The canonical bits of e (sign-extended element bits): zero and subnormal -> 0, NaN -> nan,
    magnitude at or above fmax -> signed infinity (sketch.py)."""
    mag = e & magmask
    if (mag & emask) == 0:
        return np.int64(0)
    if mag > emask:
        return np.int64(nan)
    if mag >= fmax:
        return (e & ~magmask) | emask
    return e


def forms(bits, row_w, col_w, canon, emask, mmask, fmax, nan):
    """bits [rows, cols] (int16/32/64 element bit patterns); row_w [2, limbs, rows], col_w
    [2, limbs, cols] in [1, P). Returns [2]: sum_ij sum_l limb_l(x_ij) row_w[f, l, i] col_w[f, l, j]
    mod P, with x_ij = the canonical bits when canon (zero/subnormal -> 0, NaN -> nan, magnitude
    at or above fmax -> signed infinity)."""
    rows, cols = bits.shape
    part0 = np.zeros(rows, np.int64)
    part1 = np.zeros(rows, np.int64)
    on_threads(_forms_rows, (bits, row_w, col_w, canon, emask, mmask, fmax, nan, part0, part1), 0, rows, cols)
    # each part is below P < 2^31: their sum stays far below 2^63 for any row count there can be
    return np.array([int(part0.sum()) % P, int(part1.sum()) % P], np.int64)


@numba.njit(cache=True, nogil=True)  # nogil: the other row ranges' threads run meanwhile
def _forms_rows(bits, row_w, col_w, canon, emask, mmask, fmax, nan, part0, part1, r0, r1):  # pragma: no cover
    """forms' per-row sums (mod P) for rows r0..r1 (one thread's share)."""
    cols = bits.shape[1]
    limbs = row_w.shape[1]
    width = 16 * limbs
    magmask = (np.int64(1) << (width - 1)) - 1 if width < 64 else np.int64(0x7FFFFFFFFFFFFFFF)
    for i in range(r0, r1):
        s0 = np.int64(0)
        s1 = np.int64(0)
        for l in range(limbs):
            shift = 16 * l
            rs0 = np.int64(0)
            rs1 = np.int64(0)
            for j0 in range(0, cols, CHUNK):
                a0 = np.int64(0)
                a1 = np.int64(0)
                for j in range(j0, min(cols, j0 + CHUNK)):
                    e = np.int64(bits[i, j])
                    if canon:
                        e = _canon(e, magmask, emask, fmax, nan)
                    limb = (e >> shift) & 0xFFFF
                    a0 += limb * col_w[0, l, j]
                    a1 += limb * col_w[1, l, j]
                rs0 = (rs0 + a0 % P) % P
                rs1 = (rs1 + a1 % P) % P
            s0 = (s0 + rs0 * row_w[0, l, i]) % P
            s1 = (s1 + rs1 * row_w[1, l, i]) % P
        part0[i] = s0
        part1[i] = s1


TILE = 64  # a transposed comparison walks TILE x TILE blocks, so both operands stay in cache


@numba.njit(inline="always")
def _difference(x, y, magmask, emask, fmax, nan):  # pragma: no cover - compiled
    """0: same bits; 1: other bits, one canonical value; 2: other canonical values."""
    if x == y:
        return 0
    return 1 if _canon(x, magmask, emask, fmax, nan) == _canon(y, magmask, emask, fmax, nan) else 2


def differ(a, b, transposed, magmask, emask, fmax, nan):
    """a [rows, cols] element bits; b the same shape, or [cols, rows] holding a's transpose when
    `transposed`. Returns [elements whose canonical values differ, elements whose bits differ].
    In one layout each row is first compared bit for bit in a loop the compiler vectorizes; only
    a row with differing bits is looked at element by element (canonical values)."""
    rows, cols = a.shape
    blocks = (rows + TILE - 1) // TILE
    canon = np.zeros(blocks, np.int64)
    raw = np.zeros(blocks, np.int64)
    on_threads(_differ_blocks, (a, b, transposed, magmask, emask, fmax, nan, canon, raw), 0, blocks, TILE * cols)
    return np.array([canon.sum(), raw.sum()])


@numba.njit(cache=True, nogil=True)  # nogil: the other blocks' threads run meanwhile
def _differ_blocks(a, b, transposed, magmask, emask, fmax, nan, canon, raw, b0, b1):  # pragma: no cover
    """differ's counts for row blocks b0..b1 of TILE rows (one thread's share)."""
    rows, cols = a.shape
    for bi in range(b0, b1):
        i0 = bi * TILE
        c = np.int64(0)
        r = np.int64(0)
        if transposed:
            for j0 in range(0, cols, TILE):
                for i in range(i0, min(rows, i0 + TILE)):
                    for j in range(j0, min(cols, j0 + TILE)):
                        d = _difference(np.int64(a[i, j]), np.int64(b[j, i]), magmask, emask, fmax, nan)
                        r += d > 0
                        c += d > 1
        else:
            for i in range(i0, min(rows, i0 + TILE)):
                k = 0
                for j in range(cols):
                    k += a[i, j] != b[i, j]
                if k:
                    for j in range(cols):
                        d = _difference(np.int64(a[i, j]), np.int64(b[i, j]), magmask, emask, fmax, nan)
                        r += d > 0
                        c += d > 1
        canon[bi] = c
        raw[bi] = r
