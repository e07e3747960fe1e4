"""What the generator is asked: sentences for small models, one JSON request for strong ones."""

from __future__ import annotations

from loramem.synth.prompts import json_qa_prompt, lines_qa_prompt, passages


def test_passages_group_short_sentences_only():
    text = "Short one. Short two.\nA much longer sentence that goes on and on about many things. End."
    assert passages(text, 30) == ["Short one. Short two.",
                                  "A much longer sentence that goes on and on about many things.", "End."]
    assert passages("", 30) == []


def test_lines_prompt_is_a_conversation_with_worked_examples():
    messages = lines_qa_prompt("The tower is 330 metres tall.", covered=["How tall is the tower?"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert all(m["content"].startswith("Q: ") for m in messages if m["role"] == "assistant")
    assert messages[-1]["content"].endswith("Sentence: The tower is 330 metres tall.")
    assert "Do not ask: How tall is the tower?" in messages[-1]["content"]


def test_json_prompt_lists_covered_questions():
    prompt = json_qa_prompt("Some text.", 5, covered=["Q1?", "Q2?"])
    assert "write 5 question-answer pairs" in prompt and "JSON" in prompt
    assert "- Q1?\n- Q2?" in prompt and prompt.endswith("Some text.")
