"""loramem.mix: modules composed in output space. Each row of a batch runs its own module exactly as that module
alone would; the combination rules pick the tokens they define; one module composed is that module's answer."""

import math
from contextlib import nullcontext

import pytest
import torch

from loramem import llama
from loramem.answer import Caches, generate, generate_composed, modules_applied
from loramem.errors import LoramemError
from loramem.answer import adapter_scale, read_adapter
from loramem.merge import lora_factors, low_rank
from loramem.mix import (Composer, first_adapted_layer, mixture_weights, rows_applied, supplied_by,
                         with_base_row)

from test_answer import _random_module

PROMPTS = ["Question: Who wrote the letter? Answer:", "Question: What is the phone number of Ann Lee? Answer:"]


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return [_random_module(tiny, root / f"m{i}", seed=10 + i) for i in range(2)]


def _prepared(tiny, folder):
    config, tensors = read_adapter(folder)
    return low_rank(tiny.model, lora_factors(tensors, adapter_scale(config)))


def _greedy(model, tokenizer, prompts, new_tokens=8, choose=None):
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = llama.greedy(model, enc.input_ids, enc.attention_mask, new_tokens, -1, tokenizer.pad_token_id, choose=choose)
    return ids[:, enc.input_ids.shape[1]:]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_row_runs_its_own_module(tiny, folders, precision):
    from loramem.precision import autocast

    a, b = (_prepared(tiny, f) for f in folders)
    prompt = PROMPTS[1]
    with autocast(precision == "bf16", torch.device("cpu")):
        alone = []
        for folder in (folders[0], folders[1], None):
            with _maybe(tiny, folder):
                alone.append(_greedy(tiny.model, tiny.tokenizer, [prompt])[0])
        with rows_applied(tiny.model, [a, b, None]):
            together = _greedy(tiny.model, tiny.tokenizer, [prompt] * 3)
    assert [row.tolist() for row in together] == [row.tolist() for row in alone]
    assert len({tuple(row.tolist()) for row in alone}) == 3  # the modules really differ
    assert all("forward" not in m.__dict__ for m in tiny.model.modules())  # restored


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prompts_shared_up_to_the_first_adapted_layer_answer_as_repeated_rows(tiny, tmp_path, precision):
    from loramem.precision import autocast

    late = [_prepared(tiny, _random_module(tiny, tmp_path / f"late{i}", seed=20 + i, layers="last1")) for i in range(2)]
    rows = [late[0], late[0], late[1], None]  # two prompts, each composed over two blocks
    layers = len(tiny.model.model.layers)
    assert first_adapted_layer(tiny.model, rows) == layers - 1 and first_adapted_layer(tiny.model, [None]) == layers
    tiny.tokenizer.padding_side = "left"
    enc = tiny.tokenizer(PROMPTS, return_tensors="pt", padding=True)  # unequal lengths: padded
    with autocast(precision == "bf16", torch.device("cpu")), rows_applied(tiny.model, rows):
        repeated = llama.greedy(tiny.model, enc.input_ids.repeat(2, 1), enc.attention_mask.repeat(2, 1), 8, -1,
                                tiny.tokenizer.pad_token_id)
        shared = llama.greedy(tiny.model, enc.input_ids, enc.attention_mask, 8, -1, tiny.tokenizer.pad_token_id,
                              repeat=2, shared_layers=layers - 1)
    assert shared.tolist() == repeated.tolist()
    assert len({tuple(row) for row in shared.tolist()}) == 4  # every row decoded with its own module


def _maybe(tiny, folder):
    """One module in effect, or the base weights."""
    return modules_applied(tiny.model, [folder], "linear") if folder else nullcontext()


def test_mix_takes_the_argmax_of_the_weighted_mixture_and_names_its_main_supplier():
    # two questions (n=2), two rows each (k=2); vocabulary of 3
    p = torch.tensor([[[0.6, 0.4, 0.0], [0.1, 0.1, 0.8]],     # row 0 of questions 0 and 1
                      [[0.0, 0.45, 0.55], [0.2, 0.7, 0.1]]])  # row 1
    logits = (p + 1e-9).log().view(4, 3)
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    composer = Composer("mix", weights)
    token = composer(logits)
    mixture = (weights.T[:, :, None] * p).sum(0)  # question 0: [0.3, 0.425, 0.275]; question 1: [0.175, 0.55, 0.275]
    assert mixture.argmax(-1).tolist() == [1, 1] and token.tolist() == [1, 1, 1, 1]
    # question 0: row 0 gives 0.5*0.4 = 0.2 of p(1), row 1 0.5*0.45 = 0.225; question 1: 0.025 against 0.525
    assert composer.supplied[0].tolist() == [1, 1]


def test_select_token_follows_the_most_confident_row():
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.98, 0.01, 0.01]],
                      [[0.05, 0.9, 0.05], [0.4, 0.3, 0.3]]])
    composer = Composer("select-token", torch.full((2, 2), 0.5))
    token = composer((p).log().view(4, 3))
    assert composer.supplied[0].tolist() == [1, 0] and token.tolist() == [1, 0, 1, 0]


