"""verify's comparison of a merged half-precision tensor with its expected value, decided in
float32 under a proven error bound; float64 only where the bound cannot decide. Pure math: tensors
in, a Tally out (verify's rule 1 and the delta-fidelity sums; check.py states the rule).

Setting, in the tensor's stored 2-D view (rows = its first axis): W [rows, cols] the start
(bfloat16, float16 or float32: exact in float32), M [rows, cols] the merged tensor (bfloat16 or
float16), and the expected value E = W + P @ Q, with P [rows, R] and Q [R, cols] the float64
factors of the recipe's low-rank effects (their scale folded into P). The rule, per element:
    ulps = |M - round(E)| / ulp(max(|E|, |W|, S)),   S = |P| @ |Q|,   bad when ulps > HALF_TOL_ULPS.

The float32 decision. r = fl32(W + P32 @ Q32), P32/Q32 the factors rounded to float32, by any
GEMM (any summation order, with or without FMA; never TF32). With u = 2^-24 and R + 1 <= 2^20:
    |r - E| <= gamma_{R+1} (|W| + sum_k |P32 Q32|) + 2.01 u sum_k |P Q|          (Higham eq. 3.5;
                                                                                 the factor roundings)
            <= (R + 4) u (1 + 2^-10) (|W| + nb_i na_j) + (R + 2) 2^-126 =: b
nb_i = ||P_i||_2 and na_j = ||Q_:j||_2 (Cauchy-Schwarz bounds sum_k |P_ik Q_kj| by their product;
both rounded up to float32), the last term the absolute error of products and partial sums that
underflow, even on hardware that flushes subnormals to zero (factors with values below float32's
normal range are not taken down this path). Then with
    b' = 1.001 b + 2^-22 |r| + 2^-124,   lo = fl32(r - b'),   hi = fl32(r + b'):
lo <= E <= hi (b' - b covers the rounding of b itself, of b' and of r -/+ b'). Rounding to the
output dtype is monotone, so round(lo) == round(hi) proves round(E) is that value. If M holds
exactly those bits, the element is 0 ulps off: decided without float64 (what almost every element
of a correct merge is: the bound leaves about (R + 4) 2^-16 of them near a midpoint in bfloat16).
Every other element (undecided, non-finite, or M different: a wrong value, or a 1-ulp double
rounding) goes through the float64 rule above, the numbers verify always computed.

Statistics (delta fidelity, max rel err) take r for decided elements and the float64 value
elsewhere: |r - E| <= b is ~1e-6 of |W|, so they are accurate to ~1e-6 relative, summed in float64.

Two implementations of the same decision: torch (any device; what a GPU runs) and a fused numba
kernel for the CPU (compare_kernel.py: one pass over W and M, like apply's kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine import precision
from ..engine.ops import BLOCK_ELEMS_CPU, BLOCK_ELEMS_GPU, round_to
from ..types import ST_TO_TORCH
from . import compare_kernel
from .report import _GRID, HALF_CODES, HALF_TOL_ULPS

U = 2.0 ** -24
TINY = 2.0 ** -126          # float32's smallest normal: factor values below it take the float64 path
# If more than this share of a block is undecided (a wrong merge), evaluate the block densely.
_DENSE = 0.02


@dataclass
class Tally:
    """What rule 1 found over one tensor."""

    bad: int = 0                # elements beyond the tolerance
    max_ulps: float = 0.0
    worst: tuple[int, int] = (0, 0)   # (row, col) of the first element with max_ulps, linear orientation
    sq_err: float = 0.0         # sum (M - E)^2
    sq_delta: float = 0.0       # sum (E - W)^2
    dot: float = 0.0            # sum (M - W)(E - W)
    max_err: float = 0.0        # max |M - E|
    max_e: float = 0.0          # max |E|
    redone: int = 0             # elements evaluated in float64


def ulp(mag: torch.Tensor, code: str) -> torch.Tensor:
    """Spacing of `code`'s grid at magnitude `mag` (float64), subnormals included."""
    p, emin = _GRID[code]
    _, e = torch.frexp(mag)  # mag = f * 2^e with f in [0.5, 1): the binade exponent is e - 1
    e = torch.where(mag > 0, e - 1, emin).clamp_min(emin)
    return torch.ldexp(torch.ones_like(mag), e - (p - 1))


