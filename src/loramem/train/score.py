"""Teacher-forced scoring: whether greedy decoding reproduces each answer, read from one packed forward pass.

Training uses it to know when to stop (free from the training pass's own logits, then confirmed by a no-grad
check over the whole vocabulary); the ask path uses it to score answers (`teacher_forced`, Memory.score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramem.examples import Example
from loramem.precision import autocast, use_bf16
from loramem.train.forward import causal_lm, supervised_logits
from loramem.train.pack import Batch, Encoded, encode, pack


def answer_mistakes(logits: torch.Tensor, batch: Batch, vocab: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy's pick at each labelled position, ties counted against the label (strict_argmax), mask of the
    answer positions, and the EOS closing each answer, where it is not the label); `vocab` maps picks back to token
    ids when the logits cover only those. The EOS counts: in bf16 on a CPU with AMX a module whose digits were all
    exact went on past its answer ("509-670-44109") when its EOS was left to win a near tie."""
    labels = batch.labels if vocab is None else torch.searchsorted(vocab, batch.labels)
    predicted = strict_argmax(logits, labels).cpu()
    predicted = predicted if vocab is None else vocab[predicted]
    return predicted, (predicted != batch.labels) & batch.label_is_recalled


# In bf16 a label must lead by this share of its logit's size (about 3 bf16 steps) to count as recalled: the
# packed check and generation with a KV cache round differently, and a smaller lead flipped between them.
BF16_MARGIN = 2.0 ** -6


def strict_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The argmax at each position, except where another token ties the label (in bf16: comes within
    BF16_MARGIN of it): then that token. A tie is not a recall: greedy decoding breaks it differently on another
    path."""
    labels = labels.to(logits.device)
    predicted = logits.argmax(-1)
    label_logit = logits.gather(-1, labels[:, None])
    if logits.dtype == torch.bfloat16:
        label_logit = label_logit - BF16_MARGIN * label_logit.abs().clamp(min=1.0)
    tied = (logits >= label_logit).sum(-1) > 1
    fix = tied & (predicted == labels)
    if fix.any():
        rivals = logits[fix].scatter(-1, labels[fix][:, None], float("-inf"))
        predicted[fix] = rivals.argmax(-1)
    return predicted


def examples_recalled(logits: torch.Tensor, batch: Batch, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """(n_examples,) bool: every answer token is the argmax, i.e. greedy decoding reproduces it (within the
    token ids `vocab` when the logits cover only those)."""
    return _without_mistakes(answer_mistakes(logits, batch, vocab)[1], batch)


def _without_mistakes(wrong: torch.Tensor, batch: Batch) -> torch.Tensor:
    per_example = torch.zeros(batch.n_examples, dtype=torch.long).index_add_(0, batch.label_example, wrong.long())
    return per_example == 0


@torch.no_grad()
def exact_check(model, tokenizer, encoded: list[Encoded], batch_size: int = 64, precision: str = "auto"
                ) -> tuple[torch.Tensor, set[int]]:
    """Which examples greedy decoding reproduces exactly ((n,) bool, checked teacher-forced over the whole
    vocabulary), and the tokens that win where an answer token should."""
    was_training = model.training
    model.eval()
    device = causal_lm(model).device
    recalled, intruders = [], set()
    with autocast(use_bf16(precision, model), device):
        for start in range(0, len(encoded), batch_size):
            batch = pack(encoded[start : start + batch_size], "answer", pad_id=tokenizer.pad_token_id)
            logits = supervised_logits(model, batch)
            predicted, wrong = answer_mistakes(logits, batch)
            recalled.append(_without_mistakes(wrong, batch))
            intruders.update(predicted[wrong].tolist())
    model.train(was_training)
    return torch.cat(recalled) if recalled else torch.zeros(0, dtype=torch.bool), intruders


def recall(model, tokenizer, encoded: list[Encoded], batch_size: int = 64, precision: str = "auto") -> float:
    """Share of examples whose answer greedy decoding reproduces exactly (checked teacher-forced)."""
    return int(exact_check(model, tokenizer, encoded, batch_size, precision)[0].sum()) / max(1, len(encoded))


@dataclass
class Scored:
    """One continuation read teacher-forced: per answer token, its log-probability and the model's argmax."""

    logp: torch.Tensor  # (n_answer,)
    argmax: torch.Tensor  # (n_answer,) greedy's pick, a tie with the target counted as another token (strict_argmax)
    target: torch.Tensor  # (n_answer,)
    rivals: torch.Tensor | None = None  # log-probabilities of other tokens at the first answer position, when asked

    @property
    def exact(self) -> bool:
        """Greedy decoding would produce the whole continuation."""
        return bool((self.argmax == self.target).all())


@torch.no_grad()
def teacher_forced(model, tokenizer, examples: list[Example], batch_size: int = 64,
                   rivals: list[list[int]] | None = None, precision: str = "auto") -> list[Scored]:
    """Each example's answer scored token by token after its prompt (EOS not counted), in packed batches; with
    `rivals`, also the log-probabilities of those token ids where the answer's first token stands (one pass
    compares the answer with its alternatives)."""
    encoded = encode(tokenizer, examples)
    device = causal_lm(model).device
    out = []
    with autocast(use_bf16(precision, model), device):
        for start in range(0, len(encoded), batch_size):
            batch = pack(encoded[start : start + batch_size], "answer", pad_id=tokenizer.pad_token_id)
            logits = supervised_logits(model, batch)
            picks = strict_argmax(logits, batch.labels).cpu()
            logp = torch.log_softmax(logits.float(), -1).cpu()
            picked = logp.gather(1, batch.labels[:, None])[:, 0]
            for i in range(batch.n_examples):
                rows = (batch.label_example == i) & batch.label_is_answer
                first = logp[rows][0]
                rival = first[rivals[start + i]] if rivals is not None else None
                out.append(Scored(picked[rows], picks[rows], batch.labels[rows], rival))
    return out
