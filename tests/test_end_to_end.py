"""On the bundled model: a few PhoneBook entries are stored and read back exactly."""

import pytest

from loramem import LoraSpec, Memory
from loramem.bench import phonebook as pb


@pytest.mark.slow
def test_bundled_model_memorises_a_small_phonebook(smollm, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAMEM_DATA", raising=False)
    memory = Memory.open(tmp_path / "pb.mem", create=True, base=smollm)
    result = pb.run(memory, "6", LoraSpec(rank=4, layers="all"), progress=False)
    assert result["entries"] == 6
    assert result["exact_match"] == 1.0
    base_score, _ = pb.evaluate(memory, pb.load("6"), mode="base")
    assert base_score == 0.0  # the numbers are random: the base model cannot know them
