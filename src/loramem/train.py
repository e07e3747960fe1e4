"""Training one memory module: examples in, a trained LoRA adapter out.

The fast path, each trick checked against the plain path in tests/test_train.py:
- packing: a batch's examples are laid end to end in a few rows, with position ids restarting per
  example and a block-diagonal causal mask, so there is no padding waste and no attention across
  examples;
- supervised-only logits: the output projection (a 49K-word vocabulary is ~20% of a small model's
  FLOPs) runs only at positions that carry a label;
- candidate softmax (TrainSpec.candidates, opt-in): the loss normalises over the examples' own label tokens
  plus the base model's top-k tokens at each supervised position instead of the whole vocabulary; the
  check that stops training stays exact over the whole vocabulary, and any token it finds beating an
  answer joins the candidates;
- free recall checks: the training forward already has the argmax at every supervised position, so
  "would greedy decoding reproduce this answer?" is known for every example at no cost; a separate
  no-grad check confirms it before stopping early;
- bf16 autocast only where the hardware multiplies bf16 natively (on an AVX2 CPU without it, bf16
  matmuls are ~50x slower than fp32; measured in benchmarks/speed.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.precision import autocast, use_bf16

log = logging.getLogger("loramem.train")


@dataclass(frozen=True)
class Example:
    """One training fact: the prompt the question will be asked with, and the answer to store.

    With an empty prompt the answer is a plain text trained as given.
    """

    prompt: str
    answer: str


@dataclass
class Encoded:
    ids: list[int]
    n_prompt: int  # tokens before the answer
    n_answer: int  # answer tokens, not counting the closing EOS
    hidden: torch.Tensor | None = None  # (len(ids), H) input of decoder layer `hidden_layer`, when cached
    hidden_layer: int = 0
    teacher: Teacher | None = None  # distillation targets at this example's labelled positions


@dataclass
class Teacher:
    """The teacher's next-token distribution at each labelled position, kept sparse: its top-k tokens and
    log-probabilities, plus one bucket for the probability of every other token."""

    index: torch.Tensor  # (labels, k) token ids
    logp: torch.Tensor  # (labels, k + 1) log-probabilities of those tokens, then of the rest
    hidden: torch.Tensor | None = None  # (labels, layers, H) outputs of TrainSpec.distill_layers, when matched


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
    input_ids: torch.Tensor  # (rows, T)
    position_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor  # (rows, 1, T, T) bool, block-diagonal causal
    label_index: torch.Tensor  # (K,) flat positions in rows*T whose next token is a label
    labels: torch.Tensor  # (K,)
    label_example: torch.Tensor  # (K,) which example of the batch each label belongs to
    label_is_answer: torch.Tensor  # (K,) True for answer tokens (counted in recall; EOS is not)
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
    label_index, labels, label_example, label_is_answer, spans = [], [], [], [], [None] * len(encoded)
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
        len(encoded), int((segment != -1).sum()), spans, hidden, encoded[0].hidden_layer if cached else 0,
    )


def supervised_logits(model, batch: Batch, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Logits only at labelled positions: the decoder runs on every token, the vocabulary projection
    only where a loss is taken (and only onto the sorted token ids `vocab`, when given).
    With cached hidden states the decoder starts at `batch.start_layer`."""
    return supervised_outputs(model, batch, vocab=vocab)[0]


