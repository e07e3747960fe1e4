"""synthesize() with scripted generators: counts, filtering, refinement, retries, caching, chunking."""

from __future__ import annotations

import json

import pytest

from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.synth import SynthSpec, split_text, synthesize

TEXT = "The Eiffel Tower in Paris was designed by Gustave Eiffel. It was completed in 1889 for the World's Fair."
DOC = Document.from_text(TEXT)
GOOD = "Q: Who designed the Eiffel Tower? A: Gustave Eiffel"
WRONG = "Q: When was the Eiffel Tower completed? A: in 1999"
JSON_PAIRS = json.dumps([
    {"question": "Who designed the Eiffel Tower?", "answer": "Gustave Eiffel"},
    {"question": "When was the Eiffel Tower completed?", "answer": "1889"},
])


def test_qa_pairs_become_closed_book_examples(fake):
    generator = fake(lambda prompt: f"{GOOD}\n{WRONG}")
    examples, report = synthesize(DOC, SynthSpec(questions=1), generator)
    assert [(e.prompt, e.answer) for e in examples] == [
        ("Question: Who designed the Eiffel Tower? Answer:", " Gustave Eiffel")]
    assert report.asked == {"qa": 1} and report.produced == {"qa": 1}
    assert report.dropped_unsupported == 1 and report.malformed == 0 and not report.cached


def test_refinement_asks_for_questions_not_yet_covered(fake):
    generator = fake(lambda prompt: GOOD)
    examples, report = synthesize(DOC, SynthSpec(questions=2, refine_rounds=2), generator)
    assert len(examples) == 1 and report.produced["qa"] == 1 and report.asked["qa"] == 2
    # The second prompt of the first round and the one prompt of each refinement round repeated it.
    assert report.duplicates == 3
    assert generator.calls == 3
    assert "Do not ask: Who designed the Eiffel Tower?" in generator.prompts[-1]


def test_json_generator_gets_one_prompt_for_all_pairs(fake):
    generator = fake(lambda prompt: JSON_PAIRS, qa_style="json")
    _, report = synthesize(DOC, SynthSpec(questions=2), generator)
    assert report.produced["qa"] == 2 and generator.calls == 1
    assert "write 2 question-answer pairs" in generator.prompts[0] and "JSON" in generator.prompts[0]


def test_malformed_reply_is_retried(fake, script):
    generator = fake(script("I cannot do that.", JSON_PAIRS), qa_style="json")
    _, report = synthesize(DOC, SynthSpec(questions=2), generator)
    assert report.produced["qa"] == 2 and report.malformed == 0 and generator.calls == 2


def test_reply_that_stays_malformed_is_counted(fake):
    generator = fake(lambda prompt: "I cannot do that.", qa_style="json")
    examples, report = synthesize(DOC, SynthSpec(questions=2, refine_rounds=0, max_retries=2), generator)
    assert examples == [] and report.produced["qa"] == 0 and report.asked["qa"] == 2
    assert report.malformed == 1 and generator.calls == 3


def test_second_call_reads_the_cache(fake, synth_cache):
    generator = fake(lambda prompt: f"{GOOD}\nSummary: Gustave Eiffel designed it.")
    spec = SynthSpec(formats="qa+summary", questions=1)
    first, report = synthesize(DOC, spec, generator)
    calls = generator.calls
    again, report_again = synthesize(DOC, spec, generator)
    assert again == first and generator.calls == calls
    assert report_again.cached and not report.cached
    assert report_again.produced == report.produced
    files = list(synth_cache.iterdir())
    assert len(files) == 2 and all(f.suffix == ".json" for f in files)  # no temporary files left behind
    assert all("key" in json.loads(f.read_text()) for f in files)


def test_unreadable_cache_file_is_generated_again(fake, synth_cache):
    generator = fake(lambda prompt: GOOD)
    synthesize(DOC, SynthSpec(questions=1), generator)
    (path,) = synth_cache.iterdir()
    path.write_text("{ half a fi")
    examples, report = synthesize(DOC, SynthSpec(questions=1), generator)
    assert generator.calls == 2 and not report.cached and len(examples) == 1
    assert json.loads(path.read_text())["value"]["pairs"] == [
        {"question": "Who designed the Eiffel Tower?", "answer": "Gustave Eiffel"}]


