"""LoRA factors in the base tensor's own layout. Pure math over an adapter's tensors.

Every consumer (engine, verify, algebra, ONNX) gets its factors here, so layout knowledge
(transposed Conv1D/embeddings, conv kernels) lives in one
place: for a pair and its base tensor W, with W2 = W.reshape(W.shape[0], -1),

    W2' = W2 + scale * left @ right,     left [W.shape[0], r], right [r, W2.shape[1]].
"""

from __future__ import annotations

import torch

from ..types import Adapter, LoraPair


def factors(adapter: Adapter, pair: LoraPair, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with delta2d = pair.scale * left @ right in W's 2-D view (scale NOT applied)."""
    a, b = adapter.tensors[pair.a_key], adapter.tensors[pair.b_key]
    if pair.experts:
        a, b = _expert(a, b, pair)
    a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if pair.groups is not None:
        b2 = _block_diagonal(b2, pair)
    if pair.layout == "transposed":
        # (B @ A).T = A.T @ B.T: W is [in, out]
        left, right = a2.T, b2.T
    elif pair.layout in ("linear", "conv"):
        left, right = b2, a2
    else:
        raise ValueError(f"unknown LoRA layout {pair.layout!r}")
    return left.contiguous(), right.contiguous()


def _expert(a: torch.Tensor, b: torch.Tensor, pair: LoraPair) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (A_e [r, in], B_e [out, r]) out of PEFT ParamWrapper factors holding E of them:
    lora_A [r*E, in] is expert-major (rows e*r .. e*r + r - 1), lora_B [out, r*E] rank-major
    (column k*E + e is expert e's rank k): PEFT's own reshapes (E, r, in) and (out, r, E). Then
    the rows of B_e this tensor holds (`out_rows`: the gate or up half of a fused gate_up_proj)."""
    n = pair.experts
    a_e = a.reshape(n, -1, a.shape[-1])[pair.expert]
    b_e = b.reshape(b.shape[0], -1, n)[:, :, pair.expert]
    if pair.out_rows is not None:
        b_e = b_e[pair.out_rows[0]:pair.out_rows[1]]
    return a_e, b_e


def _block_diagonal(b: torch.Tensor, pair: LoraPair) -> torch.Tensor:
    """loralib MergedLinear: B stacks one [rows, r] block per enabled group and A one [r, in] block
    per enabled group; group k's delta B_k @ A_k lands in the k-th enabled row group of W (what
    loralib computes with a grouped conv1d and zero_pad). As one product: a block-diagonal B."""
    r = pair.group_rank
    rows = b.shape[0] // sum(pair.groups)
    full = b.new_zeros((rows * len(pair.groups), r * sum(pair.groups)))
    k = 0
    for g, enabled in enumerate(pair.groups):
        if enabled:
            full[g * rows:(g + 1) * rows, k * r:(k + 1) * r] = b[k * rows:(k + 1) * rows]
            k += 1
    return full


def dense_delta(adapter: Adapter, pair: LoraPair, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """scale * B @ A as a dense tensor of W's full shape (float64 by default: for references); for
    one expert of a fused experts tensor, of that expert's slice W[e]."""
    left, right = factors(adapter, pair, dtype)
    return (pair.scale * (left @ right)).reshape(pair.base_shape)


def bias_delta(adapter: Adapter, pair: LoraPair, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    if pair.bias_key is None:
        return None
    return pair.scale * adapter.tensors[pair.bias_key].to(dtype)
