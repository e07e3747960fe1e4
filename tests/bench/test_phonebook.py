import math

import pytest

from loramem.bench import phonebook as pb
from loramem.errors import LoramemError
from loramem.metrics import PHONE_RE
from sample_facts import LINEAR_TO_ZERO


def test_generated_phonebook_has_the_paper_format_and_size():
    entries = pb.generate(48, seed=1)
    assert len(entries) == 48 and len({e.name for e in entries}) == 48
    assert all(pb.LINE_RE.match(e.line) for e in entries)
    assert pb.generate(48, seed=1) == entries and pb.generate(48, seed=2) != entries


def test_size_in_tokens_without_data(monkeypatch):
    monkeypatch.delenv("LORAMEM_DATA", raising=False)
    assert len(pb.load("1K")) == 48
    assert len(pb.load("2K")) == 96
    with pytest.raises(LoramemError, match="size"):
        pb.load("big")


def test_generated_1k_is_about_a_thousand_tokens(tiny):
    tokens = sum(len(tiny.tokenizer(e.line).input_ids) for e in pb.load("1K"))
    assert 900 <= tokens <= 1400


def test_paper_file_is_read_from_the_data_dir(tmp_path):
    folder = tmp_path / "paper" / "pb_cf"
    folder.mkdir(parents=True)
    (folder / "phonebook_qa_1K.csv").write_text(
        "text\nQuestion: What is the phone number of Jeffrey Buck? Answer: 603-556-7631\n")
    assert pb.load("1K", tmp_path) == [pb.Entry("Jeffrey Buck", "603-556-7631")]
    (folder / "phonebook_qa_2K.csv").write_text("text\nnot a phonebook line\n")
    with pytest.raises(LoramemError, match="phonebook_qa_2K.csv:2"):
        pb.load("2K", tmp_path)


def test_real_data_when_present():
    from loramem.config import data_dir

    root = data_dir()
    if root is None:
        pytest.skip("LORAMEM_DATA not set")
    assert len(pb.load("1K", root)) == 48 and len(pb.load("8K", root)) == 387
    assert pb.load("0.5K", root) == pb.load("1K", root)[:24]  # other sizes: prefixes of the paper's data


@pytest.mark.parametrize("text,match", [
    ("The number is 603-556-7631.", "603-556-7631"), ("6035567631", None), ("603-556-763", None),
    ("call 603-556-7631 or 212-555-0101", "603-556-7631"),
])
def test_scoring_regex(text, match):
    found = PHONE_RE.search(text)
    assert (found.group(0) if found else None) == match


def test_bits_per_number():
    assert pb.BITS_PER_NUMBER == pytest.approx(10 * math.log2(10))


def test_sectors_study_on_the_tiny_model(tiny, tmp_path):
    from loramem import LoraSpec, Memory, TrainSpec

    memory = Memory.open(tmp_path / "sectors.mem", create=True, base=tiny)
    result = pb.run_sectors(memory, source="1K", sector_size="0.1K", count=2, rank=8, lora=LoraSpec(rank=8, layers="all"),
                            train_spec=TrainSpec(lr=1e-2, epochs=80, batch_size=2, **LINEAR_TO_ZERO), context_questions=4,
                            progress=False)
    settings = [row["setting"] for row in result["rows"]]
    assert settings[0].endswith("oracle routing") and "single (rank 16)" in settings
    assert result["rows"][0]["questions"] == 10 and result["rows"][-1]["questions"] == 4  # ICL: the sample
    assert result["rows"][0]["exact_match"] > 0.5  # each 5-fact sector is learnt by its own module
    assert set(result["routing"]) == {"bm25", "dense", "hybrid"}
    assert result["routing"]["bm25"]["recall@1"] == 1.0  # names are rare words: BM25 finds their sector
    assert len(memory.modules()) == 2


def test_sectors_need_enough_entries():
    entries = pb.generate(10)
    with pytest.raises(LoramemError, match="need"):
        pb.sectors(entries, "1K", 2)
