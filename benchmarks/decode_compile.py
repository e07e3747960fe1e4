"""Would torch.compile make batch-1 decoding faster? loramem.llama's own loop (packed bf16 weights) against the same
loop with its decoding step compiled by inductor (freezing on, so inductor packs the bf16 weights itself; dynamic
shapes for the growing cache; the prefill stays uncompiled): answer tokens/s, decode tokens/s, compile seconds and
whether the answers are the same.

    python benchmarks/decode_compile.py MEMORY [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor

from loramem import llama
from loramem.answer import Timing, generate
from loramem.precision import hardware

from common import open_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("memory")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    memory = open_memory(parser, args.memory, 1, "decode speed")
    prompts = [memory._prompt(e.prompt) for e in memory.examples(memory.modules()[0])][:4]
    model, tokenizer = memory.base.model, memory.base.tokenizer

    def run(pack: bool) -> tuple[float, float, list[str]]:
        timing, counts = Timing(), []
        texts = generate(model, tokenizer, prompts, 24, 1, timing=timing, counts=counts, precision="bf16",
                         pack=pack, own_loop=True)
        tokens, decoded = sum(n for _, n in counts), sum(max(0, n - 1) for _, n in counts)
        return tokens / (timing.prefill + timing.decode), decoded / timing.decode, texts

    run(True)
    own = [run(True) for _ in range(args.rounds)]
    plain = llama._forward
    inductor.freezing = True
    compiled = torch.compile(plain, dynamic=True)
    llama._forward = lambda m, ids, step, cache, plan, *rest: (
        compiled if ids.shape[1] == 1 and cache else plain)(m, ids, step, cache, plan, *rest)
    start = time.perf_counter()
    run(False)
    compile_s = time.perf_counter() - start
    fast = [run(False) for _ in range(args.rounds)]
    print(hardware(), "threads", torch.get_num_threads())
    for name, rows in (("own loop (packed)", own), ("own loop, compiled step", fast)):
        print(f"{name:24s} tok/s {statistics.median(r[0] for r in rows):5.1f}  decode tok/s "
              f"{statistics.median(r[1] for r in rows):5.1f}  same answers {all(r[2] == own[0][2] for r in rows)}")
    print(f"compile and first call: {compile_s:.0f} s")


if __name__ == "__main__":
    main()
