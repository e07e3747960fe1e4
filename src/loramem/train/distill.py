"""Distillation targets: what the base model predicts with the module's documents in its prompt, computed once
before training and kept sparse (top-k tokens and one bucket for the rest), and the loss that pulls the student
(the module, without the documents) towards it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loramem.config import TrainSpec
from loramem.precision import autocast, use_bf16
from loramem.prompts import after_context
from loramem.train.forward import causal_lm, supervised_outputs
from loramem.train.pack import Encoded, pack


@dataclass
class Teacher:
    """The teacher's next-token distribution at each labelled position, kept sparse: its top-k tokens and
    log-probabilities, plus one bucket for the probability of every other token."""

    index: torch.Tensor  # (labels, k) token ids
    logp: torch.Tensor  # (labels, k + 1) log-probabilities of those tokens, then of the rest
    hidden: torch.Tensor | None = None  # (labels, layers, H) outputs of TrainSpec.distill_layers, when matched


def distill_layers(spec: TrainSpec) -> tuple[int, ...]:
    return tuple(int(x) for x in spec.distill_layers.split(",") if x.strip()) if spec.distill_layers else ()


def sparse_logp(logits: torch.Tensor, index: torch.Tensor | None, k: int, temperature: float):
    """Log-probabilities (at `temperature`) of the tokens in `index` (default: the top k), then of all others."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    if index is None:
        index = logp.topk(k, dim=-1).indices
    top = logp.gather(-1, index)
    rest = torch.log((1 - top.exp().sum(-1, keepdim=True)).clamp_min(1e-12))
    return index, torch.cat([top, rest], dim=-1)


def distill_loss(student_logits: torch.Tensor, index: torch.Tensor, teacher_logp: torch.Tensor,
                 temperature: float = 1.0, student_hidden: torch.Tensor | None = None,
                 teacher_hidden: torch.Tensor | None = None, hidden_weight: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens and one bucket for the rest, per position
    (mean), scaled by T^2 as usual; plus, with hidden states, `hidden_weight` times their normalised L1
    distance |h_s - h_t|_1 / |h_t|_1 (mean over positions and layers). Zero exactly when the student's
    outputs equal the teacher's."""
    student_logp = sparse_logp(student_logits, index, 0, temperature)[1]
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    loss = kl.mean() * temperature**2
    if teacher_hidden is not None:
        distance = (student_hidden.float() - teacher_hidden).abs().sum(-1) / teacher_hidden.abs().sum(-1).clamp_min(1e-6)
        loss = loss + hidden_weight * distance.mean()
    return loss


@torch.no_grad()
def teacher_targets(model, tokenizer, encoded: list[Encoded], context: str, spec: TrainSpec,
                    max_labels: int = 2048, teacher_prompts: list[str | None] | None = None) -> None:
    """Compute once, before training, what the base model with `context` in its prompt predicts at each of the
    examples' labelled positions (the adapter disabled), and keep it on the examples.

    The teacher reads the context followed by exactly the student's tokens, so its positions line up with the
    student's. Packing puts the context in each row once as a shared prefix that every example attends to;
    examples go in groups of at most `max_labels` labels, which bounds the vocabulary-wide logits in memory.
    `teacher_prompts[i]`, when given (and loss_on is "answer"), is instead the whole prompt the teacher reads before
    example i's answer tokens: with a chat template the documents belong inside the user turn, as ICL asks, and the
    teacher that reads them there predicts its own answers far better (measured: mean log-probability -0.70 per
    token against -1.27 with the documents before the template, PaperQA paper 0).
    """
    bos = tokenizer("").input_ids  # the examples start with it when the tokenizer adds one
    window = getattr(causal_lm(model).config, "max_position_embeddings", 1 << 30)
    budget = max(0, window - max(len(e.ids) for e in encoded) - 1)
    context_ids = tokenizer(after_context(context, ""), add_special_tokens=False).input_ids[:budget]
    device = causal_lm(model).device

    def teacher_view(e: Encoded) -> Encoded:
        own = own_prompts.get(id(e))
        if own is not None:
            return Encoded(own + e.ids[e.n_prompt:], len(own), e.n_answer)
        lead = bos if e.ids[: len(bos)] == bos else []
        first = max(e.n_prompt if spec.loss_on == "answer" else 1, 1)  # the student's first labelled token
        return Encoded(lead + context_ids + e.ids[len(lead):], len(context_ids) + first, e.n_answer)

    own_prompts = {}  # id(encoded) -> the teacher's own prompt ids, where one is given and fits the window
    for e, text in zip(encoded, teacher_prompts or []):
        ids = tokenizer(text).input_ids if text and spec.loss_on == "answer" else None
        if ids is not None and len(ids) + len(e.ids) - e.n_prompt <= window:
            own_prompts[id(e)] = ids
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with disabled, autocast(use_bf16(spec.precision, model), device):
        for group in _label_groups(encoded, max_labels):
            batch = pack([teacher_view(e) for e in group], "answer", pad_id=tokenizer.pad_token_id)
            logits, hidden = supervised_outputs(model, batch, distill_layers(spec))
            for i, e in enumerate(group):
                mine = batch.label_example == i
                index, logp = sparse_logp(logits[mine], None, spec.distill_top_k, spec.distill_temperature)
                e.teacher = Teacher(index.cpu(), logp.cpu(), hidden[mine].float().cpu() if hidden is not None else None)


def _label_groups(encoded: list[Encoded], max_labels: int):
    group, labels = [], 0
    for e in encoded:
        if group and labels + len(e.ids) > max_labels:
            yield group
            group, labels = [], 0
        group.append(e)
        labels += len(e.ids)
    if group:
        yield group
