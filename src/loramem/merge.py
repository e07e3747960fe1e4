"""Merging LoRA modules in weight-delta space: linear, TIES, DARE, magnitude pruning, rank concatenation.

A LoRA module changes each adapted weight W (out x in) by dW = s * B @ A. The merge methods here work on
those full deltas, not on A and B separately, because B1 @ A1 + B2 @ A2 is not (B1 + B2) @ (A1 + A2):
averaging factors does not average what the modules do. A module's deltas are a dict from base weight
name ("model.layers.0.self_attn.q_proj.weight") to dW in fp32.

(Over 400 lines: the methods, the exact apply/revert of merged weights and the factor paths (fused, low rank)
share one representation of deltas and factors.)

Every method has mergekit's shape, `method(deltas, weights, **params) -> deltas`; `merge()` picks one by
name. A result is added to a base model and removed again bit for bit (`applied`), or compressed back
into LoRA factors (`to_low_rank`). `MergeCache` keeps the last few merges.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from loramem.errors import LoramemError

Deltas = dict[str, torch.Tensor]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # name -> (A, B, scale)
SIGN_METHODS = ("total", "frequency")

# ---------------------------------------------------------------------------------------------------
# Reading PEFT adapters

# PEFT saves `base_model.model.<module>.lora_A.weight`: the adapter name is removed on save.
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def lora_factors(state_dict: dict[str, torch.Tensor], scale: float | dict[str, float]) -> Factors:
    """Group a PEFT adapter state dict into (A, B, scale) per base weight name.

    Only plain LoRA on linear layers (fan_in_fan_out=False) is understood. Anything else (DoRA
    magnitudes, embedding LoRA, LoRA biases, modules_to_save) raises: leaving it out of a merge
    silently would give a model that is not what the adapter trained.
    `scale` is alpha / r (alpha / sqrt(r) for rsLoRA), or a dict of it per base weight name when
    rank_pattern / alpha_pattern make it differ between layers.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise LoramemError(f"cannot merge adapter tensor {key!r}: only LoRA A/B weights of linear layers")
        pairs.setdefault(match["module"] + ".weight", {})[match["factor"]] = tensor
    factors = {}
    for name, pair in pairs.items():
        if pair.keys() != {"A", "B"}:
            raise LoramemError(f"adapter has lora_{''.join(pair)} without its partner for {name!r}")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoramemError(f"LoRA factors for {name!r} do not fit: A {tuple(a.shape)}, B {tuple(b.shape)}")
        factors[name] = (a, b, _scale_for(scale, name))
    return factors


def factor_shapes(factors: Factors) -> dict[str, tuple[int, int]]:
    """The shape of the weight each (A, B) pair adapts: B's rows by A's columns."""
    return {name: (b.shape[0], a.shape[1]) for name, (a, b, _) in factors.items()}


def _scale_for(scale: float | dict[str, float], name: str) -> float:
    if not isinstance(scale, dict):
        return float(scale)
    if name not in scale:
        raise LoramemError(f"no LoRA scale given for {name!r}")
    return float(scale[name])


def lora_deltas(state_dict: dict[str, torch.Tensor], scale: float | dict[str, float]) -> Deltas:
    """The weight delta s * B @ A (fp32) of each adapted layer, keyed by base weight name."""
    # The scale goes on the small factor: one pass over the (out x in) product instead of two.
    return {name: b.float() @ (s * a.float()) for name, (a, b, s) in lora_factors(state_dict, scale).items()}


# ---------------------------------------------------------------------------------------------------
# Validation shared by the methods


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise LoramemError(f"got {len(weights)} weights for {n} modules")
    return [float(w) for w in weights]


def _check(shapes: list[dict[str, tuple[int, ...]]], weights: Sequence[float] | None) -> list[float]:
    """Check that modules (given as {name: shape}) adapt the same layers alike; return the weights."""
    if not shapes:
        raise LoramemError("nothing to merge: the list of modules is empty")
    first = shapes[0]
    for i, module in enumerate(shapes[1:], start=1):
        if module.keys() != first.keys():
            odd = sorted(module.keys() ^ first.keys())[0]
            raise LoramemError(f"module {i} and module 0 adapt different layers (e.g. {odd!r})")
        for name, shape in module.items():
            if shape != first[name]:
                raise LoramemError(f"module {i} has shape {shape} for {name!r} but module 0 has {first[name]}")
    return _weights(len(shapes), weights)


