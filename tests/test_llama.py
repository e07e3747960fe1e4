"""loramem.llama: its own greedy loop gives transformers' generate tokens exactly, and its answering model (loaded
without transformers' model code) is the same model, under fp32, bf16 autocast and bf16 weights."""

import json
from contextlib import nullcontext

import pytest
import torch

from loramem import llama
from loramem.answer import Caches, generate, modules_applied
from loramem.errors import LoramemError
from loramem.memory import Memory
from loramem.models import load_base, resolve
from loramem.packed import available, packed_linears
from loramem.precision import autocast

from loramem.config import LoraSpec, TrainSpec
from sample_facts import LINEAR_TO_ZERO, SIX_FACTS
from test_answer import _random_module

PROMPTS = ["Question: Who wrote the letter? Answer:", "Question: What is the phone number of Ann Lee? Answer:",
           "Where is it?", "Question: What did the committee of the old town decide in the spring? Answer:"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bf16_base():
    return load_base("tiny", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return [_random_module(tiny, root / f"m{i}", seed=i) for i in range(2)]


def _encoded(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _both(model, tokenizer, prompts, bf16: bool, eos: int, new_tokens: int = 12):
    """(transformers' generate, llama.greedy) on the same encoded prompts, under the same precision."""
    enc = _encoded(tokenizer, prompts)
    packing = packed_linears(model) if bf16 and available(CPU) else nullcontext()
    with autocast(bf16, CPU), packing:
        theirs = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id)
        ours = llama.greedy(model, enc.input_ids, enc.attention_mask, new_tokens, eos, tokenizer.pad_token_id)
    return theirs, ours


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-weights"])
@pytest.mark.parametrize("rows", [1, 4])
def test_greedy_gives_generates_tokens(tiny, bf16_base, precision, rows):
    base = bf16_base if precision == "bf16-weights" else tiny
    theirs, ours = _both(base.model, base.tokenizer, PROMPTS[:rows], precision != "fp32", base.tokenizer.eos_token_id)
    assert theirs.shape == (rows, _encoded(base.tokenizer, PROMPTS[:rows]).input_ids.shape[1] + 12)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-weights"])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("kind", ["base", "module", "linear"])
def test_greedy_logits_are_generates_bit_for_bit(tiny, bf16_base, folders, precision, rows, kind):
    base = bf16_base if precision == "bf16-weights" else tiny
    enc, bf16 = _encoded(base.tokenizer, PROMPTS[:rows]), precision != "fp32"
    ours = []

    def keep(logits):
        ours.append(logits.clone())
        return logits.to(torch.float32).argmax(-1)

    weights = nullcontext() if kind == "base" else modules_applied(
        base.model, folders[:1] if kind == "module" else folders, "linear")
    with weights, autocast(bf16, CPU), packed_linears(base.model) if bf16 and available(CPU) else nullcontext():
        theirs = base.model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=-1, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=base.tokenizer.pad_token_id).logits
        llama.greedy(base.model, enc.input_ids, enc.attention_mask, 6, -1, base.tokenizer.pad_token_id, choose=keep)
    assert len(ours) == len(theirs) == 6
    assert all(torch.equal(mine, their.to(mine.dtype)) for mine, their in zip(ours, theirs))


def test_rows_that_end_are_padded_and_all_ended_stops(tiny):
    _, free = _both(tiny.model, tiny.tokenizer, PROMPTS, False, tiny.tokenizer.eos_token_id)
    prompt_len = _encoded(tiny.tokenizer, PROMPTS).input_ids.shape[1]
    written = free[:, prompt_len:].tolist()
    # a row whose first token no other row writes: made the EOS, that row alone ends at once
    row = next(r for r in range(len(written)) if all(written[r][0] not in w for i, w in enumerate(written) if i != r))
    eos = written[row][0]
    theirs, ours = _both(tiny.model, tiny.tokenizer, PROMPTS, False, eos)
    assert torch.equal(ours, theirs) and ours.shape[1] == prompt_len + 12
    assert ours[row, prompt_len] == eos and (ours[row, prompt_len + 1:] == tiny.tokenizer.pad_token_id).all()
    one_row = _both(tiny.model, tiny.tokenizer, PROMPTS[row:row + 1], False, eos)
    assert torch.equal(one_row[1], one_row[0]) and one_row[1].shape[1] == _encoded(
        tiny.tokenizer, PROMPTS[row:row + 1]).input_ids.shape[1] + 1  # everyone ended: no step after the EOS


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-weights"])
@pytest.mark.parametrize("kind", ["module", "linear", "ties"])
def test_generate_answers_alike_with_modules(tiny, bf16_base, folders, precision, kind):
    base = bf16_base if precision == "bf16-weights" else tiny
    asked = "fp32" if precision == "fp32" else "bf16"
    caches, answers = Caches(), {}
    chosen = folders[:1] if kind == "module" else folders
    for own_loop in (False, True):
        with modules_applied(base.model, chosen, "linear" if kind != "ties" else "ties", caches=caches) as model:
            answers[own_loop] = generate(model, base.tokenizer, PROMPTS, 10, 3, precision=asked, own_loop=own_loop)
    assert answers[True] == answers[False]
    assert answers[True] != generate(base.model, base.tokenizer, PROMPTS, 10, 3, precision=asked)  # modules matter


def test_supports_plain_llamas_only(tiny):
    from loramem.train.adapters import attached

    assert llama.supports(tiny.model)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as peft_model:
        assert not llama.supports(peft_model)
    assert not llama.supports(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_builds_the_same_model_without_transformers(tiny, bf16_base, dtype):
    reference = tiny if dtype == torch.float32 else bf16_base
    ours = llama.load(resolve("tiny"), dtype, CPU)
    theirs = reference.model.state_dict()
    assert isinstance(ours, llama.LlamaLM) and ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(value, theirs[name]) for name, value in ours.state_dict().items())
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied, as transformers ties it
    assert torch.equal(ours.model.rotary_emb.inv_freq, reference.model.model.rotary_emb.inv_freq)
    enc = _encoded(tiny.tokenizer, PROMPTS)
    with autocast(dtype == torch.bfloat16, CPU):
        mine = llama.greedy(ours, enc.input_ids, enc.attention_mask, 10, -1, 0)
        reference_tokens = llama.greedy(reference.model, enc.input_ids, enc.attention_mask, 10, -1, 0)
    assert torch.equal(mine, reference_tokens)


def test_load_declines_other_architectures_and_refuses_mismatched_weights(tmp_path):
    folder = resolve("tiny")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                   "model_type": "gemma3_text"}))
    assert llama.load(other, torch.float32, CPU) is None
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (scaled / "config.json").write_text(json.dumps(config))
    assert llama.load(scaled, torch.float32, CPU) is None  # rotary scaling: transformers runs it
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                   "num_hidden_layers": 3}))
    (wrong / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(LoramemError, match="weights do not match its config"):
        llama.load(wrong, torch.float32, CPU)


def test_answer_only_base_tokenizes_and_fingerprints_alike(tiny):
    quick = load_base("tiny", answer_only=True)
    assert isinstance(quick.model, llama.LlamaLM) and quick.fingerprint == tiny.fingerprint
    assert quick.num_layers == tiny.num_layers
    for text in PROMPTS:
        assert quick.tokenizer(text).input_ids == tiny.tokenizer(text).input_ids
    assert quick.tokenizer.chat_template == tiny.tokenizer.chat_template
    assert (quick.tokenizer.pad_token_id, quick.tokenizer.eos_token_id) == (tiny.tokenizer.pad_token_id,
                                                                            tiny.tokenizer.eos_token_id)


@pytest.mark.parametrize("mode", ["lora", "multi", "base"])
def test_an_answer_only_memory_answers_as_the_full_one(tiny, tmp_path, mode):
    memory = Memory.open(tmp_path / "m.mem", model="tiny", create=True, base=tiny)
    facts, spec = SIX_FACTS, TrainSpec(lr=1e-2, epochs=4, batch_size=2, target_recall=None, **LINEAR_TO_ZERO)
    memory.write(facts[:3], lora=LoraSpec(rank=2, layers="all"), train_spec=spec, name="a")
    memory.write(facts[3:], lora=LoraSpec(rank=2, layers="all"), train_spec=spec, name="b")
    questions = [f.prompt for f in facts]
    full = memory.ask_many(questions, mode=mode, router="bm25", top_k=2)
    quick = Memory.open(tmp_path / "m.mem", answer_only=True)
    answered = quick.ask_many(questions, mode=mode, router="bm25", top_k=2)
    assert isinstance(quick.base.model, llama.LlamaLM)
    assert [a.text for a in answered] == [a.text for a in full] and [a.modules for a in answered] == [
        a.modules for a in full]
