"""readers.files.all_finite: the adapters' NaN/Inf check, a sum first and the exact test after."""

from __future__ import annotations

import pytest
import torch

from loramerge.readers.files import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_element_anywhere_is_found(dtype, bad):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 300, generator=g).to(dtype)
    assert all_finite(t)
    for flat in (0, 777, t.numel() - 1):
        u = t.clone()
        u.view(-1)[flat] = bad
        assert not all_finite(u), (dtype, bad, flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_sum_that_overflows_from_finite_elements_is_still_finite(dtype):
    big = torch.finfo(dtype).max
    t = torch.full((1000,), big, dtype=dtype)
    assert not torch.isfinite(t.sum())  # the quick test cannot decide ...
    assert all_finite(t)                # ... so the exact one does
    t[::2] = -big                       # +max and -max: a sum that may cancel or overflow either way
    assert all_finite(t)
    t[3] = float("inf")
    t[4] = float("-inf")                # inf + -inf: NaN, not finite either
    assert not all_finite(t)


def test_integers_and_empty_tensors_are_finite():
    assert all_finite(torch.arange(10))
    assert all_finite(torch.empty(0, 5))
