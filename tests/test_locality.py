"""The write-time locality check: figures from answers, the check against a real module, and its record."""

from __future__ import annotations

import pytest

from loramem import locality
from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.memory import Memory
from loramem.examples import Example


def test_compare_counts_changed_answers_and_the_score_change():
    report = locality.compare(["Paris", "Seven", "blue"], ["Paris", "Eight", "green sky"], ["Paris", "Seven", "Blue"])
    assert report.questions == 3 and report.changed == pytest.approx(2 / 3)
    assert report.base_rouge_l == pytest.approx(1.0) and report.module_rouge_l == pytest.approx(1 / 3)
    assert report.to_dict()["delta"] == pytest.approx(-2 / 3)
    with pytest.raises(LoramemError, match="one reference per question"):
        locality.compare(["a"], ["a", "b"], ["a"])
    with pytest.raises(LoramemError, match="one reference per question"):
        locality.compare([], [], [])


def test_check_asks_the_base_and_the_module_and_records_it(tiny, tmp_path):
    memory = Memory.open(tmp_path / "m.mem", create=True, base=tiny)
    facts = [Example("Question: What is the code of vault 7? Answer:", " 4417 9921")]
    record = memory.write(facts, LoraSpec(rank=4, layers="all"), TrainSpec(epochs=40, lr=5e-2), progress=False)
    questions, references = ["What is the code of vault 7?"], ["4417 9921"]
    report = locality.check(memory, record.id, questions, references, max_new_tokens=6)
    base = memory.ask_many(questions, mode="base", max_new_tokens=6)[0].text
    tuned = memory.ask_many(questions, mode="lora", module=record.id, max_new_tokens=6)[0].text
    assert report.changed == float(base != tuned) and report.module_rouge_l == pytest.approx(
        locality.compare([base], [tuned], references).module_rouge_l)
    locality.record(memory, record.id, report, "vault")
    general = locality.check(memory, record.id, max_new_tokens=4)
    assert general.questions == len(locality.GENERAL_QUESTIONS)
    locality.record(memory, record.id, general)
    stats = memory.store.get(record.id).stats
    assert stats["locality"]["vault"] == report.to_dict() and stats["locality"]["general"] == general.to_dict()
    assert stats["precision"]  # the training stats are kept beside it
    with pytest.raises(LoramemError, match="reference answer for every question"):
        locality.check(memory, record.id, questions, [])
    with pytest.raises(LoramemError, match="no module"):
        memory.store.update_stats("nope", {"locality": {}})
