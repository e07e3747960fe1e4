"""Answering: answer modes, batched greedy generation, and the modules a question is answered with.

A single module is answered with by running its factors beside the base weights (merge.fused: no weight is
copied or changed), so a closed-book answer costs little more than the base model; `Caches` keeps a module's
prepared factors between questions. DoRA modules, whose update is not a plain delta, go through PEFT unmerged.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loramem import llama
from loramem.errors import LoramemError
from loramem.merge import MergeCache
from loramem.packed import packed_linears
from loramem.precision import autocast, use_bf16

# The weights a question is answered with (base, one module, several merged), optionally with context in the
# prompt (whole documents: icl; retrieved passages: rag).
WEIGHTS = ("base", "lora", "multi")
CONTEXTS = ("icl", "rag")
MODES = ("base", "icl", "rag", "lora", "multi", "lora+icl", "lora+rag", "multi+icl", "multi+rag")


def parse_mode(mode: str) -> tuple[str, str | None]:
    """"lora+rag" -> ("lora", "rag"); "icl" -> ("base", "icl")."""
    if mode not in MODES:
        raise LoramemError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    first, _, second = mode.partition("+")
    return (first, second or None) if first in WEIGHTS else ("base", first)


@dataclass
class Answer:
    question: str
    text: str
    mode: str
    modules: list[str] = field(default_factory=list)  # modules used (weights, or documents for icl), best first
    seconds: float = 0.0  # this question's share of its batch's wall time
    module_scores: list[float] = field(default_factory=list)  # the router's score of each module
    chunks: list[dict] = field(default_factory=list)  # retrieved passages: {"id": "<module>:<n>", "score"}
    timing: dict = field(default_factory=dict)  # seconds: route, merge, prefill, decode
    prompt_tokens: int = 0  # the whole prompt read, context included
    completion_tokens: int = 0
    # composed (mix, select...): each module's mixture weight (with a base row, they sum to 1 - base_weight)
    module_weights: list[float] = field(default_factory=list)
    supplied_by: list[str] = field(default_factory=list)  # composed: the module (or "base") that supplied each token

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timing:
    """Where an answer's seconds went (per question: its share of its batch)."""

    route: float = 0.0
    merge: float = 0.0
    prefill: float = 0.0  # up to the first new token's logits
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.route + self.merge + self.prefill + self.decode

    def share(self, n: int) -> Timing:
        return Timing(*(getattr(self, f) / max(1, n) for f in ("route", "merge", "prefill", "decode")))


class _FirstLogits:
    """A logits processor that only notes when generation's first forward pass (the prefill) is done."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 16,
             timing: Timing | None = None, counts: list | None = None, precision: str = "auto",
             pack: bool = True, own_loop: bool = True) -> list[str]:
    """Greedy completions, generated in left-padded batches (under bf16 autocast where `precision` resolves to
    bf16 on fp32 weights); prefill and decode seconds add to `timing`, and (prompt tokens, generated tokens
    before EOS) per prompt to `counts`.

    In bf16 on a CPU the linear layers run through bf16 weights packed once and kept between calls
    (packed.packed_linears: the same logits bit for bit; 1.3-1.6x the tokens/s at batch 1 here); `pack=False`
    runs them as autocast does, casting every weight again in each call (for comparison).

    Llama-architecture models decode through loramem.llama's own loop (the same tokens as transformers' generate,
    without its per-step overhead); `own_loop=False` uses transformers' generate (for comparison)."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    bf16 = use_bf16(precision, model)
    decode = _own_loop if own_loop and llama.supports(model) else _transformers_generate
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        began, first = time.perf_counter(), _FirstLogits()
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        with autocast(bf16, device), packed_linears(model) if bf16 and pack else nullcontext():
            ids = decode(model, tokenizer, enc, max_new_tokens, first)
        generated = ids[:, enc.input_ids.shape[1]:]
        out += tokenizer.batch_decode(generated, skip_special_tokens=True)
        if counts is not None:
            is_eos = generated == tokenizer.eos_token_id
            produced = torch.where(is_eos.any(1), is_eos.int().argmax(1), generated.shape[1])  # up to the first EOS
            counts += list(zip(enc.attention_mask.sum(1).tolist(), produced.tolist()))
        if timing is not None:
            ended = time.perf_counter()
            timing.prefill += (first.at or ended) - began
            timing.decode += ended - (first.at or ended)
    return out


