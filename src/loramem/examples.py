"""The training example: the one unit the write path makes and the ask path scores, its hash, and its shards.

It sits apart from both (train/, synth/, corpus.py, bench/ and memory.py all import it) so that neither
path imports the other to name it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training fact: the prompt the question will be asked with, and the answer to store.

    With an empty prompt the answer is a plain text trained as given. An `anchor` is a prompt that is not about
    the module's documents: the distillation teacher reads it without them, so the module learns to leave such
    answers as the base model gives them (self-study's locality anchors). A `context` is a passage the module reads
    before the question, as `lora+rag` answers put retrieved passages there (self-study's passage prompts).
    """

    prompt: str
    answer: str
    anchor: bool = False
    context: str = ""


def data_hash(examples: list[Example]) -> str:
    """SHA-256 of the examples in order: part of a module's id, and recorded in its manifest row."""
    payload = json.dumps([[e.prompt, e.answer] + ([True] if e.anchor else []) + ([e.context] if e.context else [])
                          for e in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def even_shards(examples: list[Example], sizes: list[int], shard_tokens: int) -> list[list[Example]]:
    """Consecutive runs of the examples (of `sizes` tokens each) of at most `shard_tokens` tokens, as even as the
    examples allow: 5.2K tokens at 2.6K per shard are three of ~1.7K, not two full ones and a one-fact runt. An
    example longer than a shard gets one of its own."""
    even = sum(sizes) / max(1, math.ceil(sum(sizes) / shard_tokens))
    shards: list[list[Example]] = [[]]
    used = 0
    for e, size in zip(examples, sizes):
        if shards[-1] and (used + size > shard_tokens or used >= even):
            shards.append([])
            used = 0
        shards[-1].append(e)
        used += size
    return shards
