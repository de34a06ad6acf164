"""Jobs with codecs: decode the stored tensors, do the usual float math, encode the result.

FP8 weights on the CPU go through a fused numba kernel (fp8_kernel.py: one pass per 128x128
block, the same bytes); elsewhere (GPUs) in bands of whole block-rows, so a weight of any size
needs float64 temporaries of one band only (the values are decoded exactly, in float64, and a
merged band is added to in float64: a bf16/fp16 output is then rounded once, correctly; an FP8
output is requantized from it). bitsandbytes weights and the QLoRA round trip decode the whole tensor into its own dtype
(the blocks run across rows) and then take exactly the path of a plain tensor.
"""

from __future__ import annotations

import torch

from .. import codecs
from ..codecs import fp8
from ..types import ST_TO_TORCH, Adapter, Job
from . import deltas, ops


def run(job: Job, w: torch.Tensor | None, extra: tuple, adapters: list[Adapter], device: torch.device,
        accum: torch.dtype, out: torch.Tensor | None, plain) -> tuple[tuple[torch.Tensor, ...] | torch.Tensor, int]:
    """(the job's output tensor, or its tuple of output tensors; float64 fix-ups). `plain` is the
    float math of a plain job: plain(job, w, adapters, device, accum, out, out_dtype)."""
    if _banded(job):
        return _fp8_bands(job, w, extra[0], adapters, device, out)
    if job.decode is not None and job.replacement is None:
        w = codecs.decode(job.decode, [w, *extra], job.shape, device)
    if job.encode is None:
        return plain(job, w, adapters, device, accum, out, ST_TO_TORCH[job.dtype])
    y, fixed = plain(job, w, adapters, device, accum, None, torch.float64)
    return codecs.encode(job.encode, y), fixed


def _banded(job: Job) -> bool:
    """FP8 weights with plain LoRA terms (or none) go band by band; DoRA and replacements need
    the whole tensor at once."""
    if job.decode is None or job.decode.kind != "fp8" or job.replacement is not None:
        return False
    lora = [t for t in job.terms if t.kind == "lora"]
    return len(lora) == len(job.terms) and (not lora or (len(job.shape) == 2 and all(
        t.pair.layout == "linear" and not t.pair.magnitude_key for t in lora)))


def _fp8_bands(job: Job, q: torch.Tensor, scale: torch.Tensor, adapters: list[Adapter], device: torch.device,
               out: torch.Tensor | None):
    block = job.decode.block
    rows, cols = q.shape[-2:]
    q3, s3 = q.reshape(-1, rows, cols), scale.reshape(-1, *scale.shape[-2:])
    encode = job.encode is not None
    out_dtype = ST_TO_TORCH[job.dtype]
    res = (out if out is not None else torch.empty(job.shape, dtype=out_dtype)).view(-1, rows, cols)
    s_out = torch.empty_like(s3) if encode else None
    lora = [t for t in job.terms if t.kind == "lora"]
    if lora:
        lefts, rights = zip(*(deltas.factors(adapters[t.adapter], t.pair, torch.float32, device) for t in lora))
        left, right = torch.cat(lefts, dim=1), torch.cat(rights)
        factors = torch.cat([torch.full((t.pair.rank,), t.factor, dtype=torch.float64) for t in lora])
    if device.type == "cpu" and _fp8_kernel(q3, s3, block, (left, right, factors) if lora else (None,) * 3,
                                            res, s_out):
        res = res.view(job.shape)
        return ((res, s_out.view(scale.shape)) if encode else res), 0
    elems = ops.BLOCK_ELEMS_GPU if device.type == "cuda" else ops.BLOCK_ELEMS_CPU
    step = block[0] * max(1, elems // max(1, block[0] * cols))
    fixed = 0
    for i in range(q3.shape[0]):
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            b0, b1 = r0 // block[0], -(-r1 // block[0])
            w64 = fp8.dequantize(q3[i, r0:r1].to(device), s3[i, b0:b1].to(device), block)
            try:
                if lora:
                    y, f = ops.merge_weight(w64, right, left[r0:r1], factors, torch.float64 if encode else out_dtype,
                                            accum=torch.float64, check=True)
                    fixed += f
                else:
                    y = w64 if encode else ops.round_to(w64, out_dtype)
                    ops.check_finite(y)
            except ops.NonFinite as e:  # report the index in the whole tensor, not in the band
                count, idx, value = e.args
                raise ops.NonFinite(count, idx + (i * rows + r0) * cols, value) from None
            if encode:
                qb, sb = fp8.quantize(y, block)
                res[i, r0:r1].copy_(qb)
                s_out[i, b0:b1].copy_(sb)
            else:
                res[i, r0:r1].copy_(y)
    res = res.view(job.shape)
    return ((res, s_out.view(scale.shape)) if encode else res), fixed


def _fp8_kernel(q3, s3, block, lora, res, s_out) -> bool:
    """The fused CPU kernel over every [rows, cols] slice; False where it does not apply."""
    from . import fp8_kernel  # imports numba: only runs that merge FP8 weights on the CPU pay for it

    if not fp8_kernel.supports(q3[0], res.dtype, torch.device("cpu")):
        return False
    rows, cols = q3.shape[-2:]
    for i in range(q3.shape[0]):
        count, idx, value = fp8_kernel.merge(q3[i], s3[i], block, *lora, res[i], s_out[i] if s_out is not None else None)
        if count:
            raise ops.NonFinite(count, idx + i * rows * cols, value)
    return True