def test_select_lets_each_row_answer_and_keeps_the_surest_whole_answer():
    # two questions (n=2), two rows each (k=2), vocabulary of 4 (token 3 is EOS); rows 0, 1: block 0; rows 2, 3: block 1
    steps = [torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]]),
             torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])]
    composer = Composer("select", torch.full((2, 2), 0.5))
    tokens = [composer((p + 1e-12).log()) for p in steps]
    assert [t.tolist() for t in tokens] == [[0, 0, 2, 3], [3, 1, 3, 0]]  # each row its own argmax
    generated = torch.stack(tokens, dim=1)
    answer, supplied = composer.answers(generated, eos_token_id=3)
    # question 0: block 0 "0 EOS" mean log(0.9)/2 against block 1 "2 EOS" log(0.8)/2: block 0;
    # question 1: block 0 "0 1" mean (log 0.6 + log 0.5)/2 against block 1 "EOS" log 1 = 0: block 1, an empty answer
    assert answer.tolist() == [[0, 3], [3, 0]] and supplied == [[0], []]
    # the router's weight is the prior: at weights (0.2, 0.8) question 0 takes block 1 (-0.33 against -1.66)
    tipped = Composer("select", torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    for p in steps:
        tipped((p + 1e-12).log())
    assert tipped.answers(generated, eos_token_id=3)[1] == [[1], []]


def test_mixture_weights_are_the_softmax_of_router_scores():
    weights = mixture_weights([[2.0, 1.0, 0.0]])
    expected = [math.exp(s) / sum(math.exp(t) for t in (2, 1, 0)) for s in (2, 1, 0)]
    assert weights[0].tolist() == pytest.approx(expected)


def test_a_base_row_gets_its_share_of_the_mixture_weight():
    modules, scores = with_base_row([["a", "b"], ["c", None]], [[2.0, 1.0], [0.5, -math.inf]], 0.25)
    assert modules == [["a", "b", None], ["c", None, None]]
    weights = mixture_weights(scores)
    assert weights[:, 2].tolist() == pytest.approx([0.25, 0.25])
    assert weights[0, :2].tolist() == pytest.approx((0.75 * mixture_weights([[2.0, 1.0]])[0]).tolist())
    assert weights[1].tolist() == pytest.approx([0.75, 0.0, 0.25])  # a filler stays at weight 0
    assert with_base_row([["a"]], [[1.0]], 0.0) == ([["a"]], [[1.0]])


def test_supplied_stops_at_each_answers_eos():
    steps = [torch.tensor([0, 1]), torch.tensor([2, 1]), torch.tensor([1, 1])]
    generated = torch.tensor([[5, 9, 7], [4, 4, 4]])
    assert supplied_by(steps, generated, eos_token_id=9) == [[0], [1, 1, 1]]


@pytest.mark.parametrize("method", ["mix", "select", "select-token"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_module_composed_answers_as_that_module(tiny, folders, method, precision):
    caches = Caches()
    with modules_applied(tiny.model, folders[:1], "linear", caches=caches) as model:
        expected = generate(model, tiny.tokenizer, PROMPTS, 8, 2, precision=precision)
    prepared = _prepared(tiny, folders[0])
    texts, supplied = generate_composed(tiny.model, tiny.tokenizer, PROMPTS, [[prepared]] * 2, [[1.0]] * 2, method,
                                        8, 2, precision=precision)
    assert texts == expected and all(set(s) <= {0} for s in supplied)


def test_composed_batches_give_what_one_question_at_a_time_gives(tiny, folders):
    a, b = (_prepared(tiny, f) for f in folders)
    modules, scores = [[a, b], [b, None]], [[0.9, 0.1], [0.3, 0.7]]
    together = generate_composed(tiny.model, tiny.tokenizer, PROMPTS, modules, scores, "mix", 8, 2, precision="fp32")
    apart = [generate_composed(tiny.model, tiny.tokenizer, PROMPTS[i:i + 1], modules[i:i + 1], scores[i:i + 1], "mix",
                               8, 1, precision="fp32") for i in range(2)]
    assert together == ([t[0][0] for t in apart], [t[1][0] for t in apart])


def test_bad_compositions_are_refused(tiny, folders):
    prepared = _prepared(tiny, folders[0])
    with pytest.raises(LoramemError, match="unknown composition 'vote'"):
        generate_composed(tiny.model, tiny.tokenizer, PROMPTS[:1], [[prepared]], [[1.0]], "vote")
    with pytest.raises(LoramemError, match="same number"):
        generate_composed(tiny.model, tiny.tokenizer, PROMPTS, [[prepared], [prepared, None]], [[1.0], [1.0, 1.0]])


def test_rows_of_weight_zero_never_decide():
    p = torch.tensor([[[0.5, 0.3, 0.2]], [[0.98, 0.01, 0.01]]])  # one question; row 1 is the more confident
    composer = Composer("select-token", torch.tensor([[1.0, 0.0]]))
    assert composer(p.log().view(2, 3)).tolist() == [0, 0] and composer.supplied[0].tolist() == [0]
    chooser = Composer("select", torch.tensor([[1.0, 0.0]]))
    assert chooser(p.log().view(2, 3)).tolist() == [0, 0]
    answer, supplied = chooser.answers(torch.tensor([[0], [0]]), eos_token_id=9)
    assert supplied == [[0]]  # row 1 was surer of its token, but it is a filler
    mixed = Composer("mix", torch.tensor([[1.0, 0.0]]))
    assert mixed(torch.tensor([[0.1, 0.2, 0.7], [9.0, 0.0, 0.0]]).log()).tolist() == [2, 2]