@torch.no_grad()
def generate_composed(model, tokenizer, prompts: list[str], modules: list[list], scores: list[list[float]],
                      method: str = "mix", max_new_tokens: int = 24, batch_size: int = 16, timing: Timing | None = None,
                      counts: list | None = None, precision: str = "auto") -> tuple[list[str], list[list[int]]]:
    """Greedy answers with each question's k modules composed in output space (loramem.mix): question q's prompt
    runs as k rows of one batch, row j with `modules[q][j]` (a merge.LowRank, or None for the base weights), and
    each step's token comes from the rows' distributions combined by `method` (mix.COMPOSITIONS) with the softmax
    of `scores[q]` as the mixture weights. Returns the answers and, per answer token, the index j of the module that
    supplied it. Timing and counts as in `generate`; `batch_size` counts questions (k rows each)."""
    from loramem import mix

    mix.check_composition(method)
    if not llama.supports(model):
        raise LoramemError("composing modules' outputs needs a Llama-architecture base model; merge them instead")
    k = len(modules[0]) if modules else 0
    if any(len(m) != k or len(s) != k for m, s in zip(modules, scores)) or k == 0:
        raise LoramemError("every question needs the same number (at least 1) of modules and scores to compose")
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    bf16 = use_bf16(precision, model)
    texts: list[str] = []
    supplied: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        asked = range(start, min(len(prompts), start + batch_size))
        began, first = time.perf_counter(), _FirstLogits()
        enc = tokenizer([prompts[q] for q in asked], return_tensors="pt", padding=True).to(device)
        composer = mix.Composer(method, mix.mixture_weights([scores[q] for q in asked]))
        rows = [modules[q][j] for j in range(k) for q in asked]
        with mix.rows_applied(model, rows), autocast(bf16, device), packed_linears(model) if bf16 else nullcontext():
            ids = llama.greedy(model, enc.input_ids, enc.attention_mask, max_new_tokens, tokenizer.eos_token_id,
                               tokenizer.pad_token_id, on_prefill=lambda: first(None, None), choose=composer,
                               repeat=k, shared_layers=mix.first_adapted_layer(model, rows))
        generated, by = composer.answers(ids[:, enc.input_ids.shape[1]:], tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(generated, skip_special_tokens=True)
        supplied += by
        if counts is not None:
            counts += [(read, len(s)) for read, s in zip(enc.attention_mask[: len(asked)].sum(1).tolist(),
                                                          supplied[-len(asked):])]
        if timing is not None:
            ended = time.perf_counter()
            timing.prefill += (first.at or ended) - began
            timing.decode += ended - (first.at or ended)
    return texts, supplied


def _own_loop(model, tokenizer, enc, max_new_tokens: int, first: _FirstLogits) -> torch.Tensor:
    return llama.greedy(model, enc.input_ids, enc.attention_mask, max_new_tokens, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, on_prefill=lambda: first(None, None))


def _transformers_generate(model, tokenizer, enc, max_new_tokens: int, first: _FirstLogits) -> torch.Tensor:
    from transformers import LogitsProcessorList

    return model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, logits_processor=LogitsProcessorList([first]))


def adapter_scale(config: dict) -> float:
    """The factor PEFT multiplies B @ A by."""
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def adapter_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LoramemError(f"cannot read adapter config in {folder}: {str(err).splitlines()[0]}") from None


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
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:  # adapter_scale divides by it
        raise LoramemError(f"cannot read adapter in {folder}: adapter_config.json has rank r={rank!r}")
    odd = next((name for name in tensors if ".lora_A." not in name and ".lora_B." not in name
                and "lora_magnitude_vector" not in name), None)
    if odd is not None:
        raise LoramemError(f"cannot read adapter in {folder}: unexpected tensor {odd!r}")
    return config, tensors


@dataclass
class Caches:
    """What answering keeps between questions for one base model, least recently used evicted first."""

    merged: MergeCache = field(default_factory=lambda: MergeCache(2))  # merged weights (TIES, DARE...): ~ the model each
    thresholds: MergeCache = field(default_factory=lambda: MergeCache(256))  # TIES trimming thresholds: KBs per module
    low_rank: MergeCache = field(default_factory=lambda: MergeCache(8))  # factors ready to run: MBs per module


