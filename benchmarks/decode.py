"""Greedy decoding speed of `answer.generate`: today's path, packed bf16 weights, and loramem's own decoding loop.

    python benchmarks/decode.py MEMORY [--rounds 5] [--threads N] [--static] [--fp32] [--json]
    python benchmarks/decode.py MEMORY --ask [--baseline-src DIR] [--rounds 5] [--json]

MEMORY holds at least one module (e.g. a PhoneBook memory: `loramem write pb.mem --phonebook 1K`); its first
module's own questions are asked. Interleaved rounds (rotating order) of: batch 1 (4 questions one by one) and batch
16 (16 questions at once); with the base weights, the module (its factors beside the weights, prepared once) and a
cached merge (the module TIES-merged with itself: merged weights swapped in, the merge computed once); in bf16
autocast through transformers' generate as before this work (`pack=False, own_loop=False`: every weight cast again
in each call), with packed bf16 weights (`pack=True`), and with packed weights and loramem.llama's own loop (the
default), optionally with transformers' static cache (--static) and in fp32 (--fp32). Answer tokens per second: answer
tokens (up to EOS) over the call's seconds (prefill + decode), and over the decode seconds alone; medians, ratios
to today, and whether every answer is the same as today's. The bound: bytes of weights read per decoding step
(every linear weight once, bf16 or fp32) over the memory bandwidth measured in the same rounds (the sum of a
1 GiB fp32 tensor), times the batch.

--ask times `loramem ask MEMORY QUESTION` end to end (process start, imports, model load, answer) as separate
processes, interleaved with the same command run on the source tree in --baseline-src (e.g. main's src, from
`git archive main src | tar -x -C /tmp/base`), and a breakdown of one process's seconds by stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from loramem.answer import Caches, Timing, generate, modules_applied
from loramem.precision import ENV, hardware

from common import open_memory, rotations

BATCHES = {1: 4, 16: 16}  # batch size -> questions asked per measurement
STAGES = Path(__file__).with_name("decode_stages.py")


def bandwidth_gbs(tensor: torch.Tensor) -> float:
    """Read bandwidth: bytes of a tensor too large for any cache over the seconds one sum of it takes."""
    start = time.perf_counter()
    tensor.sum()
    return tensor.numel() * tensor.element_size() / (time.perf_counter() - start) / 1e9


def linear_params(model: torch.nn.Module) -> int:
    """Parameters read once per decoding step by the linear layers (the tied lm_head counted: it is read)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@contextmanager
def static_cache(model):
    """transformers' static cache for every generate call in the block (the library's option, for comparison)."""
    plain = model.generate
    model.generate = lambda *a, **kw: plain(*a, cache_implementation="static", **kw)
    try:
        yield
    finally:
        del model.generate


def measure(model, tokenizer, prompts, batch, precision, pack, static=False, own_loop=False) -> dict:
    timing, counts = Timing(), []
    with static_cache(model) if static else nullcontext():
        texts = generate(model, tokenizer, prompts, 24, batch, timing=timing, counts=counts, precision=precision,
                         pack=pack, own_loop=own_loop)
    tokens = sum(written for _, written in counts)
    decoded = sum(max(0, written - 1) for _, written in counts)  # the first token comes from the prefill
    return {"texts": texts, "tok_s": tokens / (timing.prefill + timing.decode),
            "decode_tok_s": decoded / timing.decode if timing.decode else float("nan")}


