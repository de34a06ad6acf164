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

import os

import numpy as np
import torch

from . import rounding

try:  # numba is optional: without it ops.merge_weight's torch path does the same math
    import numba
except ImportError:  # pragma: no cover - exercised on installs without the `fast` extra
    numba = None

AVAILABLE = numba is not None and not os.environ.get("LORAMERGE_NO_KERNEL")
_HALF = (torch.bfloat16, torch.float16)
_LUTS: dict[torch.dtype, np.ndarray] = {}


def supports(w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    return (AVAILABLE and w.device.type == "cpu" and w.dim() == 2 and w.dtype in _HALF
            and out_dtype in _HALF and w.numel() > 0)


def _lut(dtype: torch.dtype) -> np.ndarray:
    """float64 value of every 16-bit pattern of `dtype`: converting W is one table lookup."""
    if dtype not in _LUTS:
        bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
        _LUTS[dtype] = bits.view(dtype).to(torch.float64).numpy()
    return _LUTS[dtype]


def merge_half(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, factors: torch.Tensor,
               out_dtype: torch.dtype, out: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(result, per-row count of non-finite results, per-row count of undecided elements). Rows
    with undecided elements hold a provisional rounding: the caller must redo them. `out`, if
    given, is a contiguous CPU tensor of w's shape and out_dtype to write into (a reused buffer)."""
    from .lowrank import TINY64, U64, upper_norms
    rows, cols = w.shape
    rank = a.shape[0]
    w16 = w.contiguous().view(torch.int16).numpy().view(np.uint16)
    f64 = factors.to(torch.float64)
    a64 = a.to(torch.float64).contiguous()
    bs64 = (b.to(torch.float64) * f64).contiguous()
    # the bound's per-row and per-column parts (lowrank.bound64), zero where no term can be nonzero
    live_r = ((b != 0) & (f64 != 0)).any(1).to(torch.float64)
    live_c = (a != 0).any(0).to(torch.float64)
    coef = 1.01 * (rank + 2) * U64
    na = upper_norms(a64, 0)
    row_w = (live_r * coef).numpy()
    row_n = (live_r * coef * upper_norms(bs64, 1)).numpy()
    col_n = (na * live_c).numpy()
    col_u = ((na * (2 * rank ** 0.5) + (rank + 4)) * TINY64 * live_c).numpy()
    if out is None:
        out = torch.empty(w.shape, dtype=out_dtype)
    out16 = out.view(torch.int16).numpy().view(np.uint16)
    bad = np.zeros(rows, dtype=np.int64)
    undecided = np.zeros(rows, dtype=np.int64)
    g = rounding.GRIDS[out_dtype]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _merge_rows(w16, _lut(w.dtype), a64.numpy(), bs64.numpy(), out16, out_dtype == torch.float16, bad,
                undecided, _lut(out_dtype), g.inf_bits, g.top_ulp, rounding.overflow_threshold(out_dtype),
                rounding.BOUND_SLACK, row_w, row_n, live_c.numpy(), col_n, col_u)
    return out, bad, undecided


if numba is not None:

    @numba.njit(cache=True, inline="always")
    def _f32_bits_to_f16(bits):
        sign = (bits >> 16) & 0x8000
        e = (bits >> 23) & 0xFF
        m = bits & 0x7FFFFF
        if e == 0xFF:
            return np.uint16(sign | 0x7C00 | (0x200 if m else 0))
        exp = np.int64(e) - 112  # rebias 127 -> 15
        if exp >= 31:
            return np.uint16(sign | 0x7C00)
        if exp <= 0:  # float16 subnormal (or zero)
            if exp < -10:
                return np.uint16(sign)
            m = m | 0x800000
            shift = 14 - exp
            q = m >> shift
            rem = m & ((np.uint32(1) << shift) - 1)
            half = np.uint32(1) << (shift - 1)
            if rem > half or (rem == half and (q & 1)):
                q += 1
            return np.uint16(sign | q)
        q = (np.uint32(exp) << 10) | (m >> 13)
        rem = m & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (q & 1)):
            q += 1  # a carry into the exponent is right, up to Inf
        return np.uint16(sign | q)

    @numba.njit(cache=True, inline="always")
    def _undecided(x, h, e, lut_out, inf_bits, top_ulp, thr):
        """rounding.decide for one element: x the float64 value, h its rounded pattern, e the bound
        (already times BOUND_SLACK). Branch-free selects, so the loop still vectorizes."""
        hm = h & 0x7FFF
        mag = abs(x)
        ya = lut_out[min(hm, inf_bits)]
        top = hm == inf_bits - 1
        gap_up = top_ulp if top else lut_out[min(hm + 1, inf_bits)] - ya
        down = lut_out[max(hm, 1) - 1]
        off = mag - ya
        d_hi = gap_up * 0.5 - off
        d_lo = mag if hm == 0 else (ya - down) * 0.5 + off
        if hm >= inf_bits:  # Inf: decided only if clearly past the overflow threshold
            d_hi = np.inf
            d_lo = mag - thr
        ok = ((d_hi > e) and (d_lo > e)) or e == 0.0
        return not (ok and abs(x) < np.inf)

    @numba.njit(parallel=True, cache=True, nogil=True)  # nogil: the reader/writer threads keep going
    def _merge_rows(w, lut, a, bs, out, to_f16, bad, undecided, lut_out, inf_bits, top_ulp, thr, slack,
                    row_w, row_n, col_w, col_n, col_u):
        rows, cols = w.shape
        rank = a.shape[0]
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
            nu = 0
            rw, rn = row_w[i], row_n[i]
            for j in range(cols):
                back = np.float64(f[j])
                inexact = np.uint32(back != acc[j])
                away = np.uint32(abs(back) > abs(acc[j]))
                bj = (bits[j] - (inexact & away)) | inexact
                if to_f16:
                    h = _f32_bits_to_f16(bj)
                else:
                    nan = np.uint32((bj & 0x7FFFFFFF) > 0x7F800000)
                    h = np.uint16(((bj + 0x7FFF + ((bj >> 16) & 1)) >> 16) * (1 - nan) + 0x7FC0 * nan)
                out[i, j] = h
                nb += (h & inf_bits) == inf_bits
                e = (rw * col_w[j] * abs(lut[w[i, j]]) + rn * col_n[j] + col_u[j] * (rw > 0)) * slack
                nu += _undecided(acc[j], h, e, lut_out, inf_bits, top_ulp, thr)
            bad[i] = nb
            undecided[i] = nu