def test_cache_is_keyed_by_seed_and_count_and_can_be_bypassed(fake):
    generator = fake(lambda prompt: GOOD)
    synthesize(DOC, SynthSpec(questions=1), generator)
    # Each generates anew: one prompt for one question; for two, a first round and a refinement round (the fake
    # repeats its one question).
    for spec, cache, calls in [(SynthSpec(questions=1, seed=1), True, 1), (SynthSpec(questions=2), True, 2),
                               (SynthSpec(questions=1), False, 1)]:
        before = generator.calls
        synthesize(DOC, spec, generator, cache=cache)
        assert generator.calls == before + calls


def test_summaries_and_rewrites(fake):
    generator = fake(lambda prompt: "Summary: Eiffel built it." if "Summarize" in prompt else "Eiffel made a tower.")
    examples, report = synthesize(DOC, SynthSpec(formats="summary+rewrite", summaries=2, rewrites=1), generator)
    assert [e.prompt for e in examples] == [f"Summary of document {DOC.id}:\n", f"[Doc ID: {DOC.id}] (rewritten)\n"]
    assert examples[0].answer == "Eiffel built it."
    # Two summaries were asked; the fake wrote the same one twice, which is kept once.
    assert report.asked == {"summary": 2, "rewrite": 1} and report.produced == {"summary": 1, "rewrite": 1}


def test_long_text_is_generated_per_chunk(fake):
    doc = Document.from_text(" ".join([TEXT] * 12))
    generator = fake(lambda prompt: f"{GOOD}\nSummary: Eiffel.")
    spec = SynthSpec(formats="qa+summary", questions=7, chunk_tokens=100)
    examples, report = synthesize(doc, spec, generator)
    chunks = split_text(doc.text, 100, None, doc.id)
    assert len(chunks) > 1
    assert report.asked == {"qa": 7, "summary": len(chunks)}  # questions are per document, summaries per chunk
    # Every prompt gave the same question. A chunk asked k >= 1 questions keeps it from its first reply; the other
    # k - 1 prompts of the first round and the k - 1 of the refinement round repeat it, and so does every chunk
    # after the first.
    counts = [7 // len(chunks) + (i < 7 % len(chunks)) for i in range(len(chunks))]
    asked = [k for k in counts if k]
    assert report.produced["qa"] == 1 and report.dropped_unsupported == 0
    assert report.duplicates == sum(2 * (k - 1) for k in asked) + len(asked) - 1
    assert [e.prompt for e in examples if e.prompt.startswith("Summary")] == [
        f"Summary of document {doc.id} part {i}/{len(chunks)}:\n" for i in range(1, len(chunks) + 1)]


def test_original_needs_no_generator_and_respects_the_length(tiny):
    doc = Document.from_text(" ".join([TEXT] * 10))
    examples, report = synthesize(doc, SynthSpec(formats="original", original_tokens=32), tokenizer=tiny.tokenizer)
    assert len(examples) > 1 and report.produced == report.asked == {"original": len(examples)}
    assert "".join(e.answer for e in examples) == doc.text
    assert all(len(tiny.tokenizer(e.answer, add_special_tokens=False).input_ids) <= 33 for e in examples)
    assert examples[1].prompt == f"[Doc ID: {doc.id} part 2/{len(examples)}]\n"
    assert not report.cached


def test_generated_formats_need_a_generator():
    with pytest.raises(LoramemError, match="needs a generator"):
        synthesize(DOC, SynthSpec(formats="original+qa"))


@pytest.mark.parametrize("kwargs", [{"min_support": 1.5}, {"questions": -1}, {"chunk_tokens": 0},
                                    {"temperature": -1.0}, {"formats": "qa+poems"}])
def test_bad_spec(kwargs):
    with pytest.raises(LoramemError):
        SynthSpec(**kwargs)


def test_split_text_by_characters_is_even_and_exact():
    text = " ".join(f"word{i}" for i in range(300))
    chunks = split_text(text, 100, None, "d")
    assert "".join(c.text for c in chunks) == text
    assert all(len(c.text) <= 400 for c in chunks)
    sizes = [len(c.text) for c in chunks]
    assert max(sizes) - min(sizes) < 50  # no short tail


def test_split_text_by_tokens(tiny):
    text = " ".join([TEXT] * 20)
    chunks = split_text(text, 64, tiny.tokenizer, "d")
    assert "".join(c.text for c in chunks) == text
    assert all(c.n_tokens <= 64 for c in chunks)
    assert max(c.n_tokens for c in chunks) - min(c.n_tokens for c in chunks) <= 1
