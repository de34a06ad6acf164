"""The codecs' math against independent references: FP8 against a float64 block quantizer written
here from the e4m3 bit layout; bitsandbytes 4-bit bit for bit against bitsandbytes itself."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loramerge.codecs import bnb4, fp8

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "quantized"


# -- FP8: an independent float64 reference ------------------------------------------------------

def _e4m3_values() -> np.ndarray:
    """Every finite non-negative float8_e4m3fn value, by code, from the bit layout (bias 7,
    subnormals m * 2^-9, no infinities, 0x7F is NaN)."""
    vals = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals)


E4M3 = _e4m3_values()


def _round_e4m3(x: float) -> float:
    """Nearest e4m3 value to x, ties to the even code, saturating at 448."""
    a = min(abs(x), 448.0)
    i = int(np.searchsorted(E4M3, a))
    if i == 0:
        r = E4M3[0]
    elif i == len(E4M3):
        r = E4M3[-1]
    else:
        lo, hi = E4M3[i - 1], E4M3[i]
        r = lo if a - lo < hi - a else hi if hi - a < a - lo else (lo if (i - 1) % 2 == 0 else hi)
    return math.copysign(r, x) if r else 0.0


def _reference_quantize(y: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = y.shape
    bm, bn = block
    scales = np.zeros((-(-rows // bm), -(-cols // bn)), dtype=np.float32)
    q = np.zeros_like(y)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            blk = y[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            amax = float(np.abs(blk).max())
            s = np.float32(amax / 448.0) if amax > 0 else np.float32(1.0)
            scales[i, j] = s
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = np.vectorize(lambda v: _round_e4m3(v / float(s)))(blk)
    return q, scales


def _fp8_cases():
    g = torch.Generator().manual_seed(12)
    y = torch.randn(300, 200, generator=g, dtype=torch.float64) * 0.03
    y[130:140] *= 1e-4                          # a spread of magnitudes: subnormal codes
    y[:128, 128:] = 0                           # an all-zero block
    y[256:, :128] = 2.0 ** -12 * torch.randint(-448 * 4, 448 * 4, (44, 128), generator=g) / 4
    yield "random, partial edges, zero and subnormal blocks", y, (128, 128)
    # exact ties: amax 448 * 2^-10 makes the scale 2^-10 exactly; values halfway between codes
    t = torch.zeros(64, 48, dtype=torch.float64)
    halves = torch.tensor([float(E4M3[i] + E4M3[i + 1]) / 2 for i in range(40, 120)], dtype=torch.float64)
    t.view(-1)[: halves.numel()] = halves * 2.0 ** -10
    t.view(-1)[halves.numel(): 2 * halves.numel()] = -halves * 2.0 ** -10
    t[0, 0] = 448 * 2.0 ** -10
    yield "ties to even", t, (64, 48)
    yield "other block size", torch.randn(70, 33, generator=g, dtype=torch.float64), (32, 16)


@pytest.mark.parametrize("name,y,block", list(_fp8_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_fp8_quantize_matches_float64_reference(name, y, block):
    q, s = fp8.quantize(y, block)
    q_ref, s_ref = _reference_quantize(y.numpy(), block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == s_ref.shape
    assert np.array_equal(s.numpy(), s_ref)
    assert np.array_equal(q.to(torch.float64).numpy(), q_ref)


def test_fp8_dequantize_is_exact_and_requantize_idempotent():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(257, 130, generator=g, dtype=torch.float64)
    q, s = fp8.quantize(w, (128, 128))
    d = fp8.dequantize(q, s, (128, 128))
    # exact: each value is q * s computed with Python floats (53-bit, and q*s needs only 28)
    for r, c in [(0, 0), (127, 129), (128, 0), (256, 129), (200, 64)]:
        assert float(d[r, c]) == float(q[r, c].float()) * float(s[r // 128, c // 128])
    q2, s2 = fp8.quantize(d, (128, 128))  # every block's max |q| is 448: the same bytes again
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    assert fp8.dequantize(q, s, (128, 128), torch.bfloat16).dtype == torch.bfloat16


def test_fp8_saturates_and_never_writes_nan():
    y = torch.tensor([[1e30, -1e30, 1.0, 0.0]], dtype=torch.float64)
    q, s = fp8.quantize(y, (128, 128))
    assert not torch.isnan(q.float()).any() and float(q.float().abs().max()) == 448.0


# -- bitsandbytes 4-bit: bit for bit against bitsandbytes (its CPU kernels) ----------------------

try:
    import bitsandbytes.functional as bnb_F
except ImportError:  # the test extra installs it; without it only the FP8 half runs
    bnb_F = None
needs_bnb = pytest.mark.skipif(bnb_F is None, reason="bitsandbytes is not installed (pip install -e '.[test]')")
SHAPES = [((128, 256), torch.bfloat16), ((3, 100), torch.bfloat16), ((77, 130), torch.float32),
          ((64, 64), torch.float16), ((5, 7), torch.bfloat16), ((300, 512), torch.bfloat16)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@needs_bnb
def test_code_tables_match_bitsandbytes():
    assert torch.equal(bnb4.dynamic_map(), bnb_F.create_dynamic_map())
    for qt in ("nf4", "fp4"):
        assert torch.equal(bnb4.code4(qt), bnb_F.get_4bit_type(qt, device="cpu"))


@needs_bnb
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,dtype", SHAPES, ids=lambda v: str(v))
def test_bnb4_cpu_kernel_bit_for_bit(shape, dtype, quant_type, double):
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w.view(-1)[:64] = 0  # an all-zero block (and, for the small shapes, a zero tail)
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type=quant_type)
    codes, absmax = bnb4.quantize_4bit(w, quant_type, 64, kernel="cpu")
    assert torch.equal(bnb4.pack(codes, quant_type), packed)
    if double:
        q, nested, offset = bnb4.quantize_absmax(absmax, kernel="cpu")
        assert torch.equal(q, state.absmax) and torch.equal(nested, state.state2.absmax)
        assert torch.equal(offset, state.offset)
    else:
        assert torch.equal(absmax, state.absmax)
    ref = bnb_F.dequantize_4bit(packed, state)
    ours = bnb4.qlora_base(w, quant_type, 64, double, kernel="cpu")
    same = _bits(ref) == _bits(ours)
    if quant_type == "fp4":
        # FP4 code 8 is -0.0: bitsandbytes' AVX-512 CPU kernel writes +0.0 there, its other paths
        # (and CUDA) -0.0; only that sign may differ
        same |= (bnb4.unpack(packed, w.numel()).view(shape) == 8) & (ref == 0) & (ours == 0)
    assert bool(same.all()), f"{int((~same).sum())} elements differ"


def test_cuda_kernel_nested_search_is_nearest_code():
    """The CUDA kernel's binary search picks the nearest dynamic-map code (CPU's lookup table
    does not, near 0): checked against brute force, away from exact midpoints."""
    code = bnb4.dynamic_map()
    x = torch.cat([torch.rand(20000, generator=torch.Generator().manual_seed(5)) * 2 - 1,
                   torch.randn(5000, generator=torch.Generator().manual_seed(6)) * 1e-4]).clamp(-1, 1)
    got = bnb4._binary_search(x, code)
    d = (x.double()[:, None] - code.double()[None]).abs()
    nearest = d.argmin(dim=1)
    two = d.topk(2, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-12
    assert torch.equal(got[clear], nearest[clear])
    lut = bnb4._lut_search(x, code)
    assert int((lut != nearest).sum()) > 0  # the CPU table is coarser: the two kernels do differ


def test_cuda_kernel_nf4_codes_equal_cpu_on_whole_nonzero_blocks():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    assert torch.equal(bnb4.quantize_4bit(w, "nf4", 64, "cuda")[0], bnb4.quantize_4bit(w, "nf4", 64, "cpu")[0])


@needs_bnb
@pytest.mark.parametrize("name,quant_type", [("llama-bnb-nf4", "nf4"), ("llama-bnb-fp4", "fp4")])
def test_stored_bnb_checkpoint_decodes_like_bitsandbytes(name, quant_type):
    """The fixture was quantized and saved by transformers + bitsandbytes; our decoder of its files
    must give bitsandbytes' own dequantize_4bit of the same quant_state, bit for bit."""
    from safetensors.torch import load_file

    from loramerge import codecs
    from loramerge.readers.checkpoint import open_checkpoint

    ck = open_checkpoint(FIX / name)
    sd = load_file(str(FIX / name / "model.safetensors"))
    assert ck.quant is not None and ck.quant.method == "bnb4" and len(ck.quant.groups) == 14
    for wname, group in ck.quant.groups.items():
        qs = {k[len(wname) + 1:]: v for k, v in sd.items() if k.startswith(wname + ".")}
        state = bnb_F.QuantState.from_dict(qs, device="cpu")
        ref = bnb_F.dequantize_4bit(sd[wname], state)
        ours = codecs.decode(group.codec, [sd[wname], *(sd[p] for p in group.parts)], group.shape, "cpu")
        assert group.codec.quant_type == quant_type and ours.shape == ref.shape and ours.dtype == ref.dtype
        same = _bits(ref) == _bits(ours)
        if quant_type == "fp4":
            same |= (ref == 0) & (ours == 0)
        assert bool(same.all()), wname


