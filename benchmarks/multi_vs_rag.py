"""Multi-module top-3 (TIES, merges included) against RAG top-3: seconds for the same questions, in one run.

    python benchmarks/multi_vs_rag.py --memory runs/sectors.mem [--questions 30] [--reps 3] [--json]

The memory is any loramem memory with several modules (for example the PhoneBook sectors of
`loramem bench sectors ... --memory runs/sectors.mem`, docs/RESULTS.md). Questions are taken in turn from
its modules' training examples. Each repetition opens the memory afresh, so nothing is cached between
runs: every module set is merged, every module's trimming thresholds computed, every index built (routing
and retrieval both use the dense encoder). The settings alternate within each repetition so that they see
the same machine load:
  rag            the base model reading the top-3 retrieved passages (the paper: 43.5 s for 30 questions);
  multi          the router's top-3 modules merged by TIES from their factors (ties_fused), no context
                 (the paper: 65.9 s);
  multi-dense    the same, merged the way answers were merged before ties_fused (dense deltas, merge.ties).
Questions are answered in batches of 16 per module set. Exact match counts an answer that contains the
example's answer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from loramem import answer
from loramem.memory import Memory

from common import open_memory, report


@contextmanager
def dense_ties():
    """Answers merge TIES from dense deltas (answer._fused_ties declines), as before ties_fused."""
    fused, answer._fused_ties = answer._fused_ties, lambda *args, **kw: None
    try:
        yield
    finally:
        answer._fused_ties = fused


def questions_of(memory: Memory, n: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs, taken round-robin from the modules' examples."""
    per_module = [memory.examples(m) for m in memory.modules()]
    picked = [ex for i in range(max(map(len, per_module))) for exs in per_module if i < len(exs) for ex in [exs[i]]]
    return [(ex.prompt, ex.answer) for ex in picked[:n]]


def run(path: Path, setting: str, pairs: list[tuple[str, str]]) -> dict:
    memory = Memory.open(path)
    memory.base  # noqa: B018 - load the model outside the timed part: both settings use the same one
    mode = "rag" if setting == "rag" else "multi"
    started = time.perf_counter()
    with dense_ties() if setting == "multi-dense" else nullcontext():
        answers = memory.ask_many([q for q, _ in pairs], mode=mode, top_k=3, merge="ties")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "exact_match": sum(gold.strip() in a.text for a, (_, gold) in zip(answers, pairs)) / len(pairs),
            "merge_s": sum(a.timing["merge"] for a in answers), "route_s": sum(a.timing["route"] for a in answers),
            "module_sets": len({tuple(a.modules) for a in answers}) if mode == "multi" else 0,
            "prompt_tokens": sum(a.prompt_tokens for a in answers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    memory = open_memory(parser, args.memory, 2, "multi-module answering")
    pairs = questions_of(memory, args.questions)
    settings = ("rag", "multi", "multi-dense")
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(args.reps):
        for setting in settings:
            runs[setting].append(run(args.memory, setting, pairs))
    result = {"memory": str(args.memory), "questions": len(pairs), "reps": args.reps, "settings": {}}
    for setting, rows in runs.items():
        result["settings"][setting] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    rag = result["settings"]["rag"]["seconds"]
    for setting in settings:
        result["settings"][setting]["over_rag"] = result["settings"][setting]["seconds"] / rag

    def table() -> None:
        print(f"{len(pairs)} questions from {args.memory}, medians of {args.reps}")
        for setting, row in result["settings"].items():
            print(f"{setting:12s} {row['seconds']:7.1f} s  ({row['over_rag']:.2f}x RAG)  merge {row['merge_s']:5.1f} s  "
                  f"sets {row['module_sets']:.0f}  exact {row['exact_match']:.2f}  prompt tokens {row['prompt_tokens']:.0f}")

    report(result, args.json, table)


if __name__ == "__main__":
    main()
