import json

import pytest

from loramem import LoraSpec, Memory, TrainSpec, facts_from_text
from loramem.capacity import Cell, cells_from, cells_from_file, module_tokens, tokens_per_param, trainable_params
from loramem.errors import LoramemError

from test_cli import loramem

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
    record = memory.write(facts_from_text(facts), LATE, TrainSpec(lr=1e-2, epochs=80, batch_size=2), progress=False)
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
    out = loramem("write", tmp_path / "n", tmp_path / "facts.txt", "--model", "tiny", "--shard-tokens", "auto")
    assert out.returncode == 2 and "needs measured capacity" in out.stderr and not (tmp_path / "n").exists()
