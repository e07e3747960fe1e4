"""Self-study prompts: kinds, teacher answers, caching, and bad input (tiny model, scripted generator)."""

from __future__ import annotations

import re

import pytest

from loramem.prompts import closed_book_prompt
from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.locality import ANCHOR_QUESTIONS
from loramem.prompts import render_prompt
from loramem.answer import generate
from loramem.synth.selfstudy import DOCUMENT_QUESTIONS, QUESTIONS, SEED_TYPES, SelfStudySpec, self_study
from tests.synth.conftest import FakeGenerator

TEXT = (
    "The Aurora telescope was built in Chile in 1998 by the Northern Sky Consortium. It observes distant galaxies "
    "in infrared light. Its main mirror is eight metres wide and made of beryllium. The consortium moved its "
    "headquarters to Lisbon in 2004 after a long dispute about funding. Since then the telescope has found "
    "twelve new dwarf galaxies and one unusual quasar named Aurora-Q7. "
) * 3


def _doc(text: str = TEXT) -> Document:
    return Document.from_text(text, title="aurora")


def test_prompts_are_shared_among_kinds_and_answered_by_the_teacher(tiny):
    generator = FakeGenerator(lambda text: "Question: What does the consortium observe?\nmore text")
    spec = SelfStudySpec(prompts=9, kinds="seed+template+continue", windows=(32, 64), answer_tokens=8, anchors=0)
    examples, report = self_study(_doc(), spec, generator, tiny, style="plain")
    assert report.asked == {"self-study": 9} and sum(report.produced.values()) == len(examples) == 9 - report.skipped_empty
    assert report.produced.get("continue") == 3 and report.produced.get("template", 0) <= 3
    assert sum(n for kind, n in report.produced.items() if kind.startswith("seed:")) <= 3
    assert all(kind.removeprefix("seed:") in SEED_TYPES for kind in report.produced if kind.startswith("seed:"))
    # every generator prompt held a window of the document and one of the generic requests, which never name it
    assert generator.calls == 1 and len(generator.prompts) == 3
    assert all(any(request in p for request in SEED_TYPES.values()) for p in generator.prompts)
    seeded = [e for e in examples if e.prompt == closed_book_prompt("What does the consortium observe?")]
    assert len(seeded) == 3  # the label is stripped, only the first line kept
    continued = [e for e in examples if e.answer.strip() in TEXT]  # the document's own next text, not the teacher's
    assert len(continued) == 3 and all("Continue this passage:" in e.prompt for e in continued)
    assert all(len(tiny.tokenizer(e.answer, add_special_tokens=False).input_ids) <= 8 + 1 for e in examples)


def test_replies_are_cached_and_the_spec_is_in_the_key(tiny):
    generator = FakeGenerator(lambda text: "What is the mirror made of?")
    spec = SelfStudySpec(prompts=4, kinds="seed+template", windows=(32,), answer_tokens=6)
    first, report = self_study(_doc(), spec, generator, tiny, style="plain")
    again, cached = self_study(_doc(), spec, generator, tiny, style="plain")
    assert not report.cached and cached.cached and again == first and generator.calls == 1
    self_study(_doc(), SelfStudySpec(prompts=5, kinds="seed+template", windows=(32,), answer_tokens=6), generator, tiny, style="plain")
    assert generator.calls == 2


def test_kinds_without_the_generator_need_none(tiny):
    examples, report = self_study(_doc(), SelfStudySpec(prompts=6, kinds="template+continue", windows=(48,),
                                                        answer_tokens=6, anchors=0), None, tiny, style="plain")
    assert set(report.produced) <= {"template", "continue"} and report.produced["continue"] == 3
    with pytest.raises(LoramemError, match="need a generator"):
        self_study(_doc(), SelfStudySpec(prompts=2, kinds="question+seed", windows=(48,)), None, tiny, style="plain")


