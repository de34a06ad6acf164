"""Fused CPU kernel for the common case: a bfloat16/float16 base tensor merged to the same kind of
half-precision output. Optional: used when numba is installed (the `fast` extra).

Why a kernel: with torch ops, one merge with a correctness check is a dozen passes over the
tensor through memory; on a 2-core machine that costs several times the disk I/O. Here each row
is converted, accumulated and rounded in cache, so W is read once and W' written once. Two
evaluations, each with a proven per-element bound and rounding.decide's rule (a rounding is kept
when no rounding boundary of the output grid lies within the bound; rounding_kernel.quick_ok
decides almost every element from the bits the output drops, the exact rule the rest):

float32 (--accum float32, the default), per row i, k in order:
    D = sum_k B32[i, k] A32[k, j]     r = fl32(D + W)     W' = r rounded to nearest even
    |r - S| <= u|r| + 1.01 (R+2) u ||B'_i|| ||A_j|| + 2^-126 (2R + 3 + sum_k |A_kj| + sum_k |B'_ik|)
  u = 2^-24, B' = B f (float64), B32 and A32 its and A's float32 roundings. Higham's bound for the
  ordered dot product (gamma_R) and for adding W last (u|r|: W's own error is one rounding, not
  R), the roundings of B' and A to float32 (2u), Cauchy-Schwarz for sum_k |B'_ik A_kj| (O(1) per
  element from row and column norms, computed never below the true ones: kernel_terms), and what
  underflow can lose - products, partial sums, subnormal inputs, each less than 2^-126 even where
  the FPU flushes subnormals to zero (FTZ/DAZ; a subnormal W adds one more 2^-126). R < 2^14
  keeps gamma_R within 1.001 R u.
  An element this leaves undecided is evaluated again in float64 (a rank-long dot product) and
  decided by the float64 bound; a row with many such elements (large rank and delta) is redone
  whole in float64, and when a tensor's first rows need that often, its other rows start there.

float64 (--accum float64, and what float32 leaves):
    acc = W + sum_k (f*B)[i, k] * A[k, j]                (float64)
    W'  = round_to_nearest_even(round_to_odd_f32(acc))   (correct rounding of the float64 value)
  with lowrank's float64 bound (stage 2). Where acc lies within it of a rounding boundary, the row
  is counted as undecided and ops.merge_weight redoes it (float64, then exact integer arithmetic)
  with lowrank.merge_rows64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import kernel_terms
from .grids import BOUND_SLACK, LAYOUTS, OVERFLOW, TINY32, TINY64, U32, U64
from .kernel_inputs import as_array
from .rounding_kernel import AVAILABLE, kind, lut, numba
from .row_threads import on_threads

if numba is not None:
    from .kernel64 import accumulate, accumulate_pair, rows64, rows64_at
    from .rounding_kernel import (aligned, exact_undecided, f32_bits_to_f16, f32_bits_to_half, flag_row,
                                  next_flag, odd_f32_bits)

if TYPE_CHECKING:
    import torch

# torch is imported by the torch-facing functions (supports, merge_half) only: merge_bits runs in
# the premerge worker, which has no torch (engine/premerge_worker.py)
_HALF = ("bfloat16", "float16")
# The float32 pass up to this rank (its bound's 1.01 covers gamma_R = Ru / (1 - Ru) < 1.001 Ru)
MAX_RANK_32 = 1 << 14
# If more than this share of a row needs float64, the row is redone whole in float64 (one
# vectorized pass beats that many rank-long dot products); if the first PROBE_ROWS rows of a
# tensor need that on average, the rest starts in float64.
DENSE_ROW = 1 / 16
PROBE_ROWS = 32
DENSE = -1  # _row32's mark in `redone` for a row it leaves to the float64 pass whole
# A row's counts are int32 in both passes: int64 sums halved their loops' vector width
MAX_COLS = 1 << 31


def supports(w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    return (AVAILABLE and w.device.type == "cpu" and w.dim() == 2 and kind(w.dtype) in _HALF
            and kind(out_dtype) in _HALF and w.numel() > 0 and w.shape[1] < MAX_COLS)


def merge_half(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, factors: torch.Tensor,
               out_dtype: torch.dtype, out: torch.Tensor | None = None,
               accum: torch.dtype | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray, int]:
    """(result, per-row count of non-finite results, per-row count of undecided elements, elements
    evaluated in float64 after the float32 pass). Rows with undecided elements hold a provisional
    rounding: the caller must redo them. `out`, if given, is a contiguous CPU tensor of w's shape
    and out_dtype to write into (a reused buffer). accum: the first pass's precision (default
    float32). merge_bits on torch's tensors."""
    import torch
    if out is None:
        out = torch.empty(w.shape, dtype=out_dtype)
    w16 = w.contiguous().view(torch.int16).numpy().view(np.uint16)
    out16 = out.view(torch.int16).numpy().view(np.uint16)
    bad, undecided, redone = merge_bits(w16, kind(w.dtype), as_array(a), as_array(b),
                                        as_array(factors.to(torch.float64)), kind(out_dtype), out16,
                                        accum != torch.float64)
    return out, bad, undecided, redone


