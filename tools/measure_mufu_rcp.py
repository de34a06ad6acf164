"""Measure the NVIDIA GPU's approximate float32 reciprocal and write loramerge's table of it.

bitsandbytes' CUDA kernels are built with fast math, so the `1.0f / absmax` in its blockwise
quantizers compiles to PTX `rcp.approx.ftz.f32` (SASS MUFU.RCP), which is not the correctly
rounded reciprocal: 13% of float32 mantissas come out one ulp above or below it. To reproduce
QLoRA's quantization bit for bit on any machine (loramerge/codecs/mufu.py), loramerge ships, for
each of the 2^23 mantissas m, d(m) = bits(rcp.approx(1.m)) - bits(RN(1 / 1.m)), a value in
{-1, 0, +1}, stored as 2-bit codes d + 1, four per byte (first in the low bits), xz-compressed.

Run on a machine with an NVIDIA GPU and cupy (the device image has both):
    python tools/measure_mufu_rcp.py loramerge/codecs/mufu_rcp_sm90.xz
It also checks what the table relies on: that the instruction's result for m * 2^e is the table's
scaled by 2^-e (the exponent only shifts it) and that div.full.f32 1/x gives the same bits.
"""

from __future__ import annotations

import hashlib
import lzma
import sys

import cupy as cp
import numpy as np

_SRC = r'''
extern "C" __global__ void recip(const float* x, float* approx, float* full, float* rn, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = x[i], r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v)); approx[i] = r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(1.0f), "f"(v)); full[i] = r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(1.0f), "f"(v)); rn[i] = r;
}'''


def _run(x: cp.ndarray) -> tuple[cp.ndarray, cp.ndarray, cp.ndarray]:
    kernel = cp.RawKernel(_SRC, "recip")
    outs = tuple(cp.empty_like(x) for _ in range(3))
    kernel(((x.size + 255) // 256,), (256,), (x, *outs, cp.int64(x.size)))
    return outs


def main(path: str) -> None:
    mant = cp.arange(1 << 23, dtype=cp.int32)
    x = (mant | 0x3F800000).view(cp.float32)
    approx, full, rn = _run(x)
    delta = approx.view(cp.int32) - rn.view(cp.int32)
    assert bool(cp.all(cp.abs(delta) <= 1)), "a reciprocal more than one ulp from the correctly rounded one"
    assert bool(cp.all(full == approx)), "div.full.f32 1/x differs from rcp.approx.ftz.f32"
    for e in (-100, -30, -3, -1, 1, 2, 7, 30, 100):
        scaled, _, _ = _run(x * cp.float32(2.0 ** e))
        assert bool(cp.all(scaled.view(cp.int32) == approx.view(cp.int32) - (e << 23))), f"exponent {e}"
    codes = (cp.asnumpy(delta) + 1).astype(np.uint8)
    packed = np.zeros(codes.size // 4, dtype=np.uint8)
    for k in range(4):
        packed |= codes[k::4] << (2 * k)
    data = lzma.compress(packed.tobytes(), preset=9 | lzma.PRESET_EXTREME)
    with open(path, "wb") as f:
        f.write(data)
    values, counts = np.unique(codes.astype(np.int64) - 1, return_counts=True)
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: d(m) counts",
          dict(zip(values.tolist(), counts.tolist())), f"table sha256 {hashlib.sha256(packed).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1])
