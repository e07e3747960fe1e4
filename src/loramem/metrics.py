"""Scores for comparing a model's answer with a reference answer.

Exact match and token F1 follow the SQuAD evaluation script (v2 rules for empty answers), ROUGE-L
uses Google's `rouge-score` package and BLEU uses NLTK, so numbers compare with published ones.
The two heavy libraries (about a second each to import) are imported on first use, so importing
this module, and with it the CLI, stays fast.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from functools import cache

from loramem.errors import LoramemError

PHONE_RE = re.compile(r"\d{3}-\d{3}-\d{4}")

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# BLEU tokens: runs of word characters, or single punctuation marks (no NLTK data needed).
_BLEU_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def extract_phone(text: str) -> str | None:
    """The first phone number (ddd-ddd-dddd) in the text, or None."""
    match = PHONE_RE.search(text)
    return match.group(0) if match else None


def phone_exact_match(prediction: str, gold: str) -> bool:
    """Whether the first phone number in the prediction is the gold's phone number.

    Only the first number counts, so an answer that lists several candidates is not rewarded.
    """
    gold_phone = extract_phone(gold)
    return gold_phone is not None and extract_phone(prediction) == gold_phone


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    """Whether the answers are equal after SQuAD normalisation."""
    return normalize_answer(prediction) == normalize_answer(gold)


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall over normalised word multisets.

    As in SQuAD v2, when either side has no tokens the score is 1.0 if both are empty, else 0.0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    n_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_tokens)
    recall = n_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _references(references: str | list[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise LoramemError("a score needs at least one reference answer, got an empty list")
    return refs


@cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | list[str]) -> float:
    """ROUGE-L F-measure (Porter-stemmed), the best over the references.

    rouge-score keeps only ASCII letters and digits as token characters, so text with no such
    characters scores 0.0.
    """
    scorer = _rouge_l_scorer()
    return max(float(scorer.score(ref, prediction)["rougeL"].fmeasure) for ref in _references(references))


def _bleu_tokens(text: str) -> list[str]:
    return _BLEU_TOKEN_RE.findall(text.lower())


def bleu(prediction: str, references: str | list[str]) -> float:
    """Sentence BLEU with uniform 1- to 4-gram weights and NLTK's smoothing method 1.

    Smoothing keeps short answers from scoring exactly 0 when they lack a matching 4-gram; it also
    means an identical answer shorter than four tokens scores below 1.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    refs = [_bleu_tokens(ref) for ref in _references(references)]
    hypothesis = _bleu_tokens(prediction)
    if not hypothesis:
        return 0.0
    return float(
        sentence_bleu(
            refs,
            hypothesis,
            weights=(0.25, 0.25, 0.25, 0.25),
            smoothing_function=SmoothingFunction().method1,
        )
    )


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for no values (an empty evaluation scores nothing, it does not crash)."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0
