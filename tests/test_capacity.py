import json

import pytest

from loramem import LoraSpec, Memory, TrainSpec, facts_from_text
from loramem.capacity import Cell, cells_from, cells_from_file, module_tokens, tokens_per_param, trainable_params
from loramem.errors import LoramemError

from command_line import loramem
from sample_facts import LINEAR_TO_ZERO

LATE = LoraSpec(rank=4, layers="late")


def cell(tokens: int, score: float, layers: str = "late", params: int = 1000) -> dict:
    return {"rank": 4, "targets": "all", "layers": layers, "data_tokens": tokens, "trainable_params": params,
            "exact_match": score}


def test_the_largest_load_that_met_the_threshold_on_the_same_placement(tmp_path):
    path = tmp_path / "cells.json"
    path.write_text(json.dumps({"rows": [cell(500, 1.0), cell(2000, 0.96), cell(4000, 0.5),
                                         cell(9000, 1.0, layers="early")]}))
    cells = cells_from_file(path)
    assert tokens_per_param(cells, LATE) == 2.0  # 2000 tokens / 1000 params; 4000 failed, early is elsewhere
    assert tokens_per_param(cells, LATE, threshold=0.99) == 0.5
    assert module_tokens(3000, cells, LATE) == 6000
    with pytest.raises(LoramemError, match="layers='all' was measured"):
        tokens_per_param(cells, LoraSpec(rank=4, layers="all"))


