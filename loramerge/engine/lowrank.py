"""The torch implementation of the low-rank merge: GPU, and CPU where the fused kernel does not apply.

    S = W + sum_k f_k B[:, k] A[k, :]        (W, B, A as stored; f_k the float64 factor, e.g. c*s)

is evaluated in stages, each with a proven per-element error bound; rounding.decide keeps what a
stage settles and hands the rest on:

1. float32 (--accum float32, bf16/fp16 outputs): D = (B f)_32 @ A_32 by one GEMM, then
   r = fl32(W + D). W is added outside the GEMM, so it is rounded once whatever order or K-blocking
   the GEMM uses (cuBLAS, MKL, OpenBLAS alike). Bound (Higham, Accuracy and Stability of Numerical
   Algorithms, 2nd ed., eq. 3.5, plus an underflow term):
       |r - S| <= u|r| + (R+3) u E + 2^-126 (2R + 4 + sum_k |A_kj| + sum_k |B'_ik|)  (times slack)
   u = 2^-24, E = |B'| @ |A|, B' = (B f)_32: the products, the rounding of B f and of a float64
   A to float32 (R+3), and what underflow loses, outside Higham's model: a product or partial sum
   below float32's normal range, or a subnormal factor, is off by less than 2^-126 even where the
   GEMM flushes subnormals to zero (FTZ/DAZ; with gradual underflow 2^-150 would do).
2. float64 (--accum float64, float32/float64 outputs, float64 bases, and what stage 1 leaves):
       |acc - S| <= (R+2) u64 (|W| + ||B'_i|| ||A_j||) + 2^-1074 (R + 4 + 2 sqrt(R) ||A_j||)
   u64 = 2^-53, any summation order (W inside the GEMM is fine here: |W| is in the bound), the
   norms (Cauchy-Schwarz) bounding sum_k |B'_ik A_kj| at O(1) per element; the last term is
   gradual underflow's (products, and B f rounded, each off by at most 2^-1075; float64 is never
   flushed: CUDA's flush-to-zero is for float32 only).
3. exact (exact.round_elements), for what float64 cannot decide.
Elements whose terms are all exactly zero get a zero bound: the float sum is then W itself.
"""

from __future__ import annotations

import math

import torch

from . import exact, rounding
from .grids import TINY32, TINY64, U32, U64  # noqa: F401  (re-exported: the bounds' constants)
# Stage 1 is used up to this rank: the bound's slack (1.25) covers gamma_R = Ru/(1 - Ru) and the
# rounding of E below it.
MAX_RANK_F32 = 1 << 20
# If more than this share of a block is left to float64, redo the whole block in float64: a dense
# GEMM is cheaper than gathering.
DENSE_REDO = 0.02


def merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, out_dtype: torch.dtype,
          accum: torch.dtype, block_elems: int) -> tuple[torch.Tensor, int]:
    """(W + (B f) @ A correctly rounded to out_dtype, elements that needed float64 or exact
    arithmetic). bf16/fp16 outputs are always correctly rounded; float32 outputs with accum float64;
    float32 outputs with accum float32 carry stage 1's bound; float64 outputs stage 2's."""
    rows, cols = w.shape
    step = max(1, block_elems // max(cols, 1))
    out = torch.empty((rows, cols), dtype=out_dtype, device=w.device)
    ctx = _Factors(a, b, f.to(device=w.device, dtype=torch.float64))
    first32 = (accum == torch.float32 and w.dtype != torch.float64 and out_dtype != torch.float64
               and a.shape[0] < MAX_RANK_F32)
    fixed = 0
    for i in range(0, rows, step):
        rs = slice(i, min(rows, i + step))
        if first32:
            y, n = _stage32(w[rs], ctx, rs, out_dtype)
            # a block that stage 1 mostly could not decide predicts the next: they start at float64,
            # one GEMM instead of three. Measured (bench_rounding.py --rates): stage 1 leaves 1.5e-4
            # for bf16 r=16 with a 1% delta, 0.18 for fp16 r=256 with a 10% delta
            first32 = n <= DENSE_REDO * y.numel()
        else:
            y, n = _stage64(w[rs], ctx, rs, out_dtype)
        out[rs] = y
        fixed += n
    return out, fixed


def merge_rows64(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Stages 2 and 3 for a few whole rows (the fused kernel's undecided rows)."""
    return _stage64(w, _Factors(a, b, f.to(device=w.device, dtype=torch.float64)), slice(None), out_dtype)


class _Factors:
    """The factors in the forms the stages use, each made once per tensor and only if needed."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, f64: torch.Tensor):
        self.a, self.b, self.f = a, b, f64
        self.rank = a.shape[0]
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = getattr(self, "_" + name)()
        return self._cache[name]

    def _a64(self):
        return self.a.to(torch.float64)

    def _bs64(self):  # B' = B f in float64
        return self.b.to(torch.float64) * self.f

    def _a32(self):
        return self.a.to(torch.float32)

    def _bs32(self):
        return self.get("bs64").to(torch.float32)

    def _abs_a32(self):
        return self.get("a32").abs()

    def _abs_bs32(self):
        return self.get("bs32").abs()

    def _col_abs32(self):  # sum_k |A_kj| per column, [1, cols]
        return self.get("abs_a32").sum(0, keepdim=True)

    def _row_abs32(self):  # sum_k |B'_ik| per row, [rows, 1]
        return self.get("abs_bs32").sum(1, keepdim=True)

    def _na(self):  # ||A_:j||, [1, cols]
        return upper_norms(self.get("a64"), 0).unsqueeze(0)

    def _nb(self):  # ||B'_i:||, [rows, 1]
        return upper_norms(self.get("bs64"), 1).unsqueeze(1)

    def _live_rows(self):  # some k with B_ik f_k != 0 exactly, [rows, 1]
        return ((self.b != 0) & (self.f != 0)).any(1, keepdim=True)

    def _live_cols(self):  # some k with A_kj != 0, [1, cols]
        return (self.a != 0).any(0, keepdim=True)


def _stage32(w: torch.Tensor, fx: _Factors, rs: slice, out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    bs32, a32 = fx.get("bs32")[rs], fx.get("a32")
    r = torch.mm(bs32, a32).add_(w)  # W outside the GEMM: one rounding of W + D
    if out_dtype == torch.float32:
        return r, 0  # --accum float32 to a float32 output: stage 1's bound, no decision
    e = bound32(torch.mm(fx.get("abs_bs32")[rs], fx.get("abs_a32")), fx.rank,
                fx.get("col_abs32"), fx.get("row_abs32")[rs], fx.get("live_rows")[rs], fx.get("live_cols"))
    y, und = _decide(r, e, out_dtype, rel=U32 * (1 + 2.0 ** -20))  # + u|r|
    del r, e
    n = int(und.sum())
    if n == 0:
        return y, 0
    if n > DENSE_REDO * und.numel():
        y64, _ = _stage64(w, fx, rs, out_dtype)
        return torch.where(und, y64, y), n
    ri, cj = und.nonzero(as_tuple=True)
    y[ri, cj] = _gathered64(w[ri, cj], fx, ri + (rs.start or 0), cj, out_dtype)
    return y, n


def _stage64(w: torch.Tensor, fx: _Factors, rs: slice, out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    acc = torch.addmm(w.to(torch.float64), fx.get("bs64")[rs], fx.get("a64"))
    if out_dtype == torch.float64:
        return acc, 0
    e = bound64(w.abs(), fx.get("nb")[rs], fx.get("na"), fx.rank, fx.get("live_rows")[rs] & fx.get("live_cols"))
    y, und = _decide(acc, e, out_dtype)
    n = int(und.sum())
    if n:
        ri, cj = und.nonzero(as_tuple=True)
        y[ri, cj] = exact.round_elements(w[ri, cj], fx.b[rs][ri], fx.a[:, cj].T, fx.f, out_dtype)
    return y, n


def _gathered64(wv: torch.Tensor, fx: _Factors, ri: torch.Tensor, cj: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """Stage 2 (and 3) for scattered elements (ri, cj) of the whole tensor."""
    acc = wv.to(torch.float64) + (fx.get("bs64")[ri] * fx.get("a64")[:, cj].T).sum(dim=1)
    live = fx.get("live_rows")[ri, 0] & fx.get("live_cols")[0, cj]
    e = bound64(wv.abs(), fx.get("nb")[ri, 0], fx.get("na")[0, cj], fx.rank, live)
    y, und = _decide(acc, e, out_dtype)
    if bool(und.any()):
        k = und.nonzero(as_tuple=True)[0]
        y[k] = exact.round_elements(wv[k], fx.b[ri[k]], fx.a[:, cj[k]].T, fx.f, out_dtype)
    return y


def _decide(approx: torch.Tensor, e: torch.Tensor, out_dtype: torch.dtype,
            rel: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """rounding.decide; on the CPU to bf16/fp16 its numba twin (one pass instead of a few dozen).
    numba is imported here, on the first such call, not with the engine."""
    if approx.device.type == "cpu" and out_dtype in (torch.bfloat16, torch.float16):
        from . import rounding_kernel
        if rounding_kernel.AVAILABLE:
            return rounding_kernel.round_decide(approx.contiguous(), e.expand_as(approx).contiguous(), out_dtype,
                                                rel)
    return rounding.decide(approx, e, out_dtype, rel)


def bound32(e_abs: torch.Tensor, rank: int, col_abs: torch.Tensor, row_abs: torch.Tensor,
            live_rows: torch.Tensor, live_cols: torch.Tensor) -> torch.Tensor:
    """Stage 1's bound on |r - S| (see the module docstring) without its u|r| term, which
    rounding.decide adds (rel=u): float32, in place on e_abs = |B'| @ |A|. Exactly zero where the
    row and the column are both dead (every term exactly zero): E is zero there, and the underflow
    term is masked per row and per column (masking per element would cost passes over the block
    for what a nonzero bound costs nothing: the elements of a dead row or column are W itself)."""
    e = e_abs.mul_(1.25 * (rank + 3) * U32)
    # underflow; +4 covers the roundings (and underflow) of computing the bound itself
    e.add_(col_abs.mul(1.25 * TINY32).mul_(live_cols))
    return e.add_(row_abs.add(2 * rank + 4).mul_(1.25 * TINY32).mul_(live_rows))


def bound64(w_abs: torch.Tensor, nb: torch.Tensor, na: torch.Tensor, rank: int,
            live: torch.Tensor) -> torch.Tensor:
    """Stage 2's bound on |acc - S| (see the module docstring), float64."""
    e = (nb * na).add_(w_abs.to(torch.float64)).mul_(1.01 * (rank + 2) * U64)
    e.add_(na.mul(2 * math.sqrt(rank)).add_(rank + 4).mul_(TINY64))
    return e.masked_fill_(~live, 0.0)


def upper_norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    """2-norms of x along `dim` in float64, never below the true ones: each slice is scaled by a
    power of two (exact) so its squares neither underflow nor overflow, and the result is raised
    to cover the rounding of the sum of squares and the square root."""
    x = x.to(torch.float64).abs()
    top = x.amax(dim, keepdim=True)
    _, ex = torch.frexp(top)
    scale = _pow2((-ex).clamp(-1022, 1000))
    n = torch.linalg.vector_norm(x * scale, dim=dim) / scale.squeeze(dim)
    return n * (1 + 2 * (x.shape[dim] + 2) * U64)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2.0 ** k exactly, for integer k in [-1022, 1023], float64."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