def merge_bits(w16: np.ndarray, w_kind: str, a: np.ndarray, b: np.ndarray, factors: np.ndarray,
               out_kind: str, out16: np.ndarray, first32: bool = True,
               threads: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The kernel on arrays: W's 16-bit patterns `w16` [out, in] (uint16, C-contiguous) of format
    `w_kind` ("bfloat16" or "float16"), A [R, in] and B [out, R] (float32 or float64, C-contiguous),
    the factors [R] (float64); writes the result's patterns of format `out_kind` into out16 [out,
    in] (uint16). first32: the float32 first pass (else float64 from the start). Returns (per-row
    count of non-finite results, per-row count of undecided elements, elements evaluated in
    float64 after the float32 pass). threads: row_threads.on_threads' (default torch's count)."""
    rows, cols = w16.shape
    rank = a.shape[0]
    if cols >= MAX_COLS:  # supports() keeps such rows from the kernel
        raise ValueError(f"the kernel counts a row's elements in int32: {cols} columns")
    first32 = first32 and 0 < rank < MAX_RANK_32
    # B' = B f and A in float64 (and float32 for the float32 pass), and the bounds' per-row and
    # per-column parts, zero where no term can be nonzero (then the float sum is W itself):
    #   float64 pass: row_w = coef, row_n = coef ||B'_i||, col_w = 1, col_n = ||A_j||,
    #                 col_u = (2 sqrt(R) ||A_j|| + R + 4) 2^-1074      (lowrank.bound64)
    #   float32 pass, in float32 rounded up: c ||B'_i||, ||A_j||, 2^-126 sum_k |B'_ik|,
    #                 2^-126 (sum_k |A_kj| + 2R + 3), and the live masks
    # with norms never below the true ones (kernel_terms; 1 + 2(R+2)u raises them)
    coef = 1.01 * (rank + 2) * U64
    raise_ = 1 + 2 * (rank + 2) * U64
    (bs64, bs32, row_w, row_n, rn32, ru32, live_r32), (a64, a32, col_w, col_n, col_u, cn32, cu32, live_c32) = \
        kernel_terms.terms(a, b, factors, first32, coef, raise_, 1.01 * (rank + 2) * U32, TINY32, 2 * rank ** 0.5,
                           rank + 4.0, TINY64, 2.0 * rank, 3.0)
    bound64 = (row_w, row_n, col_w, col_n, col_u)
    bad = np.zeros(rows, dtype=np.int64)
    undecided = np.zeros(rows, dtype=np.int64)
    redone = np.zeros(rows, dtype=np.int64)
    g = LAYOUTS[out_kind]
    lo, hi = g.quick
    args64 = (w16, lut(w_kind), a64, bs64, out16, out_kind == "float16", bad, undecided, lut(out_kind),
              g.inf_bits, g.top_ulp, OVERFLOW[out_kind], BOUND_SLACK, *bound64, 52 - g.mbits, lo, hi)
    if not first32:
        on_threads(rows64, (args64,), 0, rows, cols, threads)
        return bad, undecided, 0
    # the float32 pass's bound (module docstring), per row and per column, in float32 rounded up
    bound32 = (rn32, cn32, ru32, cu32, live_r32, live_c32)
    lo32, hi32 = np.float32(lo), np.float32(hi if hi < 2.0 ** 128 else np.inf)
    args32 = (bs32, a32, w_kind == "bfloat16", *bound32, 23 - g.mbits, redone, DENSE_ROW * cols, lo32, hi32)
    probe = min(rows, PROBE_ROWS)
    on_threads(_rows32, (args32, args64), 0, probe, cols, threads)
    if probe < rows and np.where(redone[:probe] == DENSE, cols, redone[:probe]).sum() > DENSE_ROW * probe * cols:
        # most rows would be redone: start them in float64
        on_threads(rows64, (args64,), probe, rows, cols, threads)
        redone[probe:] = cols
    elif probe < rows:
        on_threads(_rows32, (args32, args64), probe, rows, cols, threads)
    # the rows the float32 pass left to float64 whole: done here, not from inside it, so that a
    # merge that needs none (the usual one) never compiles the float64 pass (~2 s of the first
    # run after an install on the 2-core VM)
    dense = np.flatnonzero(redone == DENSE)
    if len(dense):
        on_threads(rows64_at, (args64, dense), 0, len(dense), cols, threads)
        redone[dense] = cols
    return bad, undecided, int(redone.sum())


if numba is not None:

    @numba.njit(cache=True)
    def _scratch32(cols):
        """wf, d and maybe (a flag_row: _row32 finds its flags with next_flag)."""
        return aligned(cols, np.float32), aligned(cols, np.float32), flag_row(cols)

    @numba.njit(cache=True, inline="always")
    def _bound32(r, wv, rn, cn, ru, cu, live):
        """The float32 pass's bound (module docstring) for one element, without the slack, in the
        arguments' precision (float32 in the pass: its roundings are within the slack; the
        parameters are rounded up): r the float32 sum, wv W's value; rn = c ||B'_i|| and ru =
        2^-126 sum_k |B'_ik| of its row, cn = ||A_j|| and cu = 2^-126 (2R + 3 + sum_k |A_kj|) of its
        column (2 units of 2^-126 spare: the underflow of rn cn); live: whether any of its terms
        can be nonzero. A subnormal W adds 2^-126: what DAZ would lose of it."""
        tiny = np.float32(1.1754943508222875e-38)
        sub = (wv != 0) & (abs(wv) < tiny)
        return (abs(r) * np.float32(5.960464477539063e-08) + rn * cn + ru + cu) * live + tiny * sub

    @numba.njit(cache=True, inline="always")
    def _quick32(bits, mag, e, low_mask, half, upm, lo, hi):
        """quick_ok in 32-bit arithmetic (16 lanes): `upm` = 2^-24 (1 - 2^-15) <= 2^-24 / slack
        leaves room for the float32 roundings of e and of this product."""
        # int32 throughout (numba widens int32 + int32 to int64, which halves the vector width):
        # every value is below 2^24, so the result is the same
        low = np.int32(bits & low_mask)
        dist = np.float32(min(np.int32(abs(np.int32(low - half))), np.int32(low + np.int32(half >> 1))))
        return ((dist * upm * mag > e) & (mag >= lo) & (mag < hi)) | ((e == 0) & (mag < np.float32(np.inf)))

    @numba.njit(cache=True, inline="always")
    def _ok32(r, bits, wv, rn, cn, ru, cu, live, low_mask, half, upm, lo, hi):
        """Whether the float32 pass decides its element (float32 sum r, its bits, W's value wv):
        _bound32, then _quick32."""
        mag = abs(r)
        return _quick32(bits, mag, _bound32(mag, wv, rn, cn, ru, cu, live), low_mask, half, upm, lo, hi)

    @numba.njit(cache=True, nogil=True)
    def _rows32(args32, args64, r0, r1):
        """Rows r0..r1 by the float32 pass (module docstring), what it leaves in float64: writes
        out, bad, undecided (what float64 leaves) and redone (elements evaluated in float64); one
        thread's share (row_threads)."""
        cols = args64[0].shape[1]
        wf, d, maybe = _scratch32(cols)
        d2 = aligned(cols, np.float32)
        bs32, a32 = args32[0], args32[1]
        i = r0
        # D for two rows at a time: each row of A loaded feeds both (A's R rows pass through the
        # cache once per pair, not once per row); each row's sum is the same as alone
        while i + 2 <= r1:
            _d_pair(d, d2, a32, bs32, i)
            _row32(i, args32, args64, wf, d, maybe)
            _row32(i + 1, args32, args64, wf, d2, maybe)
            i += 2
        if i < r1:
            b0 = bs32[i, 0]
            for j in range(cols):
                d[j] = b0 * a32[0, j]
            accumulate(d, a32, bs32, i, 1)
            _row32(i, args32, args64, wf, d, maybe)

    @numba.njit(cache=True)
    def _d_pair(d, e, a, b, i):
        """d = D of row i and e = D of row i + 1 (module docstring: k in order from 0, so that a
        sum of zeros keeps IEEE's sign; accumulate's sequence of roundings), sharing A's loads."""
        b0, c0 = b[i, 0], b[i + 1, 0]
        for j in range(a.shape[1]):
            x = a[0, j]
            d[j] = b0 * x
            e[j] = c0 * x
        accumulate_pair(d, e, a, b, i, 1)

    @numba.njit(cache=True)
    def _row32(i, args32, args64, wf, d, maybe):
        """Row i by the float32 pass, given its D in d (_rows32). wf, maybe: scratch rows
        (float32, bool), reused from row to row."""
        (bs32, a32, w_bf16, rn32, cn32, ru32, cu32, live_r, live_c, drop, redone, dense, lo32, hi32) = args32
        (w, lut, a, bs, out, to_f16, bad, undecided, lut_out, inf_bits, top_ulp, thr, slack,
         row_w, row_n, col_w, col_n, col_u, drop64, lo, hi) = args64
        cols = w.shape[1]
        rank = a.shape[0]
        low_mask = np.uint32((1 << drop) - 1)
        half = np.int32(1 << (drop - 1))
        upm = np.float32(2.0 ** -24 * (1 - 2.0 ** -15))
        # W in float32: a bfloat16 is the top half of its float32 (a shift, which vectorizes),
        # a float16 a table lookup
        if w_bf16:
            wu = wf.view(np.uint32)
            for j in range(cols):
                wu[j] = np.uint32(w[i, j]) << 16
        else:
            f16_row_to_f32(w[i], wf)
        # W last (after D), the rounding to the output's 16 bits and the bound's quick test, in
        # one pass over the row (all of it vectorizes: the roundings are branch-free)
        bits = d.view(np.uint32)
        rn, ru, lv = rn32[i], ru32[i], live_r[i]
        # the counts in int32 (cols < MAX_COLS): with int64 sums the loops below ran at half the
        # vector width (8 lanes of float32 need 8 lanes of each count)
        nb = np.int32(0)
        nm = np.int32(0)
        if to_f16:
            for j in range(cols):
                d[j] += wf[j]
                h = f32_bits_to_f16(bits[j])
                out[i, j] = h
                nb = np.int32(nb + np.int32((h & np.uint16(0x7C00)) == np.uint16(0x7C00)))
                ok = _ok32(d[j], bits[j], wf[j], rn, cn32[j], ru, cu32[j], lv * live_c[j], low_mask, half, upm,
                           lo32, hi32)
                maybe[j] = not ok
                nm = np.int32(nm + np.int32(not ok))
        else:
            for j in range(cols):
                d[j] += wf[j]
                h = f32_bits_to_half(bits[j], False)
                out[i, j] = h
                nb = np.int32(nb + np.int32((h & np.uint16(0x7F80)) == np.uint16(0x7F80)))
                ok = _ok32(d[j], bits[j], wf[j], rn, cn32[j], ru, cu32[j], lv * live_c[j], low_mask, half, upm,
                           lo32, hi32)
                maybe[j] = not ok
                nm = np.int32(nm + np.int32(not ok))
        bad[i] = nb
        undecided[i] = 0
        redone[i] = nm
        if nm == 0:
            return
        if nm > dense:  # many: the whole row in float64, by merge_bits after this pass (DENSE)
            redone[i] = DENSE
            return
        nu = np.int32(0)
        words = maybe.view(np.uint64)
        j = -1
        for _ in range(nm):  # the nm elements flagged (next_flag: 8 flags at a time)
            j = next_flag(maybe, words, j + 1)
            nb, nu = _redo32(i, j, args32, args64, wf, d, rn, ru, lv, nb, nu)
        bad[i] = nb
        undecided[i] = nu

    @numba.njit(cache=True, inline="always")
    def _redo32(i, j, args32, args64, wf, d, rn, ru, lv, nb, nu):
        """One element the float32 pass left: decided by the exact distances to the float32 sum, or
        evaluated in float64 (and decided by that bound, or counted undecided). Returns the row's
        non-finite and undecided counts with it."""
        (bs32, a32, w_bf16, rn32, cn32, ru32, cu32, live_r, live_c, drop, redone, dense, lo32, hi32) = args32
        (w, lut, a, bs, out, to_f16, bad, undecided, lut_out, inf_bits, top_ulp, thr, slack,
         row_w, row_n, col_w, col_n, col_u, drop64, lo, hi) = args64
        h = out[i, j]
        r = np.float64(d[j])
        e = _bound32(r, np.float64(wf[j]), np.float64(rn), np.float64(cn32[j]), np.float64(ru),
                     np.float64(cu32[j]), np.float64(lv * live_c[j])) * slack
        if not exact_undecided(r, h, e, e == 0.0, lut_out, inf_bits, top_ulp, thr):
            return nb, nu  # decided after all by the exact distances
        x = lut[w[i, j]]
        for k in range(a.shape[0]):
            x += bs[i, k] * a[k, j]
        f = np.float32(x)
        h64 = f32_bits_to_half(odd_f32_bits(x, f, f.view(np.uint32)), to_f16)
        nb = np.int32(nb + np.int32((h64 & inf_bits) == inf_bits) - np.int32((h & inf_bits) == inf_bits))
        out[i, j] = h64
        e64 = (row_w[i] * col_w[j] * abs(lut[w[i, j]]) + row_n[i] * col_n[j] + col_u[j] * lv) * slack
        nu = np.int32(nu + np.int32(exact_undecided(x, h64, e64, e64 == 0.0, lut_out, inf_bits, top_ulp, thr)))
        return nb, nu

    @numba.njit(cache=True, inline="always")
    def f16_row_to_f32(h, out):
        """float16 bit patterns -> their float32 values, in two vectorized passes instead of a
        lookup per element in a 256 KB table: each value as m 2^-24 (exact, and right for zero and
        the subnormals, all normal in float32, so flushing cannot touch them), then the normal,
        Inf and NaN patterns by their bits. The same values as rounding_kernel.lut32 for all 65536
        patterns."""
        ob = out.view(np.uint32)
        for j in range(h.shape[0]):
            out[j] = np.float32(h[j] & 0x3FF) * np.float32(5.960464477539063e-08)
        for j in range(h.shape[0]):
            x = np.uint32(h[j])
            e = (x >> np.uint32(10)) & np.uint32(0x1F)
            mant = (x & np.uint32(0x3FF)) << np.uint32(13)
            sign = (x & np.uint32(0x8000)) << np.uint32(16)
            # Inf, or NaN as the table has it (float32's quiet NaN, the sign kept)
            special = np.uint32(0x7FC00000) if mant != np.uint32(0) else np.uint32(0x7F800000)
            normal = ((e + np.uint32(112)) << np.uint32(23)) | mant
            ob[j] = sign | (ob[j] if e == np.uint32(0) else (special if e == np.uint32(31) else normal))

