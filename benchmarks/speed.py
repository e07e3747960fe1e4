"""Training and answering speed of loramem against the usual PEFT recipe, in one run.

    python benchmarks/speed.py [--model smollm2-135m] [--reps 5] [--json]

Training: the same PhoneBook examples and module, the two step functions alternating over `--reps`
repetitions (medians), so both see the same machine load. Baseline = plain PEFT + transformers in fp32: a padded batch, the causal-LM
loss with full-vocabulary logits at every position (labels -100 outside the answer). Fast = loramem's
path (packing with a shared prefix, supervised-only logits, precision "auto"). Supervised tokens per
second is the figure of merit (both supervise the same tokens). FLOP/s counts 2*N per token forward
and 2*N backward (activation gradients) over the non-embedding weights, plus the vocabulary projection
where it is computed, and is quoted against large fp32 and bf16 matmuls measured in the same run.

Answering: seconds per closed-book question (batch 1, greedy, 16 new tokens) for the base model, a
module as `loramem ask` applies it (its factors beside the weights), merged into the weights, from a cache
of merged weights, and through PEFT unmerged.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from loramem.prompts import closed_book_prompt
from loramem.bench import phonebook as pb
from loramem.config import LoraSpec, TrainSpec
from loramem.models import load_base
from loramem.precision import autocast, use_bf16
from loramem.train.adapters import attached
from loramem.train.forward import cache_frozen_layers, first_trainable_layer
from loramem.train.loop import _loss, candidate_vocab
from loramem.train.pack import encode, pack

from common import report, rotations

NEXT_TOKEN = TrainSpec()  # the fast step's loss: train's next-token objective


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def baseline_step(model, tokenizer, encoded, optimizer) -> int:
    """The usual recipe: right-padded batch, model(..., labels=...) computes every position's logits."""
    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(encoded):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        labels[i, e.n_prompt : len(e.ids)] = torch.tensor(e.ids[e.n_prompt :])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return int((labels != -100).sum())


def fast_step(model, tokenizer, encoded, optimizer, bf16: bool, vocab: torch.Tensor | None = None) -> int:
    """loramem's step (train's own loss); with `vocab`, the softmax runs over those candidate tokens only."""
    batch = pack(encoded, "answer", pad_id=tokenizer.pad_token_id)
    with autocast(bf16, torch.device("cpu")):
        loss, _ = _loss(model, batch, encoded, NEXT_TOKEN, vocab)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return len(batch.labels)


