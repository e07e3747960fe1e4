"""Wall time of writing several small modules in this process against Ray tasks, in one run.

    OMP_NUM_THREADS=1 python benchmarks/ray_write.py [--model smollm2-135m] [--cpus 2] [--reps 3] [--json]

The modules: a PhoneBook (generated, or the paper's from $LORAMEM_DATA) cut into sectors of `--sector-tokens`
tokens (1K and 176 tokens: 8 sectors of 6 entries), one rank-4 module each on the late layers, a fixed
number of epochs (no early stop, so both sides do the same work). Each repetition writes a fresh memory in
process and then with Ray (a local Ray of `--cpus` CPUs, one task per module); medians over `--reps`. The
first Ray write also starts the workers, each loading the model once: it is reported apart ("cold").
The in-process write uses torch's threads (OMP_NUM_THREADS); each Ray task runs on one CPU and one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import report

from loramem import LoraSpec, Memory, TrainSpec
from loramem.bench import phonebook as pb
from loramem.executor import RayExecutor
from loramem.models import load_base


def timed_write(base, examples, sector_tokens, lora, spec, executor=None) -> tuple[float, float, int]:
    """Wall seconds to write every sector into a fresh memory, the modules' training seconds summed, and how many
    modules that made. Training seconds over wall seconds is how many modules trained at once, on average."""
    with tempfile.TemporaryDirectory() as tmp:
        memory = Memory.open(Path(tmp) / "bench.mem", create=True, base=base)
        start = time.perf_counter()
        records = list(memory.write_shards(examples, sector_tokens, lora, spec, progress=False, executor=executor))
        return time.perf_counter() - start, sum(r.train_seconds for r in records), len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--size", default="1K", help="PhoneBook size")
    parser.add_argument("--sector-tokens", type=int, default=176)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import ray

    base = load_base(args.model)
    examples = pb.examples(pb.load(args.size))
    lora = LoraSpec(rank=4, layers="late")
    spec = TrainSpec(epochs=args.epochs, target_recall=None)
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    executor = RayExecutor()
    in_process, with_ray, concurrency, modules = [], [], [], set()
    for _ in range(args.reps):
        seconds, _, n = timed_write(base, examples, args.sector_tokens, lora, spec)
        in_process.append(seconds)
        modules.add(n)
        seconds, training, n = timed_write(base, examples, args.sector_tokens, lora, spec, executor)
        with_ray.append(seconds)
        concurrency.append(training / seconds)
        modules.add(n)
    ray.shutdown()
    warm = with_ray[1:] or with_ray
    result = {
        "model": args.model, "modules": sorted(modules), "examples": len(examples), "epochs": args.epochs,
        "torch_threads_in_process": torch.get_num_threads(), "ray_cpus": args.cpus, "reps": args.reps,
        "ray_init_s": ray_start, "in_process_s": statistics.median(in_process),
        "ray_cold_s": with_ray[0], "ray_warm_s": statistics.median(warm),
        "speedup_warm": statistics.median(in_process) / statistics.median(warm),
        "ray_modules_training_at_once": statistics.median(concurrency[1:] or concurrency),
        "load_average_1min": os.getloadavg()[0],
        "in_process_all_s": in_process, "ray_all_s": with_ray,
    }

    def table() -> None:
        print(f"{args.model}: {result['modules']} modules from {len(examples)} PhoneBook entries, {args.epochs} epochs, "
              f"rank 4 on the late layers; medians of {args.reps}")
        print(f"{'write':<40}{'seconds':>9}")
        for label, value in [("in process", result["in_process_s"]),
                             (f"ray, {args.cpus} CPUs, first (starts workers)", result["ray_cold_s"]),
                             (f"ray, {args.cpus} CPUs, warm", result["ray_warm_s"]),
                             ("ray.init", ray_start)]:
            print(f"{label:<40}{value:>9.1f}")
        print(f"speed-up (warm): {result['speedup_warm']:.2f}x; Ray trained {result['ray_modules_training_at_once']:.1f} "
              f"modules at once on average; load average {result['load_average_1min']:.1f} on {os.cpu_count()} CPUs")

    report(result, args.json, table)


if __name__ == "__main__":
    main()
