"""NarrativeQA (loramem.bench.narrativeqa): reading the stories file, cutting stories into parts, and the grid of
context against modules, from small story files written here (the real file is only read when LORAMEM_DATA has it).
"""

from __future__ import annotations

import json

import pytest

from loramem import LoraSpec, Memory, TrainSpec
from loramem.answer import Answer
from loramem.bench import narrativeqa
from loramem.corpus import Document, chunk_text
from loramem.errors import LoramemError
from loramem.synth import SynthSpec

GEARS = "Zorblat engines use quantum gears. The gears were built in Oslo by Mira Tan. " * 3
STORIES = [
    {"doc_id": "s0", "summary": GEARS + "This is story 0.",
     "questions": [{"question": "Who built the gears?", "answers": ["Mira Tan", "Mira Tan."]}]},
    {"doc_id": "s1", "summary": GEARS.replace("Oslo", "Bergen") + "This is story 1.",
     "questions": [{"question": "Where were the gears built?", "answers": ["Bergen", "In Bergen."]}]},
]


def write_stories(root, stories=STORIES, blank_lines=False):
    (root / "narrativeqa").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(s) for s in stories]
    text = ("\n\n  \n".join(lines) + "\n\n") if blank_lines else "\n".join(lines)
    (root / narrativeqa.FILE).write_text(text, encoding="utf-8")
    return root


def story_reply(prompt) -> str:
    """A pair about the story's own city, then one that repeats an evaluation question."""
    city = "Bergen" if "Bergen" in str(prompt) else "Oslo"
    return (f"Q: Which city were the gears built in?\nA: The gears were built in {city}.\n"
            "Q: Who built the gears?\nA: Mira Tan built the gears.\n")


class ScriptedGenerator:
    """Answers each prompt with reply(prompt) and counts the prompts."""

    name = "test:narrativeqa"

    def __init__(self, reply=story_reply):
        self.reply = reply
        self.calls = 0

    def complete(self, prompts, max_tokens, temperature, seed):
        self.calls += len(prompts)
        return [self.reply(p) for p in prompts]


@pytest.fixture(autouse=True)
def own_synth_cache(tmp_path, monkeypatch):
    monkeypatch.setattr("loramem.synth.cache.synth_dir", lambda: tmp_path / "synth")


# --- reading -------------------------------------------------------------------------------------


def test_load_reads_each_story_with_its_questions_and_answers(tmp_path):
    root = write_stories(tmp_path / "data", blank_lines=True)  # blank lines between and after are skipped
    stories = narrativeqa.load(root)
    assert stories == [
        narrativeqa.Story("s0", GEARS + "This is story 0.", (("Who built the gears?", ("Mira Tan", "Mira Tan.")),)),
        narrativeqa.Story("s1", GEARS.replace("Oslo", "Bergen") + "This is story 1.",
                          (("Where were the gears built?", ("Bergen", "In Bergen.")),)),
    ]
    assert narrativeqa.load(root, stories=1) == stories[:1]
    assert narrativeqa.load(root, stories=5) == stories
    assert narrativeqa.load(str(root), stories=None) == stories


def test_load_finds_the_file_through_loramem_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMEM_DATA", str(write_stories(tmp_path / "data")))
    assert [s.id for s in narrativeqa.load()] == ["s0", "s1"]


def test_a_story_is_a_document_titled_by_its_id():
    story = narrativeqa.Story("s7", "Once upon a time.", ())
    assert story.document() == Document.from_text("Once upon a time.", title="story s7", meta={"story": "s7"})


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoramemError) as err:
        narrativeqa.load(tmp_path / "empty")
    assert str(err.value) == (f"NarrativeQA data not found at {tmp_path / 'empty' / narrativeqa.FILE}; "
                              "set --data-dir or LORAMEM_DATA")
    monkeypatch.delenv("LORAMEM_DATA", raising=False)
    with pytest.raises(LoramemError, match="^NarrativeQA data not found at None; set --data-dir or LORAMEM_DATA$"):
        narrativeqa.load()
    with pytest.raises(LoramemError, match="does not exist"):
        narrativeqa.load(tmp_path / "missing")


def test_the_real_dev_stories_when_present():
    from loramem.config import data_dir

    root = data_dir()
    if root is None or not (root / narrativeqa.FILE).is_file():
        pytest.skip("LORAMEM_DATA with narrativeqa/ not set")
    stories = narrativeqa.load(root)
    assert len(stories) == 67 and sum(len(s.questions) for s in stories) == 2006
    assert stories[0].id == "d6357ef6277e" and stories[0].questions[0] == (
        "Who does Maskull accept an invitation from?", ("Krag", "Krag."))
    assert all(len(answers) == 2 for s in stories for _, answers in s.questions)
    assert narrativeqa.load(root, stories=3) == stories[:3]


