"""The prompt styles, the same for the write and the ask path."""

import pytest

from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.examples import Example
from loramem.prompts import fit_context, module_context, render_example, render_prompt


def test_plain_prompts_are_the_papers_format_after_their_context(tiny):
    assert render_prompt(tiny.tokenizer, "Who? ") == "Question: Who? Answer:"
    assert render_prompt(tiny.tokenizer, "Question: Who? Answer:", " Some context. \n") == \
        "Some context.\n\nQuestion: Who? Answer:"
    assert render_example(tiny.tokenizer, Example("Question: Who? Answer:", " Ann"), "plain") == \
        Example("Question: Who? Answer:", " Ann")  # stored and trained alike
    with pytest.raises(LoramemError, match="unknown prompt style 'fancy'; choose one of plain, chat"):
        render_prompt(tiny.tokenizer, "Who?", style="fancy")


def test_chat_prompt_is_the_user_turn_of_the_template(tiny):
    prompt = render_prompt(tiny.tokenizer, "Question: Who? Answer:", "Some context.", style="chat")
    assert "user\nSome context.\n\nQuestion: Who?<|im_end|>" in prompt and prompt.endswith("assistant\n")
    closed = render_example(tiny.tokenizer, Example("Question: Who? Answer:", " Ann"), "chat")
    assert closed.answer == "Ann" and "user\nWho?<|im_end|>" in closed.prompt
    assert render_example(tiny.tokenizer, Example("", "plain text"), "chat") == Example("", "plain text")


def test_a_modules_context_is_its_documents_else_its_facts():
    documents = [Document.from_text("First text."), Document.from_text("Second text.")]
    facts = [Example("Question: Who? Answer:", " Ann"), Example("", "The sky is green.")]
    assert module_context(documents, facts) == "First text.\n\nSecond text."
    assert module_context([], facts) == "Question: Who? Answer: Ann\nThe sky is green."


def test_a_context_too_long_for_the_window_is_cut_with_a_warning(tiny, caplog):
    context = "one two three four five six seven eight"
    n = len(tiny.tokenizer(context, add_special_tokens=False).input_ids)
    with caplog.at_level("WARNING", logger="loramem"):
        assert fit_context(tiny.tokenizer, context, n) == context
        assert not caplog.records
        cut = fit_context(tiny.tokenizer, context, 3)
    assert cut == tiny.tokenizer.decode(tiny.tokenizer(context, add_special_tokens=False).input_ids[:3])
    assert len(cut) < len(context) and context.startswith(cut.strip())
    assert [r.getMessage() for r in caplog.records] == [f"context of {n} tokens cut to the 3 that fit the model's window"]
