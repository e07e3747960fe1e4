"""The training example: the one unit the write path makes and the ask path scores.

It sits apart from both (train/, synth/, corpus.py, bench/ and memory.py all import it) so that neither
path imports the other to name it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training fact: the prompt the question will be asked with, and the answer to store.

    With an empty prompt the answer is a plain text trained as given.
    """

    prompt: str
    answer: str


def data_hash(examples: list[Example]) -> str:
    """SHA-256 of the examples in order: part of a module's id, and recorded in its manifest row."""
    payload = json.dumps([[e.prompt, e.answer] for e in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
