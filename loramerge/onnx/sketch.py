"""A content digest for matching initializers to base tensors that reads each tensor once, costs
no transposed copy, and runs at memory speed (numba; hashlib's blake2b on one core was the bulk
of folding into an 8B graph: every candidate initializer and every target, in both layouts).

The digest of a 2-D tensor X [r, c] is a pair of exact integer bilinear forms of its bits:
    s = sum_ij sum_l limb_l(X_ij) * U_r[i] * V_lc[j]   (mod P = 2^31 - 1)
where limb_l are the 16-bit pieces of the element's bit pattern and U, V fixed pseudo-random
vectors in [1, P) chosen by length. Addition mod P does not care about order, so the digest of
X.T is computed from X's own memory by swapping the roles of U and V: a graph that stores W.T is
matched without transposing anything. Two different tensors of one shape get the same pair only
when a nonzero degree-2 polynomial in the random entries vanishes: probability <= 2/P per form
(Schwartz-Zippel), 2^-60 for the pair. canonical=True first maps every value to a representative
of its class (subnormals and zeros to +0, values at or beyond the largest finite to +-inf, NaNs
to one NaN), as converters to half precision disagree on exactly these.

Tensors under SMALL elements, and every tensor without numba (LORAMERGE_NO_KERNEL, or a platform
without it), get blake2b of the canonical, contiguous bytes instead: digests are compared only
within one process and between tensors of one shape, which always take the same path.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

P = (1 << 31) - 1
FORMS = 2
SMALL = 1 << 16          # fewer elements: blake2b (the choice depends on the size only, so two
                         # tensors of one shape are always digested the same way)
_VECS: dict[tuple, np.ndarray] = {}
# dtype -> (unsigned view, exponent mask, mantissa mask, largest finite magnitude, canonical NaN)
_FORMAT = {
    torch.float16: (torch.int16, 0x7C00, 0x03FF, 0x7BFF, 0x7E00),
    torch.bfloat16: (torch.int16, 0x7F80, 0x007F, 0x7F7F, 0x7FC0),
    torch.float32: (torch.int32, 0x7F800000, 0x007FFFFF, 0x7F7FFFFF, 0x7FC00000),
    torch.float64: (torch.int64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF, 0x7FEFFFFFFFFFFFFF, 0x7FF8000000000000),
}
_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}

_kernel = None


def _vec(role: str, limb: int, form: int, n: int) -> np.ndarray:
    key = (role, limb, form, n)
    if key not in _VECS:
        seed = [ord(role), limb, form, n]
        _VECS[key] = np.random.Generator(np.random.PCG64(seed)).integers(1, P, n, dtype=np.int64)
    return _VECS[key]


def _weights(rows: int, cols: int, limbs: int, swapped: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row_w [FORMS, limbs, rows], col_w [FORMS, limbs, cols]) for a [rows, cols] array holding
    the logical tensor, or its transpose when `swapped` (then the roles of U and V trade places)."""
    key = ("W", rows, cols, limbs, swapped)
    if key not in _VECS:
        if len(_VECS) > 4096:
            _VECS.clear()  # many distinct shapes (row digests of packed blocks): keep memory bounded
        if swapped:
            row_w = np.stack([np.stack([_vec("V", l, f, rows) for l in range(limbs)]) for f in range(FORMS)])
            col_w = np.stack([np.stack([_vec("U", 0, f, cols)] * limbs) for f in range(FORMS)])
        else:
            row_w = np.stack([np.stack([_vec("U", 0, f, rows)] * limbs) for f in range(FORMS)])
            col_w = np.stack([np.stack([_vec("V", l, f, cols) for l in range(limbs)]) for f in range(FORMS)])
        _VECS[key] = (row_w, col_w)
    return _VECS[key]


def _numba_kernel():
    """The compiled kernels' module, or None without numba (imported on first use: numba is not needed
    by a fold without content matching)."""
    global _kernel
    if _kernel is None:
        try:
            if os.environ.get("LORAMERGE_NO_KERNEL"):
                raise ImportError
            from . import _sketch_kernel
            _kernel = _sketch_kernel
        except ImportError:
            _kernel = False
    return _kernel or None


