"""What a module's factors beside the weights cost per one-token forward of the bundled model, in one run.

    python benchmarks/lowrank_overhead.py [--rounds 15] [--json]

Interleaved rounds of 10 one-token forwards (batch 1, no cache) each: the base model; rank-4 factors on all 210
linear layers the way `merge.fused` runs them (the layer's forward replaced for the call: one mm and one
in-place addmm); and the same product registered as a forward hook on each layer (the first version). Medians.
Also the fixed cost per answer: entering and leaving `answer.module_applied` on a saved rank-4 adapter, reading
it from safetensors and preparing its factors (a first answer with it) or with them prepared already (any later
one: the memory keeps them), medians of 15.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from loramem.answer import module_applied
from loramem.config import LoraSpec
from loramem.merge import MergeCache, fused, low_rank
from loramem.models import load_base
from loramem.train.adapters import attached, save_adapter

from common import report, rotations


@contextmanager
def hooked(model, factors):
    """The low-rank term as forward hooks: output + s * B (A x)."""
    modules, handles = dict(model.named_modules()), []
    for name, (a, b, scale) in factors.items():
        a_t, b_t = a.t().contiguous(), (b * scale).t().contiguous()

        def hook(module, inputs, out, a_t=a_t, b_t=b_t):
            x = inputs[0]
            out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]).mm(a_t), b_t)
            return out

        handles.append(modules[name.removesuffix(".weight")].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = load_base("smollm2-135m").model
    gen = torch.Generator().manual_seed(0)
    factors = {f"{name}.weight": (torch.randn(4, m.in_features, generator=gen) * 0.01,
                                  torch.randn(m.out_features, 4, generator=gen) * 0.01, 2.0)
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
    token = torch.tensor([[5]])

    def ten_forwards() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(10):
                model(token)
        return (time.perf_counter() - start) / 10

    def under(context):
        def run():
            with context():
                return ten_forwards()
        return run

    prepared = low_rank(model, factors)
    variants = {"base": ten_forwards, "fused": under(lambda: fused(model, prepared)),
                "hooks": under(lambda: hooked(model, factors))}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for order in rotations(list(variants), args.rounds):
        for name in order:
            times[name].append(variants[name]())
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    layers = len(factors)
    with tempfile.TemporaryDirectory() as tmp:
        with attached(model, LoraSpec(rank=4, layers="all")) as peft_model:
            save_adapter(peft_model, Path(tmp))
        entries: dict[str, list[float]] = {"read": [], "prepared": []}
        cache = MergeCache(1)
        for _ in range(args.rounds + 1):
            for kind, kept in (("read", None), ("prepared", cache)):
                start = time.perf_counter()
                with module_applied(model, Path(tmp), kept):
                    pass
                entries[kind].append(time.perf_counter() - start)
    compared = [v for v in variants if v != "base"]
    result = {"threads": torch.get_num_threads(), "layers": layers, "ms_per_forward": ms,
              "apply_module_ms": 1000 * statistics.median(entries["read"][1:]),
              "apply_prepared_module_ms": 1000 * statistics.median(entries["prepared"][1:]),
              **{f"{v}_over_base": ms[v] / ms["base"] for v in compared},
              **{f"{v}_us_per_layer": 1000 * (ms[v] - ms["base"]) / layers for v in compared}}

    def table() -> None:
        for v in variants:
            extra = "" if v == "base" else (f"  {result[f'{v}_over_base']:.3f}x  "
                                            f"{result[f'{v}_us_per_layer']:.1f} us per layer")
            print(f"{v:16s} {ms[v]:6.2f} ms per one-token forward{extra}")
        print(f"entering and leaving module_applied: {result['apply_module_ms']:.1f} ms reading the module, "
              f"{result['apply_prepared_module_ms']:.1f} ms with its factors prepared")

    report(result, args.json, table)


if __name__ == "__main__":
    main()
