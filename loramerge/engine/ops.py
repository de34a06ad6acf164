"""Pure tensor math for merging. No file I/O, no formats: tensors in, tensors out.

The numerics contract: the merged value is W + sum_k f_k * B[:, k] * A[k, :] (f_k = c_i * s_i for the
adapter that rank column k came from), computed in float32 and rounded ONCE to the output dtype.

For half-precision outputs we go one step further and return the CORRECTLY ROUNDED value of the
exact result (as if computed in float64 and rounded once), at nearly float32 speed:

* the float32 result r carries an error bounded per element by
      |r - exact| <= 2u|r| + (R + 3) u (|B'| @ |A|)_ij       (u = 2^-24, R = total rank)
  (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5; any summation order).
* rounding r to bfloat16/float16 gives the correct answer unless r lies within that bound of a
  rounding midpoint of the output grid. Those elements are found from r's low mantissa bits and
  recomputed in float64, then rounded correctly (via round-to-odd to float32; torch's own
  float64 -> bfloat16 conversion rounds twice). In practice ~1e-5 of elements take that path.
"""

from __future__ import annotations

import torch

# Output dtype -> (mask of the float32 mantissa bits the conversion drops, midpoint value of those
# bits, smallest normal magnitude of the output dtype: below it the grid changes, so we recompute).
_DROPPED_BITS = {
    torch.bfloat16: (0xFFFF, 0x8000, 2.0 ** -126),
    torch.float16: (0x1FFF, 0x1000, 2.0 ** -14),
}
# Elements per row block: bounds the float32 temporaries (16 MiB on CPU, more on GPU where
# launches, not memory, are the cost).
BLOCK_ELEMS_CPU = 1 << 22
BLOCK_ELEMS_GPU = 1 << 26
# If more than this fraction of a block is ambiguous (e.g. W is all zeros), recompute the whole
# block in float64: cheaper than gathering.
_DENSE_FIXUP = 0.02


class NonFinite(ValueError):
    """Raised with (count, first_index, example value) when a merged result is not finite."""