# --- parts ---------------------------------------------------------------------------------------


def test_parts_are_the_story_or_its_chunks_with_an_eighth_overlap(tiny):
    story = narrativeqa.Story("s0", GEARS, ())
    assert narrativeqa._parts(story, "story", tiny.tokenizer, 16) == [story.document()]
    parts = narrativeqa._parts(story, "chunk", tiny.tokenizer, 16)
    chunks = chunk_text(GEARS, tiny.tokenizer, 16, 2, doc_id="s0")  # 16 tokens, 16 // 8 = 2 of them shared
    assert len(chunks) == 4
    assert parts == [Document.from_text(c.text, title=f"story s0 part {c.index}", meta={"story": "s0"})
                     for c in chunks]


# --- the grid ------------------------------------------------------------------------------------


def test_per_must_be_story_or_chunk(tiny, tmp_path):
    memory = Memory.open(tmp_path / "m.mem", create=True, base=tiny)
    stories = narrativeqa.load(write_stories(tmp_path / "data"))
    with pytest.raises(LoramemError, match="^per must be story or chunk, got 'page'$"):
        narrativeqa.run(memory, stories, "qa", SynthSpec(), ScriptedGenerator(), per="page")


def test_a_generator_giving_nothing_usable_writes_nothing(tiny, tmp_path):
    memory = Memory.open(tmp_path / "m.mem", create=True, base=tiny)
    stories = narrativeqa.load(write_stories(tmp_path / "data"))
    generator = ScriptedGenerator(lambda prompt: "Q: Who built the gears?\nA: Mira Tan built the gears.\n")  # held out
    with pytest.raises(LoramemError, match="^the generator gave no usable training data for any story$"):
        narrativeqa.run(memory, stories, "qa", SynthSpec(questions=1, refine_rounds=0), generator)
    assert generator.calls == 2 and memory.modules() == []


def fake_ask_many(calls):
    """Memory.ask_many answering each question with its first reference when modules are in the weights (lora,
    multi), else "nobody knows"; records which memory was asked, in which mode, with which options."""
    references = {q["question"]: q["answers"][0] for s in STORIES for q in s["questions"]}

    def ask_many(self, questions, mode="lora", **options):
        calls.append((self.path.name, mode, options))
        knows = mode.startswith(("lora", "multi"))
        return [Answer(q, references[q] if knows else "nobody knows", mode, seconds=0.5 * (i + 1),
                       timing={"merge": 0.25} if mode.startswith("multi") else {}) for i, q in enumerate(questions)]

    return ask_many


def test_the_grid_asks_each_setting_and_scores_it(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Memory, "ask_many", fake_ask_many(calls))
    memory = Memory.open(tmp_path / "nqa.mem", create=True, base=tiny)
    stories = narrativeqa.load(write_stories(tmp_path / "data"))
    result = narrativeqa.run(memory, stories, "qa", SynthSpec(questions=2), ScriptedGenerator(), LoraSpec(rank=4, layers="all"),
                             TrainSpec(epochs=1), router="bm25", progress=False)

    # One module per story, without the evaluation question its generator repeated; one module of all beside.
    modules = memory.modules()
    assert [m.name for m in modules] == ["story s0", "story s1"]
    trained = [[(e.prompt, e.answer) for e in memory.examples(m)] for m in modules]
    assert trained == [[("Question: Which city were the gears built in? Answer:", f" The gears were built in {city}.")]
                       for city in ("Oslo", "Bergen")]
    assert [memory.documents(m) for m in modules] == [[s.document()] for s in stories]
    alone = Memory.open(tmp_path / "nqa.mem-single", base=tiny)
    (single,) = alone.modules()
    assert single.name == "all-stories" and [(e.prompt, e.answer) for e in alone.examples(single)] == sum(trained, [])
    assert alone.documents(single) == [s.document() for s in stories]

    # Each cell: (memory asked, mode, options); k = min(3, modules) = 2.
    options = {"router": "bm25", "merge": "ties", "max_new_tokens": narrativeqa.MAX_NEW_TOKENS}
    routed, own = options | {"top_k": 2}, options | {"module": single.id}
    assert calls == [
        ("nqa.mem", "base", routed), ("nqa.mem-single", "lora", own), ("nqa.mem", "lora", routed),
        ("nqa.mem", "multi", routed),
        ("nqa.mem", "icl", routed), ("nqa.mem-single", "lora+icl", own), ("nqa.mem", "lora+icl", routed),
        ("nqa.mem", "multi+icl", routed),
        ("nqa.mem", "rag", routed), ("nqa.mem-single", "lora+rag", own), ("nqa.mem", "lora+rag", routed),
        ("nqa.mem", "multi+rag", routed),
    ]
    # ROUGE-L against the references (the answer given is the first, so 1.0; "nobody knows" shares no word), the
    # median seconds of the two answers (0.5 and 1.0: the upper one) and the merge seconds they add up to.
    rows = [(r["context"], r["modules"], r["rouge_l"], r["s_per_question"], r["merge_s"]) for r in result["rows"]]
    settings = ("none", "single", "multi top-1", "multi top-2")
    assert rows == [(context, setting, 0.0 if setting == "none" else 1.0, 1.0, 0.5 if setting == "multi top-2" else 0.0)
                    for context in ("none", "icl", "rag") for setting in settings]
    assert {k: v for k, v in result.items() if k != "rows"} == {
        "stories": 2, "questions": 2, "per": "story", "modules": 2, "no_data": [], "format": "qa", "rank": 4}