def _gpu_cases():
    """bf16/fp16/fp32 weights of varied scale (rows scaled over 6 decades, so absmax takes many
    mantissas), an all-zero block, and edge blocks: subnormal values beside 1.0 (fast math flushes
    their quotients) and a block of subnormals only."""
    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(shape, generator=g) * 0.05 for shape in [(4096, 1024), (3, 100), (300, 512)]]
    rows = 10.0 ** (torch.rand(2048, 1, generator=g) * 6 - 5)
    wide = torch.randn(2048, 2048, generator=g) * rows
    edge = torch.randn(4, 64, generator=g)
    edge[2, 0], edge[2, 1:] = 1.0, torch.randn(63, generator=g) * 1e-39
    edge[3] = torch.randn(64, generator=g) * 1e-39
    for w, dtypes in [(c, [torch.bfloat16]) for c in cases] + [(wide, [torch.bfloat16, torch.float16, torch.float32]),
                                                             (edge, [torch.bfloat16, torch.float32])]:
        w.view(-1)[:64] = 0
        for dtype in dtypes:
            yield w.to(dtype)


@needs_bnb
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False])
def test_bnb4_cuda_kernel_bit_for_bit_on_gpu(quant_type, double):
    """On a GPU: kernel='cuda' against bitsandbytes' CUDA kernels (what QLoRA training runs)."""
    for w in _gpu_cases():
        w = w.cuda()
        what = f"{tuple(w.shape)} {w.dtype}"
        packed, state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type=quant_type)
        codes, absmax = bnb4.quantize_4bit(w, quant_type, 64, kernel="cuda")
        ours_packed = bnb4.pack(codes, quant_type)
        assert torch.equal(ours_packed, packed), f"{what}: {int((ours_packed != packed).sum())} bytes differ"
        ref = bnb_F.dequantize_4bit(packed, state)
        ours = bnb4.qlora_base(w, quant_type, 64, double, kernel="cuda")
        assert torch.equal(_bits(ref), _bits(ours)), f"{what}: {int((_bits(ref) != _bits(ours)).sum())} differ"
