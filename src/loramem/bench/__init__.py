"""Benchmarks: each loads its data, builds training examples and questions, and scores answers."""

from loramem.metrics import normalize_answer
from loramem.examples import Example


def without_leaks(examples: list[Example], questions: list[str]) -> tuple[list[Example], int]:
    """Drop training examples whose prompt contains an evaluation question (normalised text), and count them:
    a benchmark's questions must never be trained on, even when a generator happens to ask them itself."""
    held_out = [normalize_answer(q) for q in questions]
    kept = [e for e in examples if not any(h in normalize_answer(e.prompt) for h in held_out)]
    return kept, len(examples) - len(kept)


def sibling_memory(memory, suffix: str):
    """A memory beside `memory` on the same loaded base model (`<path>-<suffix>`), for a study's comparison module
    that must not be seen by the other memory's routing and retrieval."""
    return type(memory).open(memory.path.with_name(f"{memory.path.name}-{suffix}"), create=True, base=memory.base,
                             prompt=memory.prompt)


def seconds(answers) -> dict:
    """Wall seconds per question (median) and the seconds spent merging, over a setting's answers."""
    per = sorted(a.seconds for a in answers)
    return {"s_per_question": per[len(per) // 2], "merge_s": sum(a.timing.get("merge", 0.0) for a in answers)}
