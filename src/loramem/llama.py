"""Greedy decoding of Llama-architecture models in a loop of our own (`greedy`), and loading them for answering
without transformers' model code (`load`).

Why by hand: on a 2-core CPU, importing transformers' Llama code takes ~1.9 s of a 4.6 s `loramem ask` (it
pulls in torch.distributed.tensor, sympy and dynamo), and at batch 1 its generation loop spends more time in
per-step and per-layer Python (cache and output objects, mask builders, logits processors, kwargs plumbing) than
in the matmuls (docs/BENCHMARKS.md, "Faster answers"). `greedy` runs the operations of transformers 5's
LlamaForCausalLM under SDPA attention in the same order on the same shapes (RMSNorm in fp32, rotary from the
padding-aware position ids, SDPA with the same mask, causal flag and GQA handling, the last position's logits), so
its tokens are those of `model.generate(do_sample=False)`: tests/test_llama.py compares logits and answers with
transformers. Where the result is the same bit for bit it takes the shorter way, because at batch 1 each of
~70 small operations per layer costs more than its arithmetic: one packed product for q|k|v and one for gate|up
(packed.group), queries and keys rotated together (rotate_half as a roll), RMSNorm's constants kept as tensors,
keys cast for SDPA once as they are made, layers called by `forward`. It calls the model's own linear layers, so
a module's factors beside them (merge.fused), merged weights (merge.applied) and packed bf16 weights (packed.py)
apply unchanged.

`load` builds `LlamaLM`, whose parameters have transformers' names (`model.layers.0.self_attn.q_proj.weight`...),
straight from a Hugging Face folder's config.json and safetensors, for processes that only answer.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from loramem import packed
from loramem.errors import LoramemError

ARCHITECTURE = "llama"


def supports(model: nn.Module) -> bool:
    """Whether `greedy` reproduces `model.generate`: a plain Llama (ours or transformers', not wrapped by PEFT)
    with default rotary embeddings, SiLU, and SDPA attention."""
    config = getattr(model, "config", None)
    if type(model).__name__ not in ("LlamaForCausalLM", "LlamaLM") or config is None:
        return False
    rope = getattr(config, "rope_parameters", None) or {}
    return (config.model_type == ARCHITECTURE and rope.get("rope_type", "default") == "default"
            and config.hidden_act == "silu" and getattr(config, "_attn_implementation", "sdpa") == "sdpa"
            and not getattr(config, "pretraining_tp", 1) > 1)


# --- the model, as transformers names it ---------------------------------------------------------------------


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, operation for operation."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        heads, kv_heads, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, heads * dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, kv_heads * dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, kv_heads * dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(heads * dim, c.hidden_size, bias=c.attention_bias)


class DecoderLayer(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Rotary(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        dim = c.head_dim
        theta = c.rope_parameters["rope_theta"]
        steps = torch.arange(0, dim, 2, dtype=torch.float, device="cpu")  # real even under torch.device("meta")
        self.register_buffer("inv_freq", 1.0 / (theta ** (steps / dim)), persistent=False)
        self.attention_scaling = 1.0


class Decoder(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = Rotary(c)


class LlamaLM(nn.Module):
    """A Llama causal LM for answering: transformers' parameter names and config fields, `greedy` as its
    generation (it has no training or generate() of its own)."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def read_config(folder: Path) -> SimpleNamespace | None:
    """A folder's config.json with the defaults LlamaConfig fills in, or None when it is not a Llama."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if raw.get("model_type") != ARCHITECTURE:
        return None
    heads = raw.get("num_attention_heads", 32)
    rope = raw.get("rope_parameters") or {"rope_type": (raw.get("rope_scaling") or {}).get("rope_type", "default"),
                                          "rope_theta": raw.get("rope_theta", 10000.0)}
    if raw.get("rope_scaling"):
        rope = {**rope, "rope_type": raw["rope_scaling"].get("rope_type", raw["rope_scaling"].get("type"))}
    fields = {"num_attention_heads": heads, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "num_key_value_heads": heads, "max_position_embeddings": 2048,
              "pretraining_tp": 1, **raw, "rope_parameters": rope}
    fields["head_dim"] = raw.get("head_dim") or fields["hidden_size"] // heads
    return SimpleNamespace(**fields, _attn_implementation="sdpa")


@contextmanager
def _no_init():
    """Modules built without random initialisation (as transformers' no_init_weights): every weight is then replaced
    by the checkpoint's. On the meta device torch would run its Python reference kernels, importing dynamo (~2 s)."""
    saved = {name: getattr(nn.init, name) for name in ("kaiming_uniform_", "uniform_", "normal_")}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


def load(folder: Path, dtype: torch.dtype, device: torch.device) -> LlamaLM | None:
    """The folder's Llama built from config.json and its safetensors, or None where `greedy` cannot run it."""
    from safetensors.torch import load_file

    config = read_config(folder)
    if config is None:
        return None
    with torch.device("meta"), _no_init():
        model = LlamaLM(config)
    if not supports(model):
        return None
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file, device=str(device)))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[:3]
        raise LoramemError(f"cannot load model from {folder}: weights do not match its config ({', '.join(odd)})")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.to(device)
    return model.eval()


