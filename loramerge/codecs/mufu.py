"""The float32 arithmetic of bitsandbytes' CUDA quantizers, reproduced on any device.

bitsandbytes builds its CUDA kernels with fast math. Two consequences reach the 4-bit codes that a
QLoRA adapter was trained against:
- `1.0f / absmax` is the GPU's approximate reciprocal (PTX rcp.approx.ftz.f32, SASS MUFU.RCP), not
  the correctly rounded one: for 13% of float32 mantissas it is one ulp above or below. x * (1/a)
  then lands on the other side of an FP4 threshold for ~2e-4 of a bf16 weight's elements (the FP4
  thresholds are simple fractions such as 5/24, which bf16 quotients hit exactly);
- products and inputs that are subnormal are flushed to zero (ftz), which decides the sign bit of
  an FP4 zero.
The reciprocal is reproduced from a table measured on an H200 (sm_90) by tools/measure_mufu_rcp.py:
d(m) = bits(rcp.approx(1.m)) - bits(RN(1 / 1.m)) for each of the 2^23 mantissas m; the instruction's
result for m * 2^e is the table's shifted by -e, which the script checks. Measured on sm_90 only:
NVIDIA documents the instruction's error bound, not its bits, so another GPU generation could in
principle round differently (then the GPU tests of tests/test_codecs.py would fail there).
"""

from __future__ import annotations

import functools
import lzma
import pathlib

import torch

TABLE = pathlib.Path(__file__).with_name("mufu_rcp_sm90.xz")
_MIN_NORMAL = 2.0 ** -126


@functools.lru_cache(maxsize=None)
def _deltas_cpu() -> torch.Tensor:
    """d(m) for every mantissa m (int32 [2^23]): the 2-bit codes d + 1, four per byte, low bits first."""
    packed = torch.frombuffer(bytearray(lzma.decompress(TABLE.read_bytes())), dtype=torch.uint8)
    codes = torch.stack([(packed >> (2 * k)) & 3 for k in range(4)], dim=1).reshape(-1)
    if codes.numel() != 1 << 23:
        raise RuntimeError(f"{TABLE}: {codes.numel()} entries, expected {1 << 23} (reinstall loramerge)")
    return codes.to(torch.int32) - 1


_by_device: dict[torch.device, torch.Tensor] = {}


def _deltas(device: torch.device) -> torch.Tensor:
    if device not in _by_device:
        _by_device[device] = _deltas_cpu().to(device)
    return _by_device[device]


def ftz(x: torch.Tensor) -> torch.Tensor:
    """x with subnormal values flushed to zero of the same sign (float32)."""
    return torch.where(x.abs() < _MIN_NORMAL, torch.copysign(torch.zeros_like(x), x), x)


def reciprocal(x: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of a float32 tensor, bit for bit: the correctly rounded 1/x moved by the
    table's d(mantissa) where the result is normal; subnormal inputs are ±0 (reciprocal ±inf),
    subnormal results ±0, inf and NaN as IEEE."""
    x = x.to(torch.float32)
    bits = x.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    rn = 1.0 / x
    moved = (rn.view(torch.int32) + _deltas(x.device)[mantissa.long()]).view(torch.float32)
    # 1/x is normal for biased exponents 1..252, and for 253 when x is a power of two (2^-126)
    normal = (exponent >= 1) & ((exponent <= 252) | ((exponent == 253) & (mantissa == 0)))
    out = torch.where(normal, moved, rn)
    out = torch.where(exponent == 0, torch.copysign(torch.full_like(x, float("inf")), x), out)
    tiny = ~normal & (exponent >= 253) & (exponent != 255)
    return torch.where(tiny, torch.copysign(torch.zeros_like(x), x), out)


def scale(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """What a bitsandbytes CUDA quantizer maps each value of a block to: x * rcp(absmax), inputs and
    product flushed to zero when subnormal. x [blocks, blocksize] float32, absmax [blocks]."""
    return ftz(ftz(x) * reciprocal(absmax).unsqueeze(1))
