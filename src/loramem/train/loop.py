"""The training loop: examples in, the LoRA parameters of a PEFT-wrapped model trained in place.

An epoch trains on shuffled packed batches under the spec's objective (next-token, or distillation towards a
teacher that reads the documents). The candidate softmax (TrainSpec.candidates, opt-in) normalises the loss over
the examples' own label tokens plus the base model's top-k tokens at each supervised position instead of the whole
vocabulary. Between epochs a StopRule decides from the training pass's free recall count when an exact check
(score.exact_check, over the whole vocabulary) is worth running, and training stops when that check meets the
target recall or the step budget is spent; any token the check finds beating an answer joins the candidates.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from loramem.config import TrainSpec
from loramem.errors import LoramemError
from loramem.examples import Example
from loramem.precision import autocast, use_bf16
from loramem.train.distill import distill_layers, distill_loss, teacher_targets
from loramem.train.forward import (cache_frozen_layers, causal_lm, first_trainable_layer, supervised_logits,
                                   supervised_outputs, trainable_layers)
from loramem.train.pack import Batch, Encoded, encode, pack
from loramem.train.score import examples_recalled, exact_check, recall

log = logging.getLogger("loramem.train")


@dataclass
class TrainStats:
    steps: int
    epochs: int
    seconds: float
    tokens: int  # tokens run through the model (forward + backward)
    supervised_tokens: int
    tokens_per_second: float
    supervised_tokens_per_second: float
    final_loss: float
    recall: float  # share of examples reproduced exactly under greedy decoding (teacher forced)
    trainable_params: int
    precision: str
    softmax_tokens: int | None = None  # size of the candidate softmax at the end (None: the whole vocabulary)

    def to_dict(self) -> dict:
        return asdict(self)


def _loss(model, batch: Batch, examples: list[Encoded], spec: TrainSpec, vocab: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits at the labelled positions) of one batch under the spec's objective; with `vocab` (sorted
    token ids holding every label) the next-token loss normalises over those tokens only."""
    if spec.objective == "ntp":
        logits = supervised_logits(model, batch, vocab)
        labels = batch.labels if vocab is None else torch.searchsorted(vocab, batch.labels)
        return F.cross_entropy(logits.float(), labels.to(logits.device)), logits
    logits, hidden = supervised_outputs(model, batch, distill_layers(spec))
    # pack lays labels out example by example in the order given, so the targets concatenate the same way
    device = logits.device
    index = torch.cat([e.teacher.index for e in examples]).to(device)
    logp = torch.cat([e.teacher.logp for e in examples]).to(device)
    teacher_hidden = torch.cat([e.teacher.hidden for e in examples]).to(device) if hidden is not None else None
    return distill_loss(logits, index, logp, spec.distill_temperature, hidden, teacher_hidden,
                        spec.distill_hidden_weight), logits


@torch.no_grad()
def candidate_vocab(model, tokenizer, encoded: list[Encoded], top_k: int, loss_on: str = "answer",
                    batch_size: int = 64) -> torch.Tensor:
    """Sorted token ids of a candidate softmax: every label token of the examples, plus the model's top_k
    tokens at each supervised position (the rivals an answer starts against)."""
    was_training = model.training
    model.eval()
    found = []
    for start in range(0, len(encoded), batch_size):
        batch = pack(encoded[start : start + batch_size], loss_on, pad_id=tokenizer.pad_token_id)
        found += [batch.labels, supervised_logits(model, batch).topk(top_k, -1).indices.flatten().cpu()]
    model.train(was_training)
    return torch.unique(torch.cat(found))