def test_question_prompts_ask_about_the_windows_phrases_or_the_whole_document(tiny):
    examples, report = self_study(_doc(), SelfStudySpec(prompts=12, kinds="question", windows=(32,), answer_tokens=6,
                                                anchors=0),
                                  None, tiny, style="plain")
    assert report.produced == {"question": 12 - report.skipped_empty} and len(examples) == 12 - report.skipped_empty
    questions = [e.prompt.removeprefix("Question: ").removesuffix(" Answer:") for e in examples]
    about_phrases = [q for q in questions if q not in DOCUMENT_QUESTIONS]
    assert about_phrases and len(about_phrases) < len(questions)  # seed 0 draws both sorts in 12
    patterns = [re.compile(re.escape(t).replace(re.escape("{phrase}"), "(.+)") + "$") for t in QUESTIONS]
    phrases = [next(m.group(1) for p in patterns if (m := p.match(q))) for q in about_phrases]
    assert all(phrase in TEXT for phrase in phrases)  # every phrase asked about is the document's
    assert not any(e.anchor for e in examples)


def test_anchors_are_general_prompts_answered_without_the_document(tiny):
    spec = SelfStudySpec(prompts=2, kinds="question", windows=(32,), answer_tokens=6, anchors=3)
    examples, report = self_study(_doc(), spec, None, tiny, style="plain")
    anchors = [e for e in examples if e.anchor]
    assert report.produced["anchor"] == len(anchors) == 3 and len(examples) == 5 - report.skipped_empty
    questions = [e.prompt.removeprefix("Question: ").removesuffix(" Answer:") for e in anchors]
    assert set(questions) <= set(ANCHOR_QUESTIONS)
    closed_book = generate(tiny.model, tiny.tokenizer, [render_prompt(tiny.tokenizer, q) for q in questions],
                           max_new_tokens=6)
    assert [e.answer for e in anchors] == [" " + a.strip() for a in closed_book]  # the model's own, no document
    with pytest.raises(LoramemError, match="anchors must be between 0 and 48"):
        SelfStudySpec(anchors=49)


def test_passage_prompts_repeat_answered_questions_with_windows_before_them(tiny):
    spec = SelfStudySpec(prompts=5, kinds="question", windows=(32,), answer_tokens=6, anchors=1)
    closed, _ = self_study(_doc(), spec, None, tiny, style="plain")
    examples, report = self_study(_doc(), SelfStudySpec(prompts=5, kinds="question", windows=(32,), answer_tokens=6,
                                                        anchors=1, passage_prompts=3), None, tiny, style="plain")
    passages = [e for e in examples if e.context]
    assert report.produced["passage"] == len(passages) == 3
    assert [e for e in examples if not e.context] == closed  # the closed-book prompts are those without the setting
    questions = [e for e in closed if not e.anchor]
    assert [(e.prompt, e.answer) for e in passages] == [(e.prompt, e.answer) for e in questions[:3]]
    for e in passages:  # three windows of the document, one of them holding what the question asks about
        windows = e.context.split("\n\n")
        assert len(windows) == 3 and len(set(windows)) == 3 and all(w in TEXT for w in windows)
    with pytest.raises(LoramemError, match="passage prompts must be between 0 and the prompt count 5, got 6"):
        SelfStudySpec(prompts=5, passage_prompts=6)


@pytest.mark.parametrize("bad, match", [
    ({"prompts": 0}, "prompt count must be at least 1"),
    ({"prompts": -3}, "prompt count must be at least 1"),
    ({"kinds": "seed+poems"}, "unknown self-study kind 'poems'"),
    ({"seed_types": "gossip"}, "unknown seed type 'gossip'"),
    ({"windows": (8,)}, "at least 16 tokens"),
])
def test_bad_specs_are_one_line_errors(bad, match):
    with pytest.raises(LoramemError, match=match):
        SelfStudySpec(**bad)


def test_a_document_without_text_or_longer_than_the_teacher_window_is_refused(tiny):
    with pytest.raises(LoramemError, match="too short for self-study"):
        self_study(_doc("   \n "), SelfStudySpec(prompts=2, kinds="template"), None, tiny, style="plain")
    long = _doc("word " * (tiny.model.config.max_position_embeddings + 10))
    with pytest.raises(LoramemError, match="teacher context, more than the model's window"):
        self_study(long, SelfStudySpec(prompts=2, kinds="template"), None, tiny, style="plain")


def test_a_one_sentence_document_skips_what_it_cannot_make(tiny):
    examples, report = self_study(_doc("A single short sentence about nothing much at all."),
                                  SelfStudySpec(prompts=2, kinds="continue", anchors=0), None, tiny, style="plain")
    assert examples == [] and report.skipped_empty == 2  # no following text to continue with: counted, no crash