def _shapes(deltas: list[Deltas]) -> list[dict[str, tuple[int, ...]]]:
    return [{name: tuple(t.shape) for name, t in d.items()} for d in deltas]


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise LoramemError(f"density must be in (0, 1], got {density}")


def _check_sign_method(sign_method: str) -> None:
    if sign_method not in SIGN_METHODS:
        raise LoramemError(f"sign_method must be one of {', '.join(SIGN_METHODS)}, got {sign_method!r}")


# ---------------------------------------------------------------------------------------------------
# Building blocks


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * t for w, t in zip(weights, tensors))


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = floor(density * numel) largest-magnitude entries of one layer, zero the rest.

    Floor as in PEFT and mergekit, with two differences: the epsilon stops 0.29 * 100 = 28.999...
    from losing an entry, and at least one entry survives (PEFT zeroes a tensor when k rounds to 0).
    Ties in magnitude are broken by torch.topk, so exactly k entries are kept.
    """
    if density >= 1:
        return t
    k = max(1, int(density * t.numel() + 1e-9))
    magnitude = t.abs()
    keep = magnitude >= _kth_largest(magnitude, k)
    if int(keep.count_nonzero()) != k:  # ties at the threshold: let topk choose exactly k
        keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        keep[magnitude.flatten().topk(k).indices] = True
        keep = keep.view_as(t)
    return t * keep  # 2.5x faster than torch.where(keep, t, 0.0) on this CPU


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry. On the CPU numpy's introselect is ~8x faster than torch.kthvalue
    (1.4 ms against 10.9 ms for a 1536x576 layer, measured here)."""
    flat = values.detach().flatten()
    if flat.device.type == "cpu":
        as_numpy = flat.float().numpy()
        return torch.tensor(np.partition(as_numpy, flat.numel() - k)[flat.numel() - k], dtype=values.dtype)
    return flat.kthvalue(flat.numel() - k + 1).values


def _dare(deltas: list[Deltas], density: float, seed: int) -> list[Deltas]:
    """DARE (Yu et al. 2023): drop each entry with probability 1 - density, scale survivors by 1 / density.

    The rescaling keeps every entry's expected value. Masks come from one CPU generator, modules in
    order and layers by sorted name, so a seed gives the same merge on any device.
    """
    gen = torch.Generator().manual_seed(seed)

    def drop(t: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(t.shape, generator=gen) < density
        return t * keep.to(t.device) / density

    return [{name: drop(d[name]) for name in sorted(d)} for d in deltas]


def _disjoint_mean(tensors: list[torch.Tensor], weights: list[float], sign_method: str) -> torch.Tensor:
    """Elect a sign per entry and average the modules that agree with it (TIES steps 2 and 3).

    Weights scale each tensor before the election, as in mergekit: a module with weight 0 has no vote
    and a negative weight (task negation) votes with its sign flipped. PEFT's `ties` differs here: it
    elects from the unweighted tensors and weights only the mean. Both agree when all weights are
    equal and positive ("total") or just positive ("frequency"). The mean divides by the number of
    agreeing modules, as in the paper and PEFT, not by their summed weights (mergekit's default), so
    one module alone comes out as w * dW, as in `linear`. A score of exactly 0 elects +, as in PEFT.
    """
    stacked = torch.stack([w * t for w, t in zip(weights, tensors)])
    signs = stacked.sign()
    score = stacked.sum(0) if sign_method == "total" else signs.sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0)
    agree = signs == elected  # zeros (trimmed or dropped entries) never agree, so they are not counted
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Merge methods


def linear(deltas: list[Deltas], weights: Sequence[float] | None = None) -> Deltas:
    """Task arithmetic: sum_i w_i dW_i. Exact; the other methods reduce to it without sparsity."""
    ws = _check(_shapes(deltas), weights)
    return {name: _weighted_sum([d[name] for d in deltas], ws) for name in deltas[0]}


