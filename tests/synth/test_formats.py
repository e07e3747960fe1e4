"""Format names and how generated data becomes training examples."""

from __future__ import annotations

import pytest

from loramem.prompts import closed_book_prompt
from loramem.errors import LoramemError
from loramem.synth.formats import (
    FORMATS,
    doc_label,
    original_example,
    parse_formats,
    qa_examples,
    rewrite_example,
    summary_example,
)
from loramem.synth.parse import QAPair


def test_parse_formats():
    assert parse_formats("qa+summary") == ("qa", "summary")
    assert parse_formats("original+summary+rewrite+qa") == ("original", "summary", "rewrite", "qa")
    assert parse_formats(" QA + qa ") == ("qa",)
    assert parse_formats(("rewrite", "qa")) == ("rewrite", "qa")


@pytest.mark.parametrize("spec", ["qa+poems", "", "qa+", "facts"])
def test_bad_formats_name_the_valid_ones(spec):
    with pytest.raises(LoramemError) as err:
        parse_formats(spec)
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in FORMATS)


def test_qa_examples_are_asked_as_at_answer_time():
    (example,) = qa_examples([QAPair("Who designed the tower?", "Gustave Eiffel")])
    assert example.prompt == closed_book_prompt("Who designed the tower?") == "Question: Who designed the tower? Answer:"
    assert example.answer == " Gustave Eiffel"


def test_document_keyed_examples():
    assert original_example("abc", "Text.").prompt == "[Doc ID: abc]\n"
    assert original_example("abc", "Text.").answer == "Text."
    assert summary_example("abc", "Short.").prompt == "Summary of document abc:\n"
    assert rewrite_example("abc", "Again.").prompt == "[Doc ID: abc] (rewritten)\n"


def test_doc_label_numbers_parts_only_when_there_are_several():
    assert doc_label("abc", 0, 1) == "abc"
    assert doc_label("abc", 1, 3) == "abc part 2/3"
