"""The math of PEFT's other tuners: pure functions of an adapter's tensors, in float64.

Every delta is given in W's 2-D view W2 = W.reshape(W.shape[0], -1) (W as stored: [out, in]
for Linear, [in, out] for a transposed layout, [out, in, *k] for conv), so the engine, verify
and the ONNX fold all apply it the same way. `shape` is the base tensor's shape, resolved by the
plan. The constant factor (TunerTarget.scale, times the user's weight) is NOT applied here.

Kinds and their tensor roles (TunerTarget.keys):
  adalora  A [r, in*k], B [out, r], E [r, 1]          delta = B diag(E) A   (PEFT SVDLinear/Conv2d)
  vera     A [r, in_max], B [out_max, r] (shared),     delta = (lambda_b * B[:out]) diag(lambda_d) A[:, :in]
           lambda_d [r], lambda_b [out]
  loha     w1a, w1b, w2a, w2b (+ t1, t2: Tucker cores) delta = (w1a w1b) * (w2a w2b)  (Hadamard)
  lokr     w1 | w1a w1b;  w2 | w2a w2b | t2 w2a w2b    delta = kron(w1, w2)
  ia3      l (PEFT's ia3_l)                            W' = W * l, broadcast along rec.axis
The low-rank kinds return factors (left, right, per-rank vector) so the engine can add them to
LoRA terms in one product; the dense kinds return a function of a row range, so a delta is never
held whole (Kronecker and Hadamard products are full rank); IA3 returns its multiplier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..types import Adapter, TunerTarget

LOWRANK = ("adalora", "vera")
DENSE = ("loha", "lokr")
SCALING = ("ia3",)
ROLES = {
    "adalora": ("A", "B", "E"),
    "vera": ("A", "B", "lambda_d", "lambda_b"),
    "loha": ("w1a", "w1b", "w2a", "w2b", "t1", "t2"),
    "lokr": ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"),
    "ia3": ("l",),
}


def is_lowrank(pair) -> bool:
    """LoRA pairs (without DoRA) and the low-rank tuners: what one factored product can hold."""
    if isinstance(pair, TunerTarget):
        return pair.tuner in LOWRANK
    return pair is not None and not pair.magnitude_key


def _get(adapter: Adapter, rec: TunerTarget, role: str, device) -> torch.Tensor | None:
    key = rec.key(role)
    return None if key is None else adapter.tensors[key].to(device=device, dtype=torch.float64)


def view2d(shape: tuple[int, ...]) -> tuple[int, int]:
    rest = 1
    for d in shape[1:]:
        rest *= d
    return (shape[0] if shape else 1), rest


def lowrank(adapter: Adapter, rec: TunerTarget, shape: tuple[int, ...], device=None):
    """(left [rows, R], right [R, cols], per_rank [R]) with delta2d = left @ diag(per_rank) @ right,
    float64, for the low-rank kinds (AdaLoRA, VeRA)."""
    if rec.tuner == "adalora":
        b, a, e = (_get(adapter, rec, r, device) for r in ("B", "A", "E"))
        left, right, per_rank = b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), e.reshape(-1)
    elif rec.tuner == "vera":
        a, b, lam_d, lam_b = (_get(adapter, rec, r, device) for r in ("A", "B", "lambda_d", "lambda_b"))
        out = lam_b.numel()
        inn = shape[0] if rec.layout == "transposed" else shape[1]
        # PEFT slices the shared projections to the layer's size: B[:out, :], A[:, :in]
        left, right, per_rank = b[:out] * lam_b.reshape(-1, 1), a[:, :inn], lam_d.reshape(-1)
    else:
        raise ValueError(f"{rec.tuner} is not a low-rank tuner")
    if rec.layout == "transposed":  # W is [in, out]: delta^T = right^T diag left^T
        return right.T.contiguous(), left.T.contiguous(), per_rank
    return left.contiguous(), right.contiguous(), per_rank


def dense(adapter: Adapter, rec: TunerTarget, shape: tuple[int, ...], device=None) -> Callable[[int, int], torch.Tensor]:
    """rows(i, j): rows i..j of the delta in W's 2-D view, float64, for LoHa and LoKr. The small
    factors are prepared once; each call builds only the rows asked for."""
    if rec.tuner == "loha":
        return _loha(adapter, rec, device)
    if rec.tuner == "lokr":
        return _lokr(adapter, rec, shape, device)
    raise ValueError(f"{rec.tuner} has no dense delta")


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP/Tucker rebuild: core t [r, r, *k], wa [r, out], wb [r, in] -> [out, in, *k]."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def _loha(adapter, rec, device):
    w1a, w1b, w2a, w2b, t1, t2 = (_get(adapter, rec, r, device) for r in ROLES["loha"])
    if t1 is None:  # Linear, or a conv flattened to [out, in*k]: (w1a w1b) * (w2a w2b)
        w1b, w2b = w1b.reshape(w1b.shape[0], -1), w2b.reshape(w2b.shape[0], -1)

        def rows(i: int, j: int) -> torch.Tensor:
            return (w1a[i:j] @ w1b) * (w2a[i:j] @ w2b)
    else:  # use_effective_conv2d: each factor a Tucker product; the output rows are wa's columns

        def rows(i: int, j: int) -> torch.Tensor:
            d = _tucker(t1, w1a[:, i:j], w1b) * _tucker(t2, w2a[:, i:j], w2b)
            return d.reshape(d.shape[0], -1)
    return rows


def _lokr(adapter, rec, shape, device):
    w1, w1a, w1b, w2, w2a, w2b, t2 = (_get(adapter, rec, r, device) for r in ROLES["lokr"])
    if w1 is None:
        w1 = w1a @ w1b
    if w2 is None:
        w2 = _tucker(t2, w2a, w2b) if t2 is not None else w2a @ w2b.reshape(w2b.shape[0], -1)
    if rec.origin == "peft" and w2.dim() == 3:
        # PEFT's make_kron aligns the factors only for 4-D w2: for Conv1d with a full w2 [c, d, k]
        # torch.kron pads w1 to [1, a, b] and the result [c, a*d, b*k] is reshaped to W's shape.
        # Training saw exactly that weight, so that is the delta to merge (small: computed whole).
        full = torch.kron(w1, w2).reshape(view2d(shape))

        def rows(i: int, j: int) -> torch.Tensor:
            return full[i:j]
        return rows
    # kron(w1 [a, b], w2 [c, d, *k]) with w1 padded to w2's rank, in W's 2-D view, is
    # kron(w1, w2 as [c, d*k]): row i*c + p of the delta is w1[i] (x) w2[p].
    w2 = w2.reshape(w2.shape[0], -1)
    c = w2.shape[0]

    def rows(i: int, j: int) -> torch.Tensor:
        lo = i // c
        block = torch.kron(w1[lo:-(-j // c)], w2)
        return block[i - lo * c:j - lo * c]
    return rows


def ia3_multiplier(adapter: Adapter, rec: TunerTarget, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """IA3's vector shaped to broadcast against a tensor of `shape`, float64: W, or (a 1-D shape)
    the bias, which PEFT scales with the output vector. Mirrors PEFT's IA3 merge: Linear scales
    rows (output units) or, for feedforward_modules, columns (inputs); transposed (Conv1D) the
    other way round; conv kernels scale output channels, or input channels with grouped convs'
    vector expanded to each group's slice."""
    l = _get(adapter, rec, "l", device).reshape(-1)
    n = len(shape)
    if n == 1:
        return l
    out_axis = 1 if rec.layout == "transposed" else 0
    axis = out_axis if rec.axis == "out" else 1 - out_axis
    if rec.layout == "conv" and rec.axis == "in":
        groups = l.numel() // shape[1]
        if groups > 1:  # PEFT: [groups, 1, in/groups] expanded to each group's output channels
            per = l.reshape(groups, 1, shape[1]).expand(groups, shape[0] // groups, shape[1])
            return per.reshape(shape[0], shape[1], *([1] * (n - 2)))
    view = [1] * n
    view[axis] = l.numel()
    return l.reshape(view)


def merge_rows(w: torch.Tensor, start: int, stop: int, multipliers, lowranks, denses) -> torch.Tensor:
    """Rows start..stop of the merged tensor's 2-D view in float64: W, times every IA3 multiplier
    (each a (tensor broadcastable to W, power) pair, power 1 or -1), plus every low-rank term
    (left, right, per-rank factor) and dense term (rows function, factor)."""
    w2 = w.reshape(w.shape[0], -1)
    acc = w2[start:stop].to(torch.float64)
    for m, power in multipliers:
        block = m.expand(w.shape)[start:stop].reshape(acc.shape) if m.dim() == w.dim() else m
        acc = acc * block if power == 1 else acc / block
    for left, right, per_rank in lowranks:
        acc = torch.addmm(acc, left[start:stop] * per_rank, right)
    for rows, factor in denses:
        acc = acc + factor * rows(start, stop)
    return acc
