"""Does a module keep its facts when merged with others? One module's facts read teacher-forced, alone and merged.

    python benchmarks/merge_interference.py --memory runs/sectors.mem [--facts 32] [--json]

Takes the first module of the memory and its first `--facts` training examples, and reads each answer
teacher-forced (greedy exact match, `train.score.teacher_forced`) with: the module alone; the module alone trimmed by
TIES at densities 1.0, 0.5 and 0.2; and the module merged with the next two modules by TIES (density 0.5 and 1.0),
the linear average and the plain sum (weights 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loramem.answer import modules_applied
from loramem.train.score import teacher_forced

from common import open_memory, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=Path, required=True)
    parser.add_argument("--facts", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    memory = open_memory(parser, args.memory, 3, "merging three of them")
    modules = memory.modules()
    facts = memory.examples(modules[0])[: args.facts]
    folders = [memory.store.module_dir(m.id) for m in modules[:3]]

    def exact(members, method, **params) -> float:
        with modules_applied(memory.base.model, members, method, **params) as model:
            scored = teacher_forced(model, memory.base.tokenizer, facts)
        return sum(s.exact for s in scored) / len(scored)

    result = {
        "alone": exact(folders[:1], "linear"),
        **{f"alone, ties density {d}": exact(folders[:1], "ties", density=d) for d in (1.0, 0.5, 0.2)},
        **{f"with 2 others, ties density {d}": exact(folders, "ties", density=d) for d in (0.5, 1.0)},
        "with 2 others, linear average": exact(folders, "linear"),
        "with 2 others, sum (weights 1)": exact(folders, "linear", weights=[1.0] * 3),
    }

    def table() -> None:
        print(f"{len(facts)} facts of module {modules[0].name}, exact match read teacher-forced")
        for setting, share in result.items():
            print(f"{setting:34s} {share:.3f}")

    report({"module": modules[0].name, "facts": len(facts), "exact_match": result}, args.json, table)


if __name__ == "__main__":
    main()