def supervised_outputs(model, batch: Batch, layers: tuple[int, ...] = (), vocab: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """supervised_logits, and the outputs of decoder `layers` at the same positions ((labels, len(layers), H))."""
    causal_lm = _causal_lm(model)
    device = causal_lm.device
    decoder = causal_lm.get_decoder()
    kw = dict(position_ids=batch.position_ids.to(device), attention_mask=batch.attention_mask.to(device),
              use_cache=False, output_hidden_states=bool(layers))
    if batch.hidden is None:
        out = decoder(input_ids=batch.input_ids.to(device), **kw)
    else:
        if layers and min(layers) < batch.start_layer:
            raise LoramemError(f"layer {min(layers)} comes before the module's first adapted layer "
                               f"({batch.start_layer}): the module cannot change it")
        with decoder_slice(decoder, batch.start_layer, None, final_norm=True):
            out = decoder(inputs_embeds=batch.hidden.to(device), **kw)
    index = batch.label_index.to(device)

    def at_labels(hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])[index]

    # hidden_states[i] is the input of the (sliced) decoder's layer i, so layer L's output sits at L - start + 1.
    picked = torch.stack([at_labels(out.hidden_states[layer - batch.start_layer + 1]) for layer in layers], 1) \
        if layers else None
    head, hidden = causal_lm.get_output_embeddings(), at_labels(out.last_hidden_state)
    if vocab is None:
        return head(hidden), picked
    vocab = vocab.to(device)
    return F.linear(hidden, head.weight[vocab], None if head.bias is None else head.bias[vocab]), picked


