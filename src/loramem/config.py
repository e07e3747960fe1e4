"""Typed settings, one documented dataclass per concept (the shape of PEFT's LoraConfig)."""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

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


# --- settings: every field is declared once, with its help text; the CLI's options and the server's request
# models are built from these declarations (cli/options.py, serve.py), so a new field appears everywhere at once.

def setting(default: Any, help: str, **options: Any) -> Any:
    """A documented settings field. `options` (read by settings_fields' users): `cli=False` keeps it off the
    command line and requests (a run-level or structured setting); `zero_is_none=True`: 0 given there means None;
    `group="variants"`: boolean fields sharing a group are one comma-separated option; `ge`/`gt`/`lt`: a request's
    bounds."""
    return field(default=default, metadata={"help": help, **options})


@dataclass(frozen=True)
class SettingField:
    """One settings field as the CLI and the server see it."""

    name: str
    type: Any
    default: Any
    help: str
    options: dict


def settings_fields(cls) -> list[SettingField]:
    """The documented fields of a settings dataclass, types resolved, in declaration order."""
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        options = {k: v for k, v in f.metadata.items() if k != "help"}
        out.append(SettingField(f.name, hints[f.name], default, f.metadata["help"], options))
    return out


def option_fields(classes, exclude=()) -> tuple[list[SettingField], dict[str, list[SettingField]]]:
    """What the CLI and the server offer of these settings: each field once (a name shared by two settings, like
    seed, is one option that sets both), none marked cli=False or in `exclude`, and the flags of a group apart
    (one comma-separated option each)."""
    plain: dict[str, SettingField] = {}
    groups: dict[str, list[SettingField]] = {}
    for cls in classes:
        for f in settings_fields(cls):
            if f.options.get("cli", True) is False or f.name in plain or f.name in exclude:
                continue
            if f.options.get("group"):
                groups.setdefault(f.options["group"], []).append(f)
            else:
                plain[f.name] = f
    return list(plain.values()), groups


def group_help(members: list[SettingField]) -> str:
    return "comma-separated: " + ", ".join(f"{m.name} ({m.help})" for m in members)


def build_settings(cls, values: dict):
    """An instance of `cls` from option values keyed by field name (groups and zero_is_none applied; keys of other
    settings ignored)."""
    chosen: dict[str, Any] = {}
    groups: dict[str, list[SettingField]] = {}
    for f in settings_fields(cls):
        group = f.options.get("group")
        if group:
            groups.setdefault(group, []).append(f)
        elif f.name in values:
            value = values[f.name]
            chosen[f.name] = None if f.options.get("zero_is_none") and value == 0 else value
    for group, members in groups.items():
        if group in values:
            chosen |= _group_flags(group, values[group], [m.name for m in members])
    return cls(**chosen)


def _group_flags(group: str, text: str | None, names: list[str]) -> dict[str, bool]:
    picked = {v.strip() for v in (text or "").split(",") if v.strip()}
    if picked - set(names):
        raise LoramemError(f"unknown LoRA {group[:-1]}(s) {', '.join(sorted(picked))}: choose from {', '.join(names)}")
    return {name: name in picked for name in names}

@dataclass
class LoraSpec:
    """What one memory module looks like: the rank, the scaling, the weights it adapts and the PEFT variant."""

    rank: int = setting(4, "LoRA rank r (> 0)")
    alpha: float | None = setting(None, "LoRA alpha: the update is (alpha / r) B A, alpha / sqrt(r) with rslora "
                                  "(default 2 x rank)")
    dropout: float = setting(0.0, "dropout on the LoRA input during training")
    targets: str = setting("all", "attention, ffn, all, or module names (q_proj,down_proj)")
    layers: str = setting("auto", "auto (the last layers, as many as the data needs: capacity.auto_layers, resolved "
                          "when a module is written), all, early (first third), late (last third), firstN, lastN, "
                          "a-b (inclusive) or a list 0,3,5")
    rslora: bool = setting(False, "rank-stabilised scaling", group="variants")
    dora: bool = setting(False, "weight decomposition", group="variants")
    pissa: bool = setting(False, "principal-singular-vector initialisation", group="variants")

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


DEFAULT_LR, DEFAULT_LR_MANY_LAYERS, DEFAULT_LR_LAYERS = 1e-2, 5e-3, 4  # TrainSpec.lr None: see its docstring


