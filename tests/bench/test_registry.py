"""Benchmarks are registered units with one interface: load, what to write, what to ask, score."""

import pytest
from sample_facts import LINEAR_TO_ZERO

from loramem.bench import get, registered, studied
from loramem.bench import phonebook as pb
from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.memory import Memory


def test_every_benchmark_is_registered_with_its_kind():
    kinds = {name: b.kind for name, b in registered().items()}
    assert kinds == {"phonebook": "facts", "sectors": "facts", "counterfact": "facts", "paperqa": "documents",
                     "paperqa-multi": "documents", "narrativeqa": "documents", "self-study": "documents"}
    assert studied() == ("phonebook", "counterfact")
    assert [name for name, b in registered().items() if b.run is None] == ["counterfact"]  # `loramem exp` only


def test_unknown_names_are_clear_errors():
    with pytest.raises(LoramemError, match="^unknown dataset 'wiki'; choose phonebook or sectors or counterfact or "):
        get("wiki")
    with pytest.raises(LoramemError, match="^unknown dataset 'paperqa'; choose phonebook or counterfact$"):
        get("paperqa", in_studies=True)


def test_phonebook_through_the_interface(tiny, tmp_path):
    bench = get("phonebook")
    entries = bench.load("0.1K")  # no data directory: a generated phonebook of that size
    assert len(entries) == 5 and bench.to_write(entries) == pb.examples(entries)
    assert bench.questions(entries) == [f"What is the phone number of {e.name}?" for e in entries]
    memory = Memory.open(tmp_path / "pb.mem", create=True, base=tiny)
    written = entries[:2]
    record = memory.write(bench.to_write(written), LoraSpec(rank=8, layers="all"),
                          TrainSpec(epochs=80, **LINEAR_TO_ZERO), progress=False)
    # The module's recall as training measured it at the end (teacher-forced exact match) is what score reads.
    assert record.recall == 1.0 and bench.score(memory, written, record.id) == {"score": 1.0, "exact_match": 1.0}
    assert bench.score(memory, written, None)["score"] == 0.0  # the random base model knows no number