def ties(
    deltas: list[Deltas], weights: Sequence[float] | None = None, *, density: float, sign_method: str = "total"
) -> Deltas:
    """TIES-merging (Yadav et al. 2023): trim each module to its largest entries, elect a sign per
    entry, average only the modules that agree, so opposite updates do not cancel into noise."""
    ws = _check(_shapes(deltas), weights)
    _check_density(density)
    _check_sign_method(sign_method)
    # Layer by layer, so each layer's trimmed copies are freed before the next: on this CPU keeping all
    # of them (3 x 97M entries for three modules of the bundled model) doubled the time in page faults.
    return {name: _disjoint_mean([_trim(d[name], density) for d in deltas], ws, sign_method) for name in deltas[0]}


def dare_linear(
    deltas: list[Deltas], weights: Sequence[float] | None = None, *, density: float, seed: int = 0
) -> Deltas:
    """DARE then linear: random dropping thins out interference while keeping the expected sum."""
    ws = _check(_shapes(deltas), weights)
    _check_density(density)
    return linear(_dare(deltas, density, seed), ws)


def dare_ties(
    deltas: list[Deltas],
    weights: Sequence[float] | None = None,
    *,
    density: float,
    sign_method: str = "total",
    seed: int = 0,
) -> Deltas:
    """DARE then TIES' sign election and disjoint mean; the random drop replaces magnitude trimming."""
    ws = _check(_shapes(deltas), weights)
    _check_density(density)
    _check_sign_method(sign_method)
    return ties(_dare(deltas, density, seed), ws, density=1.0, sign_method=sign_method)


def magnitude_prune(deltas: list[Deltas], weights: Sequence[float] | None = None, *, density: float) -> Deltas:
    """Trim each module to its largest entries, then sum: TIES without the sign election."""
    ws = _check(_shapes(deltas), weights)
    _check_density(density)
    return {name: _weighted_sum([_trim(d[name], density) for d in deltas], ws) for name in deltas[0]}


def cat_factors(factors: list[Factors], weights: Sequence[float] | None = None) -> Factors:
    """Concatenate ranks: one LoRA of rank sum(r_i) whose B @ A is exactly the linear merge.

    A_cat = vstack(w_i * s_i * A_i) and B_cat = hstack(B_i), so the scale is folded into A and the
    result has scale 1.0. Unlike `linear` it stays low rank without an SVD, but its rank grows with
    the number of modules.
    """
    ws = _check([factor_shapes(f) for f in factors], weights)
    merged = {}
    for name in factors[0]:
        parts = [f[name] for f in factors]
        a_cat = torch.cat([w * s * a.float() for w, (a, _, s) in zip(ws, parts)])
        b_cat = torch.cat([b.float() for _, b, _ in parts], dim=1)
        merged[name] = (a_cat, b_cat, 1.0)
    return merged


METHODS: dict[str, Callable[..., Deltas]] = {
    "linear": linear,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}


def _method_params(method: str, params: dict) -> dict:
    """Check `params` against what `method` takes and fill in its defaults, so equal merges look equal."""
    if method not in METHODS:
        raise LoramemError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    signature = inspect.signature(METHODS[method]).parameters.values()
    accepted = {p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(params.keys() - accepted.keys())
    if unknown:
        takes = ", ".join(accepted) or "no parameters"
        raise LoramemError(f"merge method {method!r} has no parameter {unknown[0]!r}; it takes: {takes}")
    full = {name: params.get(name, default) for name, default in accepted.items()}
    missing = [name for name, value in full.items() if value is inspect.Parameter.empty]
    if missing:
        raise LoramemError(f"merge method {method!r} needs parameter {missing[0]!r}")
    return full


def merge(deltas: list[Deltas], method: str, weights: Sequence[float] | None = None, **params) -> Deltas:
    """Merge modules with the method of that name; bad input raises LoramemError with a one-line message."""
    params = _method_params(method, params)
    return METHODS[method](deltas, weights, **params)


# ---------------------------------------------------------------------------------------------------
# Using a merge: in place on a base model, or back to LoRA factors


@dataclass
class Applied:
    """What `swap_in` changed: every touched parameter and its original tensor, for `revert`."""

    originals: dict[str, torch.Tensor]
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)


