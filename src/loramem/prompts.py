"""Prompts: how a question (and its context) is put to the model, the same when training and when answering.

Both paths import this: the write path renders its examples in the memory's prompt style (render_example), the
ask path renders questions (render_prompt) with the context of icl and rag modes (module_context, fit_context).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from loramem.errors import LoramemError
from loramem.examples import Example

if TYPE_CHECKING:
    from loramem.corpus import Document

log = logging.getLogger("loramem")
# The paper's bare "Question: ... Answer:" (plain), or the user turn of the model's chat template (chat; instruct
# models answer it readily).
PROMPT_STYLES = ("plain", "chat")


def check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise LoramemError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")


def closed_book_prompt(question: str) -> str:
    """The format facts are trained in (the paper's "Question: ... Answer:")."""
    question = question.strip()
    if question.startswith("Question:"):
        question = question[len("Question:"):].strip()
    if question.endswith("Answer:"):
        question = question[: -len("Answer:")].strip()
    return f"Question: {question} Answer:"


def after_context(context: str, text: str) -> str:
    """`text` read after its context, as every prompt with context (and the distillation teacher) reads it."""
    return f"{context.strip()}\n\n{text}"


def icl_prompt(question: str, context: str) -> str:
    return after_context(context, closed_book_prompt(question))


def chat_prompt(tokenizer, question: str, context: str | None = None) -> str:
    """The question (after its context) as the user's turn of the model's chat template, ready for the answer.

    A BOS the template writes is left to the tokenizer, which adds its own: one BOS, as in plain prompts.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise LoramemError("the base model has no chat template; use the plain prompt style")
    question = closed_book_prompt(question).removesuffix(" Answer:")
    content = after_context(context, question) if context else question.removeprefix("Question: ")
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def render_prompt(tokenizer, question: str, context: str | None = None, style: str = "plain") -> str:
    """The prompt a question is trained and answered with, in one of PROMPT_STYLES."""
    if style == "chat":
        return chat_prompt(tokenizer, question, context)
    check_style(style)
    return icl_prompt(question, context) if context else closed_book_prompt(question)


def render_example(tokenizer, example: Example, style: str) -> Example:
    """A training example in the prompt style (stored examples keep the plain "Question: ... Answer:" form), its
    context (if any) put before the question as the answering prompts put retrieved passages."""
    if not example.prompt.startswith("Question:") or (style == "plain" and not example.context):
        return example  # plain texts (original, summary, rewrite) are trained as they are in every style
    return replace(example, prompt=render_prompt(tokenizer, example.prompt, example.context or None, style),
                   answer=example.answer if style == "plain" else example.answer.strip(), context="")


def documents_context(documents: list[Document]) -> str:
    """The documents as one context: what icl reads, and what the distillation teacher reads."""
    return "\n\n".join(d.text for d in documents)


def module_context(documents: list[Document], examples: list[Example]) -> str:
    """What icl puts in the prompt for a module: its documents, else its facts (one per line)."""
    if documents:
        return documents_context(documents)
    return "\n".join(e.prompt + e.answer for e in examples)


def fit_context(tokenizer, context: str, budget: int) -> str:
    """Keep the first `budget` tokens of the context, warning when some are cut."""
    ids = tokenizer(context, add_special_tokens=False).input_ids
    if len(ids) <= budget:
        return context
    log.warning("context of %d tokens cut to the %d that fit the model's window", len(ids), budget)
    return tokenizer.decode(ids[:budget])
