"""What the fused CPU kernel is fed besides W: A, B and the factors as numpy arrays, and a digest
of them. The digest is how a merged tensor from the premerge worker (engine/premerge_worker.py)
is known to be this process's own: the kernel's result is a function of W and these arrays alone
(correctly rounded: the same bits whatever path computes it), so equal digests of equal inputs
mean equal results. Standard library and numpy only: the worker has no torch."""

from __future__ import annotations

import hashlib

import numpy as np


def as_array(t) -> np.ndarray:
    """A CPU tensor as a C-contiguous float32 or float64 array: a view where it is one already,
    other dtypes widened to float64 (exactly)."""
    import torch  # the caller's tensor means torch is loaded
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64)
    return t.contiguous().numpy()


def digest(a: np.ndarray, b: np.ndarray, factors: np.ndarray) -> str:
    """sha256 of the kernel's inputs A [R, in], B [out, R] and the factors [R]: each array's
    dtype, shape and bytes (C order)."""
    h = hashlib.sha256()
    for x in (a, b, factors):
        h.update(f"{x.dtype.str}{x.shape};".encode())
        h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()
