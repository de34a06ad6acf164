"""Adapter arithmetic on one target at a time. Pure math: factors in, factors out, no I/O.

Every adapter i that targets a module contributes a term (left_i, right_i, c_i) with
delta_i = c_i * left_i @ right_i, where left = lora_B [out, r_i], right = lora_A [r_i, in] and
c_i = w_i * s_i folds the user's weight w_i into the adapter's own scale s_i. The methods:

* cat:   exact. [c_1 B_1 | c_2 B_2 | ...] @ [A_1; A_2; ...] = sum_i c_i B_i A_i, rank sum r_i.
         (This is also what `linear` means here: the true weighted sum of the deltas.)
* svd:   the best rank-R approximation of sum_i c_i B_i A_i in Frobenius and spectral norm
         (Eckart-Young), computed from the factors alone:
             L = [c_1 B_1 | ...]  = Q_L R_L        (QR, out x k)
             M = [A_1; ...]^T     = Q_M R_M        (QR, in x k)
             delta = Q_L (R_L R_M^T) Q_M^T,  core = R_L R_M^T is only k x k (k = sum r_i)
             core = U S V^T  =>  delta = (Q_L U) S (Q_M V)^T is an SVD of delta itself,
         because Q_L U and Q_M V have orthonormal columns. Truncating S is then optimal.
         Cost O((out + in) k^2 + k^3) time and O((out + in) k) memory; a dense SVD of the
         out x in delta costs O(out * in * min(out, in)) time and O(out * in) memory.
* ties, dare_linear, dare_ties: elementwise methods on task vectors (Yadav et al. 2023,
         "TIES-Merging", arXiv:2306.01708; Yu et al. 2023, "Language Models are Super Mario",
         arXiv:2311.03099). They need the dense delta of each adapter for this one target, and
         their result has full rank in general, so it is re-factored to rank R by a truncated
         SVD (`truncate`), the optimal rank-R approximation of the merged delta.

Weights in the elementwise methods: the task vector of adapter i is tau_i = w_i s_i B_i A_i
(the weight is applied FIRST, so a negative weight negates the task vector, which then also
votes with the negated sign). TIES is then exactly the paper's algorithm on these task vectors
with lambda = 1: with equal weights w the result is w times the paper's merge. (PEFT elects the
sign on the unweighted vectors and applies weights afterwards; mergekit applies weights first
like us but divides by the sum of the agreeing weights instead of their count.)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


class FactorTerm(NamedTuple):
    """One adapter's contribution to one target: coef * left @ right (+ coef * bias)."""

    left: torch.Tensor            # [out, r]   (PEFT lora_B)
    right: torch.Tensor           # [r, in]    (PEFT lora_A)
    coef: float                   # w_i * s_i
    bias: torch.Tensor | None = None   # [out]  (PEFT lora_B.bias, unscaled)


@dataclass
class LowRank:
    """left @ right approximates (or equals) the combined delta. `sigma` are ALL singular values
    of the combined delta (descending) when known, so the truncation error is computable."""

    left: torch.Tensor            # [out, R]
    right: torch.Tensor           # [R, in]
    sigma: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def discarded(self) -> float:
        """||delta - left @ right||_F, by Eckart-Young sqrt(sum of the dropped sigma^2)."""
        if self.sigma is None:
            return 0.0
        return float(self.sigma[self.rank:].double().pow(2).sum().sqrt())

    def relative_error(self) -> float:
        """Frobenius error of the approximation relative to ||delta||_F (0 for exact methods)."""
        if self.sigma is None:
            return 0.0
        total = float(self.sigma.double().pow(2).sum().sqrt())
        return self.discarded() / total if total > 0 else 0.0


def _shapes(terms: list[FactorTerm]) -> tuple[int, int]:
    if not terms:
        raise ValueError("no terms to combine")
    out, inn = terms[0].left.shape[0], terms[0].right.shape[1]
    for t in terms:
        if t.left.shape[0] != out or t.right.shape[1] != inn or t.left.shape[1] != t.right.shape[0]:
            raise ValueError(f"factor shapes {list(t.left.shape)} @ {list(t.right.shape)} do not give "
                             f"a [{out}, {inn}] delta")
    return out, inn


def stacked(terms: list[FactorTerm], dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, M) with L @ M = sum_i coef_i left_i @ right_i: coefs folded into the left factors."""
    _shapes(terms)
    left = torch.cat([t.left.to(dtype) * t.coef for t in terms], dim=1)
    right = torch.cat([t.right.to(dtype) for t in terms], dim=0)
    return left, right


def cat(terms: list[FactorTerm], dtype: torch.dtype = torch.float32) -> LowRank:
    """Exact combination at rank sum r_i. The coefficients are folded in float64 and rounded once
    to `dtype` per element, so the product is the weighted sum up to that one rounding."""
    left, right = stacked(terms, torch.float64)
    return LowRank(left.to(dtype), right.to(dtype))


def svd(terms: list[FactorTerm], rank: int, dtype: torch.dtype = torch.float32,
        work_dtype: torch.dtype = torch.float64) -> LowRank:
    """The optimal rank-`rank` approximation of sum_i coef_i left_i @ right_i, never forming the
    out x in matrix (see the module docstring). The singular values are split evenly between
    the factors (left = Q_L U sqrt(S), right = sqrt(S) V^T Q_M^T) so neither factor dominates,
    as in a freshly trained LoRA. The result's rank is min(rank, out, in, sum r_i)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    left, right = stacked(terms, work_dtype)
    q_l, r_l = torch.linalg.qr(left)          # [out, k1], [k1, k]
    q_m, r_m = torch.linalg.qr(right.T)       # [in, k2],  [k2, k]
    core = r_l @ r_m.T                        # [k1, k2], k1, k2 <= k = sum r_i
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    new_left = (q_l @ u[:, :keep]) * root
    new_right = (root[:, None] * vh[:keep]) @ q_m.T
    return LowRank(new_left.to(dtype), new_right.to(dtype), sigma=s)


