"""FP8 block-scaled weights (DeepSeek-V3/R1, Qwen3-FP8 and others): pure math, no files.

A weight [..., R, C] is stored as float8_e4m3fn q and a float32 `weight_scale_inv` s of shape
[..., ceil(R / bm), ceil(C / bn)], one scale per bm x bn block (the blocks on the right and bottom
edges may be partial). The value is W = q * s.

- dequantize: q * s in float64. That is exact (q has 4 significant bits, s 24: 28 fit in 53), so
  the merge math starts from the stored value itself, not from a rounded copy of it.
- quantize (requantize after a merge): per block, s = float32(amax / 448) with amax = max |y|
  over the block (the float64 quotient rounded once to float32; 1.0 for an all-zero block, which
  stays all zeros), then q = y / s rounded to the nearest e4m3 value, ties to even, saturating
  at +-448. The quotient is taken in float64 and rounded to e4m3 through round-to-odd float32
  (engine.ops.round_to), since torch's own float64 -> float8 conversion rounds twice.
A block whose values did not change keeps its bytes whenever its largest |q| is 448 (fresh
scales are the same scales), so requantizing is idempotent on checkpoints quantized this way.
"""

from __future__ import annotations

import torch

from ..engine.ops import round_to

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def expand(s: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Per-block values [..., Rb, Cb] broadcast to every element [..., rows, cols]."""
    return s.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W = q * s, exact in float64 (rounded once to `dtype` if another is asked for)."""
    rows, cols = q.shape[-2:]
    w = q.to(torch.float64) * expand(scale.to(device=q.device, dtype=torch.float64), rows, cols, block)
    return w if dtype == torch.float64 else round_to(w, dtype)


def block_amax(y: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |y| per bm x bn block, [..., Rb, Cb] (edge blocks cover what they hold)."""
    *lead, rows, cols = y.shape
    bm, bn = block
    rb, cb = -(-rows // bm), -(-cols // bn)
    a = torch.nn.functional.pad(y.abs(), (0, cb * bn - cols, 0, rb * bm - rows))
    return a.reshape(*lead, rb, bm, cb, bn).amax(dim=(-3, -1))


def quantize(y: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, weight_scale_inv float32) for values y [..., R, C] (float64 or float32)."""
    y = y.to(torch.float64)
    rows, cols = y.shape[-2:]
    amax = block_amax(y, block)
    scale = (amax / E4M3_MAX).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    ratio = y / expand(scale.to(torch.float64), rows, cols, block)
    q = round_to(ratio.clamp_(-E4M3_MAX, E4M3_MAX), FP8)
    return q, scale


def grid_ulp(ratio: torch.Tensor) -> torch.Tensor:
    """Spacing of the e4m3 grid at |ratio| (float64): 2^(e-3) for normal values (e >= -6), 2^-9
    below (subnormals)."""
    _, e = torch.frexp(ratio.abs())
    return torch.ldexp(torch.ones_like(ratio), (e - 1).clamp_min(-6) - 3)
