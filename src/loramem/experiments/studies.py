"""The paper's module studies as lists of cells, and what is derived from their rows.

capacity   ranks x sizes: score against size per rank; T_max, saturation, efficiency, bits per parameter
placement  early vs late layers x FFN / attention / all, at equal parameter budgets
variants   LoRA, rsLoRA, DoRA and PiSSA on the same cells
scale      the same capacity cells on several base models
budget     the same cell trained for more steps (does more training remove the limit?)

Presets:
- `cpu` sizes a study for a 2-core CPU: FFN modules of the last 4 layers; every cell gets the same budget of 400
  steps of batch 8 (lr 5e-3 decaying linearly to 0, stopping early at exact recall); sizes from 0.25K, as small
  modules hold less than 1K. A fixed step budget, as in the paper, keeps small data sets from being starved of
  updates (16 epochs of 12 entries are only 32 steps).
- `paper` is the paper's setting for GPUs: all linear layers, alpha = r, dropout 0.1, 1,500 steps of batch 8 at
  lr 5e-5, PhoneBook through the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.experiments.runner import Cell

DEFAULT_THRESHOLD = 0.95
VARIANTS = ("lora", "rslora", "dora", "pissa")


@dataclass(frozen=True)
class Preset:
    targets: str
    layers: str
    train: TrainSpec
    ranks: tuple[int, ...]
    sizes: tuple[str, ...]
    alpha_is_rank: bool = False  # alpha = r (the paper), else loramem's alpha = 2r
    dropout: float = 0.0
    chat_phonebook: bool = False
    layer_sets: tuple[str, ...] = ("first4", "last4")  # early and late, for the placement study

    def lora(self, rank: int, **changes) -> LoraSpec:
        spec = LoraSpec(rank=rank, alpha=float(rank) if self.alpha_is_rank else None, dropout=self.dropout,
                        targets=self.targets, layers=self.layers)
        return replace(spec, **changes)

    def cell(self, dataset: str, size: str, rank: int, model: str, train: TrainSpec | None = None, **lora) -> Cell:
        prompt = "chat" if self.chat_phonebook and dataset == "phonebook" else "plain"
        return Cell(dataset, size, self.lora(rank, **lora), train or self.train, model, prompt)


# The studies measure a fixed step budget, so they keep the recipe they were measured with: a decay to zero over
# the budget with the whole-vocabulary softmax (not the write defaults, which stop at exact recall).
STUDY_RECIPE = dict(epochs=10**6, decay_epochs=None, lr_floor=0.0, candidates=0)
PRESETS = {
    "cpu": Preset(targets="ffn", layers="last4", train=TrainSpec(lr=5e-3, max_steps=400, **STUDY_RECIPE),
                  ranks=(1, 2, 4, 8, 16),
                  sizes=("0.25K", "0.5K", "1K", "2K", "4K", "8K")),
    "paper": Preset(targets="all", layers="all", alpha_is_rank=True, dropout=0.1, chat_phonebook=True,
                    train=TrainSpec(lr=5e-5, max_steps=1500, batch_size=8, target_recall=None, **STUDY_RECIPE),
                    ranks=(2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), sizes=tuple(f"{k}K" for k in range(1, 21)),
                    layer_sets=("early", "late")),
}


def preset(name: str, steps: int | None = None, precision: str = "auto") -> Preset:
    """A preset by name, with every cell's step budget changed to `steps` when given, trained at `precision`."""
    if name not in PRESETS:
        raise LoramemError(f"unknown preset {name!r}; choose {' or '.join(PRESETS)}")
    chosen = PRESETS[name]
    return replace(chosen, train=replace(chosen.train, max_steps=steps or chosen.train.max_steps, precision=precision))


# --- the studies ----------------------------------------------------------------------------------------


def capacity(p: Preset, dataset: str, ranks=None, sizes=None, model: str = "smollm2-135m") -> list[Cell]:
    return [p.cell(dataset, size, rank, model) for rank in ranks or p.ranks for size in sizes or p.sizes]


def variants(p: Preset, dataset: str, ranks, sizes, model: str = "smollm2-135m", names=VARIANTS) -> list[Cell]:
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise LoramemError(f"unknown variant {sorted(unknown)[0]!r}; choose from {', '.join(VARIANTS)}")
    return [p.cell(dataset, size, rank, model, **{v: True for v in [name] if v != "lora"})
            for name in names for rank in ranks for size in sizes]


