"""bitsandbytes' CUDA quantizers scale by the GPU's approximate reciprocal (fast math): the
emulation in codecs/mufu.py against what was measured on an H200, and against the hardware itself
when a GPU is present."""

from __future__ import annotations

import hashlib

import pytest
import torch

from loramerge.codecs import bnb4, mufu

# (x, absmax, 4-bit code bitsandbytes 0.50.2's CUDA kernel wrote on an H200, quant type): elements
# of tests/test_codecs.py's GPU case where x / absmax is exactly 5/24, 7/24 or 5/6 (an FP4
# threshold) and the correctly rounded reciprocal gives the other code
MEASURED = [
    (0.02685546875, 0.12890625, 6, "fp4"),
    (-0.02685546875, 0.12890625, 14, "fp4"),
    (-0.0250244140625, 0.1201171875, 15, "fp4"),
    (0.0250244140625, 0.1201171875, 7, "fp4"),
    (0.0286865234375, 0.1376953125, 7, "fp4"),
    (-0.030517578125, 0.146484375, 14, "fp4"),
    (0.03759765625, 0.12890625, 7, "fp4"),
    (-0.03759765625, 0.12890625, 15, "fp4"),
    (0.042724609375, 0.146484375, 7, "fp4"),
    (0.10009765625, 0.1201171875, 3, "fp4"),
    (0.11474609375, 0.1376953125, 3, "fp4"),
]


def test_table_is_the_measured_one():
    """2^23 entries in {-1, 0, 1} with the counts the H200 gave (tools/measure_mufu_rcp.py), the
    packed bytes' sha256 as written, and 1.0 (mantissa 0) exact."""
    import lzma

    packed = lzma.decompress(mufu.TABLE.read_bytes())
    assert hashlib.sha256(packed).hexdigest() == "bbda0d685ab5a66767c2c3881a67dff147e1f5a2c766db1f6dd5b63fecedcf2c"
    d = mufu._deltas_cpu()
    values, counts = torch.unique(d, return_counts=True)
    assert values.tolist() == [-1, 0, 1] and counts.tolist() == [374723, 7280086, 733799]
    assert int(d[0]) == 0


@pytest.mark.parametrize("x,absmax,code,quant_type", MEASURED)
def test_cuda_codes_where_the_correctly_rounded_reciprocal_differs(x, absmax, code, quant_type):
    block = torch.zeros(64, dtype=torch.bfloat16)
    block[0], block[5] = absmax, x
    codes, am = bnb4.quantize_4bit(block, quant_type, 64, kernel="cuda")
    assert float(am[0]) == absmax and int(codes[5]) == code
    exact = block[5].float() * (1.0 / block[0].float())  # what an IEEE reciprocal would give
    ieee = bnb4._FP4_BY_MAGNITUDE[int(torch.bucketize(exact.abs(), torch.tensor(bnb4._cuda_thresholds("fp4"))))]
    assert (ieee | (8 if x < 0 else 0)) != code  # the case is one that tells the two apart


# (x, NF4 code): the four float32 values of [-1, 1] where bitsandbytes 0.50.2's CUDA NF4 kernel (an
# exhaustive scan on an H200, absmax 1.0) disagreed with thresholds read as Python floats: its tree's
# decimal literals rounded once to float32 sit one ulp away from the double-rounded ones
NF4_SCAN = [(0.1202552542090416, 8), (0.5016634464263916, 13), (0.8614784479141235, 15), (-0.8480963706970215, 1)]


@pytest.mark.parametrize("x,code", NF4_SCAN)
def test_nf4_cuda_thresholds_are_the_literals_rounded_once(x, code):
    block = torch.zeros(64, dtype=torch.float32)
    block[0], block[1] = 1.0, x
    codes, _ = bnb4.quantize_4bit(block, "nf4", 64, kernel="cuda")
    assert int(codes[1]) == code


def test_float32_literal_rounds_once():
    import numpy as np

    for text in ("0.1", "0.8333333", "-0.045525018125772476", "3.4028234e38", "1e-45"):
        assert bnb4.float32_literal(text) == float(np.float32(float(text)))
    # a decimal just below the halfway point of two floats: through a float64 it becomes the
    # halfway point and rounds to even (up); once, it rounds down
    assert bnb4.float32_literal("0.5016634166240692") == float(np.float32(0.5016634166240692)) - 2.0 ** -24
    assert bnb4.float32_literal("0.1202552504837513") == float(np.float32(0.1202552504837513)) + 2.0 ** -27


def test_reciprocal_scales_with_the_exponent_and_flushes():
    a = torch.tensor([0.12890625, 0.1201171875], dtype=torch.float32)
    base = mufu.reciprocal(a).view(torch.int32)
    assert (base - (1.0 / a).view(torch.int32)).tolist() == [-1, 1]  # the table's d for these mantissas
    for e in (-100, -7, 3, 60, 125):
        got = mufu.reciprocal(a * 2.0 ** e).view(torch.int32)
        assert torch.equal(got, base - (e << 23)), e
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2.0 ** 126 * 1.5, -(2.0 ** 127), float("inf"), 2.0 ** -126, 2.0 ** 126])
    r = mufu.reciprocal(special)
    expect = [float("inf"), float("-inf"), float("inf"), float("-inf"), 0.0, -0.0, 0.0, 2.0 ** 126, 2.0 ** -126]
    assert r.tolist() == expect and torch.signbit(r).tolist() == [v < 0 or str(v) == "-0.0" for v in expect]
    assert torch.isnan(mufu.reciprocal(torch.tensor([float("nan")]))).all()


def test_fast_math_flushes_a_subnormal_quotient_to_a_positive_zero_code():
    """-1e-39 / 1.0 is subnormal: flushed to -0.0, which the FP4 tree (x < 0) codes as +0 (code 0)."""
    block = torch.zeros(64, dtype=torch.float32)
    block[0], block[1], block[2] = 1.0, -1e-39, 1e-39
    codes, _ = bnb4.quantize_4bit(block, "fp4", 64, kernel="cuda")
    assert codes[:3].tolist() == [3, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_reciprocal_is_the_hardware_instruction_on_this_gpu():
    """Every float32 mantissa at several exponents, and special values, against rcp.approx.ftz.f32
    run on this GPU (through torch's jiterator, which compiles the inline PTX with NVRTC)."""
    fn = torch.cuda.jiterator._create_jit_fn(
        'template <typename T> T rcp_approx(T x) { float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }')
    mant = torch.arange(1 << 23, device="cuda", dtype=torch.int32)
    x = (mant | 0x3F800000).view(torch.float32)
    for e in (-126, -20, 0, 13, 126):
        xe = x * 2.0 ** e
        assert torch.equal(mufu.reciprocal(xe).view(torch.int32), fn(xe).view(torch.int32)), e
    special = torch.tensor([0.0, -0.0, 1e-40, 2.0 ** 127, float("inf"), 3.0e38], device="cuda")
    assert torch.equal(mufu.reciprocal(special).view(torch.int32), fn(special).view(torch.int32))
