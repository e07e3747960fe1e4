"""Several modules composed in output space: each question's top-k modules run as k rows of one batch (each row
with its own module's factors beside the shared weights, as multi-LoRA servers batch adapters), and the k rows'
next-token distributions are combined into one greedy token for the question.

Why: modules of unrelated facts change the same weights in unrelated directions, so any weight-space sum (TIES,
linear, the plain sum) buries each one's facts (docs/RESULTS.md: four PhoneBook sector modules, top-3 merged: 0 of
30). Mixing outputs keeps each module whole. COMPOSITIONS:
- `mix`: the router-score-weighted mixture of the rows' probabilities, sum_j w_j p_j (as REPLUG mixes documents),
  w the softmax of the question's router scores over a temperature (AskSpec.router_temperature);
- `select`: every row decodes its own greedy answer and the question gets the answer with the highest mean
  log-probability of its own tokens up to its EOS plus the log of its module's router weight (the router's prior
  times the answer's per-token likelihood). A module asked about a fact it does not hold still answers
  confidently token by token, but not through a whole answer (docs/RESULTS.md: with the gold PhoneBook module
  forced third of three at equal weights, 97% of answers picked against 24% for `select-token`); the router's
  weight settles the near ties (96.4% without it, 100% with it, over the dense top 3);
- `select-token`: at each token the row whose distribution has the lowest entropy decides (the ablation).
A row may be the base model (no factors): `with_base_row` adds one to every question at a chosen share of the
weight, so that an answer no module holds falls back on the base model. Every answer records, per token, which row
supplied it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from loramem.errors import LoramemError
from loramem.merge import LowRank, _WithLowRank, forwards_wrapped

COMPOSITIONS = ("mix", "select", "select-token")


def check_combination(method: str) -> str:
    """A `merge` setting: an output composition or a weight merge; the error names both kinds."""
    from loramem.answer import MERGE_METHODS

    if method not in COMPOSITIONS and method not in MERGE_METHODS:
        raise LoramemError(f"unknown merge method {method!r}; choose an output composition ({', '.join(COMPOSITIONS)}) "
                           f"or a weight merge ({', '.join(MERGE_METHODS)})")
    return method


def check_composition(method: str) -> str:
    if method not in COMPOSITIONS:
        raise LoramemError(f"unknown composition {method!r}; choose one of {', '.join(COMPOSITIONS)}")
    return method


class _RowsLowRank(_WithLowRank):
    """A linear layer's forward plus, for each module in the batch, its low-rank term on the rows that run it.
    (A `_WithLowRank`, so packed.packed_linears puts the packed product under it as under one module's factors.)"""

    def __init__(self, forward, terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.forward, self.terms = forward, terms

    def add_term(self, out: torch.Tensor, x: torch.Tensor) -> None:
        for rows, a_t, b_t in self.terms:
            chosen = x.index_select(0, rows)
            term = chosen.reshape(-1, x.shape[-1]).mm(a_t).to(out.dtype).mm(b_t.to(out.dtype))
            out.index_add_(0, rows, term.view(len(rows), *out.shape[1:]))


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


def first_adapted_layer(model: torch.nn.Module, row_modules: list[LowRank | None]) -> int:
    """The first decoder layer any row's module changes (the number of layers when none does): the rows of one
    prompt are the same up to there, so llama.greedy runs that part of the prompt once."""
    layer_of = {id(linear): i for i, layer in enumerate(model.model.layers) for linear in layer.modules()}
    touched = [layer_of.get(id(linear), 0) for m in row_modules if m is not None for linear, _, _ in m.terms]
    return min(touched, default=len(model.model.layers))


@dataclass
class Composer:
    """`choose` for llama.greedy over k blocks of n rows (row j*n + q: question q's j-th module). `mix` and
    `select-token` give every row of a question the token of its combined distribution and collect, per step, the
    block (0..k-1) that supplied it; `select` lets each row take its own argmax and keeps that token's
    log-probability, and `answers` then picks a block per question. `weights` (n, k) are the rows' mixture weights;
    a row of weight 0 (a filler for an abstaining router) never decides."""

    method: str
    weights: torch.Tensor
    supplied: list[torch.Tensor] = field(default_factory=list)
    own_logp: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        n, k = self.weights.shape
        if k == 1:  # nothing to combine: the row's own argmax, exactly as one module answers
            token = logits.to(torch.float32).argmax(-1)
            self.supplied.append(torch.zeros_like(token))
            return token
        logp = logits.to(torch.float32).log_softmax(-1)
        if self.method == "select":
            best = logp.max(-1)
            self.own_logp.append(best.values)
            return best.indices
        logp = logp.view(k, n, -1)
        if self.method == "mix":
            weighted = logp + self.weights.T.log().to(logp.device)[:, :, None]
            token = torch.logsumexp(weighted, dim=0).argmax(-1)
            share = weighted.gather(2, token.view(1, n, 1).expand(k, n, 1))[..., 0]  # each row's part of p(token)
            supplier = share.argmax(0)
        else:
            entropy = -(logp.exp() * logp).sum(-1)  # (k, n)
            entropy = entropy.masked_fill(self._filler(entropy.device), torch.inf)
            supplier = entropy.argmin(0)
            token = logp[supplier, torch.arange(n, device=logp.device)].argmax(-1)
        self.supplied.append(supplier)
        return token.repeat(k)

    def answers(self, generated: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, list[list[int]]]:
        """From the (k*n, steps) new tokens: each question's answer (n, steps) and the block that supplied each of
        its tokens, up to and without its EOS."""
        n, k = self.weights.shape
        if not self.own_logp:  # every row of a question holds the same tokens
            return generated[:n], supplied_by(self.supplied, generated[:n], eos_token_id)
        lengths = _lengths(generated, eos_token_id, with_eos=True)
        logp = torch.stack(self.own_logp, dim=1)  # (k*n, steps)
        counted = torch.arange(logp.shape[1], device=logp.device)[None, :] < lengths[:, None]
        mean = (logp * counted).sum(1) / lengths.clamp(min=1)
        block = (mean.view(k, n) + self.weights.T.to(mean.device).log()).argmax(0)  # (n,); a filler's log 0 = -inf
        rows = block * n + torch.arange(n, device=block.device)
        answered = _lengths(generated[rows], eos_token_id, with_eos=False).tolist()
        return generated[rows], [[j] * length for j, length in zip(block.tolist(), answered)]

    def _filler(self, device) -> torch.Tensor:
        return self.weights.T.to(device) == 0  # (k, n)


def _lengths(generated: torch.Tensor, eos_token_id: int, with_eos: bool) -> torch.Tensor:
    """Per row, how many tokens its answer has: up to its first EOS (and with it), or all."""
    is_eos = generated == eos_token_id
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.int().argmax(1), generated.shape[1])
    return first + (ended & with_eos).long()


def mixture_weights(scores: list[list[float]]) -> torch.Tensor:
    """(n, k) weights: per question, the softmax of its modules' router scores."""
    return torch.tensor(scores, dtype=torch.float32).softmax(-1)


def with_base_row(modules: list[list], scores: list[list[float]], base_weight: float) -> tuple[list, list]:
    """Each question's rows plus one of the base model (None), scored so that its mixture weight is `base_weight`:
    log(sum_j e^s_j) + log(b / (1 - b)) gives it e^s / (S + e^s) = b, the modules keeping their ratios."""
    if not base_weight:
        return modules, scores
    offset = math.log(base_weight / (1 - base_weight))
    return ([row + [None] for row in modules],
            [row + [torch.tensor(row).logsumexp(0).item() + offset] for row in scores])


def supplied_by(supplied: list[torch.Tensor], generated: torch.Tensor, eos_token_id: int) -> list[list[int]]:
    """Per question, the block that supplied each of its answer tokens, up to and without its EOS."""
    if not supplied:
        return [[] for _ in range(generated.shape[0])]
    steps = torch.stack(supplied, dim=1)  # (n, steps)
    lengths = _lengths(generated, eos_token_id, with_eos=False).tolist()
    return [steps[q, :length].tolist() for q, length in enumerate(lengths)]
