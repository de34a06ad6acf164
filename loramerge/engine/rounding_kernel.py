"""rounding.py's rules as numba code: rounding float32/float64 to bfloat16/float16 bits, and
rounding.decide for one element; plus round_decide, both over a whole CPU block in one pass.

On the CPU, torch spends a pass over memory per elementwise operation, and rounding.decide is a
few dozen of them; here the rounding, a quick test that decides almost every element and the
exact rule for the rest run per element, in cache. The fused merge kernel (kernels.py) uses the
per-element functions; lowrank's stages use round_decide on CPU blocks.

torch is imported by round_decide only (it takes and returns tensors): the rest runs in the
premerge worker, a process without torch (engine/premerge_worker.py). Formats are named as in
grids.LAYOUTS ("bfloat16", "float16"); a torch dtype is taken for its name.

Editing this file: numba's cache keys a compiled function on its own file's timestamp only, so the
cached kernels of kernels.py and kernel64.py keep the old code of what they inline from here until
the caches go (`find loramerge -name '*.nb[ic]' -delete`; an install writes every file anew).
"""

from __future__ import annotations

import os

from typing import TYPE_CHECKING

import numpy as np

from . import jit_time
from .grids import BOUND_SLACK, LAYOUTS, OVERFLOW
from .row_threads import on_threads

try:  # numba is a core dependency; LORAMERGE_NO_KERNEL=1 (or no numba) leaves torch to do the same
    import numba
except ImportError:  # pragma: no cover
    numba = None
else:
    jit_time.install()  # the first run after an install compiles the kernels: apply reports it

if TYPE_CHECKING:
    import torch

AVAILABLE = numba is not None and not os.environ.get("LORAMERGE_NO_KERNEL")
_LUTS: dict[str, np.ndarray] = {}
_LUTS32: dict[str, np.ndarray] = {}
_CHUNK = 4096  # elements per task of round_decide


# 16-bit format -> (exponent bits, stored mantissa bits)
_LAYOUT = {"bfloat16": (8, 7), "float16": (5, 10)}


