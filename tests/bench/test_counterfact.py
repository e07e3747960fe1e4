"""CounterFact: the paper's edit files, and efficacy / paraphrase / locality of a module written from them."""

import pytest

from loramem import LoraSpec, Memory, TrainSpec
from loramem.bench import counterfact
from loramem.config import data_dir
from loramem.errors import LoramemError
from sample_facts import LINEAR_TO_ZERO


@pytest.fixture
def root():
    found = data_dir()
    if found is None or not (found / "counterfact" / "counterfact_edits.jsonl").exists():
        pytest.skip("LORAMEM_DATA with counterfact/ not set")
    return found


def test_sizes_follow_the_paper_files(root):
    edits = counterfact.load("1K", root)
    assert len(edits) == 106 and len(counterfact.load("2K", root)) > 106
    assert edits[0].prompt == "Lenta.ru is written in" and edits[0].target_new == "Italian"
    assert counterfact.examples(edits[:1])[0].answer == " Italian"
    assert counterfact.load("0.5K", root) == edits[:53]  # under 1K: that share of the 1K edits
    with pytest.raises(LoramemError, match="no CounterFact file"):
        counterfact.load("3.5K", root)


def test_without_a_data_dir_the_error_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("LORAMEM_DATA", raising=False)
    with pytest.raises(LoramemError, match="data directory"):
        counterfact.load("1K")


def test_a_written_edit_wins_and_an_empty_change_keeps_locality(tiny, tmp_path, root):
    edits = [e for e in counterfact.load("1K", root)[:12]
             if tiny.tokenizer(f" {e.target_new}").input_ids[0] != tiny.tokenizer(f" {e.target_true}").input_ids[0]][:6]
    memory = Memory.open(tmp_path / "cf.mem", create=True, base=tiny)
    record = memory.write(counterfact.examples(edits), LoraSpec(rank=8, layers="all"), TrainSpec(lr=1e-2, epochs=60, **LINEAR_TO_ZERO),
                          progress=False)
    assert record.recall == 1.0
    scores = counterfact.score(memory, edits, record.id)
    # every edit's new object is the greedy completion, so its first token outscores the true one's
    assert scores["efficacy"] == 1.0
    assert all(0.0 <= scores[k] <= 1.0 for k in ("paraphrase", "locality", "unchanged"))
    before = memory.score(counterfact.examples(edits))
    assert sum(s.exact for s in before) < len(edits)  # the base model did not already say them
    # a module that barely moved the weights leaves every neighbour's greedy tokens as they were
    still = memory.write(counterfact.examples(edits), LoraSpec(rank=8, layers="all"), TrainSpec(lr=1e-9, epochs=1, target_recall=None),
                         progress=False)
    barely, base = counterfact.score(memory, edits, still.id), counterfact.score(memory, edits, None)
    assert barely["unchanged"] == base["unchanged"] == 1.0 and barely["locality"] == base["locality"]


def test_one_pass_comparison_equals_scoring_both_objects(tiny, tmp_path, root):
    edits = counterfact.load("1K", root)[:10]
    memory = Memory.open(tmp_path / "cf.mem", create=True, base=tiny)
    flags, _ = counterfact._preferred(memory, [e.prompt for e in edits], [e.target_new for e in edits],
                                      [e.target_true for e in edits], None)
    new = memory.score([counterfact.Example(e.prompt, f" {e.target_new}") for e in edits])
    true = memory.score([counterfact.Example(e.prompt, f" {e.target_true}") for e in edits])
    assert flags == [bool(n.logp[0] > t.logp[0]) for n, t in zip(new, true)]