def _parameters(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.nn.Parameter]:
    """The named parameters, each checked to exist with the given shape (one walk of the model: looking names
    up one by one costs more than the swap itself)."""
    found = dict(model.named_parameters())
    params = {}
    for name, shape in shapes.items():
        if name not in found:
            raise LoramemError(f"the model has no weight {name!r}")
        if tuple(found[name].shape) != tuple(shape):
            raise LoramemError(f"delta for {name!r} has shape {tuple(shape)}, the weight {tuple(found[name].shape)}")
        params[name] = found[name]
    return params


def merged_weights(model: torch.nn.Module, deltas: Deltas | None = None,
                   factors: Factors | None = None) -> dict[str, torch.Tensor]:
    """W + dW for every weight a merge touches, summed in fp32 and rounded once to the weight's dtype; the
    model is not changed. One module's `factors` (A, B, scale) give W + s * B @ A as one fused addmm per
    weight, without forming dW. Every name and shape is checked before anything is computed."""
    if factors is not None:
        shapes = factor_shapes(factors)
    else:
        shapes = {name: dw.shape for name, dw in deltas.items()}
    params = _parameters(model, shapes)
    out = {}
    with torch.no_grad():
        for name, p in params.items():
            if factors is not None:
                a, b, scale = factors[name]
                merged = torch.addmm(p.float(), b.to(p.device, torch.float32), a.to(p.device, torch.float32),
                                     alpha=scale)
            else:
                merged = p.float() + deltas[name].to(p.device, torch.float32)
            out[name] = merged.to(p.dtype)
    return out


def swap_in(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Applied:
    """Point each named weight at the given tensor, keeping the original tensor (no copy) for `revert`, which
    therefore restores it bit for bit ((W + dW) - dW is not W in floating point). Swapping a cached
    `merged_weights` result back in costs microseconds per weight."""
    params = _parameters(model, {name: w.shape for name, w in weights.items()})
    handle = Applied({}, params)
    for name, p in params.items():
        handle.originals[name] = p.data
        p.data = weights[name]
    return handle


def apply_in_place(model: torch.nn.Module, deltas: Deltas) -> Applied:
    """Add each dW to its base weight (see merged_weights and swap_in)."""
    return swap_in(model, merged_weights(model, deltas=deltas))


def revert(model: torch.nn.Module, handle: Applied) -> None:
    """Restore every weight that `swap_in` touched to its original tensor."""
    with torch.no_grad():
        for name, original in handle.originals.items():
            handle.params[name].data = original


@contextlib.contextmanager
def applied(model: torch.nn.Module, deltas: Deltas | None = None, factors: Factors | None = None,
            weights: dict[str, torch.Tensor] | None = None) -> Iterator[torch.nn.Module]:
    """Run a block with `deltas`, one module's `factors`, or precomputed merged `weights` in the model;
    restored afterwards even if the block raises."""
    handle = swap_in(model, weights if weights is not None else merged_weights(model, deltas, factors))
    try:
        yield model
    finally:
        revert(model, handle)


class _WithLowRank:
    """A linear layer's forward plus s * B @ A x, added in place by one addmm (A and s * B kept transposed, in the
    layer's dtype).

    Set as the layer's own `forward` rather than registered as a forward hook, which cost ~10-30 us more per layer
    and call here (benchmarks/lowrank_overhead.py)."""

    def __init__(self, forward, a_t: torch.Tensor, b_t: torch.Tensor) -> None:
        self.forward, self.a_t, self.b_t = forward, a_t, b_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward(x)
        self.add_term(out, x)
        return out

    def add_term(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """Add the low-rank term of input x onto out, the layer's output (or a view of it, as packed.group's)."""
        flat = out.view(-1, out.shape[-1])
        # under bf16 autocast the output is bf16 while the factors keep the weights' fp32 (else .to is a no-op)
        flat.addmm_(x.reshape(-1, x.shape[-1]).mm(self.a_t).to(flat.dtype), self.b_t.to(flat.dtype))


@dataclass
class LowRank:
    """LoRA factors made ready to run beside one model's weights (`low_rank`): per adapted linear layer, A and
    s * B transposed, in the layer's dtype and on its device. Keep one to answer with the same module again
    without reading and preparing its factors anew; it holds the layers of the model it was made for."""

    terms: list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]]  # (layer, A^T, s * B^T)


