"""bitsandbytes 4-bit quantization (NF4 and FP4, QLoRA's base format), re-implemented in torch.

Two uses: reading `*-bnb-4bit` checkpoints (dequantize what bitsandbytes stored), and QLoRA-faithful
merges: W' = dequantize(quantize(W)) + dW, the base as the adapter saw it in training. The default
install must not need bitsandbytes, so this is our own code, tested bit for bit against it.

The format (bitsandbytes functional.quantize_4bit / dequantize_4bit):
- W is flattened and cut into blocks of `blocksize` (64) values; absmax = max |w| per block; each
  value is scaled by absmax (a float32 reciprocal, then a multiply) and mapped to one of 16 code
  values (NF4: normal quantiles; FP4: a sign + 2-bit exponent + 1-bit mantissa float) by comparing
  with the float32 midpoints between neighbours; a value exactly on a midpoint takes the lower
  code. Two indices per byte, the first value in the high nibble.
- Double quantization (QLoRA's default, bnb_4bit_use_double_quant): absmax minus its mean
  (`offset`, float32) is quantized blockwise again (256 per block) to 8 bits with the signed
  dynamic map; the stored absmax is then uint8 and nested_absmax holds its per-block scales.
- Dequantization: absmax = code8[q] * nested_absmax + offset, then w = code4[q] * absmax, both
  in float32, the result rounded (to nearest even) to the weight's dtype.

bitsandbytes' CUDA and CPU kernels agree on all of that except in rare roundings, so `kernel`
picks which one to reproduce (QLoRA training runs the CUDA one; tests check 'cpu' bit for bit
against the installed bitsandbytes, and 'cuda' on a GPU):
- cuda: every block scales by the GPU's approximate reciprocal of absmax, with subnormal inputs
  and products flushed to zero (fast math; mufu.py reproduces both bit for bit); an all-zero block
  (1/0 = inf, 0 * inf = NaN) gets code 0; FP4 compares |x| with the tree's decimal literals
  (0.583333 is not the midpoint 0.5833334); the nested 8-bit absmax code is found by the kernel's
  7-step binary search, after the same scaling.
- cpu: the last, partial block divides by its absmax; zero blocks scale by 1/1e-38 (code of 0);
  the nested 8-bit code comes from a 65536-entry lookup table over [-1, 1] (not always the
  nearest code: the table is 3e-5 wide per entry, the dynamic map far finer near 0).
The mean behind `offset` is torch's float32 mean on the device that runs it, as in bitsandbytes.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch

from . import mufu

QUANT_TYPES = ("nf4", "fp4")
KERNELS = ("cuda", "cpu")
NESTED_BLOCKSIZE = 256

_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
# FP4 codes in bit order (sign, 2 exponent bits, 1 mantissa bit; exponent bias 2), scaled to [-1, 1]
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# The CUDA kernels' decision trees compare x with decimal literals, which the compiler rounds once to
# float32. Several NF4 literals are printed float32 midpoints, so they sit within 1e-16 of halfway
# between two floats: read through a Python float (a second rounding) four of them land one ulp
# off (an exhaustive scan of [-1, 1] on an H200 found the four), hence the strings.
_NF4_CUDA_THRESHOLDS = ("-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906",
                        "-0.33967943489551544", "-0.23460740596055984", "-0.13791173323988914",
                        "-0.045525018125772476", "0.03979014977812767", "0.1202552504837513",
                        "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
                        "0.5016634166240692", "0.6427869200706482", "0.8614784181118011")
# FP4: |x| thresholds, and the 3-bit code of each magnitude rank
_FP4_CUDA_THRESHOLDS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
_FP4_BY_MAGNITUDE = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
_LUT_SIZE = 65536


def float32_literal(text: str) -> float:
    """A decimal literal rounded once to float32 (nearest, ties to even), as a C compiler reads
    `0.1f`: exact rational arithmetic, no detour through float64."""
    exact = Fraction(text)
    near = torch.tensor(float(exact), dtype=torch.float32)  # within one float32 ulp of the answer
    cands = [torch.nextafter(near, torch.tensor(-math.inf)), near, torch.nextafter(near, torch.tensor(math.inf))]
    cands = [c for c in cands if bool(torch.isfinite(c))]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(torch.int32)) & 1))
    return float(best)


@functools.lru_cache(maxsize=None)
def _cuda_thresholds(quant_type: str) -> tuple[float, ...]:
    return tuple(float32_literal(t) for t in (_NF4_CUDA_THRESHOLDS if quant_type == "nf4" else _FP4_CUDA_THRESHOLDS))


def code4(quant_type: str, device=None) -> torch.Tensor:
    """The 16 code values (float32) of 'nf4' or 'fp4', indexed by the 4-bit code."""
    values = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32, device=device)
    return values / values.abs().max()


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted float32
    values, a decimal exponent 1e-6..1 and a linear fraction whose bits grow with the exponent."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2  # float32, as the kernels compute them


def quantize_4bit(w: torch.Tensor, quant_type: str, blocksize: int = 64,
                  kernel: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """(4-bit codes, one uint8 per value [n], absmax float32 [blocks]) of w, as bitsandbytes'
    quantize_4bit computes them (see the module docstring for the kernels' differences)."""
    x = w.reshape(-1).to(torch.float32)
    n = x.numel()
    nblocks = -(-n // blocksize)
    full = n - n % blocksize
    code = code4(quant_type, x.device)
    if kernel == "cpu":
        blocks = x[:full].view(-1, blocksize)
        absmax = blocks.abs().amax(dim=1) if full else x.new_zeros(0)
        scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).reshape(-1)
        if full < n:
            am = x[full:].abs().amax().clamp(min=1e-38)
            absmax = torch.cat([absmax, am.reshape(1)])
            scaled = torch.cat([scaled, (x[full:] / am).clamp_(-1, 1)])
        order = torch.argsort(code, stable=True)  # +0 (code 0) sorts before -0 (code 8)
        idx = torch.bucketize(scaled, _midpoints(code[order]))
        return order[idx].to(torch.uint8), absmax
    blocks = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = mufu.scale(blocks, absmax).reshape(-1)[:n]  # NaN for an all-zero block
    thresholds = torch.tensor(_cuda_thresholds(quant_type), dtype=torch.float32, device=x.device)
    if quant_type == "nf4":
        idx = torch.bucketize(scaled, thresholds)  # the tree's code: how many thresholds x exceeds
    else:
        by_mag = torch.tensor(_FP4_BY_MAGNITUDE, dtype=torch.int64, device=x.device)
        idx = by_mag[torch.bucketize(scaled.abs(), thresholds)] | ((scaled < 0).to(torch.int64) << 3)
    idx = torch.where(torch.isnan(scaled), 0, idx)  # every comparison with NaN is false: code 0
    return idx.to(torch.uint8), absmax


def quantize_absmax(absmax: torch.Tensor, kernel: str = "cuda") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (uint8 codes [blocks], nested_absmax float32, offset float32 0-dim)."""
    offset = absmax.mean()
    x = absmax - offset
    n = x.numel()
    nblocks = -(-n // NESTED_BLOCKSIZE)
    blocks = torch.nn.functional.pad(x, (0, nblocks * NESTED_BLOCKSIZE - n)).view(nblocks, NESTED_BLOCKSIZE)
    nested = blocks.abs().amax(dim=1)
    code = dynamic_map(x.device)
    if kernel == "cpu":  # the CPU kernel writes code 0 for an all-zero block
        inv = torch.where(nested > 0, 1.0 / nested, torch.zeros_like(nested))
        q = _lut_search((blocks * inv.unsqueeze(1)).reshape(-1)[:n], code)
        q = torch.where((nested == 0).repeat_interleave(NESTED_BLOCKSIZE)[:n], 0, q)
    else:  # an all-zero block scales to NaN, which the search sends to code 0
        q = _binary_search(mufu.scale(blocks, nested).reshape(-1)[:n], code)
    return q.to(torch.uint8), nested, offset


def _binary_search(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The CUDA kernel's dQuantize: 7 halving steps from pivot 127, then the nearer of the pivot
    and the last bracket on the side of x, ties to the pivot."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper = torch.full_like(pivot, 255)
    lower = torch.zeros_like(pivot)
    step = 64
    while step:
        up = x > code[pivot]
        lower = torch.where(up, pivot, lower)
        upper = torch.where(up, upper, pivot)
        pivot = torch.where(up, pivot + step, pivot - step)
        step >>= 1
    val = code[pivot]
    above = x > val
    mid_up = (code[upper] + val) * 0.5
    mid_lo = (code[lower] + val) * 0.5
    return torch.where(above, torch.where(x > mid_up, upper, pivot), torch.where(x < mid_lo, lower, pivot))


def _lut_search(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The CPU kernel's table: [-1, 1] in 65536 steps, each mapped to the code whose midpoint
    interval holds the step's value; x goes to the step round(((x + 1) * 0.5) * 65535)."""
    i = torch.arange(_LUT_SIZE, device=x.device)
    steps = -1.0 + (2.0 * i.to(torch.float32)) / (_LUT_SIZE - 1)
    lut = torch.bucketize(steps, _midpoints(code))
    index = ((x.clamp(-1, 1) + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    return lut[index]


def dequantize_absmax(q: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor | float,
                      code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """absmax back from double quantization: code8[q] * nested_absmax + offset (float32)."""
    code = dynamic_map(q.device) if code is None else code.to(q.device, torch.float32)
    n = q.numel()
    scale = nested.to(q.device, torch.float32).repeat_interleave(blocksize)[:n]
    return code[q.reshape(-1).long()] * scale + torch.as_tensor(offset, dtype=torch.float32, device=q.device)


def dequantize_4bit(codes: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                    shape: tuple[int, ...], dtype: torch.dtype, code: torch.Tensor | None = None,
                    flush: bool = False) -> torch.Tensor:
    """w = code4[codes] * absmax per block, in float32, rounded to `dtype`. `codes` holds one
    4-bit code per value (see unpack); `code` overrides the code table (a checkpoint's quant_map);
    `flush` sends subnormal products to zero, as the CUDA kernel (fast math) does.
    FP4's code 8 is -0.0, as on CUDA (bitsandbytes' AVX-512 CPU kernel writes +0.0 there, its other
    CPU paths -0.0: only the sign of a zero, which a merge's addition erases)."""
    n = 1
    for d in shape:
        n *= d
    table = code4(quant_type, codes.device) if code is None else code.to(codes.device, torch.float32)
    scale = absmax.to(codes.device, torch.float32).repeat_interleave(blocksize)[:n]
    w = table[codes.reshape(-1)[:n].long()] * scale
    return (mufu.ftz(w) if flush else w).to(dtype).reshape(shape)


def pack(codes: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Two codes per byte, first in the high nibble; an odd count is padded with the code of 0.0
    (NF4 7, FP4 0: what both kernels store), as bitsandbytes' [(n + 1) // 2, 1] uint8 tensor."""
    c = codes.reshape(-1)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), 7 if quant_type == "nf4" else 0)])
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes of a packed tensor (any storage dtype: the bytes are what counts)."""
    b = packed.contiguous().reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 0x0F], dim=1).reshape(-1)[:n]


def qlora_base(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
               kernel: str = "cuda") -> torch.Tensor:
    """The base weight as a QLoRA adapter saw it in training: dequantize(quantize(w)) in w's dtype
    (bitsandbytes dequantizes to the dtype it quantized from)."""
    codes, absmax = quantize_4bit(w, quant_type, blocksize, kernel)
    if double_quant:
        q, nested, offset = quantize_absmax(absmax, kernel)
        absmax = dequantize_absmax(q, nested, offset)
    return dequantize_4bit(codes, absmax, quant_type, blocksize, tuple(w.shape), w.dtype, flush=kernel == "cuda")
