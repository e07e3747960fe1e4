"""What the generator is asked. Changing any wording here must bump PROMPT_VERSION (it is in cache keys).

A prompt is one user message, or a conversation (a list of {"role", "content"} messages) when a small
model needs worked examples as earlier turns: SmolLM2-135M repeats an example given inside the message
but follows one given as a previous exchange (tried on PaperQA introductions).
"""

from __future__ import annotations

import re

PROMPT_VERSION = 1

Prompt = str | list[dict[str, str]]

_JSON_QA = """Read the text and write {n} question-answer pairs about the facts it states.
Each question must make sense on its own, without the text: name the subject instead of saying "the text".
Each answer must be short and stated in the text.{covered}
Reply with only a JSON list of objects with the keys "question" and "answer".

Text:
{text}"""

# For small models: one sentence at a time, turned into one pair, with worked examples as earlier turns.
_LINES_QA = "{instruction}\n\nSentence: {text}"
_LINES_INSTRUCTION = "Turn the sentence into a question and its answer. Copy the answer from the sentence. Write Q: ... A: ..."
_LINES_EXAMPLES = (
    ("Marie Curie won the Nobel Prize in Physics in 1903 together with Pierre Curie.",
     "Q: When did Marie Curie win the Nobel Prize in Physics? A: 1903"),
    ("Transformers (Vaswani et al., 2017) use self-attention to model long-range dependencies in text.",
     "Q: What do Transformers use to model long-range dependencies in text? A: self-attention"),
)

_SUMMARY = """Summarize the text in a few sentences. Keep the names, numbers and key facts. Reply with the summary only.

Text:
{text}"""

_REWRITE = """Rewrite the text in other words, keeping every fact, name and number. Reply with the rewritten text only.

Text:
{text}"""

_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"(\[])")


def json_qa_prompt(text: str, n: int, covered: list[str]) -> Prompt:
    """Ask for n QA pairs about text as JSON, naming the questions already covered so that new ones come back."""
    listed = "".join(f"\n- {question}" for question in covered)
    note = f"\nThese questions are already covered, ask different ones:{listed}" if covered else ""
    return _JSON_QA.format(n=n, text=text.strip(), covered=note)


def lines_qa_prompt(sentence: str, covered: list[str]) -> Prompt:
    """Ask a small model for one "Q: ... A: ..." pair about one sentence, the worked examples as earlier turns."""
    messages = []
    for example_text, example_reply in _LINES_EXAMPLES:
        messages.append({"role": "user", "content": _LINES_QA.format(instruction=_LINES_INSTRUCTION, text=example_text)})
        messages.append({"role": "assistant", "content": example_reply})
    instruction = _LINES_INSTRUCTION + (f" Do not ask: {' / '.join(covered)}" if covered else "")
    messages.append({"role": "user", "content": _LINES_QA.format(instruction=instruction, text=" ".join(sentence.split()))})
    return messages


def summary_prompt(text: str) -> str:
    return _SUMMARY.format(text=text.strip())


def rewrite_prompt(text: str) -> str:
    return _REWRITE.format(text=text.strip())


def passages(text: str, max_chars: int) -> list[str]:
    """Consecutive sentences grouped up to max_chars (a longer sentence stands alone)."""
    groups: list[str] = []
    for sentence in _SENTENCE_END_RE.split(" ".join(text.split())):
        if groups and len(groups[-1]) + 1 + len(sentence) <= max_chars:
            groups[-1] += " " + sentence
        else:
            groups.append(sentence)
    return [group for group in groups if group.strip()]
