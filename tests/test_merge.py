"""Tests for loramem.merge: PEFT round trip, merge methods against plain references and PEFT, apply/revert."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramem.errors import LoramemError
from loramem.merge import (
    METHODS,
    MergeCache,
    apply_in_place,
    applied,
    cat_factors,
    dare_linear,
    dare_ties,
    fused,
    linear,
    lora_deltas,
    magnitude_prune,
    merge,
    merge_key,
    revert,
    ties,
    to_low_rank,
)

FEW = settings(max_examples=25, deadline=None, database=None)


def random_deltas(n: int, shapes: dict[str, tuple[int, int]], seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(shape, generator=gen) for name, shape in shapes.items()} for _ in range(n)]


@st.composite
def task_vectors(draw, max_modules: int = 4, positive_weights: bool = False):
    """1-4 modules of two small layers, from a drawn seed (randn has no ties in magnitude), and weights."""
    n = draw(st.integers(1, max_modules))
    dims = st.integers(1, 5)
    shapes = {"a.weight": (draw(dims), draw(dims)), "b.weight": (draw(dims), draw(dims))}
    deltas = random_deltas(n, shapes, draw(st.integers(0, 2**16)))
    halves = st.integers(1, 4) if positive_weights else st.integers(-4, 4)
    weights = draw(st.lists(halves.map(lambda i: i / 2), min_size=n, max_size=n))
    return deltas, weights


densities = st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0])


# ---------------------------------------------------------------------------------------------------
# Plain numpy references, written from the papers rather than from merge.py


def ref_trim(t: np.ndarray, density: float) -> np.ndarray:
    flat = t.ravel()
    k = max(1, int(density * flat.size + 1e-9))
    out = np.zeros_like(flat)
    for j in np.argsort(-np.abs(flat), kind="stable")[:k]:
        out[j] = flat[j]
    return out.reshape(t.shape)


def ref_ties(tensors: list[np.ndarray], weights: list[float], density: float, sign_method: str) -> np.ndarray:
    trimmed = [w * ref_trim(t, density) for w, t in zip(weights, tensors)]
    out = np.zeros(tensors[0].shape)
    for idx in np.ndindex(out.shape):
        values = [t[idx] for t in trimmed]
        score = sum(values) if sign_method == "total" else sum(np.sign(v) for v in values)
        elected = 1.0 if score >= 0 else -1.0
        agreeing = [v for v in values if np.sign(v) == elected]
        out[idx] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def as_np(deltas: list[dict[str, torch.Tensor]], name: str) -> list[np.ndarray]:
    return [d[name].double().numpy() for d in deltas]


# ---------------------------------------------------------------------------------------------------
# Reading PEFT adapters


@pytest.mark.parametrize("variant", ["plain", "rslora_with_alpha_pattern"])
def test_lora_deltas_equal_peft_merged_minus_base(variant):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )
    base = LlamaForCausalLM(config)
    before = {name: w.clone() for name, w in base.state_dict().items()}
    rslora = variant != "plain"
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
        alpha_pattern={"layers.1.self_attn.q_proj": 32} if rslora else {},
    )
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # PEFT starts B at zero, which would make every delta zero
    if rslora:  # per-layer scales, read from PEFT itself
        scale = {
            name.removeprefix("base_model.model.") + ".weight": module.scaling["default"]
            for name, module in model.named_modules() if isinstance(module, LoraLayer)
        }
        assert len(set(scale.values())) == 2
    else:
        scale = 8 / 4

    deltas = lora_deltas(get_peft_model_state_dict(model), scale)
    after = model.merge_and_unload().state_dict()

    expected = {f"model.layers.{i}.{m}.weight" for i in range(2)
                for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert set(deltas) == expected
    for name, weight in after.items():
        if name in deltas:
            torch.testing.assert_close(deltas[name], weight - before[name])
        else:
            assert torch.equal(weight, before[name]), name


def test_lora_deltas_refuses_what_it_cannot_merge():
    a, b = torch.randn(2, 3), torch.randn(4, 2)
    key = "base_model.model.layer.lora_{}.weight"
    assert set(lora_deltas({key.format("A"): a, key.format("B"): b}, 1.0)) == {"layer.weight"}
    with pytest.raises(LoramemError, match="without its partner"):
        lora_deltas({key.format("A"): a}, 1.0)
    with pytest.raises(LoramemError, match="do not fit"):
        lora_deltas({key.format("A"): a, key.format("B"): torch.randn(4, 3)}, 1.0)
    with pytest.raises(LoramemError, match="cannot merge"):
        lora_deltas({"base_model.model.layer.lora_magnitude_vector": torch.randn(4)}, 1.0)
    with pytest.raises(LoramemError, match="no LoRA scale"):
        lora_deltas({key.format("A"): a, key.format("B"): b}, {"other.weight": 1.0})


# ---------------------------------------------------------------------------------------------------
# Methods


@FEW
@given(task_vectors())
def test_linear_is_the_weighted_sum(data):
    deltas, weights = data
    merged = linear(deltas, weights)
    for name in deltas[0]:
        expected = sum(w * t for w, t in zip(weights, as_np(deltas, name)))
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cat_factors_equals_linear():
    gen = torch.Generator().manual_seed(0)
    ranks, scales, weights = [2, 3, 1], [2.0, 0.5, 4.0], [1.0, -0.5, 0.25]
    factors = [
        {name: (torch.randn(r, 5, generator=gen), torch.randn(6, r, generator=gen), s) for name in ("p", "q")}
        for r, s in zip(ranks, scales)
    ]
    merged = cat_factors(factors, weights)
    expected = linear([{name: s * b @ a for name, (a, b, s) in f.items()} for f in factors], weights)
    for name, (a, b, s) in merged.items():
        assert a.shape == (sum(ranks), 5) and b.shape == (6, sum(ranks)) and s == 1.0
        torch.testing.assert_close(b @ a, expected[name])


def test_cat_factors_checks_layer_shapes():
    f1 = {"p": (torch.randn(2, 5), torch.randn(6, 2), 1.0)}
    f2 = {"p": (torch.randn(2, 4), torch.randn(6, 2), 1.0)}
    with pytest.raises(LoramemError, match="shape"):
        cat_factors([f1, f2])


@FEW
@given(task_vectors(), densities, st.sampled_from(["total", "frequency"]))
def test_ties_matches_the_reference(data, density, sign_method):
    deltas, weights = data
    merged = ties(deltas, weights, density=density, sign_method=sign_method)
    for name in deltas[0]:
        expected = ref_ties(as_np(deltas, name), weights, density, sign_method)
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The density")  # PEFT warns that density 1 prunes nothing
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_and_magnitude_prune_match_peft(density, sign_method):
    """Where conventions meet: PEFT elects signs before weighting, which is the same as electing after
    for equal positive weights ("total") or any positive weights ("frequency")."""
    from peft.utils import merge_utils

    deltas = random_deltas(3, {"w": (6, 5)}, seed=1)  # 30 entries: density * 30 is a whole number
    weights = [0.7, 0.7, 0.7] if sign_method == "total" else [0.3, 1.0, 2.0]
    tensors, w = [d["w"] for d in deltas], torch.tensor(weights)
    theirs = merge_utils.ties(tensors, w, density, sign_method)
    torch.testing.assert_close(ties(deltas, weights, density=density, sign_method=sign_method)["w"], theirs)
    theirs = merge_utils.magnitude_prune(tensors, w, density)
    torch.testing.assert_close(magnitude_prune(deltas, weights, density=density)["w"], theirs)


@FEW
@given(task_vectors(), st.sampled_from(["total", "frequency"]))
def test_ties_output_has_the_elected_sign_or_is_zero(data, sign_method):
    deltas, weights = data
    merged = ties(deltas, weights, density=1.0, sign_method=sign_method)
    for name in deltas[0]:
        weighted = [w * t for w, t in zip(weights, as_np(deltas, name))]
        score = sum(weighted) if sign_method == "total" else sum(np.sign(t) for t in weighted)
        assert (merged[name].numpy() * score >= 0).all()


@FEW
@given(task_vectors(), densities)
def test_ties_stays_within_the_largest_contribution(data, density):
    deltas, weights = data
    merged = ties(deltas, weights, density=density)
    for name in deltas[0]:
        bound = np.max([abs(w) * np.abs(t) for w, t in zip(weights, as_np(deltas, name))], axis=0)
        assert (np.abs(merged[name].numpy()) <= bound * (1 + 1e-6)).all()


@FEW
@given(task_vectors(max_modules=1))
def test_ties_of_one_module_at_density_one_is_the_weighted_module(data):
    deltas, (w,) = data
    merged = ties(deltas, [w], density=1.0)
    for name, t in deltas[0].items():
        torch.testing.assert_close(merged[name], w * t)


@FEW
@given(task_vectors(positive_weights=True))
def test_ties_of_identical_modules_is_the_mean_weight_times_the_module(data):
    deltas, weights = data
    same = [deltas[0]] * len(weights)
    merged = ties(same, weights, density=1.0)
    for name, t in deltas[0].items():
        torch.testing.assert_close(merged[name], float(np.mean(weights)) * t)


def test_trim_keeps_floor_of_density_times_size_and_at_least_one():
    t = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    kept = magnitude_prune([{"w": t}], density=0.29)["w"]  # 0.29 * 100 is 28.999... in floating point
    assert int((kept != 0).sum()) == 29
    assert torch.equal(kept.abs().flatten().topk(29).values, t.abs().flatten().topk(29).values)
    assert int((magnitude_prune([{"w": t[:1, :3]}], density=0.1)["w"] != 0).sum()) == 1


@FEW
@given(task_vectors(), st.sampled_from(["total", "frequency"]))
def test_dare_at_density_one_is_the_undropped_method(data, sign_method):
    deltas, weights = data
    plain, tied = linear(deltas, weights), ties(deltas, weights, density=1.0, sign_method=sign_method)
    dared = dare_linear(deltas, weights, density=1.0, seed=3)
    dared_tied = dare_ties(deltas, weights, density=1.0, sign_method=sign_method, seed=3)
    for name in deltas[0]:
        assert torch.equal(dared[name], plain[name])
        assert torch.equal(dared_tied[name], tied[name])


def test_dare_drops_and_rescales_reproducibly():
    deltas = random_deltas(1, {"w": (64, 64)}, seed=0)
    t, density, w = deltas[0]["w"], 0.3, 2.0
    out = dare_linear(deltas, [w], density=density, seed=7)["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - density) < 0.05
    torch.testing.assert_close(out[kept], w * t[kept] / density)
    assert torch.equal(out, dare_linear(deltas, [w], density=density, seed=7)["w"])
    assert not torch.equal(out, dare_linear(deltas, [w], density=density, seed=8)["w"])
    two = random_deltas(2, {"w": (8, 8)}, seed=1)
    assert torch.equal(dare_ties(two, density=0.5, seed=7)["w"], dare_ties(two, density=0.5, seed=7)["w"])


def test_merge_dispatches_by_name():
    deltas = random_deltas(3, {"w": (4, 3)}, seed=2)
    assert set(METHODS) == {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    assert torch.equal(merge(deltas, "linear", [1, 2, 3])["w"], linear(deltas, [1, 2, 3])["w"])
    assert torch.equal(merge(deltas, "ties", density=0.5)["w"], ties(deltas, density=0.5)["w"])
    assert torch.equal(merge(deltas, "dare_ties", density=0.5)["w"], dare_ties(deltas, density=0.5, seed=0)["w"])


GOOD = random_deltas(2, {"w": (4, 3)}, seed=3)


@pytest.mark.parametrize(
    "deltas, method, weights, params, message",
    [
        (GOOD, "average", None, {}, "unknown merge method"),
        ([], "linear", None, {}, "empty"),
        ([GOOD[0], {"v": torch.zeros(4, 3)}], "linear", None, {}, "different layers"),
        ([GOOD[0], {"w": torch.zeros(3, 4)}], "ties", None, {"density": 0.5}, "shape"),
        (GOOD, "ties", None, {"density": 0.0}, "density"),
        (GOOD, "dare_linear", None, {"density": 1.5}, "density"),
        (GOOD, "magnitude_prune", None, {"density": float("nan")}, "density"),
        (GOOD, "linear", [1.0], {}, "weights"),
        (GOOD, "linear", None, {"density": 0.5}, "no parameter 'density'"),
        (GOOD, "ties", None, {}, "needs parameter 'density'"),
        (GOOD, "ties", None, {"density": 0.5, "sign_method": "vote"}, "sign_method"),
    ],
)
def test_merge_rejects_bad_input_with_one_line(deltas, method, weights, params, message):
    with pytest.raises(LoramemError, match=message) as err:
        merge(deltas, method, weights, **params)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Applying to a model, low rank


def tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)


@FEW
@given(st.integers(0, 2**16), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_apply_then_revert_restores_every_bit(seed, dtype):
    torch.manual_seed(seed)
    model = tiny_model(dtype)
    before = {name: w.clone() for name, w in model.state_dict().items()}
    deltas = {"0.weight": torch.randn(3, 4), "1.weight": torch.randn(2, 3)}
    handle = apply_in_place(model, deltas)
    torch.testing.assert_close(model[0].weight.float(), before["0.weight"].float() + deltas["0.weight"],
                               rtol=1e-2, atol=1e-2)
    assert torch.equal(model[0].bias, before["0.bias"])
    revert(model, handle)
    for name, w in model.state_dict().items():
        assert torch.equal(w, before[name]) and w.dtype == dtype


def test_revert_is_exact_where_subtracting_is_not():
    model = tiny_model(torch.bfloat16)
    before = model[0].weight.clone()
    deltas = {"0.weight": torch.full((3, 4), 100.0)}
    with applied(model, deltas):
        assert not torch.equal(model[0].weight - deltas["0.weight"].bfloat16(), before)
    assert torch.equal(model[0].weight, before)


def test_applied_restores_after_an_error_and_checks_before_writing():
    model = tiny_model()
    before = model[0].weight.clone()
    with pytest.raises(RuntimeError), applied(model, {"0.weight": torch.ones(3, 4)}):
        assert torch.equal(model[0].weight, before + 1)
        raise RuntimeError
    assert torch.equal(model[0].weight, before)
    for bad in ({"0.weight": torch.ones(3, 4), "9.weight": torch.ones(1)}, {"0.weight": torch.ones(4, 3)}):
        with pytest.raises(LoramemError):
            apply_in_place(model, bad)
        assert torch.equal(model[0].weight, before)


def test_fused_factors_equal_the_merged_weights_and_touch_nothing():
    torch.manual_seed(0)
    model, x = tiny_model(), torch.randn(5, 4)
    factors = {"0.weight": (torch.randn(2, 4), torch.randn(3, 2), 0.5), "1.weight": (torch.randn(1, 3), torch.randn(2, 1), 2.0)}
    before, base_out = {n: w.clone() for n, w in model.state_dict().items()}, model(x)
    with torch.no_grad(), applied(model, factors=factors):
        merged_out = model(x)
    with torch.no_grad(), fused(model, factors):
        fused_out = model(x)
        assert all(torch.equal(w, before[n]) for n, w in model.state_dict().items())
    torch.testing.assert_close(fused_out, merged_out)
    assert not torch.allclose(fused_out, base_out)
    with pytest.raises(RuntimeError), fused(model, factors):
        raise RuntimeError
    assert torch.equal(model(x), base_out)  # the hooks are gone, also after an error


def test_fused_keeps_a_forward_that_a_layer_already_had():
    model, x = tiny_model(), torch.randn(2, 4)
    own = model[0].forward  # e.g. accelerate's offloading wrapper, set on the instance
    model[0].forward = own
    before = model(x)
    with torch.no_grad(), fused(model, {"0.weight": (torch.ones(1, 4), torch.ones(3, 1), 1.0)}):
        assert not torch.allclose(model(x), before)
    assert model[0].__dict__["forward"] is own


def test_fused_refuses_factors_that_do_not_fit():
    model = tiny_model()
    for bad in ({"0.weight": (torch.ones(2, 3), torch.ones(3, 2), 1.0)}, {"9.weight": (torch.ones(1, 4), torch.ones(3, 1), 1.0)}):
        with pytest.raises(LoramemError), fused(model, bad):
            pass
    assert "forward" not in model[0].__dict__


def test_to_low_rank_is_exact_at_the_true_rank():
    gen = torch.Generator().manual_seed(0)
    dw = torch.randn(8, 3, generator=gen) @ torch.randn(3, 6, generator=gen)  # rank 3
    for rank in (3, 5, 100):
        (a, b), = to_low_rank({"w": dw}, rank).values()
        assert a.shape == (min(rank, 6), 6) and b.shape == (8, min(rank, 6))
        torch.testing.assert_close(b @ a, dw, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_to_low_rank_error_is_the_tail_singular_values(rank):
    dw = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    (a, b), = to_low_rank({"w": dw}, rank).values()
    tail = np.linalg.svd(dw.double().numpy(), compute_uv=False)[rank:]
    assert math.isclose(torch.linalg.norm(dw - b @ a).item(), float(np.sqrt((tail**2).sum())), rel_tol=1e-4)
    with pytest.raises(LoramemError):
        to_low_rank({"w": dw}, 0)


# ---------------------------------------------------------------------------------------------------
# Cache


def test_cache_hits_misses_and_evicts_least_recently_used():
    cache, calls = MergeCache(maxsize=2), []

    def compute(key):
        return lambda: calls.append(key) or key.upper()

    assert cache.get_or_compute("a", compute("a")) == "A"
    assert cache.get_or_compute("a", compute("a")) == "A"
    assert calls == ["a"]
    cache.get_or_compute("b", compute("b"))
    cache.get_or_compute("a", compute("a"))  # a is now the most recent, so b goes next
    cache.get_or_compute("c", compute("c"))
    assert "a" in cache and "b" not in cache and "c" in cache and len(cache) == 2
    cache.get_or_compute("b", compute("b"))
    assert calls == ["a", "b", "c", "b"]


def test_merge_key_names_equal_merges_alike():
    key = merge_key(["m1", "m2"], None, "ties", {"density": 0.5})
    hash(key)
    assert key == merge_key(("m1", "m2"), [1, 1], "ties", {"sign_method": "total", "density": 0.5})
    assert key != merge_key(["m2", "m1"], None, "ties", {"density": 0.5})
    assert key != merge_key(["m1", "m2"], [1, 2], "ties", {"density": 0.5})
    assert key != merge_key(["m1", "m2"], None, "ties", {"density": 0.5, "sign_method": "frequency"})
    with pytest.raises(LoramemError):
        merge_key(["m1"], [1, 2], "linear", {})
    with pytest.raises(LoramemError):
        merge_key(["m1"], None, "nope", {})


def test_trim_keeps_exactly_k_when_magnitudes_tie_at_the_threshold():
    from loramem.merge import _trim

    t = torch.tensor([[3.0, -2.0, 2.0, 2.0, -2.0, 1.0]])
    kept = _trim(t, 0.5)  # k = 3: the 3 and two of the four tied 2s
    assert int((kept != 0).sum()) == 3
    assert kept[0, 0] == 3.0 and set(kept[kept != 0].abs().tolist()) == {3.0, 2.0}