@contextmanager
def module_applied(model: torch.nn.Module, folder: Path, cache: MergeCache | None = None):
    """Run the block with one module in effect on `model` (its factors beside the weights: merge.fused).

    With a `cache`, the module's factors are read and prepared once (merge.low_rank) and kept by folder: modules
    are never changed once written."""
    from loramem.merge import fused, lora_factors, low_rank

    config = adapter_config(folder)
    if config.get("use_dora"):
        from peft import PeftModel

        read_adapter(folder)  # the same checks as every other module
        peft_model = PeftModel.from_pretrained(model, folder)
        try:
            yield peft_model
        finally:
            peft_model.unload()
        return

    def prepared():
        config, tensors = read_adapter(folder)
        return low_rank(model, lora_factors(tensors, adapter_scale(config)))

    with fused(model, cache.get_or_compute(("low_rank", str(folder)), prepared) if cache is not None else prepared()):
        yield model


MERGE_METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Methods that add the deltas up: their default weights average the modules (1/N each); TIES and DARE-TIES
# take a disjoint mean themselves and default to weight 1.
_SUMMING = ("linear", "cat", "dare_linear", "magnitude_prune")


# Density for the sparsifying methods when none is given (PEFT's and mergekit's usual setting).
DEFAULT_DENSITY = 0.5


def check_merge_method(method: str) -> None:
    if method not in MERGE_METHODS:
        raise LoramemError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")


def default_weights(method: str, n: int) -> list[float]:
    return [1.0 / n] * n if method in _SUMMING else [1.0] * n


@contextmanager
def modules_applied(model: torch.nn.Module, folders: list[Path], method: str = "ties",
                    weights: list[float] | None = None, caches: Caches | None = None, **params):
    """Run the block with several modules merged into `model` (reverted exactly afterwards).

    `linear` and `cat` are the modules' factors concatenated, run beside the weights (merge.fused: exact, no
    dense delta is formed and no weight touched). The other methods merge dense deltas into merged weights. TIES
    on fp32 CPU weights runs from the factors in one pass per weight (ties_fused). With `caches`, what was computed
    is kept for the next question: prepared factors and merged weights by module set, weights, method and params
    (asking the same set again then only swaps tensor pointers), and each module's TIES trimming thresholds.
    """
    from loramem.merge import (_method_params, applied, cat_factors, fused, lora_deltas, lora_factors, low_rank, merge,
                               merge_key, merged_weights)

    check_merge_method(method)
    if len(folders) == 1 and method in ("linear", "cat") and weights is None:
        with module_applied(model, folders[0], caches.low_rank if caches else None) as one:  # averaging one is the one
            yield one
        return
    if any(adapter_config(f).get("use_dora") for f in folders):
        raise LoramemError("DoRA modules cannot be merged (their update is not a weight delta); answer with one")
    weights = list(weights) if weights is not None else default_weights(method, len(folders))

    def adapters() -> list[tuple[dict, dict[str, torch.Tensor]]]:  # read only when not cached
        return [read_adapter(folder) for folder in folders]

    if method in ("linear", "cat"):
        def prepared():
            return low_rank(model, cat_factors([lora_factors(t, adapter_scale(c)) for c, t in adapters()], weights))

        key = merge_key([str(f) for f in folders], weights, "linear", params)  # cat's factors are linear's
        with fused(model, caches.low_rank.get_or_compute(key, prepared) if caches else prepared()):
            yield model
        return
    params = {"density": DEFAULT_DENSITY} | params
    key = merge_key([str(f) for f in folders], weights, method, params)

    def compute() -> dict[str, torch.Tensor]:
        read = adapters()
        if method == "ties":
            fused_ties = _fused_ties(model, [lora_factors(t, adapter_scale(c)) for c, t in read], weights,
                                     [str(f) for f in folders], caches.thresholds if caches else None,
                                     **_method_params(method, params))
            if fused_ties is not None:
                return fused_ties
        deltas = merge([lora_deltas(t, adapter_scale(c)) for c, t in read], method, weights, **params)
        return merged_weights(model, deltas=deltas)

    with applied(model, weights=caches.merged.get_or_compute(key, compute) if caches else compute()):
        yield model


def _fused_ties(model, factors, weights, keys, threshold_cache, density: float, sign_method: str = "total"):
    """TIES merged weights from the factors (ties_fused), or None where that path does not apply (weights that
    are not fp32 on the CPU)."""
    from loramem.merge import _parameters, factor_shapes
    from loramem.ties_fused import ties_merged_weights

    names = {name for f in factors for name in f}
    if any(set(f) != names for f in factors):
        return None  # modules adapting different weights: merge.ties checks and reports that
    params = _parameters(model, factor_shapes(factors[0]))
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params.values()):
        return None
    return ties_merged_weights(params, factors, weights, density, sign_method, keys, threshold_cache)
