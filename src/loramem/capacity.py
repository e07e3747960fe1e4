"""Capacity-aware sizing: how much text one module of a given spec can hold, from measured capacity.

A measurement ("cell") is a module of some spec trained on some number of data tokens, with the share of its
facts it reproduces exactly. Cells come from a memory's own committed modules (each records its recall on its
training data) or from benchmark results (`loramem bench phonebook --json`, study JSON). The size a new module
gets is the largest measured load per trainable parameter that still met the threshold, on the same placement
(targets and layers), times the new module's parameters: capacity grows with parameters at a fixed placement,
and placement changes it by orders of magnitude (docs/BENCHMARKS.md), so cells from another placement are not used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from loramem.config import AUTO, LoraSpec
from loramem.errors import LoramemError

DEFAULT_THRESHOLD = 0.95  # the paper's T_max: the largest size still stored at >= 95%


@dataclass(frozen=True)
class Cell:
    rank: int
    targets: str
    layers: str
    data_tokens: int
    trainable_params: int
    score: float  # exact match (or teacher-forced recall) on the module's own facts

    @property
    def tokens_per_param(self) -> float:
        return self.data_tokens / self.trainable_params


def cells_from_memory(memory) -> list[Cell]:
    """One cell per committed module that records its recall, its data measured in base-model tokens."""
    tokenizer = memory.base.tokenizer
    cells = []
    for record in memory.modules():
        if record.recall is None or not record.trainable_params:
            continue
        tokens = sum(len(tokenizer(e.prompt + e.answer, add_special_tokens=False).input_ids)
                     for e in memory.examples(record))
        spec = record.lora_spec
        cells.append(Cell(spec["rank"], spec["targets"], spec["layers"], tokens, record.trainable_params,
                          record.recall))
    return cells


def cells_from_file(path: str | Path) -> list[Cell]:
    """Cells from benchmark output: a JSON object, a list of them, {"rows": [...]}, or JSON lines; each with rank,
    targets, layers, data_tokens, trainable_params and exact_match (or score)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LoramemError(f"cannot read capacity measurements {path}: {e.strerror or e}") from None
    try:
        loaded = json.loads(text)
        rows = loaded.get("rows", [loaded]) if isinstance(loaded, dict) else loaded
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise LoramemError(f"{path}: not JSON or JSON lines ({e.msg}, line {e.lineno})") from None
    keys = ("rank", "targets", "layers", "data_tokens", "trainable_params")
    cells = [Cell(*(r[k] for k in keys), r.get("exact_match", r.get("score"))) for r in rows
             if isinstance(r, dict) and all(k in r for k in keys) and ("exact_match" in r or "score" in r)]
    if not cells:
        raise LoramemError(f"{path} holds no capacity measurements (rank, targets, layers, data_tokens, "
                           "trainable_params, exact_match)")
    return cells


def cells_from(source: str | Path, memory=None) -> list[Cell]:
    """A memory folder's modules, or a JSON file of measurements."""
    from loramem.memory import Memory

    source = Path(source)
    if source.is_dir():
        return cells_from_memory(memory if memory is not None and memory.path == source else Memory.open(source))
    return cells_from_file(source)


def tokens_per_param(cells: list[Cell], lora: LoraSpec, threshold: float = DEFAULT_THRESHOLD) -> float:
    """The largest measured load per parameter that met `threshold` at this spec's placement."""
    placed = [c for c in cells if (c.targets, c.layers) == (lora.targets, lora.layers)]
    stored = [c for c in placed if c.score >= threshold]
    if not stored:
        raise LoramemError(
            f"no module with targets={lora.targets!r} layers={lora.layers!r} was measured at >= {threshold:.0%} "
            f"({len(placed)} measured below it); measure one first, e.g. `loramem bench phonebook --targets "
            f"{lora.targets} --layers {lora.layers} --json`")
    return max(c.tokens_per_param for c in stored)


def module_tokens(trainable_params: int, cells: list[Cell], lora: LoraSpec,
                  threshold: float = DEFAULT_THRESHOLD) -> int:
    """Tokens of facts to put into one module of `trainable_params` parameters and this placement."""
    return max(1, int(tokens_per_param(cells, lora, threshold) * trainable_params))


def trainable_params(model, lora: LoraSpec) -> int:
    """Parameters a module of this spec trains on this model (attached and detached, nothing trained)."""
    from loramem.train.adapters import attached

    with attached(model, lora) as peft_model:
        return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


# Bits of answers to store per trainable parameter that a placement is sized for by layers="auto"; calibrated on
# the paper's PhoneBook and CounterFact with the default recipe (docs/BENCHMARKS.md, "Defaults"): well under the
# ~0.5 a module holds at length, because a lighter load is learnt in far fewer epochs.
AUTO_BITS_PER_PARAM = 0.06


def answer_bits(model, tokenizer, examples, precision: str = "auto") -> float:
    """What the base model does not know of the answers: the sum of -log2 p(answer token | everything before it),
    teacher-forced. Digits it cannot guess cost ~3.3 bits each; a fact it already knows costs almost nothing."""
    from loramem.train.score import teacher_forced

    return -sum(float(s.logp.sum()) for s in teacher_forced(model, tokenizer, examples, precision=precision)) / math.log(2)


def auto_layers(model, lora: LoraSpec, bits: float, bits_per_param: float = AUTO_BITS_PER_PARAM) -> str:
    """The placement "auto" resolves to: the last N layers, with N the fewest whose parameters hold `bits` at
    `bits_per_param`. Late layers are the cheapest to train (the frozen layers before them are computed once) but
    store less per parameter than early ones, so a load too heavy for few of them gets more, up to all."""
    num_layers = model.config.num_hidden_layers
    per_layer = _last_layer_params(model, lora)
    needed = max(1, math.ceil(bits / (bits_per_param * per_layer)))
    return "all" if needed >= num_layers else f"last{needed}"


def _last_layer_params(model, lora: LoraSpec) -> int:
    """LoRA factor parameters on the last decoder layer: rank x (in + out) per targeted linear layer (counted from
    the shapes: attaching an adapter to count them costs a second on a 135M model)."""
    import torch

    names, marker = set(lora.target_modules()), f"layers.{model.config.num_hidden_layers - 1}."
    return sum(lora.rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and marker in name and name.rsplit(".", 1)[-1] in names)


def shard_tokens(value: str, capacity: Path, threshold: float, memory, lora: LoraSpec) -> tuple[int, bool]:
    """A write's tokens of facts per module: a number (0: one module for all), or "auto", measured capacity (a
    memory folder or benchmark JSON) scaled to one module of `lora` on `memory`'s base model. Returns the tokens and
    whether they were sized from capacity."""
    if value.strip().lower() != "auto":
        try:
            return int(value), False
        except ValueError:
            raise LoramemError(f"--shard-tokens must be a number of tokens or auto, got {value!r}") from None
    if lora.layers == AUTO:
        raise LoramemError("--shard-tokens auto sizes modules by the capacity measured at one placement: give --layers")
    if not Path(capacity).exists():
        raise LoramemError(f"--shard-tokens auto needs measured capacity: {capacity} does not exist (--capacity)")
    return module_tokens(trainable_params(memory.base.model, lora), cells_from(capacity, memory), lora, threshold), True