def scale(p: Preset, dataset: str, models, ranks, sizes) -> list[Cell]:
    return [cell for model in models for cell in capacity(p, dataset, ranks, sizes, model)]


def budget(p: Preset, dataset: str, rank: int, size: str, steps, model: str = "smollm2-135m") -> list[Cell]:
    return [p.cell(dataset, size, rank, model, train=replace(p.train, max_steps=n)) for n in steps]


def placement(p: Preset, dataset: str, sizes, budget_rank: int, base, targets=("ffn", "attention", "all"),
              layer_sets=None) -> list[Cell]:
    """Every layer set x target group, each at the rank whose trainable parameters come closest to those of
    the preset's own placement at `budget_rank` (LoRA parameters grow linearly with rank)."""
    from loramem.capacity import trainable_params

    def per_rank(targets_: str, layers: str) -> int:
        return trainable_params(base.model, p.lora(1, targets=targets_, layers=layers))

    goal = budget_rank * per_rank(p.targets, p.layers)
    cells = []
    for layers in layer_sets or p.layer_sets:
        for group in targets:
            rank = max(1, round(goal / per_rank(group, layers)))
            cells += [p.cell(dataset, size, rank, base.name, targets=group, layers=layers) for size in sizes]
    return cells


# --- what the rows say ------------------------------------------------------------------------------------


def group_key(row: dict) -> tuple:
    """Rows of one capacity curve family: same data set, model, placement, variant and training."""
    return (row["dataset"], row["model"], row["targets"], row["layers"], row["variant"],
            json.dumps(row["train"], sort_keys=True), row.get("prompt", "plain"))


def t_max(rows: list[dict], threshold: float = DEFAULT_THRESHOLD) -> tuple[dict | None, bool]:
    """The largest cell (by data tokens) up to which every cell scored >= threshold, and whether the curve was
    cut off by the largest size measured (censored: the true T_max is at least that)."""
    best = None
    ordered = sorted(rows, key=lambda r: r["data_tokens"])
    for row in ordered:
        if row["score"] < threshold:
            return best, False
        best = row
    return best, bool(ordered)


def capacity_summary(rows: list[dict], threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """Per curve family and rank: T_max in tokens and items, efficiency (T_max tokens per trainable parameter),
    bits per parameter (PhoneBook), and the family's saturation rank and efficiency peak."""
    families: dict[tuple, dict[int, list[dict]]] = {}
    for row in rows:
        families.setdefault(group_key(row), {}).setdefault(row["rank"], []).append(row)
    out = []
    for family, by_rank in families.items():
        summary = []
        for rank in sorted(by_rank):
            cells = by_rank[rank]
            best, censored = t_max(cells, threshold)
            params = cells[0]["trainable_params"]
            tokens = best["data_tokens"] if best else 0
            most = max(cells, key=lambda r: r["score"] * r["items"])  # the most facts any size left stored
            summary.append({
                "dataset": family[0], "model": family[1], "targets": family[2], "layers": family[3],
                "variant": family[4], "rank": rank, "trainable_params": params, "t_max_size": best["size"] if best else None,
                "t_max_tokens": tokens, "t_max_items": best["items"] if best else 0, "censored": censored,
                "efficiency": tokens / params,
                "bits_per_param": best.get("bits_per_param") if best else 0.0,
                "most_stored": most["score"] * most["items"], "most_stored_size": most["size"],
                "most_bits_per_param": most.get("bits_per_param"),
                "sizes": len(cells),
            })
        peak = max(summary, key=lambda s: s["efficiency"])
        saturation = _saturation(summary)
        for s in summary:
            s["efficiency_peak_rank"] = peak["rank"]
            s["saturation_rank"] = saturation
        out += summary
    return out


def _saturation(summary: list[dict]) -> int | None:
    """The smallest rank that reaches the largest T_max measured, when a larger rank measured no more (None when
    only the largest rank reached it, or the largest size measured cut that T_max off: no saturation seen)."""
    top = max(s["t_max_tokens"] for s in summary)
    reached = [s for s in summary if s["t_max_tokens"] == top]
    if top == 0 or any(s["censored"] for s in reached) or reached[0] is summary[-1]:
        return None
    return reached[0]["rank"]

