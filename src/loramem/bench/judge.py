"""An LLM judge: a 0-10 score of an answer against the reference (the paper's PaperQA rubric).

Any generator with `complete(prompts, max_tokens, temperature, seed)` can judge; in practice a strong model
behind an OpenAI-compatible endpoint (the bundled 135M model is no judge).
"""

from __future__ import annotations

import re

RUBRIC = """You are grading an answer to a question about a research paper against the reference answer.
Rate the answer from 0 to 10, judging three things together:
- factual alignment: does it state the same facts as the reference, with nothing contradicting it?
- completeness: does it cover every point of the reference?
- relevance: does it answer the question asked, without unrelated content?
0 means wrong or empty, 10 means as good as the reference.

Question: {question}
Reference answer: {reference}
Answer to grade: {answer}

Reply with the score only, a whole number from 0 to 10."""

_SCORE_RE = re.compile(r"\b(10|[0-9])(?:\s*/\s*10)?\b")


def parse_score(reply: str) -> float | None:
    """The first 0-10 integer in the reply, or None when there is none."""
    match = _SCORE_RE.search(reply)
    return float(match.group(1)) if match else None


class Judge:
    def __init__(self, generator, seed: int = 0):
        self.generator = generator
        self.seed = seed

    def score(self, questions: list[str], references: list[str], answers: list[str]) -> list[float | None]:
        """One score per answer; None where the judge's reply held no score (left out of the means)."""
        prompts = [RUBRIC.format(question=q, reference=r, answer=a or "(no answer)")
                   for q, r, a in zip(questions, references, answers)]
        replies = self.generator.complete(prompts, max_tokens=8, temperature=0.0, seed=self.seed)
        return [parse_score(reply) for reply in replies]