@dataclass
class TrainSpec:
    """How one module is trained.

    The defaults are the fastest recipe measured that stores every benchmark's facts exactly (docs/BENCHMARKS.md,
    "Defaults"): a high rate on few late layers (LoraSpec.layers "auto"), decayed to a floor and held there, over a
    candidate softmax, stopping at exact recall. Measurements behind them:

    - lr: memorising facts wants a far higher rate than the paper's 5e-5; 1e-2 stores PhoneBook 1K-4K and CounterFact
      1K-4K on the 1-4 late layers "auto" gives them, but on 7 layers (PhoneBook 8K) it stalled at 0% for 60 epochs
      where 5e-3 stored all 387 numbers in 30: a module adapting more layers moves the output further per step. So
      the default (lr None) is 1e-2 up to 4 adapted layers and 5e-3 above (`with_lr_for`).
    - schedule: decaying (to zero, or to lr_floor) is what turns "almost memorised" into exact recall (constant 5e-3
      plateaus at 94% after 25 epochs of PhoneBook 1K; linear decay from 5e-3 reaches 100% at epoch 15).
    - lr_floor: on PhoneBook 1K, decaying to 0 over 10 epochs reached 100% for one shuffling seed of three; to 0.1
      over 10, then holding, for all five tried, in 10-16 epochs.
    - candidates: on SmolLM2-135M with PhoneBook answers (benchmarks/speed.py) a step takes 0.45x the time with FFN
      modules of the last 4 layers, 0.63x with all projections of the last 8, 0.94x on all 30 layers, where the
      49K-word softmax is a small part.
    """

    lr: float | None = setting(None, "peak learning rate (AdamW); default 1e-2 on up to 4 adapted layers, 5e-3 on "
                               "more")
    schedule: str = setting("linear", "constant, linear or cosine decay after the warmup steps")
    warmup_steps: int = setting(0, "optimizer steps of linear warmup")
    epochs: int = setting(60, "upper bound on passes over the examples (training stops at the target recall); with a "
                          "decaying schedule also its horizon, unless --decay-epochs")
    decay_epochs: int | None = setting(30, "epochs the learning rate decays over (None: all); later epochs hold it at "
                                       "the floor")
    lr_floor: float = setting(0.1, "the decay ends at this fraction of lr and holds there until the target recall or "
                              "the last epoch (0: decay to zero)")
    max_steps: int | None = setting(None, "hard cap on optimizer steps (overrides epochs when reached first)")
    batch_size: int = setting(8, "examples per optimizer step")
    seed: int = setting(0, "seeds shuffling and LoRA initialisation (and the synthetic data's sampling)")
    loss_on: str = setting("answer", "answer (only the completion is supervised) or all (the whole text)")
    target_recall: float | None = setting(1.0, "stop once this share of the examples' answers is reproduced exactly "
                                          "(greedy, teacher-forced; 0 or None: train all epochs)", zero_is_none=True)
    precision: str = setting("auto", "auto (bf16 autocast where the hardware has bf16 matmul, else fp32), bf16 or "
                             "fp32", cli=False)  # a run-level option: --precision sets LORAMEM_PRECISION
    weight_decay: float = setting(0.0, "AdamW weight decay")
    clip_norm: float | None = setting(1.0, "clip the gradient norm to this (None: no clipping); keeps high learning "
                                      "rates stable")
    b_lr_ratio: float = setting(1.0, "learning rate of the B factors relative to A (LoRA+; 1: plain LoRA)")
    candidates: int | None = setting(None, "train on a softmax over the answers' tokens plus the base model's top K "
                                     "at each answer position (0: the whole vocabulary; default 32, 0 with objective "
                                     "distill); the stopping check stays exact over the whole vocabulary")
    objective: str = setting("ntp", "ntp (next-token loss on the examples, the paper's) or distill (context "
                             "distillation: match the base model that reads the module's documents in its prompt)")
    distill_top_k: int = setting(32, "distill: teacher tokens kept per position (the rest is one more bucket)")
    distill_temperature: float = setting(1.0, "distill: softening of both distributions")
    distill_layers: str = setting("", "distill: also match these decoder layers' outputs (3,7) by normalised L1 "
                                  "distance")
    distill_hidden_weight: float = setting(1.0, "distill: weight of the layer-output term")

    def __post_init__(self) -> None:
        if self.lr is not None and self.lr <= 0:
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

    def with_lr_for(self, layers: int) -> TrainSpec:
        """The spec with its default learning rate resolved for a module that adapts `layers` decoder layers."""
        if self.lr is not None:
            return self
        return replace(self, lr=DEFAULT_LR if layers <= DEFAULT_LR_LAYERS else DEFAULT_LR_MANY_LAYERS)

    def to_dict(self) -> dict:
        spec = asdict(self)
        for key, default in (("candidates", 0), ("decay_epochs", None), ("lr_floor", 0.0)):
            if spec[key] == default:  # settings added later keep the ids of modules written before them
                spec.pop(key)
        if self.objective == "ntp":  # settings that cannot change an ntp module stay out of its id
            for key in ("objective", "distill_top_k", "distill_temperature", "distill_layers", "distill_hidden_weight"):
                spec.pop(key)
        return spec