def dense(terms: list[FactorTerm], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum_i coef_i left_i @ right_i as a dense [out, in] tensor (one product over stacked factors)."""
    left, right = stacked(terms, dtype)
    return left @ right


def truncate(delta: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32) -> LowRank:
    """Optimal rank-`rank` factorization of a dense delta via an exact (deterministic) SVD.
    A randomized SVD would be faster but only approximately optimal and seed-dependent."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    return LowRank((u[:, :keep] * root).to(dtype), (root[:, None] * vh[:keep]).to(dtype), sigma=s)


# --- elementwise task-vector methods (on dense tensors of one target) -------------------------

def _check_density(density: float) -> None:
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise ValueError(f"density must be in (0, 1], got {density}")


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the ceil(density * n) largest-magnitude entries, zero the rest.
    Ties at the threshold are broken by torch.topk (deterministic on a given device)."""
    _check_density(density)
    n = tau.numel()
    k = min(n, math.ceil(density * n))
    if k >= n:
        return tau.clone()
    flat = tau.reshape(-1)
    idx = torch.topk(flat.abs(), k, largest=True, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(tau)


def dare(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry independently with probability 1 - density, rescale the survivors by
    1/density so the expectation is unchanged. Randomness only from `generator` (CPU)."""
    _check_density(density)
    if density >= 1.0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(keep.to(tau.device), tau / density, torch.zeros_like(tau))


def elect_and_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES steps 2-3: per entry, the elected sign is the sign of the total mass sum_i tau_i
    (zero mass elects +, as in the reference implementations); the result is the mean of the
    entries that are non-zero and agree with it (zero where none does)."""
    total = torch.zeros_like(taus[0])
    for t in taus:
        total += t
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    acc = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for t in taus:  # a loop, not a stack: peak memory stays at a few tensors, not len(taus)
        agree = torch.sign(t) == sign       # zero entries never agree: they do not vote or count
        acc += torch.where(agree, t, 0.0)
        count += agree.to(count.dtype)
    return acc / count.clamp_min(1.0)


def ties(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim each task vector to its top `density` fraction by
    magnitude, elect a sign per entry by total mass, average the agreeing entries. `taus` are
    already weighted (tau_i = w_i s_i B_i A_i); the paper's lambda is 1 here."""
    return elect_and_merge([trim(t, density) for t in taus])


def dare_linear(taus: list[torch.Tensor], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE then task arithmetic (Yu et al. 2023): sum_i DARE(tau_i)."""
    out = torch.zeros_like(taus[0])
    for t in taus:
        out += dare(t, density, generator)
    return out


def dare_ties(taus: list[torch.Tensor], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE as the sparsification step of TIES (Yu et al. 2023, sec. 4): random drop + rescale
    instead of the magnitude trim, then TIES's sign election and disjoint mean."""
    return elect_and_merge([dare(t, density, generator) for t in taus])


ELEMENTWISE = ("ties", "dare_linear", "dare_ties")
RANDOM = ("dare_linear", "dare_ties")


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, target name): the same target gets the same random
    mask whatever order targets are processed in, and different targets get independent ones."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def elementwise(method: str, taus: list[torch.Tensor], density: float, seed: int, name: str) -> torch.Tensor:
    """Apply an elementwise method to one target's task vectors (or one bias)."""
    if method == "ties":
        return ties(taus, density)
    gen = generator_for(seed, name)
    if method == "dare_linear":
        return dare_linear(taus, density, gen)
    if method == "dare_ties":
        return dare_ties(taus, density, gen)
    raise ValueError(f"unknown elementwise method {method!r}")


def combine_bias(terms: list[FactorTerm], method: str = "cat", density: float = 1.0, seed: int = 0,
                 name: str = "", dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The combined lora_B.bias at scale 1: bias deltas are not low-rank, so cat/svd/linear give
    the exact weighted sum sum_i coef_i b_i; the elementwise methods treat it as one more tensor."""
    if all(t.bias is None for t in terms):
        return None
    out = terms[0].left.shape[0]
    taus = [t.bias.to(torch.float64) * t.coef if t.bias is not None else torch.zeros(out, dtype=torch.float64)
            for t in terms]
    if method in ELEMENTWISE:
        return elementwise(method, taus, density, seed, name + ".bias").to(dtype)
    return torch.stack(taus).sum(0).to(dtype)
