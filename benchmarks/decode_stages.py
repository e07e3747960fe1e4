"""Where one `loramem ask` process's seconds go, stage by stage, as JSON (run by `decode.py --ask`).

    python benchmarks/decode_stages.py MEMORY QUESTION

The stages of `loramem ask` done one by one in the order it does them: the interpreter's start (from the
process's start time in /proc), importing torch, the rest of the CLI's imports, opening the memory, importing
transformers' model code, the tokenizer, the weights, packing bf16 weights (where the run is bf16), and the
answer (route and module, prefill, decode, the rest).
"""

from __future__ import annotations

import os
import time

STARTED = time.perf_counter()


def _since_process_start() -> float:
    """Seconds since this process started, from /proc (clock ticks: 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    import json
    import sys

    stages = {"python_start": _since_process_start() - (time.perf_counter() - STARTED)}
    mark = [time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name] = now - mark[0]
        mark[0] = now

    import torch

    stage("import_torch")
    import loramem.cli  # noqa: F401 - what `loramem ask` imports before it runs
    from loramem.memory import Memory

    stage("import_loramem_cli")
    memory = Memory.open(sys.argv[1], answer_only=True)
    memory._check_base(memory.store.base_fingerprint, memory.model_name)
    stage("open_memory")
    from loramem import llama
    from loramem.models import Base, _load_tokenizer, read_fingerprint, resolve
    from loramem.precision import preferred_device, weights_dtype

    folder = resolve(memory.model_name)
    tokenizer = _load_tokenizer(folder, fast_only=True)  # imports transformers' tokenizer code (not its models)
    stage("tokenizer")
    device = preferred_device()
    model = llama.load(folder, weights_dtype(device), device)
    memory._base = Base(memory.model_name, model, tokenizer, read_fingerprint(folder, model))
    stage("model_weights")
    from loramem.packed import packed_linears
    from loramem.precision import use_bf16

    if use_bf16("auto", model):
        with packed_linears(model):
            pass
    stage("pack_bf16_weights")
    answer = memory.ask(sys.argv[2])
    stage("answer")
    spent = answer.timing
    stages["answer_module"] = spent["route"] + spent["merge"]
    stages["answer_prefill"], stages["answer_decode"] = spent["prefill"], spent["decode"]
    stages["answer_other"] = stages.pop("answer") - sum(spent.values())
    stages["total"] = sum(stages.values())
    print(json.dumps(stages))


if __name__ == "__main__":
    main()