def digest(t: torch.Tensor, canonical: bool = False) -> bytes:
    """16 bytes that equal for two tensors of one dtype and shape exactly when their bits (or, with
    canonical, their canonical values) are equal, up to the odds above. Any view works; a
    transposed 2-D view is read in its base's memory order."""
    t = t.detach().cpu()
    if t.numel() < SMALL or t.element_size() not in _INTS:
        return _blake(t, canonical)  # per-call overhead wins below this size (rows of packed tensors)
    kernel = _numba_kernel()
    if kernel is None:
        return _blake(t, canonical)
    swapped = False
    if transposed_view(t):
        t, swapped = t.T, True   # t.T is contiguous: read it in memory order, roles swapped
    x = t.reshape(1, -1) if t.dim() != 2 else t
    if x.dim() == 2 and x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    fmt = _FORMAT.get(t.dtype) if canonical else None
    bits = x.view(_INTS[t.element_size()]).numpy()
    row_w, col_w = _weights(rows, cols, t.element_size() // 2, swapped)
    emask, mmask, fmax, nan = (fmt[1:] if fmt else (0, 0, 0, 0))
    out = kernel.forms(bits, row_w, col_w, fmt is not None, emask, mmask, fmax, nan)
    return b"".join(int(v).to_bytes(8, "little") for v in out)


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(elements whose canonical values differ, elements whose bits differ) between `a` and `b`, of
    one float dtype and shape: exact, element by element. `b` may be any view; a transposed view of
    a contiguous tensor is read in place (in tiles), not copied."""
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"compare: {a.dtype} {list(a.shape)} against {b.dtype} {list(b.shape)}")
    a, b = a.detach().cpu(), b.detach().cpu()
    kernel = _numba_kernel()
    fmt = _FORMAT.get(a.dtype)
    if kernel is None or fmt is None or a.numel() < SMALL:
        raw = _bit_differences(a, b)
        return (_bit_differences(canonical_values(a), canonical_values(b)) if raw and fmt else raw), raw
    transposed = transposed_view(b)
    shape = tuple(a.shape) if a.dim() == 2 else (a.shape[0] if a.dim() > 2 else 1, -1)
    a = a.contiguous().reshape(shape)
    b = b.T if transposed else b.contiguous().reshape(shape)   # b.T: the contiguous memory behind b
    ints = fmt[0]
    magmask = (1 << (8 * a.element_size() - 1)) - 1
    canon, raw = kernel.differ(a.view(ints).numpy(), b.view(ints).numpy(), transposed, magmask, *fmt[1:2], *fmt[3:])
    return int(canon), int(raw)


def transposed_view(t: torch.Tensor) -> bool:
    """Whether `t` is the transpose of a contiguous 2-D tensor (t.T is then read in memory order)."""
    return t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride() == (1, t.shape[0])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one float dtype and shape hold the same bits (any device, any views:
    an integer comparison, so exact anywhere)."""
    ints = _INTS.get(a.element_size(), torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a.view(ints), b.view(ints)))


def _bit_differences(a: torch.Tensor, b: torch.Tensor) -> int:
    ints = _INTS.get(a.element_size(), torch.uint8)
    return int((a.contiguous().view(ints) != b.contiguous().view(ints)).sum())


def _blake(t: torch.Tensor, canonical: bool) -> bytes:
    if canonical and t.dtype in _FORMAT:
        t = canonical_values(t)
    t = t.contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return hashlib.blake2b(data, digest_size=16).digest()


def canonical_values(t: torch.Tensor) -> torch.Tensor:
    """The canonical representative of every value (see the module docstring), by the numbers."""
    fi = torch.finfo(t.dtype)
    a = t.abs()
    x = torch.where(a < fi.tiny, torch.zeros((), dtype=t.dtype), t)
    x = torch.where(a >= fi.max, torch.sign(t) * float("inf"), x)
    return torch.where(torch.isnan(t), torch.full((), float("nan"), dtype=t.dtype), x)
