"""Linear layers computed through bf16 weights packed once for the CPU's bf16 matmul (oneDNN), for generation.

Under bf16 autocast over fp32 weights, every linear layer casts its fp32 weight to bf16 (autocast keeps the cast
only until its block ends: one `generate` call) and oneDNN reorders the bf16 weight into its blocked layout on
every call. For the bundled 135M model that is ~0.4 s of casting per generate call and a batch-1 matmul ~2x
slower than one on a weight packed in advance (the tied 49152x576 lm_head: 5.5 ms against 1.7 ms here).

`packed_linears(model)` runs a block with each plain `nn.Linear` computing through
`torch.ops.mkldnn._linear_pointwise` on a bf16 copy of its *current* weight packed by
`torch.ops.mkldnn._reorder_linear_weight` (what inductor's CPU freezing does): the same oneDNN kernel on the same
bf16 values as `F.linear` under autocast, so the outputs are bit for bit the same, for calls over up to PACKED_ROWS
rows (decoding; short prompts). Calls over more rows run `F.linear` on a plain bf16 copy kept beside the packed one,
as autocast would, because with AMX oneDNN rounds a packed product over many rows differently. Packed weights are kept per
model between calls (`PackCache`), keyed by the weight tensor's storage and version: a merge swaps tensors in
(merge.swap_in) and a module's factors run beside the weight (merge.fused), so the packed copy always matches the
weight the layer holds at that moment. Weights changed in place through `.data` (which bumps no version) would not
be seen; loramem never does that.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from loramem.errors import LoramemError
from loramem.merge import _WithLowRank
from loramem.precision import cpu_flags

# Packed copies kept per model: its own linear weights and those of a few merges (merge.MergeCache keeps 2 sets).
WEIGHT_SETS_KEPT = 3


def available(device: torch.device) -> bool:
    """Whether this torch can pack bf16 linear weights for `device` (a CPU whose oneDNN runs bf16)."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# oneDNN runs a packed weight by the same kernel as autocast's bf16 matmul only for few rows: on a CPU with AMX, 64
# rows and more (a batch's prefill, a long context) come out rounded differently (tests/test_packed.py checks every
# row count up to this one and beyond it). Calls over more rows take a plain bf16 copy, as autocast does. Without AMX
# every row count up to 320 came out bit for bit the same (session 19, avx512_bf16), so there 64 rows are packed: a
# composed batch of 16 questions runs 48 rows (docs/BENCHMARKS.md, "Composing modules").
PACKED_ROWS = 16 if "amx_bf16" in cpu_flags() else 64


@dataclass
class _Entry:
    """A weight's bf16 copies, each made on first use: packed (for few rows) and plain (for many)."""

    source: torch.Tensor  # held so its storage (the key's address) cannot be freed and reused while kept
    held: tuple = ()  # a group's member weights, held for the same reason
    _packed: torch.Tensor | None = None
    plain: torch.Tensor | None = None

    @property
    def packed(self) -> torch.Tensor:
        if self._packed is None:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.source.to(torch.bfloat16), 1)
        return self._packed

    def bf16(self) -> torch.Tensor:
        if self.plain is None:
            self.plain = self.source.to(torch.bfloat16)
        return self.plain


def _key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight._version


class PackCache:
    """Packed bf16 copies of linear weights, least recently used evicted first (`capacity` weights)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise LoramemError(f"a pack cache holds at least 1 weight, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def packed(self, weight: torch.Tensor) -> torch.Tensor:
        return self.entry(weight).packed

    def entry(self, weight: torch.Tensor) -> _Entry:
        return self._kept(_key(weight), lambda: _Entry(weight.detach()))

    def group(self, weights: list[torch.Tensor]) -> _Entry:
        """The weights stacked (their outputs side by side), as one entry."""
        return self._kept(tuple(_key(w) for w in weights),
                          lambda: _Entry(torch.cat([w.detach().to(torch.bfloat16) for w in weights]),
                                         held=tuple(weights)))

    def _kept(self, key: tuple, make) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = make()
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry

    def __len__(self) -> int:
        return len(self._entries)


_CACHES: weakref.WeakKeyDictionary[torch.nn.Module, PackCache] = weakref.WeakKeyDictionary()


class _PackedLinear:
    """A linear layer's forward through its packed bf16 weight, or its plain bf16 copy for many rows (the bias cast
    as autocast casts it)."""

    def __init__(self, entry: _Entry, bias: torch.Tensor | None, cache: PackCache) -> None:
        self.entry, self.cache = entry, cache
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if x.numel() <= PACKED_ROWS * x.shape[-1]:
            return torch.ops.mkldnn._linear_pointwise(x, self.entry.packed, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.entry.bf16(), self.bias)


def _plain_linears(model: torch.nn.Module) -> list[torch.nn.Linear] | None:
    """The model's plain linear layers, or None where PEFT wraps layers (DoRA reads the base weight itself)."""
    layers = []
    for module in model.modules():
        if hasattr(module, "base_layer"):
            return None
        if type(module) is torch.nn.Linear and module.weight.dtype in (torch.float32, torch.bfloat16):
            layers.append(module)
    return layers


