"""Reading generator replies: JSON, line formats and garbage; the support check; question normalisation."""

from __future__ import annotations

import pytest

from loramem.synth.parse import (
    QAPair,
    clean_text,
    content_words,
    grounding,
    normalise_question,
    parse_pairs,
    support,
    usable,
)

TEXT = "The Eiffel Tower in Paris was designed by Gustave Eiffel and completed in 1889."
WORDS = content_words(TEXT)


def test_json_list():
    reply = '[{"question": "Who designed it?", "answer": "Gustave Eiffel"}, {"question": "When?", "answer": "1889"}]'
    assert parse_pairs(reply) == [QAPair("Who designed it?", "Gustave Eiffel"), QAPair("When?", "1889")]


def test_json_fenced_with_chatter_and_wrapper_object():
    reply = 'Sure! Here they are:\n```json\n{"pairs": [{"Question": "Q1?", "Answer": "A1"}]}\n```\nEnjoy.'
    assert parse_pairs(reply) == [QAPair("Q1?", "A1")]


def test_json_items_without_both_fields_are_skipped():
    reply = '[{"question": "Q1?", "answer": "A1"}, {"question": "Q2?"}, "text", {"q": "Q3?", "a": "A3"}]'
    assert parse_pairs(reply) == [QAPair("Q1?", "A1"), QAPair("Q3?", "A3")]


def test_json_cut_off_at_max_tokens_keeps_the_whole_objects():
    reply = '```json\n[{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}, {"question": "Q3'
    assert parse_pairs(reply) == [QAPair("Q1?", "A1"), QAPair("Q2?", "A2")]


@pytest.mark.parametrize(
    "reply",
    [
        "Q: Who designed it? A: Gustave Eiffel",
        "Q: Who designed it?\nA: Gustave Eiffel",
        "1. Q: Who designed it? A: Gustave Eiffel",
        "**Q:** Who designed it? **A:** Gustave Eiffel",
        "Question 1: Who designed it?\nAnswer 1: Gustave Eiffel",
        "Q: Who designed it? A: A: Gustave Eiffel B: Paris C: 1889",
    ],
)
def test_line_formats(reply):
    assert parse_pairs(reply) == [QAPair("Who designed it?", "Gustave Eiffel")]


def test_brackets_in_a_line_reply_are_not_taken_for_json():
    assert parse_pairs("Q: Which work is cited? A: [1]") == [QAPair("Which work is cited?", "[1]")]


def test_several_lines_and_noise_between():
    reply = "Here are questions.\nQ: Where is it? A: Paris\n\nsome noise\nQ: When? \nA: 1889\nQ: dangling question?"
    assert parse_pairs(reply) == [QAPair("Where is it?", "Paris"), QAPair("When?", "1889")]


@pytest.mark.parametrize("reply", ["", "no pairs here", "[1, 2, 3]", '{"broken": ', "Q: only a question?"])
def test_garbage_gives_no_pairs(reply):
    assert parse_pairs(reply) == []


def test_support_counts_only_the_answers_own_words():
    assert support(QAPair("Who designed the Eiffel Tower?", "Gustave Eiffel"), WORDS) == 1.0
    assert support(QAPair("Who designed the Eiffel Tower?", "Gustave Eiffel of Paris, a painter"), WORDS) == pytest.approx(2 / 3)
    # Echoing the question, or saying nothing of substance, supports nothing.
    assert support(QAPair("Who designed the Eiffel Tower?", "the Eiffel Tower"), WORDS) == 0.0
    assert support(QAPair("Who designed it?", "it is what it is"), WORDS) == 0.0


def test_support_ignores_case_punctuation_and_plurals():
    assert support(QAPair("What was completed?", "TOWERS, in PARIS!"), WORDS) == 1.0


def test_a_number_missing_from_the_text_fails_support():
    assert support(QAPair("When was it completed?", "in 1890 in Paris"), WORDS) == 0.0


def test_usable_applies_the_threshold_and_rejects_context_questions():
    pair = QAPair("Who designed the tower?", "Gustave Eiffel, a painter")
    assert usable(pair, WORDS, 0.5)
    assert not usable(pair, WORDS, 0.9)
    assert not usable(QAPair("What does this sentence say?", "Gustave Eiffel"), WORDS, 0.5)
    # A supported answer to a question the text does not raise.
    assert not usable(QAPair("Which painter loved neural networks and image classification?", "Gustave Eiffel"),
                      WORDS, 0.5)


def test_grounding():
    assert grounding("Who designed the Eiffel Tower?", WORDS) == 1.0
    assert grounding("Who painted the Mona Lisa?", WORDS) == 0.0
    assert grounding("Who?", WORDS) == 1.0


def test_normalised_questions_compare_equal():
    assert normalise_question("What is X?") == normalise_question("  what IS x ") == "what is x"


def test_clean_text_drops_a_label():
    assert clean_text("  Summary: The tower is tall.\n") == "The tower is tall."
    assert clean_text("The tower is tall.") == "The tower is tall."
