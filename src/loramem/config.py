"""Typed settings, one documented dataclass per concept (the shape of PEFT's LoraConfig)."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from loramem.errors import LoramemError

# Module names by role for Llama-family decoders (Llama, SmolLM, Mistral, Qwen2, Gemma).
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = {
    "attention": ATTENTION_MODULES,
    "ffn": FFN_MODULES,
    "all": ATTENTION_MODULES + FFN_MODULES,
}


PRECISIONS = ("auto", "bf16", "fp32")  # what loramem.precision resolves
AUTO = "auto"

@dataclass
class LoraSpec:
    """What one memory module looks like.

    rank:    LoRA rank r (> 0).
    alpha:   LoRA scaling numerator; the update is (alpha / r) * B @ A (alpha / sqrt(r) with rslora).
             None means alpha = 2 * rank.
    dropout: dropout on the LoRA input during training.
    targets: "attention", "ffn", "all", or a comma-separated list of module names ("q_proj,down_proj").
    layers:  "auto" (the last layers, as many as the data needs: capacity.auto_layers, resolved when a module is
             written), "all", "early" (first third), "late" (last third), "firstN" / "lastN" (the first or last N
             layers), a range "a-b" (inclusive) or a list "0,3,5".
    rslora, dora, pissa: PEFT variants passed through (rank-stabilised scaling, weight decomposition,
             principal-singular-vector initialisation).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: str = "all"
    layers: str = "auto"
    rslora: bool = False
    dora: bool = False
    pissa: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LoramemError(f"rank must be a positive integer, got {self.rank!r}")
        if self.rank > 4096:
            raise LoramemError(f"rank {self.rank} is larger than any layer it could adapt")
        if not 0.0 <= self.dropout < 1.0:
            raise LoramemError(f"dropout must be in [0, 1), got {self.dropout}")
        self.target_modules()  # validate early

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def target_modules(self) -> list[str]:
        if self.targets in TARGET_GROUPS:
            return list(TARGET_GROUPS[self.targets])
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not names:
            raise LoramemError(f"targets must be attention, ffn, all or module names, got {self.targets!r}")
        return names

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """The decoder layers to adapt, or None for all of them."""
        spec = self.layers.strip()
        third = max(1, num_layers // 3)
        if spec == AUTO:
            raise LoramemError('layers "auto" is resolved from the data when a module is written (capacity.auto_layers)')
        if spec == "all":
            return None
        if spec == "early":
            return list(range(third))
        if spec == "late":
            return list(range(num_layers - third, num_layers))
        edge = re.fullmatch(r"(first|last)(\d+)", spec)
        if edge:  # "first4", "last4": the same placement on models of any depth
            n = int(edge.group(2))
            if not 0 < n <= num_layers:
                raise LoramemError(f"layers {spec!r}: the model has {num_layers} layers")
            return list(range(n)) if edge.group(1) == "first" else list(range(num_layers - n, num_layers))
        try:
            if "-" in spec:
                lo, hi = (int(x) for x in spec.split("-"))
                idx = list(range(lo, hi + 1))
            else:
                idx = [int(x) for x in spec.split(",")]
        except ValueError:
            raise LoramemError(f"layers must be all, early, late, firstN, lastN, a-b or a list, got {self.layers!r}") from None
        if not idx or min(idx) < 0 or max(idx) >= num_layers:
            raise LoramemError(f"layers {self.layers!r} out of range for a model with {num_layers} layers")
        return sorted(set(idx))

    def to_peft(self, num_layers: int):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules(),
            layers_to_transform=self.layer_indices(num_layers),
            use_rslora=self.rslora,
            use_dora=self.dora,
            init_lora_weights="pissa" if self.pissa else True,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def to_dict(self) -> dict:
        return asdict(self)


OBJECTIVES = ("ntp", "distill")
DEFAULT_CANDIDATES = 32  # the candidate softmax's top k when none is given (ntp)


@dataclass
class TrainSpec:
    """How one module is trained.

    The defaults are the fastest recipe measured that stores every benchmark's facts exactly (docs/BENCHMARKS.md,
    "Defaults"): a high rate on few late layers (LoraSpec.layers "auto"), decayed to a floor and held there, over a
    candidate softmax, stopping at exact recall.

    lr:            peak learning rate (AdamW). Memorising facts wants a far higher rate than the paper's 5e-5.
    schedule:      "constant", "linear" or "cosine" decay after warmup_steps. Decaying (to zero, or to lr_floor)
                   is what turns "almost memorised" into exact recall (measured: constant 5e-3 plateaus at 94%
                   after 25 epochs of PhoneBook 1K; linear decay from 5e-3 reaches 100% at epoch 15).
    epochs:        upper bound on passes over the examples (training stops at target_recall); with a decaying
                   schedule also its horizon, unless decay_epochs.
    decay_epochs:  epochs the schedule decays over (None: all of them); later epochs hold the rate at lr_floor.
    lr_floor:      fraction of lr the decay ends at. Above 0, a run that is not exact when the decay ends goes
                   on learning until the target recall or the last epoch (measured on PhoneBook 1K: decaying to
                   0 over 10 epochs reached 100% for one shuffling seed of three; to 0.1 over 10, then holding,
                   for all five tried, in 10-16 epochs).
    max_steps:     optional hard cap on optimizer steps (overrides epochs when reached first).
    batch_size:    examples per optimizer step.
    seed:          seeds shuffling and LoRA initialisation.
    loss_on:       "answer" (only the completion is supervised) or "all" (the whole text).
    target_recall: stop once the share of examples whose answer is reproduced exactly (greedy, teacher
                   forced) reaches this; None trains for all epochs.
    clip_norm:     clip the gradient norm to this (None: no clipping); keeps high learning rates stable.
    b_lr_ratio:    learning rate of the B factors relative to A (LoRA+, Hayou et al. 2024; 1 = plain LoRA).
    candidates:    0: the loss normalises over the whole vocabulary. k > 0: over a candidate set only, the
                   examples' own label tokens plus the base model's top k at each supervised position; the
                   stopping check stays exact over the whole vocabulary and adds any token it finds beating an
                   answer. Measured on SmolLM2-135M with PhoneBook answers (benchmarks/speed.py): a step takes
                   0.45x the time with FFN modules of the last 4 layers, 0.63x with all projections of the last 8,
                   0.94x on all 30 layers, where the 49K-word softmax is a small part. None (the default): 32 for
                   the ntp objective, 0 for distill (which keeps the teacher's top k instead).
    precision:     "auto" (bf16 autocast where the hardware has bf16 matmul, else fp32), "bf16", "fp32".
    objective:     "ntp" (next-token loss on the examples, the paper's) or "distill" (context distillation, as in
                   Knowledge Modules: match the base model that reads the module's documents in its prompt, on
                   the same continuations; see train.distill.distill_loss).
    distill_top_k: teacher tokens kept per position (the rest of its probability is one more bucket).
    distill_temperature: softening of both distributions in the distillation loss.
    distill_layers: also match the outputs of these decoder layers ("3,7"; "" none) by normalised L1 distance,
                   weighted by distill_hidden_weight.
    """

    lr: float = 1e-2
    schedule: str = "linear"
    warmup_steps: int = 0
    epochs: int = 60
    decay_epochs: int | None = 30
    lr_floor: float = 0.1
    max_steps: int | None = None
    batch_size: int = 8
    seed: int = 0
    loss_on: str = "answer"
    target_recall: float | None = 1.0
    precision: str = "auto"
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b_lr_ratio: float = 1.0
    candidates: int | None = None
    objective: str = "ntp"
    distill_top_k: int = 32
    distill_temperature: float = 1.0
    distill_layers: str = ""
    distill_hidden_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise LoramemError(f"learning rate must be positive, got {self.lr}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise LoramemError(f"schedule must be constant, linear or cosine, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise LoramemError("epochs and batch size must be at least 1")
        if self.decay_epochs is not None and self.decay_epochs < 1:
            raise LoramemError(f"decay_epochs must be at least 1, got {self.decay_epochs}")
        if not 0.0 <= self.lr_floor < 1.0:
            raise LoramemError(f"lr_floor is a fraction of lr in [0, 1), got {self.lr_floor}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LoramemError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.loss_on not in ("answer", "all"):
            raise LoramemError(f"loss_on must be answer or all, got {self.loss_on!r}")
        if self.target_recall is not None and not 0.0 < self.target_recall <= 1.0:
            raise LoramemError(f"target recall must be in (0, 1], got {self.target_recall}")
        if self.candidates is None:
            self.candidates = DEFAULT_CANDIDATES if self.objective == "ntp" else 0
        if self.candidates < 0:
            raise LoramemError(f"candidates must be 0 (whole vocabulary) or a positive top k, got {self.candidates}")
        if self.candidates and self.objective != "ntp":
            raise LoramemError("candidates applies to the ntp objective only (distill already keeps the teacher's top k)")
        if self.b_lr_ratio <= 0:
            raise LoramemError(f"b_lr_ratio must be positive, got {self.b_lr_ratio}")
        if self.precision not in PRECISIONS:
            raise LoramemError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.objective not in OBJECTIVES:
            raise LoramemError(f"objective must be {' or '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.distill_top_k < 1 or self.distill_temperature <= 0:
            raise LoramemError("distill_top_k must be at least 1 and distill_temperature positive")
        if not all(x.strip().isdigit() for x in self.distill_layers.split(",")) and self.distill_layers:
            raise LoramemError(f"distill_layers must be layer numbers like 3,7, got {self.distill_layers!r}")

    def to_dict(self) -> dict:
        spec = asdict(self)
        for key, default in (("candidates", 0), ("decay_epochs", None), ("lr_floor", 0.0)):
            if spec[key] == default:  # settings added later keep the ids of modules written before them
                spec.pop(key)
        if self.objective == "ntp":  # settings that cannot change an ntp module stay out of its id
            for key in ("objective", "distill_top_k", "distill_temperature", "distill_layers", "distill_hidden_weight"):
                spec.pop(key)
        return spec


def cache_dir() -> Path:
    """Where converted base models live (LORAMEM_CACHE, default ~/.cache/loramem)."""
    return Path(os.environ.get("LORAMEM_CACHE", Path.home() / ".cache" / "loramem")).expanduser()


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The benchmark data directory (--data-dir or LORAMEM_DATA), or None when unset."""
    value = explicit or os.environ.get("LORAMEM_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise LoramemError(f"data directory {path} does not exist")
    return path