@contextmanager
def packed_linears(model: torch.nn.Module, cache: PackCache | None = None):
    """Run the block (inference under bf16 autocast, or with bf16 weights) with the model's plain linear layers
    computing through packed bf16 weights; a layer running a module's factors beside it (merge.fused) keeps them,
    around the packed product. Nothing changes where packing is unavailable or PEFT wraps the layers."""
    layers = _plain_linears(model) if available(next(model.parameters()).device) else None
    if not layers:
        yield model
        return
    if cache is None:
        cache = _CACHES.get(model)
        if cache is None:
            cache = _CACHES[model] = PackCache(WEIGHT_SETS_KEPT * 2 * len(layers))  # weights and groups
    undo = []
    try:
        for layer in layers:
            packed = _PackedLinear(cache.entry(layer.weight), layer.bias, cache)
            own = layer.__dict__.get("forward")
            if own is None:
                layer.forward = packed
                undo.append(lambda layer=layer: delattr(layer, "forward"))
            elif isinstance(own, _WithLowRank):  # the low-rank term goes on the packed product
                inner, own.forward = own.forward, packed
                undo.append(lambda own=own, inner=inner: setattr(own, "forward", inner))
            # any other replaced forward (e.g. accelerate's hooks) is left as it is
        yield model
    finally:
        for step in reversed(undo):
            step()


class _PackedGroup:
    """Linear layers that read the same input (a transformer's q|k|v, gate|up) computed as one product through
    their weights packed side by side, each layer's low-rank term (a module's factors) then added on its own part:
    one cast of the input and one matmul call instead of several, the same outputs bit for bit over up to
    PACKED_ROWS rows (tests/test_packed.py). Returns the outputs of each part's layers side by side (`parts`: how
    many layers each part has, e.g. (2, 1): q|k, then v). More rows run the layers one by one, as they would, and
    put each part's outputs side by side."""

    def __init__(self, layers: list[torch.nn.Linear], cache: PackCache, parts: tuple[int, ...]) -> None:
        self.layers, self.parts = layers, parts
        self.entry = cache.group([layer.weight for layer in layers])
        biases = [layer.bias for layer in layers]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases]).to(torch.bfloat16)
        bounds = [0, *itertools.accumulate(parts)]
        self.spans = list(zip(bounds, bounds[1:]))
        self.sizes = [sum(layer.out_features for layer in layers[i:j]) for i, j in self.spans]
        starts = [0, *itertools.accumulate(layer.out_features for layer in layers)]
        self.terms = [(wrapper, start, layer.out_features) for wrapper, start, layer in
                      zip((layer.__dict__["forward"] for layer in layers), starts, layers)
                      if isinstance(wrapper, _WithLowRank)]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.numel() > PACKED_ROWS * x.shape[-1]:
            outs = [layer(x) for layer in self.layers]
            return tuple(outs[i] if j == i + 1 else torch.cat(outs[i:j], dim=-1) for i, j in self.spans)
        out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.entry.packed, self.bias, "none", [], "")
        for wrapper, start, size in self.terms:
            wrapper.add_term(out[..., start : start + size], x)
        return out.split(self.sizes, dim=-1)


def _packed_forward(layer: torch.nn.Linear) -> _PackedLinear | None:
    """The packed product a layer runs inside `packed_linears`, alone or under a module's factors."""
    forward = layer.__dict__.get("forward")
    if isinstance(forward, _WithLowRank):
        forward = forward.forward
    return forward if isinstance(forward, _PackedLinear) else None


def group(layers: list[torch.nn.Linear], parts: tuple[int, ...] | None = None) -> _PackedGroup | None:
    """Inside `packed_linears`: the layers as one packed product (`parts` as in _PackedGroup; default: one part per
    layer), where each of them runs its packed weight (alone or under a module's factors), all read inputs of one
    width and all have a bias or none do; else None (run them one by one)."""
    forwards = [_packed_forward(layer) for layer in layers]
    if None in forwards or len({(layer.in_features, layer.bias is None) for layer in layers}) > 1:
        return None
    return _PackedGroup(layers, forwards[0].cache, parts or (1,) * len(layers))