def _schedule(spec: TrainSpec, total_steps: int, steps_per_epoch: int):
    horizon = total_steps if spec.decay_epochs is None else min(total_steps, spec.decay_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = min(1.0, (step - spec.warmup_steps) / max(1, horizon - spec.warmup_steps))
        if spec.schedule == "linear":
            return spec.lr_floor + (1.0 - spec.lr_floor) * (1.0 - progress)
        if spec.schedule == "cosine":
            return spec.lr_floor + (1.0 - spec.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


@dataclass
class StopRule:
    """When to run the exact check, and when its result stops training.

    The training pass saw each batch before its update, so it lags the weights by about an epoch: check exactly once
    it reaches the target or, extrapolated one epoch, would. With candidates, the first epoch that recalls half the
    target checks too: rivals found then still get trained against.
    """

    target: float | None  # TrainSpec.target_recall; None trains for the whole step budget
    candidates: bool  # a candidate softmax is in use
    last_share: float = 0.0  # the training pass's recall in the previous epoch
    scouted: bool = False  # the candidates' check at half the target has run

    def wants_check(self, share: float) -> bool:
        """After an epoch whose training pass recalled `share` of the examples: run the exact check now?"""
        ahead, self.last_share = max(share, 2 * share - self.last_share), share
        scout = self.candidates and not self.scouted and share >= (self.target or 1.0) / 2
        self.scouted = self.scouted or scout
        return scout or (self.target is not None and ahead >= self.target)

    def reached(self, measured: float) -> bool:
        """The exact check's recall meets the target."""
        return self.target is not None and measured >= self.target


class _Run:
    """One training run's state: optimizer and schedule, counters, the candidate vocabulary and the last exact check.
    train() drives it an epoch at a time until `should_stop`."""

    def __init__(self, model, tokenizer, encoded: list[Encoded], spec: TrainSpec, bf16: bool,
                 vocab: torch.Tensor | None):
        self.model, self.tokenizer, self.encoded, self.spec, self.bf16 = model, tokenizer, encoded, spec, bf16
        self.device = causal_lm(model).device
        self.vocab = vocab  # sorted token ids of the candidate softmax; None: the whole vocabulary
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW([
            {"params": [p for n, p in named if "lora_B" not in n], "lr": spec.lr},
            {"params": [p for n, p in named if "lora_B" in n], "lr": spec.lr * spec.b_lr_ratio},
        ], weight_decay=spec.weight_decay)
        steps_per_epoch = math.ceil(len(encoded) / spec.batch_size)
        self.total_steps = min(spec.max_steps or 10**12, spec.epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _schedule(spec, self.total_steps, steps_per_epoch))
        self.rule = StopRule(spec.target_recall, vocab is not None)
        self.step = self.epochs = self.tokens = self.supervised = 0
        self.loss = float("nan")
        self.measured, self.measured_at = 0.0, -1  # the last exact check's recall, and the step whose weights it saw
        self.start = time.perf_counter()

    def train_epoch(self, epoch: int, shuffled: list[Encoded], bar) -> int:
        """One pass over the examples in this order (cut short at the step budget); returns how many of them the
        training pass recalled."""
        recalled, losses = 0, []
        for first in range(0, len(shuffled), self.spec.batch_size):
            recalled += self._train_step(shuffled[first : first + self.spec.batch_size])
            losses.append(self.loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{self.loss:.3f}",
                            tok_s=f"{self.tokens / (time.perf_counter() - self.start):.0f}")
            if self.step >= self.total_steps:
                break
        self.epochs = epoch
        log.info("epoch %d: mean loss %.4f, recalled in the training pass %d/%d, %.1f s",
                 epoch, sum(losses) / len(losses), recalled, len(self.encoded), time.perf_counter() - self.start)
        return recalled

    def _train_step(self, chunk: list[Encoded]) -> int:
        """One optimizer step on a batch; returns how many of its examples the training pass recalled."""
        batch = pack(chunk, self.spec.loss_on, pad_id=self.tokenizer.pad_token_id)
        with autocast(self.bf16, self.device):
            loss, logits = _loss(self.model, batch, chunk, self.spec, self.vocab)
        loss.backward()
        if self.spec.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += batch.n_tokens
        self.supervised += len(batch.labels)
        self.loss = loss.item()
        return int(examples_recalled(logits.detach(), batch, self.vocab).sum())

    def should_stop(self, epoch: int, recalled: int) -> bool:
        """After an epoch: stop when an exact check (run when the rule asks for one) meets the target, or when the
        step budget is spent."""
        if self.rule.wants_check(recalled / len(self.encoded)) and self._exact_check(epoch):
            return True
        return self.step >= self.total_steps

    def _exact_check(self, epoch: int) -> bool:
        """Measure recall exactly; True when it meets the target. Tokens outside the candidates that beat an answer
        are trained against from now on."""
        clock = time.perf_counter()
        recalled, intruders = exact_check(self.model, self.tokenizer, self.encoded, precision=self.spec.precision)
        self.measured, self.measured_at = int(recalled.sum()) / len(self.encoded), self.step
        log.info("exact check after epoch %d: %d/%d recalled, in %.1f s", epoch, int(recalled.sum()), len(self.encoded),
                 time.perf_counter() - clock)
        if self.rule.reached(self.measured):
            return True
        if self.vocab is not None:
            grown = torch.unique(torch.cat([self.vocab, torch.tensor(sorted(intruders), dtype=self.vocab.dtype)]))
            log.info("the check found %d token(s) beating answers, %d of them new: candidates now %d",
                     len(intruders), len(grown) - len(self.vocab), len(grown))
            self.vocab = grown
        return False

    def stats(self) -> TrainStats:
        """The run's statistics, recall measured again when the weights changed since the last exact check."""
        if self.measured_at != self.step:
            self.measured = recall(self.model, self.tokenizer, self.encoded, precision=self.spec.precision)
        seconds = time.perf_counter() - self.start
        return TrainStats(
            steps=self.step, epochs=self.epochs, seconds=seconds, tokens=self.tokens, supervised_tokens=self.supervised,
            tokens_per_second=self.tokens / seconds, supervised_tokens_per_second=self.supervised / seconds,
            final_loss=self.loss, recall=self.measured, trainable_params=sum(p.numel() for p in self.params),
            precision="bf16" if self.bf16 else "fp32",
            softmax_tokens=len(self.vocab) if self.vocab is not None else None,
        )


def train(model, tokenizer, examples: list[Example], spec: TrainSpec, progress: bool = True,
          context: str | None = None, teacher_prompts: list[str | None] | None = None) -> TrainStats:
    """Train the LoRA parameters of a PEFT-wrapped model on examples, in place.

    With spec.objective "distill", `context` (the module's documents) is what the teacher reads (see
    distill.teacher_targets for `teacher_prompts`).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise LoramemError("no training examples")
    spec = spec.with_lr_for(trainable_layers(model))  # Memory.write resolves it first (module ids hash it)
    encoded = encode(tokenizer, examples)
    bf16 = use_bf16(spec.precision, model)
    if spec.objective == "distill":
        if not context:
            raise LoramemError("the distill objective needs the documents the module is written from")
        teacher_targets(model, tokenizer, encoded, context, spec, teacher_prompts=teacher_prompts)
    _cache_frozen(model, encoded, bf16)
    run = _Run(model, tokenizer, encoded, spec, bf16, _candidates(model, tokenizer, encoded, spec, bf16))
    rng, order = random.Random(spec.seed), list(range(len(encoded)))
    model.train()
    # No bar when stderr is not a terminal (logs, CI): tqdm would write a line per update there.
    with tqdm(total=run.total_steps, disable=not progress or not sys.stderr.isatty(), desc="train", unit="step",
              leave=False, mininterval=0.5) as bar:
        for epoch in range(1, spec.epochs + 1):
            rng.shuffle(order)
            recalled = run.train_epoch(epoch, [encoded[i] for i in order], bar)
            if run.should_stop(epoch, recalled):
                break
    stats = run.stats()
    model.eval()
    return stats


def _cache_frozen(model, encoded: list[Encoded], bf16: bool) -> None:
    """Keep the examples' hidden states at the first adapted layer: the layers before it never change."""
    frozen = first_trainable_layer(model)
    if frozen > 0:
        clock = time.perf_counter()
        cache_frozen_layers(model, encoded, frozen, bf16)
        log.info("cached the outputs of the frozen layers 0-%d in %.1f s", frozen - 1, time.perf_counter() - clock)


def _candidates(model, tokenizer, encoded: list[Encoded], spec: TrainSpec, bf16: bool) -> torch.Tensor | None:
    """The candidate softmax's token ids when the spec asks for one, else None (the whole vocabulary)."""
    if not spec.candidates:
        return None
    clock = time.perf_counter()
    with autocast(bf16, causal_lm(model).device):
        vocab = candidate_vocab(model, tokenizer, encoded, spec.candidates, spec.loss_on)
    log.info("candidate softmax over %d tokens, found in %.1f s", len(vocab), time.perf_counter() - clock)
    return vocab
