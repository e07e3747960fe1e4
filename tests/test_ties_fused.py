import pytest
import torch

from loramem.merge import MergeCache, ties
from loramem.ties_fused import thresholds, ties_merged_weights

SHAPES = {"a.weight": (24, 40), "b.weight": (40, 24)}


def integer_factors(seed: int, rank: int) -> dict:
    """Factors whose products are exact in fp32 (integers under 2^24, a scale of 0.5), so that any order of
    summation gives the same deltas and the fused and dense paths can be compared bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randint(-1000, 1000, (rank, cols), generator=gen).float(),
                   torch.randint(-1000, 1000, (rows, rank), generator=gen).float(), 0.5)
            for name, (rows, cols) in SHAPES.items()}


def dense_ties(params, factors, weights, **kw):
    deltas = [{name: s * b @ a for name, (a, b, s) in f.items()} for f in factors]
    merged = ties(deltas, weights, **kw)
    return {name: p.detach() + merged[name] for name, p in params.items()}


@pytest.fixture
def params():
    gen = torch.Generator().manual_seed(7)
    return {name: torch.nn.Parameter(torch.randint(-1000, 1000, shape, generator=gen).float())
            for name, shape in SHAPES.items()}


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("weights", [None, [0.5, -1.0, 2.0], [1.0, 0.0, 0.25]])
def test_fused_ties_equals_the_dense_merge(params, density, sign_method, weights):
    factors = [integer_factors(seed, rank) for seed, rank in [(0, 4), (1, 2), (2, 3)]]  # ranks may differ
    fused = ties_merged_weights(params, factors, weights, density, sign_method)
    reference = dense_ties(params, factors, weights, density=density, sign_method=sign_method)
    for name in SHAPES:
        assert torch.equal(fused[name], reference[name]), name
    assert not torch.equal(fused["a.weight"], params["a.weight"].detach())


def test_a_tie_at_the_threshold_keeps_exactly_k(params):
    ones = {name: (torch.ones(1, cols), torch.ones(rows, 1), 1.0) for name, (rows, cols) in SHAPES.items()}
    assert thresholds(ones, 0.5) == dict.fromkeys(SHAPES)  # every entry ties: the dense path decides
    fused = ties_merged_weights(params, [ones, integer_factors(3, 2)], None, 0.5)
    reference = dense_ties(params, [ones, integer_factors(3, 2)], None, density=0.5)
    for name in SHAPES:
        torch.testing.assert_close(fused[name], reference[name])


def test_thresholds_are_cached_per_module_and_density(params):
    cache = MergeCache(maxsize=8)
    factors = [integer_factors(seed, 4) for seed in range(3)]
    first = ties_merged_weights(params, factors, None, 0.2, keys=["m0", "m1", "m2"], cache=cache)
    assert len(cache) == 3
    ties_merged_weights(params, factors[:2], None, 0.2, keys=["m0", "m1"], cache=cache)
    assert len(cache) == 3  # the two modules' thresholds were reused
    cache.get_or_compute(("m2", 0.2), lambda: pytest.fail("m2's thresholds should be cached"))
    again = ties_merged_weights(params, factors, None, 0.2, keys=["m0", "m1", "m2"], cache=cache)
    assert all(torch.equal(first[name], again[name]) for name in SHAPES)
    ties_merged_weights(params, factors, None, 0.5, keys=["m0", "m1", "m2"], cache=cache)
    assert len(cache) == 6