def off(m64: torch.Tensor, ref64: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """|M - ref| (divided by `scale`): 0 where M is ref (an infinity where one is due, a NaN where
    the expected value is NaN: a base with a NaN), infinite where only one of them is NaN. A NaN
    distance compares false with every tolerance, so taken as is, a NaN in a merged tensor passed
    for right (and the worst element could not be found)."""
    d = (m64 - ref64).abs()
    if scale is not None:
        d = d / scale
    same = (m64 == ref64) | (torch.isnan(m64) & torch.isnan(ref64))
    d = torch.where(same, torch.zeros_like(d), d)
    return torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)


def element_ulps(m64: torch.Tensor, e64: torch.Tensor, w64: torch.Tensor, s64: torch.Tensor, code: str) -> torch.Tensor:
    """The float64 rule for half precision: |M - round(E)| / ulp(max(|E|, |W|, S)) (off)."""
    mag = torch.maximum(torch.maximum(e64.abs(), w64.abs()), s64)
    return off(m64, round_to(e64, ST_TO_TORCH[code]).to(torch.float64), ulp(mag, code))


def eligible(code: str, start: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether compare() may decide this tensor: a half-precision output, a start exact in float32,
    factors with no value float32 would hold as a subnormal."""
    if code not in HALF_CODES or start.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return not any(bool(((x != 0) & (x.abs() < TINY)).any()) for x in (p, q) if x.numel())


def compare(w2: torch.Tensor, m2: torch.Tensor, p: torch.Tensor, q: torch.Tensor, code: str,
            transposed: bool, dev: torch.device) -> Tally:
    """Rule 1 over the stored 2-D views w2, m2 (on the CPU) with E = w2 + p @ q (float64 factors,
    stored orientation). `transposed`: the linear orientation is the transpose (worst element and
    ties are reported in its order, as the float64 path does)."""
    if dev.type == "cpu" and compare_kernel.supports(w2, m2):
        p, q = p.cpu(), q.cpu()
        got = compare_kernel.compare(w2, m2, p, q, *_norms(p, q), code, transposed, margins(p.shape[1]),
                                     HALF_TOL_ULPS)
        return Tally(*got)
    return _compare_torch(w2, m2, p.to(dev), q.to(dev), code, transposed, dev)


def _norms(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms of P and column norms of Q, rounded up to float32."""
    up = 1 + 2.0 ** -20
    nb = torch.linalg.vector_norm(p, dim=1).to(torch.float32) * up
    na = torch.linalg.vector_norm(q, dim=0).to(torch.float32) * up
    return nb, na


def margins(rank: int) -> tuple[float, float, float]:
    """(c, eta, rel) with b' = c (|W| + nb na) + eta + rel |r|: the module docstring's bound
    b = (R + 4) u (1 + 2^-10) (|W| + nb na) + (R + 2) 2^-126, and b' = 1.001 b + 2^-22 |r| + 2^-124."""
    c, eta = (rank + 4) * U * (1 + 2.0 ** -10), (rank + 2) * 2.0 ** -126
    return c * 1.001, eta * 1.001 + 2.0 ** -124, 2.0 ** -22


def _compare_torch(w2, m2, p, q, code, transposed, dev) -> Tally:
    rows, cols = w2.shape
    out_dtype = ST_TO_TORCH[code]
    p32, q32 = p.to(torch.float32), q.to(torch.float32)
    nb, na = _norms(p, q)
    c, eta, rel = margins(p.shape[1])
    # TF32 (or oneDNN bf16) still in force - TORCH_ALLOW_TF32_CUBLAS_OVERRIDE, or a caller outside
    # engine.precision.exact_matmul(): the float32 GEMM cannot be trusted, so D is computed in
    # float64 and rounded to float32 (still within b)
    f64_gemm = not precision.float32_gemm_exact(dev)
    step = max(1, (BLOCK_ELEMS_GPU if dev.type == "cuda" else BLOCK_ELEMS_CPU) // max(cols, 1))
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    sq_err, sq_delta, dot, max_err, max_e = zero, zero, zero, zero, zero
    cands, bad, redone = [], torch.zeros((), dtype=torch.int64, device=dev), 0
    w_dev, m_dev = w2.to(dev, non_blocking=True), m2.to(dev, non_blocking=True)
    for i in range(0, rows, step):
        sl = slice(i, min(i + step, rows))
        wb, mb = w_dev[sl], m_dev[sl]
        wf = wb.to(torch.float32)
        # D = P @ Q first, then r = W + D (a summation order the bound covers); D feeds the statistics
        d = (p[sl] @ q).to(torch.float32) if f64_gemm else p32[sl] @ q32
        r = d + wf
        b = torch.addr(wf.abs(), nb[sl], na).mul_(c).add_(eta).add_(r.abs().mul_(rel))
        lo, hi = (r - b).to(out_dtype).view(torch.int16), (r + b).to(out_dtype).view(torch.int16)
        # (a bound that is no number decides nothing: a NaN lo and hi convert to one NaN pattern,
        # which a merged NaN of that pattern would match)
        ok = (lo == hi).logical_and_(lo == mb.view(torch.int16)).logical_and_(torch.isfinite(r))
        ok.logical_and_(torch.isfinite(b))
        w64, m64 = wb.to(torch.float64), mb.to(torch.float64)
        delta = d.to(torch.float64)
        e = w64 + delta
        ri, cj = (~ok).nonzero(as_tuple=True)
        n = ri.numel()
        if n:
            redone += n
            if n > _DENSE * ok.numel():
                e = torch.addmm(w64, p[sl], q)
                delta = e - w64
                ulps = element_ulps(m64, e, w64, p[sl].abs() @ q.abs(), code)
                ri, cj = torch.meshgrid(torch.arange(ulps.shape[0], device=dev), torch.arange(cols, device=dev),
                                        indexing="ij")
                ri, cj, ulps = ri.reshape(-1), cj.reshape(-1), ulps.reshape(-1)
            else:
                pr, qc = p[sl][ri], q[:, cj].T
                e[ri, cj] = w64[ri, cj] + (pr * qc).sum(dim=1)
                delta[ri, cj] = e[ri, cj] - w64[ri, cj]
                ulps = element_ulps(m64[ri, cj], e[ri, cj], w64[ri, cj], (pr.abs() * qc.abs()).sum(dim=1), code)
            bad += (ulps > HALF_TOL_ULPS).sum()
            top = ulps.max()
            gi = ri + i
            key = cj * rows + gi if transposed else gi * cols + cj   # position in linear row-major order
            cands.append(torch.stack([top, key[ulps == top].min().to(torch.float64)]))
        moved = m64 - w64   # exact
        diff = moved - delta
        sq_err = sq_err + diff.square().sum()
        sq_delta = sq_delta + delta.square().sum()
        dot = dot + (moved * delta).sum()
        max_err = torch.maximum(max_err, off(m64, e).max())
        max_e = torch.maximum(max_e, e.abs().max())
    s = torch.stack([sq_err, sq_delta, dot, max_err, max_e]).tolist()  # one device sync per tensor
    t = Tally(bad=int(bad), sq_err=s[0], sq_delta=s[1], dot=s[2], max_err=s[3], max_e=s[4], redone=redone)
    key = 0
    if cands:
        best = torch.stack(cands).cpu()
        t.max_ulps = float(best[:, 0].max())
        if t.max_ulps > 0:
            key = int(best[best[:, 0] == t.max_ulps, 1].min())
    lin_cols = rows if transposed else cols
    t.worst = divmod(key, lin_cols)
    return t


def expected_at(w2: torch.Tensor, p: torch.Tensor, q: torch.Tensor, i: int, j: int) -> float:
    """E at one element of the stored view, in float64 (for the report's worst element)."""
    return float(w2[i, j].to(torch.float64) + p[i].cpu() @ q[:, j].cpu())
