"""Routing recall on PaperQA: does each of the 450 questions reach its own paper's module?

Keys are what a memory routes a document module by (Memory.keys): the introduction cut into the same
encoder-sized token windows, here without synthetic questions so that no generator is involved. Prints
recall@1/@3 per router (overall and per question level) and the time to build the index and route.

    python benchmarks/routing.py [--data-dir ../shared/data] [--json]
"""

from __future__ import annotations

import argparse
import time

from common import report

from loramem.bench import paperqa
from loramem.corpus import chunk_text
from loramem.memory import RAG_CHUNK_TOKENS, RAG_OVERLAP
from loramem.models import load_base
from loramem.route import make_router, recall_at_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    papers = paperqa.load(args.data_dir)
    tokenizer = load_base("tiny").tokenizer  # the bundled model's tokenizer, without loading its weights
    keys = {str(p.id): [c.text for c in chunk_text(p.introduction, tokenizer, RAG_CHUNK_TOKENS, RAG_OVERLAP)]
            for p in papers}
    questions = [q for p in papers for q in p.questions]
    gold = [str(q.paper) for q in questions]
    result = {"papers": len(papers), "questions": len(questions), "keys": sum(map(len, keys.values())), "routers": {}}
    for kind in ("dense", "bm25", "hybrid"):
        started = time.perf_counter()
        router = make_router(kind, keys)
        built = time.perf_counter()
        ranked = router.route([q.question for q in questions], 3)
        routed = time.perf_counter()
        row = {"recall@1": recall_at_k(ranked, gold, 1), "recall@3": recall_at_k(ranked, gold, 3),
               "build_s": built - started, "ms_per_question": 1000 * (routed - built) / len(questions)}
        for level in (1, 2, 3):
            picked = [i for i, q in enumerate(questions) if q.level == level]
            row[f"recall@1_l{level}"] = recall_at_k([ranked[i] for i in picked], [gold[i] for i in picked], 1)
        result["routers"][kind] = row

    def table() -> None:
        print(f"PaperQA routing: {result['questions']} questions, {result['papers']} papers, {result['keys']} keys")
        for kind, row in result["routers"].items():
            print(f"{kind:7s} R@1 {row['recall@1']:.3f}  R@3 {row['recall@3']:.3f}  "
                  f"R@1 by level {row['recall@1_l1']:.2f}/{row['recall@1_l2']:.2f}/{row['recall@1_l3']:.2f}  "
                  f"build {row['build_s']:.1f} s  {row['ms_per_question']:.1f} ms/question")

    report(result, args.json, table)


if __name__ == "__main__":
    main()
