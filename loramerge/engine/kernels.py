"""Fused CPU kernel for the common case: a bfloat16/float16 base tensor merged to the same kind of
half-precision output. Optional: used when numba is installed (the `fast` extra).

Why a kernel: with torch ops, one merge with a correctness check is a dozen passes over the
tensor through memory; on a 2-core machine that costs several times the disk I/O. Here each row
is converted, accumulated in float64 and rounded in cache, so W is read once and W' written once:
    acc = W + sum_k (f*B)[i, k] * A[k, j]                (float64)
    W'  = round_to_nearest_even(round_to_odd_f32(acc))   (correct rounding of the float64 value)
and, per element, the decision rule of rounding.decide with lowrank's float64 bound (stage 2):
where acc lies within its error bound of a rounding boundary, the row is counted as undecided and
ops.merge_weight redoes it (float64, then exact integer arithmetic) with lowrank.merge_rows64.
"""

from __future__ import annotations

import numpy as np
import torch

from . import rounding
from .rounding_kernel import AVAILABLE, lut, numba

if numba is not None:
    from .rounding_kernel import exact_undecided, f32_bits_to_f16, quick_ok

_HALF = (torch.bfloat16, torch.float16)


def supports(w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    return (AVAILABLE and w.device.type == "cpu" and w.dim() == 2 and w.dtype in _HALF
            and out_dtype in _HALF and w.numel() > 0)


def merge_half(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, factors: torch.Tensor,
               out_dtype: torch.dtype, out: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(result, per-row count of non-finite results, per-row count of undecided elements). Rows
    with undecided elements hold a provisional rounding: the caller must redo them. `out`, if
    given, is a contiguous CPU tensor of w's shape and out_dtype to write into (a reused buffer)."""
    from .lowrank import TINY64, U64
    rows, cols = w.shape
    rank = a.shape[0]
    w16 = w.contiguous().view(torch.int16).numpy().view(np.uint16)
    f64 = factors.to(torch.float64).numpy()
    a64 = a.to(torch.float64).contiguous().numpy()
    b64 = b.to(torch.float64).numpy()
    bs64 = np.ascontiguousarray(b64 * f64)
    # the bound's per-row and per-column parts (lowrank.bound64), zero where no term can be nonzero;
    # numpy, not torch: torch's CPU reductions along a short axis cost more than the merge itself
    live_r = ((b64 != 0) & (f64 != 0)).any(1).astype(np.float64)
    live_c = (a64 != 0).any(0).astype(np.float64)
    coef = 1.01 * (rank + 2) * U64
    na = upper_norms(a64, 0)
    row_w = live_r * coef
    row_n = live_r * coef * upper_norms(bs64, 1)
    col_n = na * live_c
    col_u = (na * (2 * rank ** 0.5) + (rank + 4)) * TINY64 * live_c
    if out is None:
        out = torch.empty(w.shape, dtype=out_dtype)
    out16 = out.view(torch.int16).numpy().view(np.uint16)
    bad = np.zeros(rows, dtype=np.int64)
    undecided = np.zeros(rows, dtype=np.int64)
    g = rounding.GRIDS[out_dtype]
    lo, hi = rounding.QUICK_RANGE[out_dtype]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _merge_rows(w16, lut(w.dtype), a64, bs64, out16, out_dtype == torch.float16, bad,
                undecided, lut(out_dtype), g.inf_bits, g.top_ulp, rounding.overflow_threshold(out_dtype),
                rounding.BOUND_SLACK, row_w, row_n, live_c, col_n, col_u, 52 - g.mbits, lo, hi)
    return out, bad, undecided


def upper_norms(x: np.ndarray, axis: int) -> np.ndarray:
    """lowrank.upper_norms in numpy: 2-norms along `axis` (float64), never below the true ones:
    each slice scaled by a power of two (exact) so that its squares neither underflow nor
    overflow, the result raised to cover the roundings of the sum of squares and the root."""
    from .lowrank import U64
    x = np.abs(x)
    _, ex = np.frexp(x.max(axis, keepdims=True))
    scale = np.ldexp(1.0, np.clip(-ex, -1022, 1000))
    n = np.sqrt(np.square(x * scale).sum(axis)) / np.squeeze(scale, axis)
    return n * (1 + 2 * (x.shape[axis] + 2) * U64)


if numba is not None:

    @numba.njit(parallel=True, cache=True, nogil=True)  # nogil: the reader/writer threads keep going
    def _merge_rows(w, lut, a, bs, out, to_f16, bad, undecided, lut_out, inf_bits, top_ulp, thr, slack,
                    row_w, row_n, col_w, col_n, col_u, drop, lo, hi):
        rows, cols = w.shape
        rank = a.shape[0]
        low_mask = (np.int64(1) << drop) - 1
        half = np.int64(1) << (drop - 1)
        upm = 2.0 ** -53 / slack
        for i in numba.prange(rows):
            # W + delta for one row in a float64 buffer that stays in cache; the k loop streams
            # contiguous rows of A, which vectorizes (a register-blocked variant measured slower)
            acc = np.empty(cols, np.float64)
            for j in range(cols):
                acc[j] = lut[w[i, j]]
            for k in range(rank):
                bk = bs[i, k]
                for j in range(cols):
                    acc[j] += bk * a[k, j]
            # round to odd into float32: truncate toward zero, then mark inexact in the last bit
            # (branch-free so the loops vectorize); then to the output's 16 bits
            f = acc.astype(np.float32)
            bits = f.view(np.uint32)
            nb = 0
            if to_f16:
                for j in range(cols):
                    back = np.float64(f[j])
                    inexact = np.uint32(back != acc[j])
                    away = np.uint32(abs(back) > abs(acc[j]))
                    h = f32_bits_to_f16((bits[j] - (inexact & away)) | inexact)
                    out[i, j] = h
                    nb += (h & 0x7C00) == 0x7C00
            else:
                for j in range(cols):
                    back = np.float64(f[j])
                    inexact = np.uint32(back != acc[j])
                    away = np.uint32(abs(back) > abs(acc[j]))
                    bj = (bits[j] - (inexact & away)) | inexact
                    nan = np.uint32((bj & 0x7FFFFFFF) > 0x7F800000)
                    h = np.uint16(((bj + 0x7FFF + ((bj >> 16) & 1)) >> 16) * (1 - nan) + 0x7FC0 * nan)
                    out[i, j] = h
                    nb += (h & 0x7F80) == 0x7F80
            # The quick test (rounding_kernel.quick_ok, rounding._quick) decides almost every
            # element, vectorized, without table lookups; the exact rule runs on the rest. Its
            # bound: with |W| <= |x| + |x - W| <= |x| + N + bound (N = ||B'_i|| ||A_j||),
            # (c (|x| + 2N) + U) / (1 - c) covers it (the slack covers 1 / (1 - c)).
            accb = acc.view(np.int64)
            rw, rn = row_w[i], row_n[i]
            live = np.float64(rw > 0)
            maybe = np.empty(cols, np.bool_)
            nm = 0
            for j in range(cols):
                x = acc[j]
                e = rw * col_w[j] * abs(x) + 2 * rn * col_n[j] + col_u[j] * live
                ok = quick_ok(x, accb[j] & low_mask, half, upm, e, lo, hi) | ((e == 0.0) & (abs(x) < np.inf))
                maybe[j] = not ok
                nm += not ok
            nu = 0
            if nm:
                for j in range(cols):
                    if maybe[j]:
                        e = (rw * col_w[j] * abs(lut[w[i, j]]) + rn * col_n[j] + col_u[j] * (rw > 0)) * slack
                        nu += exact_undecided(acc[j], out[i, j], e, e == 0.0, lut_out, inf_bits, top_ulp, thr)
            bad[i] = nb
            undecided[i] = nu
