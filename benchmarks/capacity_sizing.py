"""Capacity-aware sizing: does a PhoneBook split at the measured capacity of one module stay recalled, and what
happens when each module is given more (x2, x4) than was measured to fit?

Sizes come from loramem.capacity (measured cells: a memory's modules or benchmark JSON), the same path as
`loramem write --shard-tokens auto`. Every module is asked through BM25 routing, as a user would.

    OMP_NUM_THREADS=1 python benchmarks/capacity_sizing.py --capacity runs/sectors.mem --size 4K --layers late \
        [--over 2] [--memory runs/sizing.mem] [--json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import report

from loramem.bench import phonebook as pb
from loramem.bench import sibling_memory
from loramem.capacity import cells_from, module_tokens, tokens_per_param, trainable_params
from loramem.config import LoraSpec, TrainSpec
from loramem.memory import Memory


def sized_row(memory: Memory, entries, tokens: int, lora: LoraSpec, label: str) -> dict:
    records = list(memory.write_shards(pb.examples(entries), tokens, lora, TrainSpec(), name=label, progress=False))
    score, seconds = pb.evaluate(memory, entries, router="bm25")
    return {"setting": label, "tokens_per_module": tokens, "modules": len(records), "exact_match": score,
            "worst_module_recall": min(r.recall for r in records),
            "train_seconds": sum(r.train_seconds for r in records), "seconds_per_question": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", required=True, help="a memory folder or benchmark JSON of measured modules")
    parser.add_argument("--size", default="4K")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="all")
    parser.add_argument("--layers", default="late")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--over", type=float, nargs="*", default=[2.0], help="also size modules at these multiples")
    parser.add_argument("--memory", default=None, help="keep the modules here (reruns reuse them)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lora = LoraSpec(rank=args.rank, targets=args.targets, layers=args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        memory = Memory.open(args.memory or Path(tmp) / "sized.mem", create=True)
        cells = cells_from(args.capacity)
        params = trainable_params(memory.base.model, lora)
        tokens = module_tokens(params, cells, lora, args.threshold)
        entries = pb.load(args.size, args.data_dir)
        rows = [sized_row(memory, entries, tokens, lora, "at measured capacity")]
        for factor in args.over:
            other = sibling_memory(memory, f"x{factor:g}")
            rows.append(sized_row(other, entries, int(tokens * factor), lora, f"{factor:g}x measured capacity"))
    result = {"size": args.size, "entries": len(entries), "rank": args.rank, "targets": args.targets,
              "layers": args.layers, "trainable_params": params, "threshold": args.threshold,
              "measured_tokens_per_param": tokens_per_param(cells, lora, args.threshold), "rows": rows}

    def table() -> None:
        print(f"PhoneBook {args.size} ({len(entries)} entries), rank {args.rank} {args.targets} {args.layers}: "
              f"{params} parameters per module, measured {result['measured_tokens_per_param']:.4f} tokens/parameter")
        print(f"{'setting':28} {'tokens/module':>13} {'modules':>7} {'exact':>7} {'worst recall':>12} {'train s':>8}")
        for r in rows:
            print(f"{r['setting']:28} {r['tokens_per_module']:>13} {r['modules']:>7} {r['exact_match']:>7.1%} "
                  f"{r['worst_module_recall']:>12.2f} {r['train_seconds']:>8.0f}")

    report(result, args.json, table)


if __name__ == "__main__":
    main()