def decode_speed(args, parser) -> dict:
    memory = open_memory(parser, args.memory, 1, "decode speed")
    module = memory.modules()[0]
    questions = [e.prompt for e in memory.examples(module)][:max(BATCHES.values())]
    prompts = [memory._prompt(q) for q in questions]
    base = memory.base
    model, tokenizer = base.model, base.tokenizer
    folder = memory.store.module_dir(module.id)
    caches = Caches()
    weights = {"base": lambda: nullcontext(),
               "module": lambda: modules_applied(model, [folder], "linear", caches=caches),
               "merge": lambda: modules_applied(model, [folder, folder], "ties", caches=caches)}
    # (precision, packed weights, static cache, loramem.llama's own loop)
    paths = {"today": ("bf16", False, False, False), "packed": ("bf16", True, False, False),
             "own loop": ("bf16", True, False, True)}
    if args.fp32:
        paths["fp32"] = ("fp32", False, False, False)
        paths["fp32 own loop"] = ("fp32", False, False, True)
    if args.static:
        paths["static"] = ("bf16", False, True, False)
        paths["packed+static"] = ("bf16", True, True, False)
    cells = [(w, b, p) for w in weights for b in BATCHES for p in paths]
    big = torch.ones(256 * 1024 * 1024)  # 1 GiB
    runs: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    bandwidth = []

    def run(cell) -> dict:
        w, b, p = cell
        with weights[w]():
            return measure(model, tokenizer, prompts[:BATCHES[b]], b, *paths[p])

    for w, b, p in cells:  # warm-up: factors prepared, merges computed, packed weights made, oneDNN kernels created
        with weights[w]():
            measure(model, tokenizer, prompts[:b], b, *paths[p])
    for order in rotations([str(i) for i in range(len(cells))], args.rounds):
        bandwidth.append(bandwidth_gbs(big))
        for i in order:
            runs[cells[int(i)]].append(run(cells[int(i)]))
    gbs = statistics.median(bandwidth)
    params = linear_params(model)
    rows = []
    for w, b, p in cells:
        measured, today = runs[(w, b, p)], runs[(w, b, "today")]
        tok_s = statistics.median(r["tok_s"] for r in measured)
        decode = statistics.median(r["decode_tok_s"] for r in measured)
        bytes_per_step = params * (4 if paths[p][0] == "fp32" else 2)
        rows.append({"weights": w, "batch": b, "path": p, "tok_s": tok_s, "decode_tok_s": decode,
                     "over_today": tok_s / statistics.median(r["tok_s"] for r in today),
                     "decode_over_today": decode / statistics.median(r["decode_tok_s"] for r in today),
                     "bound_tok_s": b * gbs * 1e9 / bytes_per_step,
                     "same_answers": all(r["texts"] == today[0]["texts"] for r in measured)})
    return {"hardware": hardware(base.device), "threads": torch.get_num_threads(), "rounds": args.rounds,
            "memory_bandwidth_gbs": gbs, "linear_params": params, "module": module.id, "rows": rows}


def ask_wall(args, parser) -> dict:
    """`loramem ask` end to end, today's source against this one, interleaved; then one process's stages."""
    memory = open_memory(parser, args.memory, 1, "ask")
    question = memory.examples(memory.modules()[0])[0].prompt
    mine = str(Path(__file__).resolve().parents[1] / "src")
    sources = {"this": mine, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    command = [sys.executable, "-m", "loramem.cli", "ask", str(args.memory), question]

    def once(src: str) -> tuple[float, str]:
        env = {**os.environ, "PYTHONPATH": src}
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return time.perf_counter() - start, done.stdout.strip()

    walls: dict[str, list[float]] = {name: [] for name in sources}
    answers: dict[str, set] = {name: set() for name in sources}
    for order in rotations(list(sources), args.rounds):
        for name in order:
            seconds, answer = once(sources[name])
            walls[name].append(seconds)
            answers[name].add(answer)
    stages = subprocess.run([sys.executable, str(STAGES), str(args.memory), question],
                            env={**os.environ, "PYTHONPATH": mine}, capture_output=True, text=True, check=True)
    return {"hardware": hardware(), "command": " ".join(command[1:]), "rounds": args.rounds,
            "wall_s": {name: statistics.median(w) for name, w in walls.items()},
            "wall_runs_s": walls, "answers": {name: sorted(a) for name, a in answers.items()},
            "stages_s": json.loads(stages.stdout)}


def print_table(result: dict) -> None:
    if "rows" not in result:
        for name, seconds in result["wall_s"].items():
            print(f"{name:9s} {seconds:5.2f} s median wall  answers {result['answers'][name]}")
        print("stages (one process, seconds):", ", ".join(f"{k} {v:.2f}" for k, v in result["stages_s"].items()))
        return
    print(f"{result['hardware']}  threads {result['threads']}  memory bandwidth {result['memory_bandwidth_gbs']:.1f} "
          f"GB/s  linear params {result['linear_params'] / 1e6:.1f}M")
    print(f"{'weights':7s} {'batch':>5s} {'path':13s} {'tok/s':>7s} {'x today':>7s} {'decode':>7s} {'x today':>7s} "
          f"{'bound':>7s}  same answers")
    for r in result["rows"]:
        print(f"{r['weights']:7s} {r['batch']:5d} {r['path']:13s} {r['tok_s']:7.1f} {r['over_today']:7.2f} "
              f"{r['decode_tok_s']:7.1f} {r['decode_over_today']:7.2f} {r['bound_tok_s']:7.0f}  {r['same_answers']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("memory", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--static", action="store_true", help="also transformers' static cache")
    parser.add_argument("--fp32", action="store_true", help="also fp32 (today's path: nothing is packed in fp32)")
    parser.add_argument("--ask", action="store_true", help="time `loramem ask` end to end instead")
    parser.add_argument("--baseline-src", default=None, help="--ask: the src folder of the code to compare with")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    os.environ.pop(ENV, None)  # each path sets its own precision
    result = ask_wall(args, parser) if args.ask else decode_speed(args, parser)
    print(json.dumps(result, indent=1)) if args.json else print_table(result)


if __name__ == "__main__":
    main()