def kind(dtype) -> str:
    """A format's name ("bfloat16", "float16"): a torch dtype's, or the name itself."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def lut(dtype) -> np.ndarray:
    """float64 value of every 16-bit pattern of `dtype`: converting W is one table lookup.

    Built from the bits with integer arithmetic and exact powers of two, never by a float
    conversion: the table is cached for the process, and a conversion made while the thread
    flushes subnormals to zero (torch.set_flush_denormal(True) before the first merge) would store
    every bfloat16 subnormal as 0 for good. Every value here is normal in float64."""
    dtype = kind(dtype)
    if dtype not in _LUTS:
        ebits, mbits = _LAYOUT[dtype]
        bits = np.arange(65536, dtype=np.int64)
        e = (bits >> mbits) & ((1 << ebits) - 1)
        m = bits & ((1 << mbits) - 1)
        bias = (1 << (ebits - 1)) - 1
        # (2^mbits + m) 2^(e - bias - mbits) for a normal pattern, m 2^(1 - bias - mbits) for a
        # subnormal one (e == 0): an integer below 2^11 times a power of two, exact in float64
        mag = np.ldexp(np.where(e > 0, m + (1 << mbits), m).astype(np.float64), np.maximum(e, 1) - bias - mbits)
        top = e == (1 << ebits) - 1
        mag = np.where(top & (m == 0), np.inf, np.where(top, np.nan, mag))
        _LUTS[dtype] = np.where(bits >> 15 == 1, -mag, mag)  # the sign by negation: exact, -0 included
    return _LUTS[dtype]


def lut32(dtype) -> np.ndarray:
    """lut(dtype) in float32 (exact: both formats fit), from the bits as well: a bfloat16 is the
    top half of its float32; every float16 value, subnormals included, is a normal float32, so
    rounding the float64 table cannot flush one."""
    dtype = kind(dtype)
    if dtype not in _LUTS32:
        _LUTS32[dtype] = ((np.arange(65536, dtype=np.uint32) << np.uint32(16)).view(np.float32)
                          if dtype == "bfloat16" else lut(dtype).astype(np.float32))
    return _LUTS32[dtype]


def grid_args(dtype) -> tuple:
    """What the per-element functions need to know of a 16-bit output format: (value table, +Inf
    pattern, spacing below the largest value, overflow threshold, float16?, and for the quick
    test: output mantissa bits, smallest normal, first power of two past the largest value)."""
    dtype = kind(dtype)
    g = LAYOUTS[dtype]
    lo, hi = g.quick
    return (lut(dtype), g.inf_bits, g.top_ulp, OVERFLOW[dtype], dtype == "float16",
            g.mbits, lo, hi)


def round_decide(approx: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype,
                 rel: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """rounding.decide for a contiguous CPU float32/float64 `approx` and a bound of its shape,
    to bfloat16/float16: (y, undecided), the same answers, in one pass."""
    import torch
    y = torch.empty(approx.shape, dtype=dtype)
    und = torch.empty(approx.shape, dtype=torch.bool)
    x = approx.reshape(-1).numpy()
    single = x.dtype == np.float32
    args = (x, x.view(np.uint32 if single else np.uint64), single, bound.reshape(-1).numpy().astype(x.dtype, copy=False),
            rel, BOUND_SLACK, y.view(torch.int16).reshape(-1).numpy().view(np.uint16),
            und.reshape(-1).numpy(), *grid_args(dtype))
    on_threads(_round_decide, args, 0, -(-x.shape[0] // _CHUNK), _CHUNK)
    return y, und


if numba is not None:

    @numba.njit(cache=True)
    def aligned(cols, dtype):
        """An empty row of `cols` elements starting on a 64-byte boundary (a cache line): the
        kernels' scratch rows, taken once per range of rows (row_threads). An unaligned one made
        every 512-bit load and store of the row straddle two lines: a bf16 r=16 merge took 137-138
        ms against 120-124 ms on one thread of the VM."""
        item = np.empty(1, dtype).itemsize
        buf = np.empty(cols + 64 // item, dtype)
        skip = (-(buf.ctypes.data // item)) % (64 // item)
        return buf[skip:skip + cols]

    @numba.njit(cache=True, inline="always")
    def next_flag(flags, words, j):
        """The first index >= j whose flag is set, or len(flags) if none. flags: a bool row padded
        with False to whole 8-byte words (flag_row), words: its uint64 view; a zero word skips 8
        flags at once. The kernels find the few elements a row's fast test left (one or two in
        thousands, in most rows) with it: a test of every flag cost as much as the fast test."""
        n = flags.shape[0]
        while j < n:
            if (j & 7) == 0 and words[j >> 3] == 0:
                j += 8
            elif flags[j]:
                return j
            else:
                j += 1
        return n

    @numba.njit(cache=True)
    def flag_row(cols):
        """A row of `cols` flags for next_flag, all False, padded with False to whole words."""
        return np.zeros(-(-cols // 8) * 8, np.bool_)

    @numba.njit(cache=True, inline="always")
    def f32_bits_to_f16(bits):
        """float32 bits -> float16 bits, rounded to nearest even (subnormals, Inf, NaN included).
        Branch-free (every case computed, one selected), so the loops calling it vectorize; the
        same bits as a branching version for all 2^32 inputs (checked once, exhaustively)."""
        u = np.uint32
        bits = u(bits)
        sign = u((bits >> u(16)) & u(0x8000))
        a = u(bits & u(0x7FFFFFFF))
        # float16's normal range: rebias the exponent (127 -> 15, i.e. minus 112 << 23), round to
        # nearest even on the 13 dropped bits; a carry into the exponent is right, up to Inf
        normal = u(u(u(a - u(0x38000000)) + u(u(0xFFF) + u((a >> u(13)) & u(1)))) >> u(13))
        # below 2^-14 (float16 subnormals and zero): the significand with its leading 1 shifted
        # right by 126 - e, to nearest even; 25 places drop it all (the shift is capped there:
        # an integer shift past its width is undefined)
        # Every step is cast back to 32 bits: numba computes (u)int32 arithmetic in 64 bits, and
        # a loop over 64-bit lanes runs at half the vector width; the values all fit in 32.
        e = np.int32(a >> u(23))
        m = u(u(a & u(0x7FFFFF)) | u(0x800000))
        shift = u(min(max(np.int32(np.int32(126) - e), np.int32(14)), np.int32(25)))
        q = u(m >> shift)
        rem = u(m & u(u(u(1) << shift) - u(1)))
        half = u(u(1) << u(shift - u(1)))
        sub = u(q + u((rem > half) | ((rem == half) & (u(q & u(1)) == u(1)))))
        h = u(0x7E00) if a > u(0x7F800000) else (          # NaN (quiet)
            u(0x7C00) if a >= u(0x47800000) else (         # 2^16 and up: Inf
                normal if a >= u(0x38800000) else sub))
        return np.uint16(sign | h)

    @numba.njit(cache=True, inline="always")
    def f32_bits_to_half(bits, to_f16):
        """float32 bits -> bfloat16 or float16 bits, rounded to nearest even."""
        if to_f16:
            return f32_bits_to_f16(bits)
        # uint32 operands only (numba still types the sum uint64, but LLVM narrows it to 32-bit
        # lanes; with a Python int it computed in int64 lanes, and the loops calling this ran at
        # half the vector width). Only a NaN's pattern can pass 2^32 in the sum (the largest other
        # is -Inf's, 0xFF800000), and a NaN's sum is not used.
        b = np.uint32(bits)
        r = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        return np.uint16(np.uint32(0x7FC0) if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r)

    @numba.njit(cache=True, inline="always")
    def odd_f32_bits(x, f, fbits):
        """The float32 bits of float64 x rounded to odd (truncate, then set the last bit if anything
        was lost), given f = float32(x) (to nearest) and its bits: rounding that to bfloat16 or
        float16 is the correct rounding of x (Boldo & Melquiond). Branch-free."""
        back = np.float64(f)
        inexact = np.uint32(back != x)
        away = np.uint32(abs(back) > abs(x))
        return (fbits - (inexact & away)) | inexact

    @numba.njit(cache=True, inline="always")
    def exact_undecided(x, h, e, exact, lut_out, inf_bits, top_ulp, thr):
        """rounding.decide's exact rule for one element: x the float64 value, h its rounded pattern,
        e the bound (already times BOUND_SLACK), exact whether x is the value itself."""
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
        ok = ((d_hi > e) and (d_lo > e)) or exact
        return not (ok and abs(x) < np.inf)

    @numba.njit(cache=True, inline="always")
    def quick_ok(x, low, half, ulp_per_mag, e, lo, hi):
        """rounding._quick for one element (x's dropped bits `low`, `half` their midpoint value,
        ulp_per_mag = 2^-(m+1) / BOUND_SLACK for x's m mantissa bits; e without the slack):
        whether the distance to the nearest boundary provably exceeds e. Branch-free."""
        dist = np.float64(min(abs(low - half), low + (half >> 1)))
        mag = abs(x)
        return (dist * ulp_per_mag * mag > e) & (mag >= lo) & (mag < hi)

    @numba.njit(cache=True, nogil=True)  # nogil: the other chunks' threads (row_threads) run meanwhile
    def _round_decide(x, xbits, single, e, rel, slack, out, und, lut_out, inf_bits, top_ulp, thr, to_f16, mbits,
                      lo, hi, c0, c1):
        """Chunks c0..c1 of _CHUNK elements (one thread's share)."""
        n = x.shape[0]
        chunk = _CHUNK
        mb = 23 if single else 52
        drop = mb - mbits
        half = np.int64(1) << (drop - 1)
        low_mask = (np.int64(1) << drop) - 1
        upm = 2.0 ** -(mb + 1) / slack
        for c in range(c0, c1):
            s0 = c * chunk
            s1 = min(n, s0 + chunk)
            xs = x[s0:s1]
            f = xs.astype(np.float32)
            fb = f.view(np.uint32)
            xb = xbits[s0:s1]
            for j in range(s1 - s0):
                xj = np.float64(xs[j])
                bits = fb[j] if single else odd_f32_bits(xj, f[j], fb[j])
                h = f32_bits_to_half(bits, to_f16)
                out[s0 + j] = h
                ej = e[s0 + j] + rel * abs(xj)
                exact = (e[s0 + j] == 0.0) & ((rel == 0.0) | (xj == 0.0)) & (abs(xj) < np.inf)
                ok = quick_ok(xj, np.int64(xb[j]) & low_mask, half, upm, ej, lo, hi) | exact
                und[s0 + j] = not ok
            for j in range(s1 - s0):
                if und[s0 + j]:  # the exact rule (exact bounds were decided above)
                    xj = np.float64(xs[j])
                    und[s0 + j] = exact_undecided(xj, out[s0 + j], (e[s0 + j] + rel * abs(xj)) * slack, False,
                                                  lut_out, inf_bits, top_ulp, thr)