def round_to(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correctly round a float64 tensor to `dtype` (round to nearest, ties to even)."""
    if dtype == torch.float64:
        return x64
    if dtype == torch.float32:
        return x64.to(torch.float32)
    return _round_to_odd_f32(x64).to(dtype)


def _round_to_odd_f32(x64: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding to odd: truncate, then set the last bit if anything was lost.
    Rounding that result to any format with at least 2 fewer mantissa bits is then correct
    (Boldo & Melquiond, 'When double rounding is odd', 2005)."""
    f = x64.to(torch.float32)
    back = f.to(torch.float64)
    inexact = back != x64
    away = back.abs() > x64.abs()
    f = torch.where(inexact & away, torch.nextafter(f, torch.zeros_like(f)), f)
    bits = f.view(torch.int32) | inexact.to(torch.int32)
    return bits.view(torch.float32)


def cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a base tensor with one correct rounding (torch converts half<->half via float32, which
    is exact, then rounds once; from float64 to half we must avoid its double rounding)."""
    if w.dtype == torch.float64 and dtype in _DROPPED_BITS:
        return round_to(w, dtype)
    return w.to(dtype)


def merge_weight(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    factors: torch.Tensor,
    out_dtype: torch.dtype,
    accum: torch.dtype = torch.float32,
    block_elems: int | None = None,
    out: torch.Tensor | None = None,
    check: bool = False,
) -> tuple[torch.Tensor, int]:
    """Return (W + (B * factors) @ A rounded once to out_dtype, number of elements recomputed in
    float64). Shapes: w [out, in], a [R, in], b [out, R], factors [R] (float64). All on one device.
    `out` (CPU only) is a buffer the fused kernel may write into; the result may or may not be it.
    check=True raises NonFinite for a non-finite result (the fused kernel counts them as it writes,
    sparing a pass over the output).

    On CUDA the error bound behind the exact rounding assumes true float32 products, so TF32
    matmuls must be off (torch's default; engine.run switches them off for the whole run, since the
    flag is process-global and cannot be toggled safely per call from several threads)."""
    y, fixed, bad = _merge_weight(w, a, b, factors, out_dtype, accum, block_elems,
                                  out if w.device.type == "cpu" else None)
    if check and bad != 0:  # bad is None when unknown (torch path): check the output
        check_finite(y)
    return y, fixed


def _merge_weight(w, a, b, factors, out_dtype, accum, block_elems, out):
    if torch.float64 in (w.dtype, out_dtype):
        accum = torch.float64  # float32 math would round a float64 base before the add
    if (accum == torch.float32 and block_elems is None and w.device.type == "cpu"
            and w.dtype in _DROPPED_BITS and out_dtype in _DROPPED_BITS):
        # numba is imported here, on the first CPU half-precision merge, not with the engine: a GPU
        # run or a float32 merge never pays for it
        from . import kernels
        if kernels.supports(w, out_dtype):
            # fused CPU kernel (numba): float64 accumulation, the same correctly rounded result
            y, bad = kernels.merge_half(w, a, b, factors, out_dtype, out=out)
            return y, 0, bad
    rows, cols = w.shape
    if block_elems is None:
        block_elems = BLOCK_ELEMS_GPU if w.device.type == "cuda" else BLOCK_ELEMS_CPU
    step = max(1, block_elems // max(cols, 1))
    out = torch.empty((rows, cols), dtype=out_dtype, device=w.device)
    f64 = factors.to(device=w.device, dtype=torch.float64)
    b64s = None  # float64 copy of B with factors, built only if some element needs it

    if accum == torch.float64:
        a64 = a.to(torch.float64)
        b64s = b.to(torch.float64) * f64
        for i in range(0, rows, step):
            r = torch.addmm(w[i:i + step].to(torch.float64), b64s[i:i + step], a64)
            out[i:i + step] = round_to(r, out_dtype)
        return out, 0, None

    a32 = a.to(torch.float32)
    # Fold the factors into B once: one extra rounding per element of B, covered by the bound.
    bs32 = (b.to(torch.float64) * f64).to(torch.float32)
    dropped = _DROPPED_BITS.get(out_dtype)
    if dropped is not None:
        # Bound coefficient: (R + 3) u covers the dot product (R terms), folding the factors into B
        # and a float64 adapter's rounding to float32; x1.25 covers the rounding of the bound itself.
        slack = 1.25 * (a.shape[0] + 3)
        abs_a, abs_b = a32.abs(), bs32.abs()
    fixed = 0
    for i in range(0, rows, step):
        wb = w[i:i + step]
        if out_dtype == torch.float32:
            torch.addmm(wb.to(torch.float32), bs32[i:i + step], a32, out=out[i:i + step])
            continue
        r = torch.addmm(wb.to(torch.float32), bs32[i:i + step], a32)
        y = r.to(out_dtype)
        if dropped is not None:
            mask, mid, tiny = dropped
            # |r - exact| <= 2u|r| + (R+3)u E_ij with E = |B'| @ |A|. Rounding r is correct when r is
            # farther than that from the output grid's midpoint. r's distance to the midpoint is
            # dist * ulp32(r) with dist read off the dropped mantissa bits, and ulp32(r) > u|r|, so
            # (dist - 4) |r| > slack * E_ij proves the rounding right (comparing in units of u).
            dist = ((r.view(torch.int32) & mask) - mid).abs_().to(torch.float32)
            rabs = r.abs_()
            bound = torch.mm(abs_b[i:i + step], abs_a).mul_(slack)
            flag = dist.sub_(4.0).mul_(rabs) <= bound
            flag |= rabs < tiny
            n = int(flag.sum())
            if n:
                if b64s is None:
                    b64s = b.to(torch.float64) * f64
                    a64 = a.to(torch.float64)
                if n > _DENSE_FIXUP * flag.numel():
                    exact = torch.addmm(wb.to(torch.float64), b64s[i:i + step], a64)
                    y = round_to(exact, out_dtype)
                else:
                    ri, cj = flag.nonzero(as_tuple=True)
                    exact = wb[ri, cj].to(torch.float64) + (b64s[i + ri] * a64[:, cj].T).sum(dim=1)
                    y[ri, cj] = round_to(exact, out_dtype)
                fixed += n
        out[i:i + step] = y
    return out, fixed, None


def dora_merge(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float, magnitude: torch.Tensor,
               per_column: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """DoRA: W' = m * (W + s L R) / ||W + s L R||, in float64, rounded once. The norm runs over the
    input axis of each output unit: per row of the 2-D view for Linear/Conv, per column where the
    layout is transposed (Conv1D with fan_in_fan_out, embeddings), as PEFT's DoRA layers do."""
    shape = w.shape
    v = torch.addmm(w.reshape(shape[0], -1).to(torch.float64), left.to(torch.float64),
                    right.to(torch.float64), alpha=scale)
    m = magnitude.reshape(-1).to(device=v.device, dtype=torch.float64)
    if per_column:
        v = v * (m / torch.linalg.vector_norm(v, dim=0)).unsqueeze(0)
    else:
        v = v * (m / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1)
    return round_to(v, out_dtype).reshape(shape)


def merge_bias(bias: torch.Tensor, deltas: list[tuple[float, torch.Tensor]], out_dtype: torch.dtype) -> torch.Tensor:
    """bias + sum f * delta, in float64 (biases are tiny), rounded once."""
    acc = bias.to(torch.float64)
    for f, d in deltas:
        acc = acc + f * d.to(device=acc.device, dtype=torch.float64)
    return round_to(acc, out_dtype)


# Exponent bits of the 16-bit float formats: all ones means Inf or NaN.
_EXP_MASK = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def check_finite(t: torch.Tensor) -> None:
    """Raise NonFinite(count, flat index, value) if t has NaN or Inf."""
    mask = _EXP_MASK.get(t.dtype)
    if mask is not None:
        # integer test of the exponent bits: torch's isfinite on CPU half tensors is several
        # times slower than the merge itself
        finite = (t.view(torch.int16) & mask) != mask
    else:
        finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = (~finite).view(-1)
    idx = int(bad.nonzero()[0])
    raise NonFinite(int(bad.sum()), idx, float(t.view(-1)[idx]))