CITY_STORY = {"doc_id": "c0", "questions": [{"question": "Who built the gears?", "answers": ["Mira Tan", "Mira Tan."]}],
              "summary": ("Zorblat engines use quantum gears. " * 4 + "The gears were built in Oslo by Mira Tan. "
                          + "Nothing else happened that day. " * 5 + "Mira Tan later moved to Oslo for good. "
                          + "The end came quietly. " * 3).strip()}


def city_reply(prompt) -> str:  # usable data only from the passages that name the city
    text = str(prompt)
    if "moved" in text:
        return "Q: Where did Mira Tan move?\nA: Mira Tan moved to Oslo.\n"
    if "Oslo" in text:
        return "Q: Which city were the gears built in?\nA: The gears were built in Oslo.\n"
    return "I cannot."


def test_per_chunk_writes_a_module_per_chunk_and_lists_the_chunks_without_data(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Memory, "ask_many", fake_ask_many(calls))
    memory = Memory.open(tmp_path / "chunks.mem", create=True, base=tiny)
    stories = narrativeqa.load(write_stories(tmp_path / "data", [CITY_STORY]))
    parts = narrativeqa._parts(stories[0], "chunk", tiny.tokenizer, 24)
    with_city = [p.title for p in parts if "Oslo" in p.text]
    assert len(parts) == 5 and with_city == ["story c0 part 1", "story c0 part 3"]
    generator = ScriptedGenerator(city_reply)
    result = narrativeqa.run(memory, stories, "qa", SynthSpec(questions=1, refine_rounds=0, max_retries=0),
                             generator, LoraSpec(rank=2, layers="all"), TrainSpec(epochs=1), per="chunk", chunk_tokens=24,
                             progress=False)
    assert generator.calls == 5  # one prompt per part
    assert [m.name for m in memory.modules()] == with_city
    assert [memory.documents(m) for m in memory.modules()] == [[p] for p in parts if "Oslo" in p.text]
    assert result["no_data"] == ["story c0 part 0", "story c0 part 2", "story c0 part 4"]
    assert (result["per"], result["modules"], result["stories"], result["questions"]) == ("chunk", 2, 1, 1)
    assert [r["modules"] for r in result["rows"]] == ["none", "single", "multi top-1", "multi top-2"] * 3
    assert {options.get("top_k") for _, _, options in calls} == {2, None}  # None: the single module, by id


def test_the_grid_runs_end_to_end(tiny, tmp_path):
    """The real answers, on the tiny model: every cell is asked and scored."""
    memory = Memory.open(tmp_path / "nqa.mem", create=True, base=tiny)
    stories = narrativeqa.load(write_stories(tmp_path / "data"))
    result = narrativeqa.run(memory, stories, "qa", SynthSpec(questions=2), ScriptedGenerator(), LoraSpec(rank=4, layers="all"),
                             TrainSpec(epochs=1), router="bm25", progress=False)
    cells = [(r["context"], r["modules"]) for r in result["rows"]]
    assert cells == [(c, m) for c in ("none", "icl", "rag") for m in ("none", "single", "multi top-1", "multi top-2")]
    assert result["questions"] == 2 and result["modules"] == 2


def test_the_top_k_row_is_repeated_for_each_way_of_combining_the_modules(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Memory, "ask_many", fake_ask_many(calls))
    memory = Memory.open(tmp_path / "nqa.mem", create=True, base=tiny)
    stories = narrativeqa.load(write_stories(tmp_path / "data"))
    result = narrativeqa.run(memory, stories, "qa", SynthSpec(questions=2), ScriptedGenerator(), LoraSpec(rank=4, layers="all"),
                             TrainSpec(epochs=1), router="bm25", progress=False, merges=("ties", "select"))
    assert [r["modules"] for r in result["rows"]][:5] == ["none", "single", "multi top-1", "multi top-2 ties",
                                                          "multi top-2 select"]
    assert [(mode, options["merge"]) for _, mode, options in calls if mode.startswith("multi")] == [
        ("multi", "ties"), ("multi", "select"), ("multi+icl", "ties"), ("multi+icl", "select"),
        ("multi+rag", "ties"), ("multi+rag", "select")]