def time_interleaved(steps: dict, starts, reps: int) -> tuple[dict, dict]:
    """Median seconds per pass over all batches for each step function, repetitions interleaved so
    that both see the same machine load."""
    for step in steps.values():  # warm-up
        step(starts[0])
    per_rep = {name: [] for name in steps}
    supervised = {}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            supervised[name] = sum(step(i) for i in starts)
            per_rep[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in per_rep.items()}, supervised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="all")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--candidates", type=int, default=0,
                        help="also time the fast step with a candidate softmax of this top k (TrainSpec.candidates)")
    parser.add_argument("--parts", default="train,answer,merge", help="comma-separated: train, answer, merge")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    base = load_base(args.model)
    bf16 = use_bf16("auto", base.model)
    spec = LoraSpec(rank=args.rank, targets=args.targets, layers=args.layers)
    result = {"model": args.model, "rank": args.rank, "targets": args.targets, "layers": args.layers,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32"}

    parts = set(args.parts.split(","))
    if "train" in parts:
        train_throughput(args, base, spec, bf16, result)
    if "answer" in parts:
        result["answer"] = answer_latency(base, args.rank, args.reps)
    if "merge" in parts:
        result["merge_3_modules"] = merge_latency(base, args.rank, args.reps)

    def table() -> None:
        for key, value in result.items():
            print(f"{key:32s} {json.dumps(value) if isinstance(value, dict) else value}")

    report(result, args.json, table)


def train_throughput(args, base, spec: LoraSpec, bf16: bool, result: dict) -> None:
    """Baseline and fast training steps, alternating, on one module; fills `result`."""
    tok = base.tokenizer
    entries = pb.generate(args.batch_size * args.batches, seed=0)
    encoded = encode(tok, pb.examples(entries))
    batches = [encoded[i : i + args.batch_size] for i in range(0, len(encoded), args.batch_size)]
    cfg = base.model.config
    embed = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for p in base.model.parameters()) - embed * (1 if cfg.tie_word_embeddings else 2)
    with attached(base.model, spec) as model:
        model.train()
        frozen = first_trainable_layer(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        plain_encoded = [copy.copy(e) for e in encoded]  # the baseline never sees cached hidden states
        if frozen > 0:  # one forward over the frozen layers, reused every epoch
            start = time.perf_counter()
            cache_frozen_layers(model, encoded, frozen, bf16)
            result["frozen_layer_cache_seconds"] = time.perf_counter() - start
        steps = {
            "baseline": lambda i: baseline_step(model, tok, plain_encoded[i : i + args.batch_size], optimizer),
            "fast": lambda i: fast_step(model, tok, encoded[i : i + args.batch_size], optimizer, bf16),
        }
        if args.candidates:
            vocab = candidate_vocab(model, tok, encoded, args.candidates)
            result["softmax_tokens"] = len(vocab)
            steps["candidates"] = lambda i: fast_step(model, tok, encoded[i : i + args.batch_size], optimizer, bf16, vocab)
        starts = range(0, len(encoded), args.batch_size)
        times, supervised = time_interleaved(steps, starts, args.reps)
    share = 1 - frozen / cfg.num_hidden_layers  # layers that need a backward pass
    for name in steps:
        if name == "baseline":  # forward through every layer, backward down to the first adapted one
            tokens = sum(len(b) * max(len(e.ids) for e in b) for b in batches)
            flops = tokens * (2 * body + 2 * body * share) + tokens * 4 * embed
        else:  # cached frozen layers: forward and backward only through the adapted ones
            packed = [pack(b, "answer") for b in batches]
            tokens = sum(p.n_tokens for p in packed)
            head = embed * (result["softmax_tokens"] / cfg.vocab_size if name == "candidates" else 1)
            flops = tokens * 4 * body * share + sum(len(p.labels) for p in packed) * 4 * head
        result[name] = {"seconds_per_step": times[name] / len(batches), "tokens_computed": tokens,
                        "supervised_tokens_per_second": supervised[name] / times[name],
                        "gflops": flops / times[name] / 1e9}
    result["speedup_supervised_tokens"] = (result["fast"]["supervised_tokens_per_second"]
                                           / result["baseline"]["supervised_tokens_per_second"])
    if "candidates" in steps:
        result["speedup_candidates"] = (result["candidates"]["supervised_tokens_per_second"]
                                        / result["baseline"]["supervised_tokens_per_second"])
    result["peak_gflops_fp32"] = matmul_peak(torch.float32) / 1e9
    result["peak_gflops_bf16"] = matmul_peak(torch.bfloat16, n=512) / 1e9
    result["fast_fraction_of_fp32_peak"] = result["fast"]["gflops"] / result["peak_gflops_fp32"]
    result["fast_fraction_of_bf16_peak"] = result["fast"]["gflops"] / result["peak_gflops_bf16"]


def answer_latency(base, rank: int, reps: int) -> dict:
    """Median seconds per closed-book answer, the variants interleaved round by round: the base model; a saved
    module applied the way `loramem ask` applies it (answer.module_applied: factors run beside the weights), as
    a first answer with it (read and prepared) and as any later one (prepared factors from the memory's cache);
    the same module merged into copies of the weights (the previous path); those merged weights reused from a
    cache; and the module through PEFT, unmerged. The base model runs twice per round: the ratio of the two (an
    A/A control) shows how far apart identical work lands on this machine, and the other ratios are to their mean."""
    import tempfile

    from loramem.answer import adapter_scale, module_applied, read_adapter
    from loramem.merge import MergeCache, applied, lora_factors, merged_weights
    from loramem.train.adapters import save_adapter

    enc = base.tokenizer([closed_book_prompt("What is the phone number of Jeffrey Buck?")], return_tensors="pt")

    def answer(model):  # exactly 16 new tokens for every variant, so only the per-token cost differs
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=base.tokenizer.pad_token_id)

    def fused_answer(cache=None):
        with module_applied(base.model, folder, cache) as model:
            answer(model)

    def merged_answer():
        config, tensors = read_adapter(folder)
        with applied(base.model, factors=lora_factors(tensors, adapter_scale(config))) as model:
            answer(model)

    def cached_answer():
        with applied(base.model, weights=cached) as model:
            answer(model)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with attached(base.model, LoraSpec(rank=rank, layers="all")) as model:
            _randomise(model)
            save_adapter(model, folder)
            unmerged = _median(lambda: answer(model), reps)
        config, tensors = read_adapter(folder)
        cached = merged_weights(base.model, factors=lora_factors(tensors, adapter_scale(config)))
        prepared = MergeCache(1)
        times = _interleaved({"base_s": lambda: answer(base.model), "base_again_s": lambda: answer(base.model),
                              "module_s": fused_answer,
                              "module_prepared_s": lambda: fused_answer(prepared),
                              "merged_module_s": merged_answer, "cached_merged_module_s": cached_answer}, reps)
    times["peft_unmerged_s"] = unmerged
    reference = (times["base_s"] + times["base_again_s"]) / 2  # both base runs: the A/A pair's own spread averaged
    return times | {"base_again_over_base": times["base_again_s"] / times["base_s"]} | {
        key.removesuffix("_s") + "_over_base": t / reference for key, t in times.items() if "base" not in key}


