"""Benchmarks as registered units (as lm-evaluation-harness tasks): each loads its data, says what to write and what
to ask, and scores a module; `loramem bench NAME`, `loramem exp` and the scripts in benchmarks/ find them here.

    bench = get("phonebook")
    items = bench.load("1K")
    record = memory.write(bench.to_write(items))
    bench.score(memory, items, record.id)["score"]
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loramem.errors import LoramemError
from loramem.metrics import normalize_answer
from loramem.examples import Example

KINDS = ("facts", "documents")
_MODULES = ("phonebook", "counterfact", "paperqa", "narrativeqa", "selfstudy")  # each registers its benchmarks when imported
_REGISTRY: dict[str, Benchmark] = {}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's interface.

    kind:      "facts" (to_write gives training examples, written as they are: a study cell can size and score
               them) or "documents" (to_write gives documents, written through synthetic data).
    load:      (selection, data_dir) -> items; selection is the benchmark's size or subset ("1K", "0-4", 5), None
               for all or the default.
    to_write:  items -> the examples or documents a module is written from.
    questions: items -> the questions asked (never trained on).
    score:     (memory, items, module) -> scores of that module (an id, or ids to merge) on the items; "score" is
               the headline figure.
    run:       the benchmark's whole study, as `loramem bench NAME` runs it (None: it has none;
               `loramem exp` studies it).
    bits_per_item: information in one item's answer, for bits per parameter (PhoneBook: a 10-digit number).
    in_studies: a `loramem exp --dataset` (a facts benchmark whose selection is a size, as the studies' cells take).
    """

    name: str
    kind: str
    load: Callable
    to_write: Callable
    questions: Callable
    score: Callable
    run: Callable | None = None
    bits_per_item: float | None = None
    in_studies: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"benchmark kind must be one of {KINDS}, got {self.kind!r}")


def register(benchmark: Benchmark) -> Benchmark:
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def registered() -> dict[str, Benchmark]:
    """Every benchmark by name, in registration order."""
    for name in _MODULES:
        importlib.import_module(f"loramem.bench.{name}")
    # In _MODULES' order, whichever module another import loaded first (a module's own benchmarks in its order).
    ordered = sorted(_REGISTRY.values(), key=lambda b: _MODULES.index(b.score.__module__.rsplit(".", 1)[-1]))
    return {b.name: b for b in ordered}


def studied() -> tuple[str, ...]:
    """The benchmarks a study's cells can measure (`loramem exp --dataset`)."""
    return tuple(n for n, b in registered().items() if b.in_studies)


def get(name: str, in_studies: bool = False) -> Benchmark:
    """The benchmark of this name (one a study can measure, with `in_studies`); a clear error otherwise."""
    known = {n: b for n, b in registered().items() if b.in_studies or not in_studies}
    if name not in known:
        raise LoramemError(f"unknown dataset {name!r}; choose {' or '.join(known)}")
    return known[name]


@contextmanager
def study_memory(path: Path | None, model: str | None = None, prompt: str | None = None, name: str = "memory"):
    """The memory a benchmark writes into: the one at `path` (kept, and reused by a rerun), else a temporary one."""
    from loramem.memory import Memory

    with tempfile.TemporaryDirectory() as tmp:
        yield Memory.open(path or Path(tmp) / name, model=model, create=True, prompt=prompt)


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
