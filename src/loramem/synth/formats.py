"""The kinds of synthetic data, and how each becomes training examples.

Every prompt an example is trained under is defined here, in one place: QA pairs are trained as the
question will be asked at answer time (`closed_book_prompt`); the other formats are keyed to their
document as in the paper, with a part number when a document spans several chunks.
"""

from __future__ import annotations

from loramem.prompts import closed_book_prompt
from loramem.errors import LoramemError
from loramem.synth.parse import QAPair
from loramem.examples import Example

FORMATS = ("original", "qa", "summary", "rewrite")

ORIGINAL_PROMPT = "[Doc ID: {doc}]\n"
SUMMARY_PROMPT = "Summary of document {doc}:\n"
REWRITE_PROMPT = "[Doc ID: {doc}] (rewritten)\n"


def parse_formats(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """"qa+summary" -> ("qa", "summary"); repeats are dropped, order kept."""
    names = spec.split("+") if isinstance(spec, str) else list(spec)
    names = [name.strip().lower() for name in names]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        problem = f"unknown format {unknown[0]!r}" if unknown else "no format given"
        raise LoramemError(f"{problem}: choose from {', '.join(FORMATS)}, several joined with '+'")
    return tuple(dict.fromkeys(names))


def doc_label(doc_id: str, part: int, parts: int) -> str:
    """The document's id, with a part number when it was cut into several chunks."""
    return doc_id if parts == 1 else f"{doc_id} part {part + 1}/{parts}"


def qa_examples(pairs: list[QAPair]) -> list[Example]:
    # The leading space: "Answer:" is followed by " <answer>" when the model answers.
    return [Example(closed_book_prompt(pair.question), " " + pair.answer) for pair in pairs]


def original_example(label: str, text: str) -> Example:
    return Example(ORIGINAL_PROMPT.format(doc=label), text)


def summary_example(label: str, summary: str) -> Example:
    return Example(SUMMARY_PROMPT.format(doc=label), summary)


def rewrite_example(label: str, rewrite: str) -> Example:
    return Example(REWRITE_PROMPT.format(doc=label), rewrite)
