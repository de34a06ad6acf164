"""loramerge.arithmetic.algebra: adapter arithmetic as pure math, against float64 references written here.

cat must equal the weighted sum of deltas; svd must reach the Eckart-Young optimum without
forming the dense matrix; ties/dare must follow the papers (checked against a per-element loop
written independently below, and numpy float64 references in conftest; DARE's masks redrawn from its
documented randomness contract, never through the code under test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import dare_masks, dare_np, elect_np, ties_np
from loramerge.arithmetic import algebra
from loramerge.arithmetic.algebra import FactorTerm


def make_terms(seed: int, out: int, inn: int, ranks: list[int], weights: list[float],
               dtype=torch.float32) -> list[FactorTerm]:
    g = torch.Generator().manual_seed(seed)
    terms = []
    for r, w in zip(ranks, weights):
        b = torch.randn(out, r, generator=g, dtype=torch.float64).to(dtype)
        a = torch.randn(r, inn, generator=g, dtype=torch.float64).to(dtype)
        scale = 16.0 / r
        terms.append(FactorTerm(b, a, w * scale))
    return terms


def reference_sum(terms: list[FactorTerm]) -> torch.Tensor:
    """sum_i coef_i B_i A_i, one product per adapter, in float64."""
    total = 0
    for t in terms:
        total = total + t.coef * (t.left.double() @ t.right.double())
    return total


weights_st = st.floats(min_value=-3, max_value=3, allow_nan=False).filter(lambda w: abs(w) > 1e-3)
case_st = st.tuples(
    st.integers(0, 10_000),                                   # seed
    st.integers(1, 40), st.integers(1, 40),                   # out, in
    st.lists(st.integers(1, 9), min_size=1, max_size=4),      # ranks
).flatmap(lambda c: st.tuples(st.just(c), st.lists(weights_st, min_size=len(c[3]), max_size=len(c[3]))))


@settings(max_examples=60, deadline=None)
@given(case_st)
def test_cat_is_the_weighted_sum(case):
    (seed, out, inn, ranks), weights = case
    terms = make_terms(seed, out, inn, ranks, weights)
    low = algebra.cat(terms)
    assert low.rank == sum(ranks)
    assert low.left.dtype == low.right.dtype == torch.float32
    ref = reference_sum(terms)
    err = (low.left.double() @ low.right.double() - ref).abs().max()
    assert err <= 1e-5 * ref.abs().max() + 1e-30


@settings(max_examples=60, deadline=None)
@given(case_st, st.integers(1, 12))
def test_svd_reaches_the_eckart_young_bound(case, rank):
    (seed, out, inn, ranks), weights = case
    terms = make_terms(seed, out, inn, ranks, weights, torch.float64)
    low = algebra.svd(terms, rank, dtype=torch.float64)
    ref = reference_sum(terms)
    sigma = torch.linalg.svdvals(ref)                      # dense reference SVD
    keep = min(rank, out, inn, sum(ranks))
    assert low.rank == keep
    bound = float(sigma[keep:].pow(2).sum().sqrt())
    err = float(torch.linalg.matrix_norm(ref - low.left @ low.right))
    scale = float(sigma[0]) if sigma.numel() else 1.0
    assert err <= bound * (1 + 1e-3) + 1e-10 * scale
    # and it reports that error correctly without the dense matrix
    assert abs(low.discarded() - bound) <= 1e-3 * bound + 1e-10 * scale
    assert torch.allclose(low.sigma[:keep], sigma[:keep], rtol=1e-9, atol=1e-9 * scale)


def test_svd_at_full_rank_is_exact_and_balanced():
    terms = make_terms(1, 30, 50, [4, 6], [1.0, -2.0])
    low = algebra.svd(terms, 10)
    ref = reference_sum(terms)
    assert (low.left.double() @ low.right.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # sqrt(S) on each side: the factors' column/row norms agree
    assert torch.allclose(low.left.norm(dim=0), low.right.norm(dim=1), rtol=1e-4)


def test_svd_never_forms_the_dense_delta():
    # 200k x 300k: the dense delta would take 480 GB in float64. The factored path needs ~20 MB.
    terms = make_terms(2, 200_000, 300_000, [2, 1], [1.0, 0.5])
    low = algebra.svd(terms, 2)
    assert low.left.shape == (200_000, 2) and low.right.shape == (2, 300_000)
    assert low.relative_error() > 0


def test_truncate_is_optimal():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(40, 25, generator=g, dtype=torch.float64)
    low = algebra.truncate(d, 5, dtype=torch.float64)
    s = torch.linalg.svdvals(d)
    assert math.isclose(float(torch.linalg.matrix_norm(d - low.left @ low.right)),
                        float(s[5:].pow(2).sum().sqrt()), rel_tol=1e-9)


# --- TIES / DARE --------------------------------------------------------------------------

def ties_reference(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """Yadav et al. 2023, Algorithm 1, one entry at a time (lambda = 1)."""
    n = taus[0].numel()
    k = math.ceil(density * n)
    trimmed = []
    for t in taus:
        flat = t.reshape(-1).tolist()
        order = sorted(range(n), key=lambda i: -abs(flat[i]))[:k]
        kept = [0.0] * n
        for i in order:
            kept[i] = flat[i]
        trimmed.append(kept)
    out = []
    for p in range(n):
        mass = sum(tr[p] for tr in trimmed)
        gamma = 1.0 if mass >= 0 else -1.0
        agree = [tr[p] for tr in trimmed if tr[p] != 0 and math.copysign(1.0, tr[p]) == gamma]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(taus[0].shape)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from([0.1, 0.3, 0.5, 0.77, 1.0]))
def test_ties_matches_the_paper(seed, k, density):
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(7, 9, generator=g, dtype=torch.float64) for _ in range(k)]
    got = algebra.ties(taus, density)
    assert torch.allclose(got, ties_reference(taus, density), rtol=0, atol=1e-12)


def test_ties_weights_scale_and_negate():
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(20, 30, generator=g, dtype=torch.float64) for _ in range(3)]
    base = algebra.ties(taus, 0.4)
    # equal weights lambda: the paper's lambda * merge
    assert torch.allclose(algebra.ties([2.5 * t for t in taus], 0.4), 2.5 * base, atol=1e-12)
    # negating every task vector negates the merge (sign election follows the weights)
    assert torch.allclose(algebra.ties([-t for t in taus], 0.4), -base, atol=1e-12)
    # a single task vector at density 1 comes back unchanged
    assert torch.equal(algebra.ties(taus[:1], 1.0), taus[0])


def test_trim_keeps_the_largest_entries():
    t = torch.tensor([0.1, -5.0, 3.0, -0.2, 4.0, 0.0, 1.0, -2.0])
    got = algebra.trim(t, 0.5)
    assert got.tolist() == [0.0, -5.0, 3.0, 0.0, 4.0, 0.0, 0.0, -2.0]
    assert int((algebra.trim(t, 0.3) != 0).sum()) == 3     # ceil(0.3 * 8)


def test_dare_drops_at_the_right_rate_and_rescales():
    t = torch.randn(300, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = algebra.dare(t, 0.3, algebra.generator_for(7, "x"))
    (mask,) = dare_masks(7, "x", 1, t.shape, 0.3)
    assert np.array_equal(d.numpy(), dare_np([t.numpy()], [mask], 0.3)[0])  # the reference, exactly
    kept = d != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.01
    # deterministic per (seed, name); different seeds or names give other masks
    assert torch.equal(d, algebra.dare(t, 0.3, algebra.generator_for(7, "x")))
    assert not torch.equal(d, algebra.dare(t, 0.3, algebra.generator_for(8, "x")))
    assert not torch.equal(d, algebra.dare(t, 0.3, algebra.generator_for(7, "y")))
    # unbiased: the mean over many masks approaches t
    mean = sum(algebra.dare(t[:20, :20], 0.5, algebra.generator_for(s, "m")) for s in range(400)) / 400
    assert float((mean - t[:20, :20]).abs().mean()) < 0.1 * float(t[:20, :20].abs().mean())


def test_dare_methods_at_density_one_reduce_to_linear_and_ties():
    g = torch.Generator().manual_seed(9)
    taus = [torch.randn(10, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    assert torch.allclose(algebra.elementwise("dare_linear", taus, 1.0, 0, "m"), sum(taus), atol=1e-12)
    assert torch.allclose(algebra.elementwise("dare_ties", taus, 1.0, 0, "m"), ties_reference(taus, 1.0),
                          rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_dare_methods_match_the_papers(method, density):
    """Against numpy float64 written from the papers, with the masks drawn by the documented
    randomness contract (conftest.dare_masks): every adapter's vector in order, one generator."""
    g = torch.Generator().manual_seed(11)
    taus = [torch.randn(30, 40, generator=g, dtype=torch.float64) * (i + 1) for i in range(3)]
    got = algebra.elementwise(method, taus, density, 4, "mod").numpy()
    dropped = dare_np([t.numpy() for t in taus], dare_masks(4, "mod", 3, (30, 40), density), density)
    want = sum(dropped) if method == "dare_linear" else elect_np(dropped)
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    assert np.count_nonzero(got) < got.size  # something was dropped


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from([0.1, 0.3, 0.5, 1.0]))
def test_ties_matches_numpy(seed, k, density):
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(11, 13, generator=g, dtype=torch.float64) for _ in range(k)]
    got = algebra.ties(taus, density).numpy()
    assert np.abs(got - ties_np([t.numpy() for t in taus], density)).max() <= 1e-12


def test_bias_is_combined_linearly_for_exact_methods():
    terms = make_terms(0, 6, 5, [2, 3], [1.0, -0.5])
    b0 = torch.arange(6.0)
    terms = [terms[0]._replace(bias=b0), terms[1]]  # the second adapter has no bias
    got = algebra.combine_bias(terms, "svd")
    assert torch.allclose(got.double(), terms[0].coef * b0.double())
    assert algebra.combine_bias([terms[1]]) is None


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="density"):
        algebra.trim(torch.ones(3), bad)
