"""The math of one job: the output tensor from the base tensor and the job's adapter terms.

Pure of file formats: the pipeline hands in W (or nothing, when the adapter replaces it) and an
output buffer; the math itself lives in ops (merge, DoRA, bias, cast) and deltas (factor layouts).
"""

from __future__ import annotations

import torch

from ..errors import LoraMergeError, NumericsError
from ..types import ST_TO_TORCH, Adapter, Job
from . import deltas, ops


def compute(job: Job, w: torch.Tensor | None, adapters: list[Adapter], device: torch.device,
            accum: torch.dtype, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(the output tensor for one job on the CPU, elements recomputed in float64). `w` is the base
    tensor, or None when the adapter replaces it; `out`, if given, is a CPU buffer of the job's
    dtype and shape that receives the result (reused across tensors, pinned when a GPU is used)."""
    try:
        y, fixed = _math(job, w, adapters, device, accum, out)
    except torch.cuda.OutOfMemoryError:
        raise LoraMergeError(f"{job.name}: out of memory on {device} ({list(job.shape)}, {job.dtype}); use "
                             "--device cpu, or a GPU with more free memory") from None
    except ops.NonFinite as e:
        count, idx, value = e.args
        src = "; ".join(f"{adapters[t.adapter].label}: {t.pair.module if t.pair else t.key}"
                        for t in job.terms) or "cast only"
        hint = ""
        if job.dtype == "F16" and value in (float("inf"), float("-inf")):
            hint = "; the value overflows float16 (max 65504): use --dtype bfloat16 or float32"
        raise NumericsError(f"{job.name}: merged result has {count} non-finite value(s) (first at flat index "
                            f"{idx}: {value}) from {src}{hint}; nothing was written") from None
    if out is None:
        return y.cpu(), fixed
    if y.data_ptr() != out.data_ptr():
        out.copy_(y)  # device -> pinned host copy on GPU; already in place for the CPU kernel
    return out, fixed


def _math(job: Job, w: torch.Tensor | None, adapters: list[Adapter], device: torch.device,
          accum: torch.dtype, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The merged tensor (on `device`, or in `out`) and its float64 fix-up count; raises
    ops.NonFinite for a non-finite result."""
    if job.kind == "copy":  # an untouched tensor from a pickled .bin: written as it is
        return w, 0
    out_dtype = ST_TO_TORCH[job.dtype]
    rep = job.replacement
    if rep is not None:  # a full tensor saved in the adapter stands in for the base tensor
        w = adapters[rep.adapter].tensors[rep.key]
    w = w.to(device, non_blocking=True)
    lora = [t for t in job.terms if t.kind == "lora"]
    bias = [t for t in job.terms if t.kind == "bias"]
    if lora and not lora[0].pair.magnitude_key:
        # All adapters' terms for this tensor in one product: [B1 B2 ..] @ [A1; A2; ..], each
        # rank column carrying its own factor c_i * s_i, so the sum is rounded once.
        lefts, rights = zip(*(deltas.factors(adapters[t.adapter], t.pair, torch.float32, device) for t in lora))
        factors = torch.cat([torch.full((t.pair.rank,), t.factor, dtype=torch.float64) for t in lora])
        w2 = w.reshape(w.shape[0], -1)
        y, fixed = ops.merge_weight(w2, torch.cat(rights), torch.cat(lefts, dim=1), factors, out_dtype,
                                    accum=accum, out=None if out is None else out.view(w2.shape), check=True)
        return y.reshape(w.shape), fixed
    if lora:  # DoRA; the plan allows it only alone on its tensor
        t = lora[0]
        left, right = deltas.factors(adapters[t.adapter], t.pair, torch.float64, device)
        y = ops.dora_merge(w, left, right, t.pair.scale, adapters[t.adapter].tensors[t.pair.magnitude_key],
                           t.pair.layout == "transposed", out_dtype)
    elif bias:
        y = ops.merge_bias(w, [(t.factor, adapters[t.adapter].tensors[t.pair.bias_key]) for t in bias], out_dtype)
    else:  # a replacement or a plain cast: one rounding to the output dtype
        y = ops.cast(w, out_dtype)
    ops.check_finite(y)
    return y, 0
