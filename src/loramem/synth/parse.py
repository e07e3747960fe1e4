"""Reading generator replies: QA pairs from JSON or "Q: ... A: ..." lines, plain texts, support checks.

Parsing is lenient on purpose: a 135M model rarely follows a format exactly, so any reply that holds
recognisable pairs is used and whatever is not a pair is ignored. Whether a pair is true to its source
is judged separately by `usable`, a cheap lexical check that needs no model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.DOTALL)
_OBJECT_RE = re.compile(r"\{[^{}]*\}")
# "Q:", "Q1:", "Question 2:", "1. Q:", "**Q:**" ... and the same for answers.
_QUESTION_RE = re.compile(r"^[\s*#>-]*(?:\d+[.)]\s*)?\**(?:Q|Question)\s*\d*\**\s*:\**\s*(.*)$", re.IGNORECASE)
_ANSWER_RE = re.compile(r"^[\s*#>-]*\**(?:A|Answer)\s*\d*\**\s*:\**\s*(.*)$", re.IGNORECASE)
_INLINE_ANSWER_RE = re.compile(r"\s\**(?:A|Answer)\s*\d*\**\s*:\**\s*", re.IGNORECASE)
# Where a runaway answer starts another item: "... B: ...", "... Q: ...", or a repeated "A:" label.
_ANSWER_END_RE = re.compile(r"(?:^|\s)\**(?:[B-DQ]|Question)\s*\d*\**\s*:.*$", re.IGNORECASE)
_ANSWER_LABEL_RE = re.compile(r"^(?:\**(?:A|Answer)\s*\d*\**\s*:\**\s*)+", re.IGNORECASE)
_LABEL_RE = re.compile(r"^\W*(?:summary|rewrite|rewritten text|rewritten|paraphrase)\s*:\s*", re.IGNORECASE)
# A question about "this sentence" means nothing when asked closed-book, without the text.
_CONTEXT_REF_RE = re.compile(r"\b(?:this|the|that)\s+(?:text|sentence|passage|paragraph|excerpt)\b", re.IGNORECASE)
_WORD_RE = re.compile(r"[a-z0-9]+")

_STOPWORD_LIST = """a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up us very was we were what
when where which while who whom why will with would you your yours yourself yourselves"""
STOPWORDS = frozenset(_STOPWORD_LIST.split())


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer}


def parse_pairs(reply: str) -> list[QAPair]:
    """The QA pairs in a reply: a JSON list of {"question", "answer"} objects, else Q:/A: lines."""
    return _json_pairs(reply) or _line_pairs(reply)


def _json_pairs(reply: str) -> list[QAPair]:
    """Pairs from the first JSON value in the reply (fenced or bare)."""
    fenced = _FENCE_RE.search(reply)
    candidate = fenced.group(1) if fenced else reply
    start = min((i for i in (candidate.find("["), candidate.find("{")) if i >= 0), default=-1)
    if start < 0:
        return []
    try:
        value, _ = json.JSONDecoder().raw_decode(candidate[start:])
    except json.JSONDecodeError:
        return _complete_objects(candidate[start:])
    if isinstance(value, dict):  # {"pairs": [...]} or a single pair
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if lists else [value]
    if not isinstance(value, list):
        return []
    return [pair for item in value if (pair := _pair_from_object(item))]


def _complete_objects(text: str) -> list[QAPair]:
    """The whole {...} pairs of a list that broke off (a reply cut at max_tokens)."""
    pairs = []
    for match in _OBJECT_RE.finditer(text):
        try:
            pairs.append(_pair_from_object(json.loads(match.group())))
        except json.JSONDecodeError:
            continue
    return [pair for pair in pairs if pair]


def _pair_from_object(item: object) -> QAPair | None:
    if not isinstance(item, dict):
        return None
    fields = {key.lower(): value for key, value in item.items() if isinstance(value, str)}
    question = fields.get("question", fields.get("q", "")).strip()
    answer = fields.get("answer", fields.get("a", "")).strip()
    return QAPair(question, answer) if question and answer else None


def _tidy_answer(answer: str) -> str:
    return _ANSWER_END_RE.sub("", _ANSWER_LABEL_RE.sub("", answer.strip())).strip()


def _line_pairs(reply: str) -> list[QAPair]:
    """Pairs from "Q: ... A: ..." on one line, or a "Q:" line followed by an "A:" line."""
    pairs: list[QAPair] = []
    question = ""
    for line in reply.splitlines():
        if match := _QUESTION_RE.match(line):
            question, answer = _split_inline(match.group(1))
        elif question and (match := _ANSWER_RE.match(line)):
            answer = match.group(1).strip()
        else:
            continue
        if question and (answer := _tidy_answer(answer)):
            pairs.append(QAPair(question, answer))
            question = ""
    return pairs


def _split_inline(line: str) -> tuple[str, str]:
    parts = _INLINE_ANSWER_RE.split(line, maxsplit=1)
    return parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")


def clean_text(reply: str) -> str:
    """A summary or rewrite without a leading "Summary:"-style label."""
    return _LABEL_RE.sub("", reply.strip(), count=1).strip()


def normalise_question(question: str) -> str:
    """Lower-cased words only, so "What is X?" and "what is x" count as the same question."""
    return " ".join(_WORD_RE.findall(question.lower()))


def content_words(text: str) -> set[str]:
    """Lower-cased words minus stopwords, a plural 's' dropped so "models" matches "model"."""
    words = _WORD_RE.findall(text.lower())
    # Single letters are left out too: list labels ("B:") and citation suffixes ("2024a, c") are not facts.
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words if len(w) > 1 and w not in STOPWORDS}


def support(pair: QAPair, source_words: set[str]) -> float:
    """Share of the answer's own content words (those not already in the question) found in the source.

    Words the answer repeats from the question are left out, so an answer that only echoes its question
    scores 0, as does one without content words. A number missing from the source also scores 0: a
    wrong number is a wrong fact however many other words match.
    """
    new_words = content_words(pair.answer) - content_words(pair.question)
    if not new_words or any(word.isdigit() and word not in source_words for word in new_words):
        return 0.0
    return len(new_words & source_words) / len(new_words)


def grounding(text: str, source_words: set[str]) -> float:
    """Share of the text's content words found in the source (1 for a text without content words)."""
    words = content_words(text)
    return len(words & source_words) / len(words) if words else 1.0


def usable(pair: QAPair, source_words: set[str], min_support: float) -> bool:
    """Worth training on: the answer is supported by the source, the question is about it (min_support of
    its content words are there too, which drops questions a small model made up), and the question can
    be asked without the text."""
    return (
        not _CONTEXT_REF_RE.search(pair.question)
        and grounding(pair.question, source_words) >= min_support
        and support(pair, source_words) >= min_support
    )
