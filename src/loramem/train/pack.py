"""Packing: a batch's examples laid end to end in a few rows, with position ids restarting per example and a
block-diagonal causal mask, so there is no padding waste and no attention across examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loramem.errors import LoramemError
from loramem.examples import Example

if TYPE_CHECKING:
    from loramem.train.distill import Teacher


@dataclass
class Encoded:
    """One example as token ids (prompt, answer, EOS), with what is cached for it before training."""

    ids: list[int]
    n_prompt: int  # tokens before the answer
    n_answer: int  # answer tokens, not counting the closing EOS
    hidden: torch.Tensor | None = None  # (len(ids), H) input of decoder layer `hidden_layer`, when cached
    hidden_layer: int = 0
    teacher: Teacher | None = None  # distillation targets at this example's labelled positions


def encode(tokenizer, examples: list[Example], max_tokens: int = 4096) -> list[Encoded]:
    """Prompt and answer tokenized separately, exactly as generation sees them; EOS closes the answer."""
    out = []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt).input_ids if ex.prompt else []
        answer_ids = tokenizer(ex.answer, add_special_tokens=False).input_ids
        if not answer_ids:
            raise LoramemError(f"empty answer in training example {ex.prompt[:60]!r}")
        ids = (prompt_ids + answer_ids + [tokenizer.eos_token_id])[:max_tokens]
        out.append(Encoded(ids, len(prompt_ids), min(len(answer_ids), len(ids) - len(prompt_ids))))
    return out


@dataclass
class Batch:
    """Examples packed into rows: what the model reads, and where each label sits."""

    input_ids: torch.Tensor  # (rows, T)
    position_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor  # (rows, 1, T, T) bool, block-diagonal causal
    label_index: torch.Tensor  # (K,) flat positions in rows*T whose next token is a label
    labels: torch.Tensor  # (K,)
    label_example: torch.Tensor  # (K,) which example of the batch each label belongs to
    label_is_answer: torch.Tensor  # (K,) True for answer tokens (Scored reads these)
    label_is_recalled: torch.Tensor  # (K,) the answer tokens and the EOS that closes the answer (counted in recall)
    n_examples: int
    n_tokens: int
    spans: list[tuple[int, int, int]]  # per example: (row, start, length) of its own tokens
    hidden: torch.Tensor | None = None  # (rows, T, H) cached input of decoder layer `start_layer`
    start_layer: int = 0


def shared_prefix(encoded: list[Encoded]) -> int:
    """Tokens every example of the batch starts with, stopping before the first answer token."""
    limit = min(e.n_prompt for e in encoded) - 1
    first = encoded[0].ids
    n = 0
    while n < limit and all(e.ids[n] == first[n] for e in encoded):
        n += 1
    return max(n, 0) if len(encoded) > 1 else 0


ROW_TOKENS = 256  # packed rows attend through a dense mask, whose cost grows with the square of the row


def pack(encoded: list[Encoded], loss_on: str = "answer", row_tokens: int = ROW_TOKENS, pad_id: int = 0) -> Batch:
    """Lay examples end to end in rows of at most max(row_tokens, longest example) tokens.

    With answer-only loss, a prompt prefix shared by all examples (a template such as "Question: What
    is the phone number of") is computed once per row and attended to by every example: the same
    numbers as separate sequences, at a fraction of the tokens.
    """
    prefix = shared_prefix(encoded) if loss_on == "answer" else 0
    head = encoded[0].ids[:prefix]
    capacity = max(row_tokens, max(len(e.ids) for e in encoded))
    rows: list[list[int]] = [[]]
    used = prefix
    for i, e in enumerate(encoded):
        if rows[-1] and used + len(e.ids) - prefix > capacity:
            rows.append([])
            used = prefix
        rows[-1].append(i)
        used += len(e.ids) - prefix
    width = max(prefix + sum(len(encoded[j].ids) - prefix for j in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    # segment: -2 shared prefix, -1 padding, i >= 0 example i
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    cached = encoded[0].hidden is not None
    hidden = torch.zeros((len(rows), width, encoded[0].hidden.shape[-1]), dtype=encoded[0].hidden.dtype) if cached else None
    label_index, labels, label_example, label_is_answer, recalled = [], [], [], [], []
    spans = [None] * len(encoded)
    for r, row in enumerate(rows):
        ids[r, :prefix] = torch.tensor(head, dtype=torch.long)
        if cached:
            hidden[r, :prefix] = encoded[row[0]].hidden[:prefix]
        pos[r, :prefix] = torch.arange(prefix)
        segment[r, :prefix] = -2
        offset = prefix
        for i in row:
            e = encoded[i]
            n = len(e.ids) - prefix
            ids[r, offset : offset + n] = torch.tensor(e.ids[prefix:])
            pos[r, offset : offset + n] = torch.arange(prefix, prefix + n)
            segment[r, offset : offset + n] = i
            spans[i] = (r, offset, n)
            if cached:
                hidden[r, offset : offset + n] = e.hidden[prefix:]
            first = e.n_prompt if loss_on == "answer" else 1
            for j in range(max(first, 1), len(e.ids)):  # j indexes e.ids; its input sits at j - 1
                label_index.append(r * width + offset + j - 1 - prefix)
                labels.append(e.ids[j])
                label_example.append(i)
                label_is_answer.append(e.n_prompt <= j < e.n_prompt + e.n_answer)
                recalled.append(e.n_prompt <= j <= e.n_prompt + e.n_answer)  # the EOS too: an answer must stop
            offset += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    visible = ((q == k) & (q != -1)) | ((k == -2) & (q >= 0))
    # Padding attends to itself only, so softmax never sees an all-masked row.
    mask = ((visible & causal) | torch.eye(width, dtype=torch.bool))[:, None]
    return Batch(
        ids, pos, mask,
        torch.tensor(label_index, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
        torch.tensor(label_example, dtype=torch.long), torch.tensor(label_is_answer, dtype=torch.bool),
        torch.tensor(recalled, dtype=torch.bool),
        len(encoded), int((segment != -1).sum()), spans, hidden, encoded[0].hidden_layer if cached else 0,
    )
