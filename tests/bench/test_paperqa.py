import json

import pytest

from loramem import LoraSpec, Memory, TrainSpec
from loramem.bench import paperqa, without_leaks
from loramem.errors import LoramemError
from loramem.synth import SynthSpec
from loramem.examples import Example

INTRO = "Zorblat engines use quantum gears. The gears were built in Oslo by Mira Tan. " * 3
EVAL_QUESTION = "What do Zorblat engines use?"


class ScriptedGenerator:
    """Answers every prompt with the same QA lines, one of which repeats an evaluation question."""

    name = "test:scripted"

    def __init__(self):
        self.calls = 0

    def complete(self, prompts, max_tokens, temperature, seed):
        self.calls += len(prompts)
        return [f"Q: {EVAL_QUESTION}\nA: Zorblat engines use quantum gears.\n"
                "Q: Who built the gears?\nA: Mira Tan built the gears in Oslo.\n" for _ in prompts]


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("loramem.synth.cache.synth_dir", lambda: tmp_path / "synth")
    root = tmp_path / "data"
    (root / "paper" / "paper_dataset").mkdir(parents=True)
    papers = [{"id": i, "title": f"Paper {i}", "introduction": INTRO if i == 0 else INTRO.replace("Zorblat", "Quix"),
               "QA": [{"level": 1, "question": EVAL_QUESTION if i == 0 else "What do Quix engines use?",
                       "answer": "They use quantum gears."},
                      {"level": 2, "question": "Where were the gears built?", "answer": "In Oslo."}]}
              for i in range(2)]
    (root / paperqa.FILE).write_text(json.dumps(papers))
    return root


def test_load_and_select(data_dir):
    papers = paperqa.load(data_dir)
    assert [p.id for p in papers] == [0, 1] and papers[0].questions[0].question == EVAL_QUESTION
    assert [p.id for p in paperqa.load(data_dir, "1")] == [1]
    with pytest.raises(LoramemError, match="outside"):
        paperqa.load(data_dir, "0-5")
    with pytest.raises(LoramemError, match="does not exist"):
        paperqa.load(data_dir / "missing")
    (data_dir / paperqa.FILE).unlink()
    with pytest.raises(LoramemError, match="PaperQA data not found"):
        paperqa.load(data_dir)


def test_evaluation_questions_never_reach_training(tiny, data_dir, tmp_path):
    generator = ScriptedGenerator()
    memory = Memory.open(tmp_path / "pq.mem", create=True, base=tiny)
    papers = paperqa.load(data_dir, "0")
    written = paperqa.write_format(memory, papers, "qa", SynthSpec(questions=2), generator,
                                   LoraSpec(rank=4, layers="all"), TrainSpec(epochs=1), progress=False)
    # Two questions: two prompts, one passage of the text each. Each reply holds the same two pairs: the first
    # gives both, the second only repeats them; the evaluation question among them is dropped.
    assert generator.calls == 2 and written[0]["leaks_dropped"] == 1
    trained = memory.examples(memory.store.get(written[0]["module"]))
    assert [(e.prompt, e.answer) for e in trained] == [
        ("Question: Who built the gears? Answer:", " Mira Tan built the gears in Oslo.")]
    assert all("zorblat engines use" not in e.prompt.lower() for e in trained)


def test_without_leaks_matches_normalised_text():
    examples = [Example("Question: what do  Zorblat engines use ? Answer:", " gears"), Example("Question: Who? Answer:", " x")]
    kept, dropped = without_leaks(examples, [EVAL_QUESTION])
    assert dropped == 1 and kept == examples[1:]


def test_score_reports_metrics_per_level():
    questions = [paperqa.Question(0, 1, "q1", "the gears were built in Oslo"), paperqa.Question(0, 2, "q2", "Mira Tan")]
    scores = paperqa.score(["the gears were built in Oslo", "nobody"], questions)
    assert scores["rouge_l_l1"] == pytest.approx(1.0) and scores["rouge_l_l2"] == 0.0
    assert scores["rouge_l"] == pytest.approx(0.5) and {"bleu", "f1", "f1_l2"} <= scores.keys()


def test_format_table_runs_end_to_end(tiny, data_dir, tmp_path):
    memory = Memory.open(tmp_path / "table.mem", create=True, base=tiny)
    result = paperqa.run(memory, paperqa.load(data_dir), ["original", "qa"], SynthSpec(questions=2),
                         ScriptedGenerator(), LoraSpec(rank=4, layers="all"), TrainSpec(epochs=2), progress=False)
    assert [r["format"] for r in result["rows"]] == ["base (no module)", "icl (introduction in prompt)", "original", "qa"]
    assert result["questions"] == 4 and all(0.0 <= r["rouge_l"] <= 1.0 for r in result["rows"])
    assert result["rows"][0]["train_tokens"] == 0 and result["rows"][2]["train_tokens"] > 0


def test_format_table_with_rag_rows_and_the_distill_objective(tiny, data_dir, tmp_path):
    memory = Memory.open(tmp_path / "distill.mem", create=True, base=tiny)
    result = paperqa.run(memory, paperqa.load(data_dir), ["qa"], SynthSpec(questions=2), ScriptedGenerator(),
                         LoraSpec(rank=4, layers="all"), TrainSpec(epochs=2, objective="distill"), progress=False, rag=True)
    assert [r["format"] for r in result["rows"]] == [
        "base (no module)", "icl (introduction in prompt)", "rag top 3 (base model)", "qa", "qa + rag top 3"]
    modules = memory.modules()
    assert len(modules) == 2 and all(m.train_spec["objective"] == "distill" for m in modules)
    module = modules[0]
    # a second module on the same documents adds no passage: retrieval indexes each document once
    passages = len(memory.retriever("bm25").index.texts)
    memory.write(memory.examples(module), LoraSpec(rank=2, layers="all"), TrainSpec(epochs=1), documents=memory.documents(module),
                 progress=False)
    assert len(memory.retriever("bm25").index.texts) == passages
