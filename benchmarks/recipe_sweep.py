"""How many epochs a training recipe needs to store PhoneBook 1K exactly, one line per recipe.

    python benchmarks/recipe_sweep.py "lr=5e-3,schedule='linear',epochs=16" "lr=5e-3,epochs=25,lora_layers='late'"

Each argument is TrainSpec keyword arguments; `lora_*` keys go to LoraSpec (default rank 4, all
targets, all layers). Per-epoch progress (loss, examples recalled in the training pass) is logged;
the last line per recipe gives epochs, steps, training seconds, wall seconds (adapter initialisation,
frozen-layer cache and recall checks included), tokens/s and the final teacher-forced recall.
"""

import logging
import sys
import time

from loramem.bench import phonebook as pb
from loramem.config import LoraSpec, TrainSpec
from loramem.models import load_base
from loramem.train import attached, train


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    base = load_base("smollm2-135m")
    examples = pb.examples(pb.load("1K"))
    for recipe in sys.argv[1:]:
        kw = eval(f"dict({recipe})")  # noqa: S307 - a benchmark's own command line
        lora_kw = {k[len("lora_"):]: kw.pop(k) for k in list(kw) if k.startswith("lora_")}
        print("==", recipe, flush=True)
        start = time.perf_counter()  # wall time includes initialising the adapter, caching frozen layers, recall checks
        with attached(base.model, LoraSpec(rank=4, **lora_kw)) as model:
            st = train(model, base.tokenizer, examples, TrainSpec(**kw), progress=False)
            wall = time.perf_counter() - start
        print(recipe, st.epochs, st.steps, f"{st.seconds:.1f}s train", f"{wall:.1f}s wall",
              f"{st.tokens_per_second:.0f} tok/s", st.recall, round(st.final_loss, 3), flush=True)


if __name__ == "__main__":
    main()
