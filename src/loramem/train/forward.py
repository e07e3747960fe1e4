"""The forward pass over a packed batch: the decoder on every token, the vocabulary projection only where a label
is (a 49K-word vocabulary is ~20% of a small model's FLOPs), and, for a module on late layers, the frozen layers
before it computed once instead of every epoch."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from loramem.errors import LoramemError
from loramem.precision import autocast
from loramem.train.pack import ROW_TOKENS, Batch, Encoded, pack, shared_prefix


def supervised_logits(model, batch: Batch, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Logits only at labelled positions: the decoder runs on every token, the vocabulary projection
    only where a loss is taken (and only onto the sorted token ids `vocab`, when given).
    With cached hidden states the decoder starts at `batch.start_layer`."""
    return supervised_outputs(model, batch, vocab=vocab)[0]


def supervised_outputs(model, batch: Batch, layers: tuple[int, ...] = (), vocab: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """supervised_logits, and the outputs of decoder `layers` at the same positions ((labels, len(layers), H))."""
    lm = causal_lm(model)
    device = lm.device
    decoder = lm.get_decoder()
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
    head, hidden = lm.get_output_embeddings(), at_labels(out.last_hidden_state)
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


def trainable_layers(model) -> int:
    """How many decoder layers have a trainable parameter."""
    return len({m[1] for name, p in model.named_parameters() if p.requires_grad
                and (m := re.search(r"\.layers\.(\d+)\.", name))})


@torch.no_grad()
def cache_frozen_layers(model, encoded: list[Encoded], layer: int, bf16: bool, batch_size: int = 64,
                        row_tokens: int = ROW_TOKENS) -> None:
    """Store each example's hidden states at the input of `layer`.

    Layers before the first adapted one never change during training, so their output is computed once
    instead of every epoch: a module on late layers then trains at the cost of its own layers only.
    The examples' shared prompt prefix runs once per row.
    """
    decoder = causal_lm(model).get_decoder()
    device = causal_lm(model).device
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


def causal_lm(model):
    """The transformers model under a PeftModel wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
