"""PhoneBook sectors: several modules composed in output space (mix, select) against weight merges and top-1.

    python benchmarks/compose.py --memory runs/compose.mem [--count 4] [--sector 2K] [--questions N] [--json]
    python benchmarks/compose.py --memory runs/compose.mem --latency 32 [--rounds 3]
    python benchmarks/compose.py --memory runs/compose-seed7.mem --seed 7   # sectors of other, generated entries
    python benchmarks/compose.py --memory runs/compose.mem --temperatures 1,0.1   # compositions at router temperatures

Writes (or, when already written, reuses) one rank-4 module per PhoneBook sector (the 128K file cut into `--count`
sectors of `--sector` tokens, the defaults' recipe; with `--seed`, sectors of PhoneBook entries generated from that
seed instead, names and numbers the paper's files do not hold) through Memory.write, then asks every sector's questions
through Memory.ask_many with: the router's top 1; its top 3 composed by `mix`, `select` and `select-token`, and merged by TIES
and by the linear average, for each router (dense, bm25, hybrid); and the gold module forced to the third of three
places (two other sectors first, all at score 1), composed and merged. Exact match of the phone number, seconds per
question, and for composed answers the share of answer tokens supplied by the gold module. `--latency N` instead
times N questions answered at batch 1 and at batch 16 (after a warm-up, median of `--rounds`): one module (the
oracle's), the dense top 3 composed by each combination, and RAG's top 3 passages with the base weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from loramem.bench import phonebook as pb
from loramem.config import LoraSpec
from loramem.memory import Memory
from loramem.mix import COMPOSITIONS
from loramem.precision import hardware, resolve

COMBINATIONS = ("mix", "select", "select-token", "ties", "linear")


def written(memory: Memory, parts) -> list[str]:
    """One module per sector, written with the defaults (committed ones are found again, not retrained)."""
    return [memory.write(pb.examples(part), lora=LoraSpec(rank=4), name=f"sector-{i}").id
            for i, part in enumerate(parts)]


def score(memory, asked, gold_ids, **ask) -> dict:
    started = time.perf_counter()
    answers = memory.ask_many([e.question for e in asked], **ask)
    wall = time.perf_counter() - started
    exact = [pb.phone_exact_match(a.text, e.phone) for a, e in zip(answers, asked)]
    row = {"exact_match": sum(exact) / len(asked), "seconds_per_question": wall / len(asked)}
    if answers[0].supplied_by:
        tokens = [(s == g) for a, g in zip(answers, gold_ids) for s in a.supplied_by]
        row["gold_supplied"] = sum(tokens) / max(1, len(tokens))
    return row


def latency(memory, asked, gold, combinations, rounds: int) -> list[dict]:
    settings = [("one module (oracle)", dict(mode="lora", router="oracle", gold=gold))]
    settings += [(f"top 3 {how} (dense)", dict(mode="multi", router="dense", top_k=3, merge=how)) for how in combinations]
    settings.append(("rag top 3 (dense), base weights", dict(mode="rag", router="dense", top_k=3)))
    rows = []
    for batch in (1, 16):
        for name, ask in settings:
            memory.ask_many([e.question for e in asked[:2]], batch_size=batch, **ask | (
                {"gold": gold[:2]} if "gold" in ask else {}))  # warm-up: indexes, factors, merges
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                memory.ask_many([e.question for e in asked], batch_size=batch, **ask)
                times.append((time.perf_counter() - started) / len(asked))
            rows.append({"setting": name, "batch": batch, "seconds_per_question": statistics.median(times)})
    one = {r["batch"]: r["seconds_per_question"] for r in rows if r["setting"].startswith("one module")}
    return [r | {"vs_one_module": r["seconds_per_question"] / one[r["batch"]]} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=Path, required=True)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--sector", default="2K")
    parser.add_argument("--questions", type=int, default=None, help="per sector (default: all)")
    parser.add_argument("--routers", default="dense,bm25,hybrid")
    parser.add_argument("--data-dir", default=os.environ.get("LORAMEM_DATA"))
    parser.add_argument("--combinations", default=",".join(COMBINATIONS))
    parser.add_argument("--latency", type=int, default=0, help="time this many questions instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="sectors of entries generated from this seed")
    parser.add_argument("--temperatures", default="", help="router temperatures, comma-separated: each composition "
                        "is asked at each (default: AskSpec's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    combinations = args.combinations.split(",")
    per_sector = round(pb.parse_size(args.sector) / 1000 * pb.ENTRIES_PER_K)
    source = pb.load("128K", args.data_dir) if args.seed is None else pb.generate(2 * args.count * per_sector, args.seed)
    parts = pb.sectors(source, args.sector, args.count)
    memory = Memory.open(args.memory, create=True)
    ids = written(memory, parts)
    per = args.questions or len(parts[0])
    asked = [e for part in parts for e in part[:per]]
    gold = [ids[i] for i, part in enumerate(parts) for _ in part[:per]]
    if args.latency:
        step = max(1, len(asked) // args.latency)  # spread over the sectors
        picked = list(range(0, len(asked), step))[: args.latency]
        rows = latency(memory, [asked[i] for i in picked], [gold[i] for i in picked],
                       [c for c in combinations if c in ("mix", "select", "select-token")], args.rounds)
        result = {"hardware": hardware(), "precision": resolve(), "questions": len(picked), "rows": rows}
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            for r in rows:
                print(f"{r['setting']:34s} batch {r['batch']:2d}  {r['seconds_per_question']:.4f} s/q  "
                      f"{r['vs_one_module']:.2f}x one module")
        return
    rows = [{"setting": "top 1", "router": "oracle", **score(memory, asked, gold, mode="lora", router="oracle",
                                                            gold=gold)}]
    temperatures = [float(t) for t in args.temperatures.split(",")] if args.temperatures else [None]
    for router in args.routers.split(","):
        rows.append({"setting": "top 1", "router": router, **score(memory, asked, gold, mode="lora", router=router)})
        for how in combinations:
            for t in temperatures if how in COMPOSITIONS else [None]:
                given = {} if t is None else {"router_temperature": t}
                rows.append({"setting": f"top 3 {how}" + ("" if t is None else f" T {t:g}"), "router": router,
                             **score(memory, asked, gold, mode="multi", router=router, top_k=3, merge=how, **given)})
    for how in combinations:  # gold third of three: per sector, the two next sectors' modules before it
        results = []
        for i, part in enumerate(parts):
            order = [ids[(i + 1) % len(ids)], ids[(i + 2) % len(ids)], ids[i]]
            results.append(score(memory, part[:per], [ids[i]] * per, mode="multi", module=order, merge=how))
        rows.append({"setting": f"gold third, {how}", "router": "forced",
                     **{k: sum(r[k] for r in results) / len(results) for k in results[0]}})
    result = {"hardware": hardware(), "precision": resolve(), "sectors": args.count, "sector_size": args.sector,
              "seed": args.seed,
              "questions": len(asked), "modules": ids, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.count} sectors of {args.sector}, {len(asked)} questions; {result['hardware']}, {result['precision']}")
    for r in rows:
        gold_share = f"  gold supplied {r['gold_supplied']:.1%}" if "gold_supplied" in r else ""
        print(f"{r['setting']:22s} {r['router']:7s} exact {r['exact_match']:6.1%}  {r['seconds_per_question']:.3f} s/q"
              f"{gold_share}")


if __name__ == "__main__":
    main()
