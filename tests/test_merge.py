"""Tests for loramem.merge: PEFT round trip, merge methods against plain references, their properties (hypothesis)
and PEFT, apply/revert, fused factors, low rank and the merge cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
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
    lora_factors,
    magnitude_prune,
    merge,
    merge_key,
    merged_weights,
    revert,
    ties,
    to_low_rank,
)
from loramem.models import load_base

# Small inputs and few examples per property, so the whole file runs in seconds on a busy CPU.
FEW = settings(max_examples=40, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SIGN_METHODS = st.sampled_from(["total", "frequency"])


def random_deltas(n: int, shapes: dict[str, tuple[int, int]], seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(shape, generator=gen) for name, shape in shapes.items()} for _ in range(n)]


# Layers of 16-40 entries each (two or three of them), where independent random masks differ almost surely.
LARGE_SHAPES = [{"a.weight": (8, 5), "b.weight": (3, 7)},
                {"a.weight": (8, 5), "b.weight": (3, 7), "c.weight": (4, 4)}]
WEIGHTS = [-2.0, -1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0]


@st.composite
def task_vectors(draw, min_modules: int = 1, max_modules: int = 4, *, large: bool = False, sparse: bool = False,
                 positive_weights: bool = False):
    """min-max modules (task vectors) of the same layers and one weight each, from a drawn seed (randn has no ties in
    magnitude). The layers are two of 1-5 x 1-5 entries or LARGE_SHAPES (`large`: always LARGE_SHAPES); `sparse`
    zeroes ~60% of the entries, in a pattern every module shares; weights are negative, zero or positive
    (`positive_weights`: positive only)."""
    n = draw(st.integers(min_modules, max_modules))
    dims = st.integers(1, 5)
    small = st.builds(lambda a, b, c, d: {"a.weight": (a, b), "b.weight": (c, d)}, dims, dims, dims, dims)
    shapes = draw(st.sampled_from(LARGE_SHAPES) if large else st.one_of(small, st.sampled_from(LARGE_SHAPES)))
    deltas = random_deltas(n, shapes, draw(st.integers(0, 2**31 - 1)))
    if sparse:
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        for name, shape in shapes.items():
            mask = torch.rand(shape, generator=gen) < 0.6
            for d in deltas:
                d[name] = d[name] * mask
    choices = [w for w in WEIGHTS if w > 0] if positive_weights else WEIGHTS
    weights = draw(st.lists(st.sampled_from(choices), min_size=n, max_size=n))
    return deltas, weights


densities = st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0])


# ---------------------------------------------------------------------------------------------------
# Plain numpy references, written from the papers rather than from merge.py


def ref_trim(t: np.ndarray, density: float) -> np.ndarray:
    """Keep the k = max(1, floor(density * size)) largest magnitudes (randn has no ties)."""
    flat = t.ravel()
    k = max(1, int(density * flat.size + 1e-9))
    out = np.zeros_like(flat)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out[keep] = flat[keep]
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
@given(tv=task_vectors())
def test_linear_is_the_weighted_sum(tv):
    deltas, weights = tv
    out = linear(deltas, weights)
    assert out.keys() == deltas[0].keys()
    for name in out:
        expected = sum(w * t for w, t in zip(weights, as_np(deltas, name)))
        np.testing.assert_allclose(out[name].numpy(), expected, rtol=1e-5, atol=1e-5)
    # default weights are all 1
    for name, t in linear(deltas).items():
        torch.testing.assert_close(t, sum(d[name] for d in deltas), rtol=1e-5, atol=1e-5)


@FEW
@given(tv=task_vectors(min_modules=2), density=densities, data=st.data(),
       method=st.sampled_from(["linear", "ties", "magnitude_prune"]))
def test_merges_do_not_depend_on_the_order_of_the_modules(tv, density, data, method):
    deltas, weights = tv
    order = data.draw(st.permutations(range(len(deltas))))
    params = {} if method == "linear" else {"density": density}
    first = merge(deltas, method, weights, **params)
    shuffled = merge([deltas[i] for i in order], method, [weights[i] for i in order], **params)
    for name in first:
        torch.testing.assert_close(shuffled[name], first[name], rtol=1e-5, atol=1e-5)


@FEW
@given(n=st.integers(1, 3), ranks=st.lists(st.integers(1, 4), min_size=3, max_size=3),
       scales=st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), min_size=3, max_size=3),
       weights=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0]), min_size=3, max_size=3),
       seed=st.integers(0, 2**31 - 1))
@example(n=3, ranks=[2, 3, 1], scales=[2.0, 0.5, 4.0], weights=[1.0, -0.5, 0.25], seed=0)
def test_cat_factors_product_is_the_linear_merge(n, ranks, scales, weights, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"x.weight": (8, 5), "y.weight": (6, 3)}
    factors = [
        {name: (torch.randn(ranks[i], fan_in, generator=gen), torch.randn(out, ranks[i], generator=gen), scales[i])
         for name, (out, fan_in) in shapes.items()}
        for i in range(n)
    ]
    ws = weights[:n]
    merged = cat_factors(factors, ws)
    # The same modules read as PEFT state dicts, through lora_factors / lora_deltas.
    deltas = []
    for i, f in enumerate(factors):
        state = {}
        for name, (a, b, _) in f.items():
            module = name.removesuffix(".weight")
            state[f"base_model.model.{module}.lora_A.weight"] = a
            state[f"base_model.model.{module}.lora_B.weight"] = b
        read = lora_factors(state, scales[i])
        assert all(torch.equal(read[k][0], f[k][0]) and read[k][2] == scales[i] for k in f)
        deltas.append(lora_deltas(state, scales[i]))
    expected = linear(deltas, ws)
    assert merged.keys() == expected.keys()
    for name, (a_cat, b_cat, s) in merged.items():
        out, fan_in = shapes[name]
        assert s == 1.0 and a_cat.shape == (sum(ranks[:n]), fan_in) and b_cat.shape == (out, sum(ranks[:n]))
        torch.testing.assert_close(s * b_cat @ a_cat, expected[name], rtol=1e-4, atol=1e-4)
        # Against sum_i w_i s_i B_i A_i in float64: A_cat holds w_i s_i A_i rounded once to fp32, so each entry of
        # the product is off by at most 2^-24 of the sum of its terms' magnitudes.
        terms = [w * s_i * f[name][1].double() @ f[name][0].double() for w, s_i, f in zip(ws, scales, factors)]
        size = sum(abs(w * s_i) * f[name][1].double().abs() @ f[name][0].double().abs()
                   for w, s_i, f in zip(ws, scales, factors))
        error = (b_cat.double() @ a_cat.double() - sum(terms)).abs()
        assert torch.all(error <= 2**-24 * size + 1e-12)


def test_cat_factors_checks_layer_shapes():
    f1 = {"p": (torch.randn(2, 5), torch.randn(6, 2), 1.0)}
    f2 = {"p": (torch.randn(2, 4), torch.randn(6, 2), 1.0)}
    with pytest.raises(LoramemError, match="shape"):
        cat_factors([f1, f2])


@FEW
@given(tv=task_vectors(sparse=True) | task_vectors(), density=densities, sign_method=SIGN_METHODS)
def test_ties_matches_the_reference_and_keeps_the_elected_signs(tv, density, sign_method):
    deltas, weights = tv
    merged = ties(deltas, weights, density=density, sign_method=sign_method)
    full = ties(deltas, weights, density=1.0, sign_method=sign_method)
    for name in deltas[0]:
        inputs = as_np(deltas, name)
        m = merged[name].double().numpy()
        np.testing.assert_allclose(m, ref_ties(inputs, weights, density, sign_method), rtol=1e-5, atol=1e-6)
        # Zero where every module is zero, or where trimming zeroed every module.
        assert np.all(m[(np.stack(inputs) == 0).all(0)] == 0)
        trimmed = np.stack([w * ref_trim(t, density) for w, t in zip(weights, inputs)])
        assert np.all(m[(trimmed == 0).all(0)] == 0)
        # A nonzero entry has the elected sign (a score of exactly 0 elects +)...
        score = trimmed.sum(0) if sign_method == "total" else np.sign(trimmed).sum(0)
        assert np.all(score[m > 0] >= 0)
        assert np.all(score[m < 0] < 0)
        # ...and is the mean of the trimmed inputs that agree with it, so it lies between them,
        nz = m != 0
        assert np.all(np.abs(m[nz]) <= np.abs(trimmed).max(0)[nz] + 1e-6)
        # and within the largest weighted contribution before trimming.
        bound = np.max([abs(w) * np.abs(t) for w, t in zip(weights, inputs)], axis=0)
        assert (np.abs(m) <= bound * (1 + 1e-6)).all()
        # Untrimmed: the sign elected from the weighted modules themselves, or zero.
        weighted = [w * t for w, t in zip(weights, inputs)]
        untrimmed_score = sum(weighted) if sign_method == "total" else sum(np.sign(t) for t in weighted)
        assert (full[name].numpy() * untrimmed_score >= 0).all()


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
@given(tv=task_vectors(max_modules=1), sign_method=SIGN_METHODS)
def test_ties_of_one_module_at_full_density_is_the_weighted_module(tv, sign_method):
    (delta,), (w,) = tv
    for name, t in ties([delta], density=1.0, sign_method=sign_method).items():
        assert torch.equal(t, delta[name])
    for name, t in ties([delta], [w], density=1.0, sign_method=sign_method).items():
        torch.testing.assert_close(t, w * delta[name])


@FEW
@given(tv=task_vectors(positive_weights=True))
def test_ties_of_identical_modules_is_the_mean_weight_times_the_module(tv):
    deltas, weights = tv
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
@given(tv=task_vectors(), density=densities)
def test_magnitude_prune_keeps_at_most_ceil_density_n_per_module(tv, density):
    deltas, weights = tv
    out = magnitude_prune(deltas, weights, density=density)
    for name, merged in out.items():
        numel = merged.numel()
        cap = math.ceil(density * numel)
        # One module alone: at most ceil(density * n) nonzeros, and those are its largest entries.
        single = magnitude_prune([deltas[0]], density=density)[name]
        assert int(single.count_nonzero()) <= cap
        kept = single != 0
        if kept.any() and (~kept).any():
            assert deltas[0][name][kept].abs().min() >= deltas[0][name][~kept].abs().max()
        assert torch.equal(single[kept], deltas[0][name][kept])
        # The sum: nonzero only where some module kept an entry, and equal to the reference.
        kept_any = torch.zeros_like(merged, dtype=torch.bool)
        for d in deltas:
            kept_any |= magnitude_prune([d], density=density)[name] != 0
        assert torch.all(merged[~kept_any] == 0)
        assert int(merged.count_nonzero()) <= len(deltas) * cap
        expected = sum(w * ref_trim(d[name].double().numpy(), density) for w, d in zip(weights, deltas))
        np.testing.assert_allclose(merged.double().numpy(), expected, rtol=1e-5, atol=1e-5)


@FEW
@given(tv=task_vectors(), sign_method=SIGN_METHODS)
def test_dare_at_density_one_is_the_undropped_method(tv, sign_method):
    deltas, weights = tv
    plain, tied = linear(deltas, weights), ties(deltas, weights, density=1.0, sign_method=sign_method)
    dared = dare_linear(deltas, weights, density=1.0, seed=3)
    dared_tied = dare_ties(deltas, weights, density=1.0, sign_method=sign_method, seed=3)
    for name in deltas[0]:
        assert torch.equal(dared[name], plain[name])
        assert torch.equal(dared_tied[name], tied[name])


@FEW
@given(tv=task_vectors(large=True), density=st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]),
       seed=st.integers(0, 2**31 - 2), method=st.sampled_from(["dare_linear", "dare_ties"]))
@example(tv=(random_deltas(1, {"w": (64, 64)}, seed=0), [2.0]), density=0.3, seed=7, method="dare_linear")
@example(tv=(random_deltas(2, {"w": (8, 8)}, seed=1), [1.0, 1.0]), density=0.5, seed=7, method="dare_ties")
def test_dare_is_reproducible_by_seed(tv, density, seed, method):
    deltas, weights = tv
    assume(any(w != 0 for w in weights))
    inputs = [{k: t.clone() for k, t in d.items()} for d in deltas]
    fn = dare_linear if method == "dare_linear" else dare_ties
    first = fn(deltas, weights, density=density, seed=seed)
    again = fn(deltas, weights, density=density, seed=seed)
    other = fn(deltas, weights, density=density, seed=seed + 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # 2-3 layers of >= 16 entries each: independent masks coincide with negligible probability.
    assert not all(torch.equal(first[k], other[k]) for k in first)
    # The inputs are not modified.
    assert all(torch.equal(d[k], before[k]) for d, before in zip(deltas, inputs) for k in before)


def test_dare_drops_and_rescales():
    deltas = random_deltas(1, {"w": (64, 64)}, seed=0)
    t, density, w = deltas[0]["w"], 0.3, 2.0
    out = dare_linear(deltas, [w], density=density, seed=7)["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - density) < 0.05
    torch.testing.assert_close(out[kept], w * t[kept] / density)
    # Reproducible by seed: test_dare_is_reproducible_by_seed, whose examples are these modules.


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


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class TwoLinear(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.first = torch.nn.Linear(5, 8, dtype=dtype)
        self.second = torch.nn.Linear(8, 3, bias=False, dtype=dtype)


@FEW
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3]), names=st.sampled_from([["first.weight"],
                                                                          ["first.weight", "second.weight"]]))
def test_apply_then_revert_is_bit_exact_on_a_small_module(dtype, seed, scale, names):
    torch.manual_seed(seed)
    model = TwoLinear(dtype)
    before = {k: bits(v) for k, v in model.state_dict().items()}
    values = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = dict(model.named_parameters())
    deltas = {name: torch.randn(shapes[name].shape) * scale for name in names}
    expected = merged_weights(model, deltas=deltas)
    handle = apply_in_place(model, deltas)
    for name, p in model.named_parameters():
        if name in deltas:
            assert p.dtype == dtype and torch.equal(bits(p), bits(expected[name]))
            torch.testing.assert_close(p.float(), values[name].float() + deltas[name], rtol=1e-2, atol=1e-2)
        else:  # the biases, and the weight without a delta
            assert torch.equal(bits(p), before[name])
    revert(model, handle)
    after = {k: bits(v) for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(v.dtype == dtype for v in model.state_dict().values())


def test_revert_is_exact_where_subtracting_is_not():
    model = tiny_model(torch.bfloat16)
    before = model[0].weight.clone()
    deltas = {"0.weight": torch.full((3, 4), 100.0)}
    with applied(model, deltas):
        assert not torch.equal(model[0].weight - deltas["0.weight"].bfloat16(), before)
    assert torch.equal(model[0].weight, before)


@pytest.fixture(scope="module")
def own_tiny_model():
    """A copy of the tiny model of this module's own, changed in place and restored by the tests."""
    return load_base("tiny").model


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@settings(max_examples=10, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-4, 1.0, 100.0]), raises=st.booleans())
@example(seed=0, scale=1.0, raises=True)
def test_applied_restores_the_tiny_model_bit_for_bit(own_tiny_model, seed, scale, raises):
    model = own_tiny_model
    params = dict(model.named_parameters())
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    gen = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(params[n].shape, generator=gen) * scale for n in names}
    before = {k: bits(v) for k, v in model.state_dict().items()}
    values = {n: params[n].detach().clone() for n in names}
    with pytest.raises(RuntimeError) if raises else _nothing():
        with applied(model, deltas=deltas):
            inside = dict(model.named_parameters())
            assert not torch.equal(bits(inside[names[0]]), before[names[0]])
            for n in names:  # W + dW, summed in fp32 and rounded once to the weight's dtype
                assert torch.equal(inside[n], (values[n].float() + deltas[n]).to(values[n].dtype))
            if raises:
                raise RuntimeError("boom")
    after = {k: bits(v) for k, v in model.state_dict().items()}
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_apply_checks_every_name_and_shape_before_writing():
    model = tiny_model()
    before = model[0].weight.clone()
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
