"""Several modules composed in output space: each question's top-k modules run as k rows of one batch (each row
with its own module's factors beside the shared weights, as multi-LoRA servers batch adapters), and the k rows'
next-token distributions are combined into one greedy token for the question.

Why: modules of unrelated facts change the same weights in unrelated directions, so any weight-space sum (TIES,
linear, the plain sum) buries each one's facts (docs/RESULTS.md: four PhoneBook sector modules, top-3 merged: 0 of
30). Mixing outputs keeps each module whole. COMPOSITIONS:
- `mix`: the router-score-weighted mixture of the rows' probabilities, sum_j w_j p_j (as REPLUG mixes documents),
  w the softmax of the question's router scores;
- `select`: at each token the row whose distribution has the lowest entropy (the most confident module) decides.
A row may be the base model (no factors). Every answer records, per token, which row supplied it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from loramem.errors import LoramemError
from loramem.merge import LowRank, _WithLowRank, forwards_wrapped

COMPOSITIONS = ("mix", "select")


def check_composition(method: str) -> str:
    if method not in COMPOSITIONS:
        raise LoramemError(f"unknown composition {method!r}; choose one of {', '.join(COMPOSITIONS)}")
    return method


class _RowsLowRank(_WithLowRank):
    """A linear layer's forward plus, for each module in the batch, its low-rank term on the rows that run it.
    (A `_WithLowRank`, so packed.packed_linears puts the packed product under it as under one module's factors.)"""

    def __init__(self, forward, terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.forward, self.terms = forward, terms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward(x)
        for rows, a_t, b_t in self.terms:
            chosen = x.index_select(0, rows)
            term = chosen.reshape(-1, x.shape[-1]).mm(a_t).to(out.dtype).mm(b_t.to(out.dtype))
            out.index_add_(0, rows, term.view(len(rows), *out.shape[1:]))
        return out


@contextmanager
def rows_applied(model: torch.nn.Module, row_modules: list[LowRank | None]):
    """Run the block with batch row i computing through module `row_modules[i]` (None: the base weights)."""
    by_layer: dict[int, tuple[torch.nn.Linear, list]] = {}
    for prepared in {id(m): m for m in row_modules if m is not None}.values():
        rows = torch.tensor([i for i, m in enumerate(row_modules) if m is prepared])
        for layer, a_t, b_t in prepared.terms:
            by_layer.setdefault(id(layer), (layer, []))[1].append((rows.to(a_t.device), a_t, b_t))
    with forwards_wrapped((layer, lambda forward, terms=terms: _RowsLowRank(forward, terms))
                          for layer, terms in by_layer.values()):
        yield model


@dataclass
class Composer:
    """`choose` for llama.greedy over k blocks of n rows (row j*n + q: question q's j-th module): every row of a
    question gets the token of the question's combined distribution. `weights` (n, k) are the rows' mixture
    weights; `supplied` collects, per step, the block (0..k-1) that supplied each question's token."""

    method: str
    weights: torch.Tensor
    supplied: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        n, k = self.weights.shape
        if k == 1:  # nothing to combine: the row's own argmax, exactly as one module answers
            token = logits.to(torch.float32).argmax(-1)
            self.supplied.append(torch.zeros_like(token))
            return token
        logp = logits.to(torch.float32).log_softmax(-1).view(k, n, -1)
        if self.method == "mix":
            weighted = logp + self.weights.T.log().to(logp.device)[:, :, None]
            token = torch.logsumexp(weighted, dim=0).argmax(-1)
            share = weighted.gather(2, token.view(1, n, 1).expand(k, n, 1))[..., 0]  # each row's part of p(token)
            supplier = share.argmax(0)
        else:
            entropy = -(logp.exp() * logp).sum(-1)  # (k, n)
            entropy = entropy.masked_fill(self.weights.T.to(entropy.device) == 0, torch.inf)  # filler rows never decide
            supplier = entropy.argmin(0)
            token = logp[supplier, torch.arange(n, device=logp.device)].argmax(-1)
        self.supplied.append(supplier)
        return token.repeat(k)


def mixture_weights(scores: list[list[float]]) -> torch.Tensor:
    """(n, k) weights: per question, the softmax of its modules' router scores."""
    return torch.tensor(scores, dtype=torch.float32).softmax(-1)


def supplied_by(supplied: list[torch.Tensor], generated: torch.Tensor, eos_token_id: int) -> list[list[int]]:
    """Per question, the block that supplied each of its answer tokens, up to and without its EOS."""
    if not supplied:
        return [[] for _ in range(generated.shape[0])]
    steps = torch.stack(supplied, dim=1)  # (n, steps)
    out = []
    for q in range(generated.shape[0]):
        tokens = generated[q].tolist()
        length = tokens.index(eos_token_id) if eos_token_id in tokens else len(tokens)
        out.append(steps[q, :length].tolist())
    return out
