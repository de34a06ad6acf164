"""Pure tensor math for merging. No file I/O, no formats: tensors in, tensors out.

The numerics contract: the merged value is the exact sum

    S = W + sum_k f_k * B[:, k] * A[k, :]

(W, B and A the stored values; f_k the float64 factor of rank column k, i.e. c_i * s_i of the
adapter it came from, as computed in float64), rounded ONCE to the output dtype: correctly
rounded (to nearest, ties to even) for bfloat16/float16 outputs always, and for float32 outputs
under --accum float64. How: engine/lowrank.py (float32, then float64 where needed, then exact
integer arithmetic for what float64 cannot decide; the decision rule is rounding.decide), or on
CPU the fused kernel (kernels.py: float32 then float64 in one pass over W, the same rule,
undecided rows handed to lowrank).
"""

from __future__ import annotations

import torch

from . import lowrank, precision
from .rounding import cast, round_to  # noqa: F401  (re-exported: callers round through ops)

# Elements per row block: bounds the temporaries (16 MiB of float32 on CPU, more on GPU where
# launches, not memory, are the cost).
BLOCK_ELEMS_CPU = 1 << 22
BLOCK_ELEMS_GPU = 1 << 26
_HALF = (torch.bfloat16, torch.float16)


class NonFinite(ValueError):
    """Raised with (count, first_index, example value) when a merged result is not finite."""


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
    """(W + (B * factors) @ A rounded once to out_dtype, number of elements that needed more than
    the first evaluation). Shapes: w [out, in], a [R, in], b [out, R], factors [R] (float64); all
    on one device. `accum` is the first pass's precision (float32 or float64), in the fused
    kernel as on the torch path; what it cannot decide goes on in float64, then exactly. `out`
    (CPU only) is a buffer the fused kernel may write into; the result may or may not be it.
    `block_elems` forces the torch path in blocks of that many elements. check=True raises
    NonFinite for a non-finite result.

    Inputs are not modified."""
    if torch.float64 in (w.dtype, out_dtype):
        accum = torch.float64  # float32 math would round a float64 base before the add
    if accum == torch.float32 and not precision.float32_gemm_exact(w.device):
        # TF32 or oneDNN bf16 in force (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE, or a caller outside
        # precision.exact_matmul()): float64 GEMMs are IEEE whatever the flags say
        accum = torch.float64
    if (block_elems is None and w.device.type == "cpu" and w.dtype in _HALF and out_dtype in _HALF
            and _kernel_supports(w, out_dtype)):
        y, fixed, bad = _merge_kernel(w, a, b, factors, out_dtype, out, accum)
        if check and bad:
            check_finite(y)
        return y, fixed
    if block_elems is None:
        block_elems = BLOCK_ELEMS_GPU if w.device.type == "cuda" else BLOCK_ELEMS_CPU
    y, fixed = lowrank.merge(w, a, b, factors, out_dtype, accum, block_elems)
    if check:
        check_finite(y)
    return y, fixed


def _kernel_supports(w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    # numba is imported here, on the first CPU half-precision merge, not with the engine: a GPU
    # run or a float32 merge never pays for it
    from . import kernels
    return kernels.supports(w, out_dtype)


def _merge_kernel(w, a, b, factors, out_dtype, out, accum) -> tuple[torch.Tensor, int, int]:
    """The fused CPU kernel, then lowrank's float64/exact stages for the rows it left undecided.
    Returns (result, elements evaluated beyond the first pass, non-finite elements)."""
    from . import kernels
    y, bad, undecided, redone = kernels.merge_half(w, a, b, factors, out_dtype, out=out, accum=accum)
    rows = undecided.nonzero()[0]
    if len(rows):
        idx = torch.from_numpy(rows)
        redo, _ = lowrank.merge_rows64(w[idx], a, b[idx], factors, out_dtype)
        y[idx] = redo
        bad[rows] = (~torch.isfinite(redo.float())).sum(1).numpy()
    return y, max(redone, int(undecided.sum())), int(bad.sum())  # what float64 left: a subset of the redone


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
    """bias + sum f * delta, correctly rounded once (a one-row merge_weight with B = 1)."""
    if not deltas:
        return cast(bias, out_dtype)
    a = torch.stack([d.to(device=bias.device, dtype=torch.float64).reshape(-1) for _, d in deltas])
    f = torch.tensor([float(f) for f, _ in deltas], dtype=torch.float64)
    y, _ = merge_weight(bias.reshape(1, -1), a, torch.ones(1, len(deltas), dtype=torch.float64, device=bias.device),
                        f, out_dtype, accum=torch.float64)
    return y.reshape(bias.shape)


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
    bad = (~finite).reshape(-1)  # reshape: a .bin base's tensor may keep its strides
    idx = int(bad.nonzero()[0])
    raise NonFinite(int(bad.sum()), idx, float(t.reshape(-1)[idx]))