def merge_latency(base, rank: int, reps: int) -> dict:
    """Median seconds to merge three rank-r all-linear modules of the model by every method of merge.py
    (factors -> full deltas -> merged deltas), TIES from the factors straight into merged weights (ties_fused:
    the path answers take) with the modules' trimming thresholds computed or already cached, and to apply +
    revert a result."""
    from peft import get_peft_model_state_dict

    from loramem.merge import (METHODS, MergeCache, _parameters, applied, factor_shapes, lora_deltas, lora_factors, merge,
                               merged_weights)
    from loramem.ties_fused import ties_merged_weights

    spec = LoraSpec(rank=rank, layers="all")
    scale = spec.lora_alpha / rank
    states = []
    for seed in range(3):
        with attached(base.model, spec, seed=seed) as model:
            _randomise(model, seed)
            states.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
    params = {"ties": {"density": 0.2}, "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5},
              "magnitude_prune": {"density": 0.2}}
    out = {}
    for method in METHODS:
        def run():
            deltas = [lora_deltas(s, scale) for s in states]
            return merge(deltas, method, **params.get(method, {}))
        out[f"{method}_s"] = _median(run, reps)
    factors = [lora_factors(s, scale) for s in states]
    weights = _parameters(base.model, factor_shapes(factors[0]))
    out["ties_from_factors_into_weights_s"] = _median(lambda: ties_merged_weights(weights, factors, None, 0.2), reps)
    cache = MergeCache(maxsize=3)
    out["ties_from_factors_cached_thresholds_s"] = _median(
        lambda: ties_merged_weights(weights, factors, None, 0.2, keys=[0, 1, 2], cache=cache), reps)
    out["ties_dense_into_weights_s"] = _median(  # the path answers took before ties_fused
        lambda: merged_weights(base.model, deltas=merge([lora_deltas(s, scale) for s in states], "ties", density=0.2)),
        reps)
    merged = merge([lora_deltas(s, scale) for s in states], "ties", density=0.2)

    def apply_revert():
        with applied(base.model, merged):
            pass

    out["apply_and_revert_s"] = _median(apply_revert, reps)
    cached = merged_weights(base.model, deltas=merged)  # what Memory's merge cache keeps for a module set

    def reuse():
        with applied(base.model, weights=cached):
            pass

    out["cached_apply_and_revert_s"] = _median(reuse, reps)
    return out


def _randomise(model, seed: int = 0) -> None:
    """Give a fresh adapter non-zero B factors, so that it changes the model like a trained one."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, run once each per round in a rotating order, so that all of them see the
    same load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for order in rotations(list(fns), reps):
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _median(fn, reps: int) -> float:
    return _interleaved({"fn": fn}, reps)["fn"]


if __name__ == "__main__":
    main()