@contextmanager
def decoder_slice(decoder, start: int, stop: int | None, final_norm: bool):
    """Run only decoder layers [start:stop] (and the final norm or not), reusing the model's own forward."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def first_trainable_layer(model) -> int:
    """Index of the first decoder layer with a trainable parameter; 0 when something before the layers trains."""
    first = None
    for name, p in model.named_parameters():
        if p.requires_grad:
            match = re.search(r"\.layers\.(\d+)\.", name)
            if match is None:
                return 0
            first = int(match[1]) if first is None else min(first, int(match[1]))
    return first or 0


@torch.no_grad()
def cache_frozen_layers(model, encoded: list[Encoded], layer: int, bf16: bool, batch_size: int = 64,
                        row_tokens: int = ROW_TOKENS) -> None:
    """Store each example's hidden states at the input of `layer`.

    Layers before the first adapted one never change during training, so their output is computed once
    instead of every epoch: a module on late layers then trains at the cost of its own layers only.
    The examples' shared prompt prefix runs once per row.
    """
    decoder = _causal_lm(model).get_decoder()
    device = _causal_lm(model).device
    with decoder_slice(decoder, 0, layer, final_norm=False), autocast(bf16, device):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = pack(chunk, "answer", row_tokens=row_tokens)
            hidden = decoder(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                             attention_mask=batch.attention_mask.to(device), use_cache=False).last_hidden_state
            prefix = shared_prefix(chunk)  # the one pack laid at the head of every row
            for e, (row, offset, n) in zip(chunk, batch.spans):
                e.hidden = torch.cat([hidden[row, :prefix], hidden[row, offset : offset + n]]).float().cpu()
                e.hidden_layer = layer


def _causal_lm(model):
    """The transformers model under a PeftModel wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_mistakes(logits: torch.Tensor, batch: Batch, vocab: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy's pick at each labelled position, ties counted against the label (strict_argmax), mask of the
    answer positions where it is not the label); `vocab` maps picks back to token ids when the logits cover
    only those."""
    labels = batch.labels if vocab is None else torch.searchsorted(vocab, batch.labels)
    predicted = strict_argmax(logits, labels).cpu()
    predicted = predicted if vocab is None else vocab[predicted]
    return predicted, (predicted != batch.labels) & batch.label_is_answer


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


def distill_layers(spec: TrainSpec) -> tuple[int, ...]:
    return tuple(int(x) for x in spec.distill_layers.split(",") if x.strip()) if spec.distill_layers else ()


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
def exact_check(model, tokenizer, encoded: list[Encoded], batch_size: int = 64, precision: str = "auto"
                ) -> tuple[torch.Tensor, set[int]]:
    """Which examples greedy decoding reproduces exactly ((n,) bool, checked teacher-forced over the whole
    vocabulary), and the tokens that win where an answer token should."""
    was_training = model.training
    model.eval()
    device = _causal_lm(model).device
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
    device = _causal_lm(model).device
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
                    max_labels: int = 2048) -> None:
    """Compute once, before training, what the base model with `context` in its prompt predicts at each of the
    examples' labelled positions (the adapter disabled), and keep it on the examples.

    The teacher reads the context followed by exactly the student's tokens, so its positions line up with the
    student's. Packing puts the context in each row once as a shared prefix that every example attends to;
    examples go in groups of at most `max_labels` labels, which bounds the vocabulary-wide logits in memory.
    """
    bos = tokenizer("").input_ids  # the examples start with it when the tokenizer adds one
    window = getattr(_causal_lm(model).config, "max_position_embeddings", 1 << 30)
    budget = max(0, window - max(len(e.ids) for e in encoded) - 1)
    context_ids = tokenizer(context.strip() + "\n\n", add_special_tokens=False).input_ids[:budget]
    device = _causal_lm(model).device

    def teacher_view(e: Encoded) -> Encoded:
        lead = bos if e.ids[: len(bos)] == bos else []
        first = max(e.n_prompt if spec.loss_on == "answer" else 1, 1)  # the student's first labelled token
        return Encoded(lead + context_ids + e.ids[len(lead):], len(context_ids) + first, e.n_answer)

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


def train(model, tokenizer, examples: list[Example], spec: TrainSpec, progress: bool = True,
          context: str | None = None) -> TrainStats:
    """Train the LoRA parameters of a PEFT-wrapped model on examples, in place.

    With spec.objective "distill", `context` (the module's documents) is what the teacher reads.
    """
    from tqdm.auto import tqdm

    if not examples:
        raise LoramemError("no training examples")
    encoded = encode(tokenizer, examples)
    device = _causal_lm(model).device
    bf16 = use_bf16(spec.precision, model)
    if spec.objective == "distill":
        if not context:
            raise LoramemError("the distill objective needs the documents the module is written from")
        teacher_targets(model, tokenizer, encoded, context, spec)
    frozen = first_trainable_layer(model)
    clock = time.perf_counter()
    if frozen > 0:
        cache_frozen_layers(model, encoded, frozen, bf16)
        log.info("cached the outputs of the frozen layers 0-%d in %.1f s", frozen - 1, time.perf_counter() - clock)
    vocab = None
    if spec.candidates:
        clock = time.perf_counter()
        with autocast(bf16, device):
            vocab = candidate_vocab(model, tokenizer, encoded, spec.candidates, spec.loss_on)
        log.info("candidate softmax over %d tokens, found in %.1f s", len(vocab), time.perf_counter() - clock)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [
        {"params": [p for n, p in named if "lora_B" not in n], "lr": spec.lr},
        {"params": [p for n, p in named if "lora_B" in n], "lr": spec.lr * spec.b_lr_ratio},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / spec.batch_size)
    total_steps = min(spec.max_steps or 10**12, spec.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec, total_steps, steps_per_epoch))
    rng = random.Random(spec.seed)
    order = list(range(len(encoded)))
    step = tokens = supervised = 0
    loss_value, measured, scouted, last_share = float("nan"), 0.0, False, 0.0
    measured_at = -1  # the step whose weights `measured` describes
    model.train()
    start = time.perf_counter()
    # No bar when stderr is not a terminal (logs, CI): tqdm would write a line per update there.
    bar = tqdm(total=total_steps, disable=not progress or not sys.stderr.isatty(), desc="train", unit="step",
               leave=False, mininterval=0.5)
    for epoch in range(1, spec.epochs + 1):
        rng.shuffle(order)
        seen_recalled, epoch_loss, epoch_steps = 0, 0.0, 0
        for first in range(0, len(order), spec.batch_size):
            chunk = [encoded[i] for i in order[first : first + spec.batch_size]]
            batch = pack(chunk, spec.loss_on, pad_id=tokenizer.pad_token_id)
            with autocast(bf16, device):
                loss, logits = _loss(model, batch, chunk, spec, vocab)
            loss.backward()
            if spec.clip_norm:
                torch.nn.utils.clip_grad_norm_(params, spec.clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seen_recalled += int(examples_recalled(logits.detach(), batch, vocab).sum())
            step += 1
            tokens += batch.n_tokens
            supervised += len(batch.labels)
            loss_value = loss.item()
            epoch_loss, epoch_steps = epoch_loss + loss_value, epoch_steps + 1
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", tok_s=f"{tokens / elapsed:.0f}")
            if step >= total_steps:
                break
        log.info("epoch %d: mean loss %.4f, recalled in the training pass %d/%d, %.1f s",
                 epoch, epoch_loss / epoch_steps, seen_recalled, len(encoded), time.perf_counter() - start)
        # The training pass saw each batch before its update, so it lags the weights by about an epoch: check exactly
        # once it reaches the target or, extrapolated one epoch, would. With candidates, the first epoch that recalls
        # half the target checks too: rivals found then still get trained against.
        share = seen_recalled / len(encoded)
        ahead, last_share = max(share, 2 * share - last_share), share
        scout = vocab is not None and not scouted and share >= (spec.target_recall or 1.0) / 2
        if scout or (spec.target_recall is not None and ahead >= spec.target_recall):
            scouted = scouted or scout
            clock = time.perf_counter()
            recalled, intruders = exact_check(model, tokenizer, encoded, precision=spec.precision)
            measured, measured_at = int(recalled.sum()) / len(encoded), step
            log.info("exact check after epoch %d: %d/%d recalled, in %.1f s", epoch, int(recalled.sum()), len(encoded),
                     time.perf_counter() - clock)
            if spec.target_recall is not None and measured >= spec.target_recall:
                break
            if vocab is not None:  # tokens outside the candidates that beat an answer are trained against from now on
                grown = torch.unique(torch.cat([vocab, torch.tensor(sorted(intruders), dtype=vocab.dtype)]))
                log.info("the check found %d token(s) beating answers, %d of them new: candidates now %d",
                         len(intruders), len(grown) - len(vocab), len(grown))
                vocab = grown
        if step >= total_steps:
            break
    bar.close()
    if measured_at != step:  # weights changed since the last exact check (or there was none)
        measured = recall(model, tokenizer, encoded, precision=spec.precision)
    seconds = time.perf_counter() - start
    model.eval()
    return TrainStats(
        steps=step, epochs=epoch, seconds=seconds, tokens=tokens, supervised_tokens=supervised,
        tokens_per_second=tokens / seconds, supervised_tokens_per_second=supervised / seconds,
        final_loss=loss_value, recall=measured, trainable_params=sum(p.numel() for p in params),
        precision="bf16" if bf16 else "fp32", softmax_tokens=len(vocab) if vocab is not None else None,
    )


@contextmanager
def attached(model: torch.nn.Module, lora: LoraSpec, seed: int = 0):
    """Wrap a base model with a fresh LoRA adapter; the base comes back bit for bit afterwards.

    PiSSA initialisation rewrites the base weights to a residual, so for it the touched weights are
    kept and put back, and the initial adapter is saved so `save_adapter` can write a plain LoRA
    adapter (rank 2r) that applies to the original base.
    """
    import shutil
    import tempfile

    from peft import get_peft_model

    torch.manual_seed(seed)
    config = lora.to_peft(model.config.num_hidden_layers)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()} if lora.pissa else {}
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise LoramemError(f"cannot build the LoRA module: {str(err).splitlines()[0]}") from None
    initial = None
    if lora.pissa:
        initial = tempfile.mkdtemp(prefix="loramem-pissa-")
        peft_model.peft_config["default"].init_lora_weights = True  # save it as a plain LoRA start point
        peft_model.save_pretrained(initial)
        peft_model.peft_config["default"].init_lora_weights = "pissa"
    peft_model.loramem_initial_adapter = initial
    try:
        yield peft_model
    finally:
        base = peft_model.unload()
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name in snapshot:
                    p.data = snapshot[name]
        if initial:
            shutil.rmtree(initial, ignore_errors=True)


def save_adapter(peft_model, folder) -> None:
    """Save a standard PEFT adapter folder (PiSSA converted to a plain LoRA of the original base)."""
    initial = getattr(peft_model, "loramem_initial_adapter", None)
    extra = {"path_initial_model_for_weight_conversion": initial} if initial else {}
    peft_model.save_pretrained(folder, safe_serialization=True, **extra)
