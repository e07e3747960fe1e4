"""Seconds to exact recall for each training recipe on each kind of data: the old defaults, the new ones, the fastest.

    python benchmarks/defaults.py --cells pb:1K,pb:2K,cf:1K --recipes "old;new;fastest" [--seeds 0,1] [--json]

Every run is one `Memory.write` into a fresh memory (the write path users get: the data-driven placement, the
frozen-layer cache, every recall check), timed from the call to the commit. Cells: `pb:SIZE` (the paper's PhoneBook),
`cf:SIZE` (CounterFact edits), `qa:PAPERS` (PaperQA's introductions as synthetic QA, from the synth cache or the
bundled generator). Recipes: `old` (the defaults before issue 19), `new` (today's defaults: what `loramem write`
does with no recipe flags), `fastest` (the fastest PhoneBook 1K recipe measured, docs/BENCHMARKS.md), or TrainSpec /
`lora_*` keyword arguments ("lr=1e-2,lora_layers='last2'"). Recall is the teacher-forced exact-answer rate the write
measures (bf16 ties count as misses); PhoneBook also asks every number by greedy generation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from loramem.config import LoraSpec, TrainSpec
from loramem.memory import Memory
from loramem.precision import hardware, run_precision

from common import recipe_kwargs, report

RECIPES = {
    # Before issue 19: every layer, the whole-vocabulary softmax, a decay to zero over 16 epochs.
    "old": (LoraSpec(rank=4, layers="all"), TrainSpec(lr=5e-3, epochs=16, decay_epochs=None, lr_floor=0.0, candidates=0)),
    "new": (LoraSpec(), TrainSpec()),
    # The fastest PhoneBook 1K recipe of the speed issue.
    "fastest": (LoraSpec(rank=4, layers="last1"),
                TrainSpec(lr=1e-2, epochs=60, decay_epochs=30, lr_floor=0.1, candidates=32)),
}


def recipe(text: str) -> tuple[LoraSpec, TrainSpec]:
    if text in RECIPES:
        return RECIPES[text]
    lora_kw, kw = recipe_kwargs(text)
    return replace(LoraSpec(), **lora_kw), replace(TrainSpec(), **kw)


def cell_examples(cell: str, base) -> tuple[list, list]:
    """(examples to write, PhoneBook entries to ask or [])."""
    from loramem.bench import get, without_leaks

    kind, _, size = cell.partition(":")
    if kind in ("pb", "cf"):  # a facts benchmark, written as it is
        bench = get({"pb": "phonebook", "cf": "counterfact"}[kind])
        items = bench.load(size)
        return bench.to_write(items), items if kind == "pb" else []
    if kind == "qa":  # every selected paper's synthetic QA pairs, leaks of evaluation questions dropped
        from loramem.synth import HFGenerator, SynthSpec, synthesize

        bench, examples = get("paperqa"), []
        for paper in bench.load(size):
            made, _ = synthesize(paper.document(), SynthSpec(), HFGenerator(base), tokenizer=base.tokenizer)
            examples += without_leaks(made, bench.questions([paper]))[0]
        return examples, []
    raise SystemExit(f"error: unknown cell {cell!r}: pb:SIZE, cf:SIZE or qa:PAPERS")


def run(base, cell: str, name: str, seed: int) -> dict:
    from loramem.bench import phonebook as pb

    examples, entries = cell_examples(cell, base)
    lora, spec = recipe(name)
    spec = replace(spec, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        memory = Memory.open(Path(tmp) / "m", create=True, base=base)
        start = time.perf_counter()
        record = memory.write(examples, lora=lora, train_spec=spec, progress=False)
        wall = time.perf_counter() - start
        row = {"cell": cell, "recipe": name, "seed": seed, "facts": len(examples), "seconds": round(wall, 1),
               "recall": record.recall, "epochs": record.stats["epochs"], "layers": record.lora_spec["layers"],
               "params": record.trainable_params}
        if entries:
            row["exact_match"] = pb.evaluate(memory, entries, module=record.id)[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="pb:1K")
    parser.add_argument("--recipes", default="old;new;fastest", help="names or keyword lists, separated by ';'")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from loramem.models import load_base

    base = load_base()
    names = args.recipes.split(";")
    rows = []
    for cell in args.cells.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:  # interleaved: every recipe of a cell and seed runs back to back
                rows.append(run(base, cell, name, seed))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = [{"cell": c, "recipe": n, "median_seconds": statistics.median(r["seconds"] for r in group),
                "min_recall": min(r["recall"] for r in group), "runs": len(group)}
               for c in dict.fromkeys(r["cell"] for r in rows) for n in names
               if (group := [r for r in rows if r["cell"] == c and r["recipe"] == n])]
    result = {"rows": rows, "summary": summary, "precision": run_precision(), "hardware": hardware()}

    def table() -> None:
        for line in summary:
            print(f"{line['cell']:>8} {line['recipe']:>40}  {line['median_seconds']:7.1f} s  recall {line['min_recall']:.3f}"
                  f"  ({line['runs']} runs)")
        print(f"precision {result['precision']}, {hardware()}")

    report(result, args.json, table)


if __name__ == "__main__":
    main()
