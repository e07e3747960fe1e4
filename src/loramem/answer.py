"""Answering: prompts, batched greedy generation, and the modules a question is answered with.

A single module is answered with by adding its weight deltas into the base weights (exact, reverted bit
for bit afterwards), so a closed-book answer costs what the base model costs; DoRA modules, whose
update is not a plain delta, go through PEFT unmerged.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loramem.errors import LoramemError

log = logging.getLogger("loramem")
MODES = ("base", "lora", "icl")


@dataclass
class Answer:
    question: str
    text: str
    mode: str
    modules: list[str] = field(default_factory=list)
    seconds: float = 0.0  # this question's share of its batch's wall time

    def to_dict(self) -> dict:
        return asdict(self)


def closed_book_prompt(question: str) -> str:
    """The format facts are trained in (the paper's "Question: ... Answer:")."""
    question = question.strip()
    if question.startswith("Question:"):
        question = question[len("Question:"):].strip()
    if question.endswith("Answer:"):
        question = question[: -len("Answer:")].strip()
    return f"Question: {question} Answer:"


def icl_prompt(question: str, context: str) -> str:
    return f"{context.strip()}\n\n{closed_book_prompt(question)}"


def fit_context(tokenizer, context: str, budget: int) -> str:
    """Keep the first `budget` tokens of the context, warning when some are cut."""
    ids = tokenizer(context, add_special_tokens=False).input_ids
    if len(ids) <= budget:
        return context
    log.warning("context of %d tokens cut to the %d that fit the model's window", len(ids), budget)
    return tokenizer.decode(ids[:budget])


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 16) -> list[str]:
    """Greedy completions, generated in left-padded batches."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        ids = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return out


def adapter_scale(config: dict) -> float:
    """The factor PEFT multiplies B @ A by."""
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter's config and tensors, from safetensors only (pickle files are never loaded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoramemError(f"{folder} has no adapter_model.safetensors (only safetensors adapters are loaded)")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(weights)
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise LoramemError(f"cannot read adapter in {folder}: {str(err).splitlines()[0]}") from None
    return config, tensors


@contextmanager
def module_applied(model: torch.nn.Module, folder: Path):
    """Run the block with one module in effect on `model` (merged in place, then reverted exactly)."""
    from loramem.merge import applied, lora_factors

    config, tensors = read_adapter(folder)
    if config.get("use_dora"):
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, folder)
        try:
            yield peft_model
        finally:
            peft_model.unload()
        return
    with applied(model, factors=lora_factors(tensors, adapter_scale(config))):
        yield model


def timed_generate(model, tokenizer, prompts, **kw) -> tuple[list[str], float]:
    start = time.perf_counter()
    texts = generate(model, tokenizer, prompts, **kw)
    return texts, (time.perf_counter() - start) / max(1, len(prompts))