@dataclass(frozen=True)
class AskSpec:
    """How a question is answered: which weights and context (the mode), which modules (router, top-k, threshold),
    how they are combined (merge) and how long the answer may be. Which modules or context text to use for one
    call, and the oracle's gold modules, are arguments of Memory.ask, not settings."""

    mode: str = setting("lora", "base, icl, rag, lora, multi, or a module mode with context: lora+icl, lora+rag, "
                        "multi+icl, multi+rag")
    router: str = setting("dense", "dense, bm25 or hybrid (oracle: the gold modules given)")
    top_k: int | None = setting(None, "modules merged (multi) and passages retrieved (rag); default 3, or all modules "
                                "when fewer", ge=1)
    # select is the default: the only combination measured exact on the sector modules' facts (100% top 3, 97.1% with
    # the gold module third), where every weight merge stores 0% (docs/RESULTS.md, issue 22)
    merge: str = setting("select", "multi: an output composition (select: the answer its module is surest of; mix: "
                         "router-weighted mixture; select-token) or a weight merge (linear, cat, ties, dare_linear, "
                         "dare_ties, magnitude_prune)")
    # the base model's row lets a composed answer fall back on what the base model knows when no module holds the
    # answer (documents: modules that change answers a little, docs/RESULTS.md issue 22)
    base_weight: float = setting(0.0, "multi with an output composition: the base model answers as one more row with "
                                 "this share of the mixture weight (0: no base row)", ge=0.0, lt=1.0)
    # cosine scores sit close together (NarrativeQA's median top 3: 0.56, 0.33, 0.29), so their plain softmax gives
    # the top module about 0.39 even where it is right; over 0.1 a clear router decides and a close one still mixes.
    # 0.1 against 1 (docs/RESULTS.md, issue 22): PhoneBook dense mix 37% -> 100% (select 100% both), NarrativeQA
    # select 0.077 -> 0.081, PaperQA mix 0.205 -> 0.214
    router_temperature: float = setting(0.1, "multi with an output composition: the mixture weights are the softmax "
                                        "of the router scores divided by this (lower: the top module counts more)",
                                        gt=0.0)
    threshold: float | None = setting(None, "abstain (no module: the base weights answer) below this router score")
    max_new_tokens: int = setting(24, "longest answer in tokens (memory answers are short)", ge=1)
    batch_size: int = setting(16, "questions generated together", ge=1)

    def __post_init__(self) -> None:
        from loramem.answer import parse_mode
        from loramem.mix import COMPOSITIONS, check_combination

        parse_mode(self.mode)
        check_combination(self.merge)
        if not 0.0 <= self.base_weight < 1.0:
            raise LoramemError(f"base_weight must be at least 0 and below 1, not {self.base_weight}")
        if self.base_weight and self.merge not in COMPOSITIONS:
            raise LoramemError(f"base_weight is for output compositions ({', '.join(COMPOSITIONS)}), "
                               f"not the weight merge {self.merge!r}")
        if not self.router_temperature > 0.0:
            raise LoramemError(f"router_temperature must be above 0, not {self.router_temperature}")
        if self.router_temperature != AskSpec.router_temperature and self.merge not in COMPOSITIONS:
            raise LoramemError(f"router_temperature weighs output compositions ({', '.join(COMPOSITIONS)}), "
                               f"not the weight merge {self.merge!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise LoramemError("max_new_tokens and batch_size must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


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