def low_rank(model: torch.nn.Module, factors: Factors) -> LowRank:
    """Check that `factors` fit the model's linear layers and prepare them for `fused`."""
    modules = dict(model.named_modules())
    params = _parameters(model, factor_shapes(factors))
    terms = []
    for name, (a, b, scale) in factors.items():
        layer, weight = modules[name.removesuffix(".weight")], params[name]
        if not isinstance(layer, torch.nn.Linear):
            raise LoramemError("LoRA factors apply to linear layers only")
        a_t = a.to(weight.device, weight.dtype).t().contiguous()
        b_t = (b.to(weight.device, torch.float32) * scale).to(weight.dtype).t().contiguous()
        terms.append((layer, a_t, b_t))
    return LowRank(terms)


@contextlib.contextmanager
def fused(model: torch.nn.Module, factors: Factors | LowRank) -> Iterator[torch.nn.Module]:
    """Run a block (inference only) with LoRA factors in effect as an extra low-rank product beside each adapted
    weight, W x + s * B (A x), instead of merged into it: no weight is copied or changed, so nothing is paid up
    front, at two small matmuls per adapted layer and step. Several modules' factors concatenated
    (`cat_factors`) are their linear merge, exactly. `factors` may come prepared (`low_rank`)."""
    prepared = factors if isinstance(factors, LowRank) else low_rank(model, factors)
    with forwards_wrapped((layer, lambda forward, a_t=a_t, b_t=b_t: _WithLowRank(forward, a_t, b_t))
                          for layer, a_t, b_t in prepared.terms):
        yield model


@contextlib.contextmanager
def forwards_wrapped(wrappers):
    """Run a block with each (layer, wrap) pair's layer computing through wrap(its current forward), restored after
    (a forward attribute the layer had of its own, e.g. from accelerate, is put back)."""
    replaced = []
    try:
        for layer, wrap in wrappers:
            own = layer.__dict__.get("forward")
            layer.forward = wrap(layer.forward)
            replaced.append((layer, own))
        yield
    finally:
        for layer, own in reversed(replaced):
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def to_low_rank(deltas: Deltas, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The best rank-`rank` factors (A, B) with B @ A ~ dW for each layer, by truncated SVD.

    B = U_r * S_r and A = Vh_r, i.e. a LoRA with scale 1. By Eckart-Young no rank-r pair does better;
    a layer's Frobenius error is the norm of its dropped singular values. A rank above min(out, in)
    is capped there.
    """
    if rank < 1:
        raise LoramemError(f"rank must be at least 1, got {rank}")
    factors = {}
    for name, dw in deltas.items():
        if dw.dim() != 2:
            raise LoramemError(f"delta for {name!r} is not a matrix: shape {tuple(dw.shape)}")
        u, s, vh = torch.linalg.svd(dw.float(), full_matrices=False)
        r = min(rank, s.numel())
        factors[name] = (vh[:r].contiguous(), (u[:, :r] * s[:r]).contiguous())
    return factors


# ---------------------------------------------------------------------------------------------------
# Caching merges

T = TypeVar("T")


def merge_key(
    module_ids: Sequence[Hashable], weights: Sequence[float] | None, method: str, params: dict
) -> tuple:
    """A hashable key for one merge. Equal merges get equal keys: weights default to 1.0, params are
    sorted and have the method's defaults filled in. Module order is kept, since DARE's masks use it."""
    ids = tuple(module_ids)
    ws = tuple(_weights(len(ids), weights))
    return ids, ws, method, tuple(sorted(_method_params(method, params).items()))


class MergeCache:
    """The last `maxsize` merges, least recently used evicted first.

    Merging is cheap next to training but not free, and a server tends to ask for the same few
    combinations again. Cached results are shared: do not modify them. Not thread-safe.
    """

    def __init__(self, maxsize: int = 8) -> None:
        if maxsize < 1:
            raise LoramemError(f"cache size must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def get_or_compute(self, key: Hashable, fn: Callable[[], T]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = fn()
        self._items[key] = value
        if len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
