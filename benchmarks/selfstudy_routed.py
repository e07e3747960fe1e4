"""Routed rows of `loramem bench self-study --merges` for modules it already wrote, printed one by one in the order
given: for a machine too busy to wait for the whole study (each composed row with RAG takes minutes per data set).

    OMP_NUM_THREADS=1 python benchmarks/selfstudy_routed.py --dataset paperqa --papers 0-4 --memory /tmp/ss-pq.mem \
        --rows "linear+rag,mix@0.25+rag,lora+rag,mix+rag"

MEMORY is the one given to `bench self-study --memory` (its self-study modules are in the sibling memory). A row is
`lora` (the dense router's top 1) or a merge or composition over the top 3, `@B` for a base row at weight B, `:T` for
a router temperature T (`mix@0.5:0.1`; else AskSpec's default), and `+rag` for the top 3 passages; every row asks all
questions as `bench self-study` does.
"""
import argparse
import json
import time

from loramem.bench import selfstudy as study
from loramem.memory import Memory

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", default="paperqa")
parser.add_argument("--papers", default="0-4")
parser.add_argument("--stories", type=int, default=5)
parser.add_argument("--memory", required=True)
parser.add_argument("--method", default="self-study")
parser.add_argument("--rows", required=True)
args = parser.parse_args()
items = study.load(args.papers if args.dataset == "paperqa" else args.stories, None, args.dataset)
target = Memory.open(f"{args.memory}-{args.method}")  # where bench self-study wrote that method's modules
questions = [q for it in items for q in it.questions]
references = [r for it in items for r in it.references]
k = study.routed_k(target)
started = time.perf_counter()
for row in args.rows.split(","):
    method, _, context = row.partition("+")
    method, _, temperature = method.partition(":")
    method, _, weight = method.partition("@")
    mode = ("lora" if method == "lora" else "multi") + (f"+{context}" if context else "")
    options = {} if method == "lora" else {"merge": method, "base_weight": float(weight or 0)}
    options |= {"router_temperature": float(temperature)} if temperature else {}
    score = study.routed_score(target, k, mode, options, questions, references, items[0].max_new_tokens)
    print(json.dumps({"row": row, "rouge_l": round(score, 4), "questions": len(questions)}),
          f"({time.perf_counter() - started:.0f} s)", flush=True)