# --- greedy decoding ------------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, kv_heads, length, dim = x.shape
    return x[:, :, None].expand(b, kv_heads, groups, length, dim).reshape(b, kv_heads * groups, length, dim)


class _Plan:
    """How one greedy call runs the layers, made once: per decoder layer its q|k|v (as q and k side by side, then v)
    and gate|up projections as one packed product each where packing runs them (packed.group; None: one by one),
    and RMSNorm's constants as tensors. transformers' LlamaRMSNorm takes the mean of squares (on a CPU a sum, then a
    division by the width) and adds epsilon, each time wrapping a Python number in a new tensor; the same division
    and addition by kept fp32 tensors give the same values with fewer operations (tests/test_llama.py compares the
    logits)."""

    def __init__(self, model) -> None:
        self.groups = [(packed.group([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], (2, 1)),
                        packed.group([layer.mlp.gate_proj, layer.mlp.up_proj])) for layer in model.model.layers]
        device, norm = model.model.embed_tokens.weight.device, model.model.norm
        self.width = torch.tensor(float(norm.weight.shape[-1]), device=device)
        self.eps = torch.tensor(float(norm.variance_epsilon), device=device)

    def norm(self, norm, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        wide = x if dtype == torch.float32 else x.to(torch.float32)
        wide = wide * (wide.pow(2).sum(-1, keepdim=True).div_(self.width).add_(self.eps)).rsqrt_()
        return norm.weight * (wide if dtype == torch.float32 else wide.to(dtype))


class _Step:
    """What one forward pass over new tokens needs, made once for all layers: the rotary terms in the (batch,
    positions, heads, dim) layout of the projections' outputs, the sine with rotate_half's signs in it (so that
    rotate_half(x) * sin is x.roll(dim / 2) * signed sin, exactly: negation is exact), the attention mask, and the
    dtype autocast runs SDPA in (None without autocast)."""

    def __init__(self, model, positions: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> None:
        rotary = model.model.rotary_emb
        freqs = positions[..., None].float() * rotary.inv_freq.to(device=positions.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rotary.attention_scaling).to(dtype).unsqueeze(2)
        sin = (emb.sin() * rotary.attention_scaling).to(dtype).unsqueeze(2)
        half = sin.shape[-1] // 2
        self.sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        self.mask = mask
        device = positions.device.type
        self.attention_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

    def rotated(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' apply_rotary_pos_emb on (batch, positions, heads, dim)."""
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.sin

    def for_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x as autocast hands it to SDPA (cast once where it is made, not again with the whole cache each step)."""
        dtype = self.attention_dtype
        return x if dtype is None or x.dtype == dtype else x.to(dtype)


def _attention(attn, x: torch.Tensor, step: _Step, cache: list, index: int, c, qkv) -> torch.Tensor:
    b, length, _ = x.shape
    if qkv is not None:
        qk, v = qkv(x)
    else:
        qk, v = torch.cat([attn.q_proj.forward(x), attn.k_proj.forward(x)], dim=-1), attn.v_proj.forward(x)
    # queries and keys rotated in one go: their heads side by side
    qk = step.for_attention(step.rotated(qk.view(b, length, -1, c.head_dim))).transpose(1, 2)
    q, k = qk[:, : c.num_attention_heads], qk[:, c.num_attention_heads :]
    v = step.for_attention(v.view(b, length, -1, c.head_dim).transpose(1, 2))
    if index < len(cache):  # as transformers' DynamicCache: the new keys and values concatenated on the old
        k, v = torch.cat([cache[index][0], k], dim=-2), torch.cat([cache[index][1], v], dim=-2)
        cache[index] = (k, v)
    else:
        cache.append((k, v))
    mask, extra = step.mask, {}
    groups = c.num_attention_heads // c.num_key_value_heads
    if groups > 1:  # transformers' sdpa_attention_forward: GQA in SDPA, packed queries, or repeated keys
        if mask is None and k.shape[-1] == v.shape[-1] <= 256:
            extra["enable_gqa"] = True
        elif length == 1:
            q = q.reshape(b, c.num_key_value_heads, groups, c.head_dim)
        else:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=c.head_dim**-0.5,
                                         is_causal=length > 1 and mask is None, **extra)
    return attn.o_proj.forward(out.reshape(b, -1, length, v.shape[-1]).transpose(1, 2).reshape(b, length, -1))


def _mlp(mlp, x: torch.Tensor, gate_up) -> torch.Tensor:
    gate, up = gate_up(x) if gate_up is not None else (mlp.gate_proj.forward(x), mlp.up_proj.forward(x))
    return mlp.down_proj.forward(F.silu(gate) * up)


def _forward(model, ids: torch.Tensor, step: _Step, cache: list, plan: _Plan,
             repeat: tuple[int, int, _Step] | None = None) -> torch.Tensor:
    """The last position's logits after `ids`, extending `cache` (one (keys, values) pair per layer). With `repeat`
    (layer, times, step), the rows run once through the layers before that one and are then repeated `times` over
    (row j*n + q is row q), hidden states and cache alike, to go on with `step`. Layers are called by their
    `forward` (no module hooks: a supported model has none)."""
    c, decoder = model.config, model.model
    h = decoder.embed_tokens(ids)
    for index, layer in enumerate(decoder.layers):
        if repeat is not None and index == repeat[0]:
            times, step = repeat[1], repeat[2]
            h = h.repeat(times, 1, 1)
            cache[:] = [(k.repeat(times, 1, 1, 1), v.repeat(times, 1, 1, 1)) for k, v in cache]
        qkv, gate_up = plan.groups[index]
        h = h + _attention(layer.self_attn, plan.norm(layer.input_layernorm, h), step, cache, index, c, qkv)
        h = h + _mlp(layer.mlp, plan.norm(layer.post_attention_layernorm, h), gate_up)
    return model.lm_head(plan.norm(decoder.norm, h)[:, -1:, :])[:, -1, :]


def _prefill_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """transformers' SDPA mask for a prompt: none without padding (SDPA's causal flag), else causal and padding."""
    if bool(attention_mask.all()):
        return None
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal[None, None] & attention_mask.bool()[:, None, None, :])


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, on_prefill=None, choose=None, repeat: int = 1, shared_layers: int = 0) -> torch.Tensor:
    """The prompts (left-padded) followed by their greedy continuations, as `model.generate(do_sample=False)`
    returns them: rows that reached EOS continue with `pad_token_id`; generation stops when every row has ended or
    after `max_new_tokens`. `on_prefill()` is called once the first new token's logits are computed. `choose(logits)`
    picks every row's next token from all rows' last logits (default: each row's own argmax; loramem.mix gives the
    rows of one question the token of their combined distributions). `repeat` > 1 decodes every prompt `repeat`
    times (row j*n + q is prompt q), the copies differing only from decoder layer `shared_layers` on (where their
    modules start), so the prompts' prefill through the layers before it runs once, not `repeat` times."""
    dtype = model.model.embed_tokens.weight.dtype
    padded = not bool(attention_mask.all())
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    prefill_mask = _prefill_mask(attention_mask)
    cache: list = []
    prompt_ids, step, rest = input_ids, _Step(model, positions, prefill_mask, dtype), None
    if repeat > 1:  # every row from here on is the repeated batch's
        input_ids, attention_mask, positions = (t.repeat(repeat, 1) for t in (input_ids, attention_mask, positions))
        mask_rows = None if prefill_mask is None else prefill_mask.repeat(repeat, 1, 1, 1)
        rest = (min(shared_layers, model.config.num_hidden_layers - 1), repeat, _Step(model, positions, mask_rows, dtype))
    plan = _Plan(model)
    logits = _forward(model, prompt_ids, step, cache, plan, rest)
    if on_prefill is not None:
        on_prefill()
    out, unfinished = [input_ids], torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    mask = attention_mask
    for made in range(max_new_tokens):
        token = logits.to(torch.float32).argmax(-1) if choose is None else choose(logits)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        out.append(token[:, None])
        unfinished &= token != eos_token_id
        if made + 1 == max_new_tokens or not bool(unfinished.any()):
            break
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        step_mask = mask.bool()[:, None, None, :] if padded else None
        logits = _forward(model, token[:, None], _Step(model, positions, step_mask, dtype), cache, plan)
    return torch.cat(out, dim=-1)
