"""How many epochs a training recipe needs to store PhoneBook 1K exactly, one line per recipe.

    python benchmarks/recipe_sweep.py "lr=5e-3,schedule='linear',epochs=16" "lr=5e-3,epochs=25,lora_layers='late'"

Each argument is TrainSpec keyword arguments; `lora_*` keys go to LoraSpec (default rank 4, all
targets, all layers). `start='gradient'` is an experiment, not in the library: each A starts on the
top-r right singular vectors of its weight's loss gradient over the data (LoRA-GA's idea), B stays 0, so the
module still starts at zero; the extra pass (and a second caching of the frozen layers, which `train` does
again) counts in the wall time. Per-epoch progress (mean loss, examples recalled in the training pass) is
logged; the last line per recipe gives epochs, steps, training seconds, wall seconds (adapter initialisation,
frozen-layer cache and recall checks included), tokens/s and the final teacher-forced recall.
"""

import logging
import statistics
import sys
import time

import torch

from loramem.bench import phonebook as pb
from loramem.config import LoraSpec, TrainSpec, data_dir
from loramem.models import load_base
from loramem.train.adapters import attached
from loramem.train.forward import cache_frozen_layers, first_trainable_layer
from loramem.train.loop import _loss, train
from loramem.train.pack import encode, pack

from common import recipe_kwargs


def start_on_gradient(model, tokenizer, examples, spec: TrainSpec) -> None:
    """Point each LoRA A at its weight gradient's top right singular vectors, at the norm it was given."""
    encoded = encode(tokenizer, examples)
    cache_frozen_layers(model, encoded, first_trainable_layer(model), bf16=False)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    for m in layers:
        m.base_layer.weight.requires_grad_(True)
    for first in range(0, len(encoded), spec.batch_size):
        chunk = encoded[first : first + spec.batch_size]
        _loss(model, pack(chunk, "answer", pad_id=tokenizer.pad_token_id), chunk, spec)[0].backward()
    with torch.no_grad():
        for m in layers:
            a = m.lora_A["default"].weight
            _, _, v = torch.svd_lowrank(m.base_layer.weight.grad, q=2 * a.shape[0], niter=4)
            a.copy_(v[:, : a.shape[0]].T * a.norm(dim=1, keepdim=True).mean())
            m.base_layer.weight.grad = None
            m.base_layer.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    base = load_base("smollm2-135m")
    examples = pb.examples(pb.load("1K"))
    root = data_dir()
    print(f"PhoneBook 1K: {len(examples)} entries,", f"the paper's file under {root}" if root else
          "generated (no data directory: set LORAMEM_DATA for the paper's file)", flush=True)
    walls, exact = [], 0
    for recipe in sys.argv[1:]:
        lora_kw, kw = recipe_kwargs(recipe)
        start_from = kw.pop("start", "random")
        if start_from not in ("random", "gradient"):
            sys.exit(f"error: start must be 'random' or 'gradient', got {start_from!r}")
        print("==", recipe, flush=True)
        start = time.perf_counter()  # wall time includes initialising the adapter, caching frozen layers, recall checks
        spec = TrainSpec(**kw)
        with attached(base.model, LoraSpec(rank=4, **({"layers": "all"} | lora_kw))) as model:
            if start_from == "gradient":
                start_on_gradient(model, base.tokenizer, examples, spec)
            st = train(model, base.tokenizer, examples, spec, progress=False)
            wall = time.perf_counter() - start
        print(recipe, st.epochs, st.steps, f"{st.seconds:.1f}s train", f"{wall:.1f}s wall",
              f"{st.tokens_per_second:.0f} tok/s", st.recall, round(st.final_loss, 3), flush=True)
        walls.append(wall)
        exact += st.recall == 1.0
    if len(walls) > 1:
        print(f"median wall {statistics.median(walls):.1f}s over {len(walls)} recipes; 100% recall in {exact}")


if __name__ == "__main__":
    main()
