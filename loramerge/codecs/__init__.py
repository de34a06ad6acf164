"""Codecs: stored tensors -> values -> stored tensors. Pure math, no files.

The engine asks `decode` for the values a job's float math starts from, does the math it always
does, and asks `encode` for the stored tensors of the result. A codec is described in the plan by
a types.Codec; fp8.py and bnb4.py hold the math.
"""

from __future__ import annotations

import torch

from ..types import ST_TO_TORCH, Codec
from . import bnb4, fp8


def decode(codec: Codec, tensors: list[torch.Tensor], shape: tuple[int, ...], device) -> torch.Tensor:
    """The values of one weight from its stored tensors (the job's source, then its inputs):
    FP8 exactly, in float64; bitsandbytes 4-bit in the dtype it dequantizes to; 'qlora' is the
    4-bit round trip of a plain weight, in that weight's dtype."""
    tensors = [t.to(device, non_blocking=True) for t in tensors]
    if codec.kind == "fp8":
        return fp8.dequantize(tensors[0], tensors[1], codec.block)
    if codec.kind == "qlora":
        return bnb4.qlora_base(tensors[0], codec.quant_type, codec.blocksize, codec.double_quant, codec.kernel)
    n = 1
    for d in shape:
        n *= d
    packed, absmax, quant_map = tensors[:3]
    if codec.double_quant:
        absmax = bnb4.dequantize_absmax(absmax, tensors[3], codec.offset, tensors[4], codec.nested_blocksize)
    return bnb4.dequantize_4bit(bnb4.unpack(packed, n), absmax, codec.quant_type, codec.blocksize, shape,
                                ST_TO_TORCH[codec.dtype], code=quant_map)


def encode(codec: Codec, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The stored tensors of values y (FP8: the weight and its fresh scales)."""
    if codec.kind != "fp8":
        raise ValueError(f"no encoder for {codec.kind}")
    return fp8.quantize(y, codec.block)


__all__ = ["decode", "encode", "fp8", "bnb4"]