def test_json_lines_and_bad_files(tmp_path):
    lines = tmp_path / "cells.jsonl"
    lines.write_text(json.dumps(cell(100, 1.0)) + "\n" + json.dumps(cell(300, 1.0)) + "\n")
    assert [c.data_tokens for c in cells_from_file(lines)] == [100, 300]
    (tmp_path / "other.json").write_text('{"rows": [{"setting": "oracle"}]}')
    with pytest.raises(LoramemError, match="no capacity measurements"):
        cells_from_file(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("{not json\n")
    with pytest.raises(LoramemError, match="not JSON"):
        cells_from_file(tmp_path / "bad.json")


def test_a_memory_measures_its_own_modules(tiny, tmp_path):
    memory = Memory.open(tmp_path / "m", create=True, base=tiny)
    facts = "Question: What is the phone number of Ann Lee? Answer: 603-556-7631\n"
    record = memory.write(facts_from_text(facts), LATE, TrainSpec(lr=1e-2, epochs=80, batch_size=2, **LINEAR_TO_ZERO), progress=False)
    [measured] = cells_from(tmp_path / "m", memory)
    assert measured == Cell(4, "all", "late", measured.data_tokens, record.trainable_params, record.recall)
    assert measured.data_tokens == len(tiny.tokenizer(facts.strip(), add_special_tokens=False).input_ids)
    assert trainable_params(tiny.model, LATE) == record.trainable_params
    assert trainable_params(tiny.model, LoraSpec(rank=8, layers="late")) == 2 * record.trainable_params


def test_write_shards_sized_from_measured_capacity(tiny, tmp_path):
    facts = "".join(f"Question: What is the phone number of Person {i}? Answer: 555-000-{i:04d}\n" for i in range(6))
    (tmp_path / "facts.txt").write_text(facts)
    params = trainable_params(tiny.model, LATE)
    per_fact = len(tiny.tokenizer(facts.splitlines()[0], add_special_tokens=False).input_ids)
    # Measured: a module of these parameters held two facts' worth of tokens, and failed at four.
    (tmp_path / "cells.json").write_text(json.dumps([cell(2 * per_fact, 1.0, params=params),
                                                     cell(4 * per_fact, 0.2, params=params)]))
    out = loramem("write", tmp_path / "m", tmp_path / "facts.txt", "--model", "tiny", "--layers", "late",
                  "--shard-tokens", "auto", "--capacity", tmp_path / "cells.json", "--epochs", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert f"{2 * per_fact} tokens of facts per rank-4 module" in out.stderr
    assert len(json.loads(out.stdout)["modules"]) == 3
    out = loramem("write", tmp_path / "n", tmp_path / "facts.txt", "--model", "tiny", "--layers", "late",
                  "--shard-tokens", "auto")
    assert out.returncode == 2 and "needs measured capacity" in out.stderr and not (tmp_path / "n").exists()
    out = loramem("write", tmp_path / "n", tmp_path / "facts.txt", "--model", "tiny", "--shard-tokens", "auto",
                  "--capacity", tmp_path / "cells.json")  # layers auto: capacity was measured at one placement
    assert out.returncode == 2 and "give --layers" in out.stderr and not (tmp_path / "n").exists()


# The tiny model's decoder layer: q and o 64->64, k and v 64->32, gate and up 64->128, down 128->64; a rank-r module
# on all seven projections trains r * (in + out) parameters on each.
TINY_PARAMS_PER_RANK_AND_LAYER = 2 * 128 + 2 * 96 + 3 * 192


def test_auto_layers_takes_the_fewest_last_layers_that_hold_the_bits(tiny):
    from loramem.capacity import AUTO_BITS_PER_PARAM, auto_layers

    per_layer = 4 * TINY_PARAMS_PER_RANK_AND_LAYER  # 4,096
    for lora in (LoraSpec(rank=4, layers="last1"), LoraSpec(rank=1, targets="ffn", layers="last1")):  # as PEFT counts
        assert trainable_params(tiny.model, lora) == lora.rank * (1024 if lora.targets == "all" else 576)
    spec = LoraSpec(rank=4)
    assert auto_layers(tiny.model, spec, bits=1.0, bits_per_param=0.5) == "last1"
    assert auto_layers(tiny.model, spec, bits=0.5 * per_layer, bits_per_param=0.5) == "last1"
    assert auto_layers(tiny.model, spec, bits=0.5 * per_layer + 1, bits_per_param=0.5) == "last2"
    assert auto_layers(tiny.model, spec, bits=3 * 0.5 * per_layer, bits_per_param=0.5) == "last3"
    assert auto_layers(tiny.model, spec, bits=3 * 0.5 * per_layer + 1, bits_per_param=0.5) == "all"  # 4 of 4
    assert auto_layers(tiny.model, spec, bits=1e9) == "all"
    assert auto_layers(tiny.model, LoraSpec(rank=1, targets="ffn"), bits=3 * 192 * 0.06, bits_per_param=0.06) == "last1"
    assert auto_layers(tiny.model, LoraSpec(rank=1, targets="ffn"), bits=3 * 192 * AUTO_BITS_PER_PARAM + 1) == "last2"


def test_answer_bits_are_the_base_models_surprisal_at_the_answers(tiny):
    import math

    import torch

    from loramem.capacity import answer_bits
    from loramem.examples import Example

    examples = [Example("Question: Who wrote Hamlet? Answer:", " Shakespeare"), Example("Q: 2+2? A:", " 4")]
    expected = 0.0
    for e in examples:
        prompt = tiny.tokenizer(e.prompt).input_ids
        answer = tiny.tokenizer(e.answer, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = tiny.model(torch.tensor([prompt + answer])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expected -= sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer)) / math.log(2)
    assert answer_bits(tiny.model, tiny.tokenizer, examples, precision="fp32") == pytest.approx(expected, rel=1e-4)


def test_a_write_resolves_auto_layers_from_the_facts(tiny, tmp_path):
    from loramem.capacity import answer_bits, auto_layers
    from loramem.corpus import facts_from_text

    facts = facts_from_text("Question: What is the code of Ada? Answer: 4471\n")
    memory = Memory.open(tmp_path / "m", model="tiny", create=True)
    record = memory.write(facts, LoraSpec(rank=4), TrainSpec(epochs=1), progress=False)
    expected = auto_layers(tiny.model, LoraSpec(rank=4), answer_bits(tiny.model, tiny.tokenizer, facts, "fp32"))
    assert record.lora_spec["layers"] == expected
    assert record.trainable_params == 4 * TINY_PARAMS_PER_RANK_AND_LAYER * (4 if expected == "all" else int(expected[4:]))
    assert memory.write(facts, LoraSpec(rank=4), TrainSpec(epochs=1), progress=False).id == record.id  # resumes
