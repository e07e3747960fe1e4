"""Packed bf16 linear weights (loramem.packed) give bit for bit what bf16 autocast gives, with the base weights, one
module beside them and a cached merge swapped in, and follow every change of the weights."""

from contextlib import nullcontext

import pytest
import torch

from loramem.answer import Caches, generate, modules_applied
from loramem.errors import LoramemError
from loramem.merge import _WithLowRank
from loramem.models import load_base
from loramem import answer
from loramem.packed import PackCache, available, packed_linears
from loramem.precision import autocast

from test_answer import _random_module

pytestmark = pytest.mark.skipif(not available(torch.device("cpu")), reason="this CPU's oneDNN has no bf16 matmul")
PROMPTS = ["Question: Who wrote the letter? Answer:", "Question: What is the phone number of Ann Lee? Answer:",
           "Question: Where is it? Answer:"]


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    return [_random_module(tiny, root / f"m{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def bf16_base():
    return load_base("tiny", dtype=torch.bfloat16)


@pytest.fixture(params=["autocast", "bf16-weights"])
def base(request, tiny, bf16_base):
    return tiny if request.param == "autocast" else bf16_base


def _weights(model, folders, kind: str, caches: Caches):
    if kind == "module":
        return modules_applied(model, folders[:1], "linear", caches=caches)
    if kind == "merge":
        return modules_applied(model, folders, "ties", caches=caches)
    return modules_applied(model, folders, "linear", caches=caches) if kind == "linear" else nullcontext(model)


@torch.no_grad()
def _logits(model, tokenizer, packed: bool):
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with autocast(True, torch.device("cpu")), packed_linears(model) if packed else nullcontext():
        return model(**batch).logits


@pytest.mark.parametrize("kind", ["base", "module", "linear", "merge"])
def test_packed_logits_are_bit_identical(base, folders, kind):
    caches = Caches()
    for _ in range(2):  # the second time from the packed weights and merge kept in the caches
        with _weights(base.model, folders, kind, caches) as model:
            autocast_logits = _logits(model, base.tokenizer, packed=False)
            packed_logits = _logits(model, base.tokenizer, packed=True)
        assert torch.equal(packed_logits, autocast_logits)
    with _weights(base.model, folders, kind, caches) as model:  # a module or merge really changes them
        changed = _logits(model, base.tokenizer, packed=True)
    assert (kind == "base") == torch.equal(changed, _logits(base.model, base.tokenizer, packed=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-weights"])
@pytest.mark.parametrize("kind", ["base", "module", "merge"])
def test_generate_answers_alike_packed_or_not(tiny, bf16_base, folders, precision, kind, monkeypatch):
    base = bf16_base if precision == "bf16-weights" else tiny
    asked = "fp32" if precision == "fp32" else "bf16"
    packings = []
    monkeypatch.setattr(answer, "packed_linears", lambda model: packings.append(model) or packed_linears(model))
    caches, answers = Caches(), {}
    for pack in (False, True, True):  # packed twice: packing, then the packed weights kept
        with _weights(base.model, folders, kind, caches) as model:
            answers.setdefault(pack, []).append(generate(model, base.tokenizer, PROMPTS, 8, 2, precision=asked,
                                                         pack=pack))
    assert answers[True] == [answers[False][0]] * 2
    assert len(packings) == (0 if precision == "fp32" else 2 * 2)  # fp32 runs the weights as they are; 2 batches


def test_layers_run_packed_inside_and_restored_after(tiny, folders):
    layer = tiny.model.model.layers[0].mlp.down_proj
    with packed_linears(tiny.model):
        assert "forward" in layer.__dict__ and "forward" in tiny.model.lm_head.__dict__
    assert "forward" not in layer.__dict__ and "forward" not in tiny.model.lm_head.__dict__
    with modules_applied(tiny.model, folders[:1], "linear"):
        low_rank = layer.__dict__["forward"]
        inner = low_rank.forward
        assert isinstance(low_rank, _WithLowRank)
        with packed_linears(tiny.model):
            assert layer.__dict__["forward"] is low_rank and low_rank.forward is not inner  # factors kept around it
        assert low_rank.forward == inner
    assert "forward" not in layer.__dict__


def test_packed_weights_follow_in_place_changes(tiny):
    layer = tiny.model.model.layers[1].self_attn.q_proj
    original = layer.weight.detach().clone()
    before = _logits(tiny.model, tiny.tokenizer, packed=True)
    try:
        with torch.no_grad():
            layer.weight.mul_(2.0)  # bumps the weight's version: packed again
        changed = _logits(tiny.model, tiny.tokenizer, packed=True)
        assert torch.equal(changed, _logits(tiny.model, tiny.tokenizer, packed=False))
        assert not torch.equal(changed, before)
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)
    assert torch.equal(_logits(tiny.model, tiny.tokenizer, packed=True), before)


def test_peft_wrapped_layers_are_left_alone(tiny):
    from loramem.config import LoraSpec
    from loramem.train.adapters import attached

    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as peft_model, packed_linears(peft_model):
        assert not any("forward" in m.__dict__ for m in peft_model.modules() if type(m) is torch.nn.Linear)


def test_pack_cache_keeps_its_capacity_and_refuses_none(tiny):
    weights = [m.weight for m in tiny.model.modules() if type(m) is torch.nn.Linear][:3]
    cache = PackCache(2)
    first = cache.packed(weights[0])
    assert cache.packed(weights[0]) is first and len(cache) == 1
    cache.packed(weights[1]), cache.packed(weights[2])
    assert len(cache) == 2 and cache.packed(weights[0]) is not first  # the least recently used went first
    with pytest.raises(LoramemError, match="at least 1"):
        PackCache(0)


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 17, 64, 320])
@pytest.mark.parametrize("shape", [(64, 64), (1536, 576), (49152, 576)])
def test_a_packed_layer_gives_autocasts_output_for_any_row_count(shape, rows):
    torch.manual_seed(rows)
    layer = torch.nn.Linear(shape[1], shape[0], bias=shape[0] == 64)
    x = torch.randn(rows, shape[1])
    with autocast(True, torch.device("cpu")):
        expected = layer(x)
        with packed_linears(torch.nn.Sequential(layer)):
            assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("with_module", [False, True])
def test_a_group_gives_its_layers_outputs_side_by_side(tiny, folders, rows, with_module):
    from loramem.packed import group

    attn = tiny.model.model.layers[1].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(1, rows, layers[0].in_features, generator=torch.Generator().manual_seed(rows))
    weights = modules_applied(tiny.model, folders[:1], "linear") if with_module else nullcontext()
    with weights, autocast(True, torch.device("cpu")), packed_linears(tiny.model):
        one_by_one = [layer(x) for layer in layers]
        qk, v = group(layers, (2, 1))(x)
        mlp = tiny.model.model.layers[1].mlp
        assert group([mlp.gate_proj, mlp.down_proj]) is None  # inputs of different widths
    assert torch.equal(qk, torch.cat(one_by_one[:2], dim=-1)) and torch.equal(v, one_by_one[2])
    assert group(layers) is None  # outside packed_linears: nothing to group
