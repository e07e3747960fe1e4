"""Text generators that write synthetic training data: a local chat model, or any OpenAI-compatible server.

Both follow one small protocol, `Generator`: a `name` that goes into cache keys, and `complete`, which
answers a list of prompts (each a user message, or a conversation of {"role", "content"} messages).
An optional `qa_style` tells the pipeline how to ask for QA pairs: "json" (all pairs of a chunk in one
JSON reply) for models that follow instructions well, "lines" (one "Q: ... A: ..." pair about one
sentence per prompt; the default) for small local models.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

import torch

from loramem.errors import LoramemError
from loramem.models import DEFAULT_MODEL, Base, load_base
from loramem.synth.prompts import Prompt


class Generator(Protocol):
    name: str  # identifies the model in cache keys: same name, same outputs for the same prompts and seed
    qa_style: str  # "json" or "lines"; optional, "lines" when absent

    def complete(self, prompts: list[Prompt], max_tokens: int, temperature: float, seed: int) -> list[str]:
        """One reply per prompt; prompt i is sampled with seed + i where the backend takes a seed."""
        ...


class HFGenerator:
    """A local Hugging Face chat model; prompts are batched into one `generate` call per batch_size."""

    qa_style = "lines"

    def __init__(self, base: Base | str = DEFAULT_MODEL, batch_size: int = 16, top_p: float = 0.9,
                 repetition_penalty: float = 1.1):
        self.base = load_base(base) if isinstance(base, str) else base
        self.batch_size = batch_size
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty
        # The weights hash keeps a cache entry from outliving a model replaced under the same name or path.
        self.name = f"hf:{self.base.name}@{self.base.fingerprint['weights_sha256'][:8]}"

    @property
    def tokenizer(self):
        return self.base.tokenizer

    def complete(self, prompts: list[Prompt], max_tokens: int, temperature: float, seed: int) -> list[str]:
        texts = [self._chat(prompt) for prompt in prompts]
        replies: list[str] = []
        with _seeded(seed, self.base.device), _left_padding(self.tokenizer):
            for start in range(0, len(texts), self.batch_size):
                replies += self._generate(texts[start : start + self.batch_size], max_tokens, temperature)
        return replies

    @property
    def _has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _chat(self, prompt: Prompt) -> str:
        messages = _messages(prompt)
        if not self._has_chat_template:
            return "".join(message["content"] + "\n" for message in messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def _generate(self, texts: list[str], max_tokens: int, temperature: float) -> list[str]:
        tokenizer = self.tokenizer
        # A chat template already writes the special tokens into the text.
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self._has_chat_template)
        enc = enc.to(self.base.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": self.top_p} if temperature > 0 else {
            "do_sample": False, "temperature": None, "top_p": None}
        ids = self.base.model.generate(
            **enc, max_new_tokens=max_tokens, repetition_penalty=self.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id, **sampling,
        )
        return tokenizer.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Sample from `seed` without disturbing the caller's random state (training shuffles with it)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _left_padding(tokenizer):
    """Batched generation needs prompts aligned at the right; the tokenizer is shared, so restore it."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


class OpenAIGenerator:
    """Any server with an OpenAI-compatible /chat/completions: vLLM, llama.cpp, Ollama, OpenAI.

    Settings come from the arguments, else LORAMEM_OPENAI_BASE_URL / LORAMEM_OPENAI_MODEL /
    LORAMEM_OPENAI_API_KEY, else OPENAI_BASE_URL / OPENAI_API_KEY. Prompts are sent `concurrency` at a
    time, since servers batch concurrent requests.
    """

    qa_style = "json"
    tokenizer = None  # unknown: texts are cut into chunks by characters

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 300.0, concurrency: int = 8):
        self.model = model or os.environ.get("LORAMEM_OPENAI_MODEL")
        if not self.model:
            raise LoramemError("no model for the OpenAI-compatible endpoint: pass model or set LORAMEM_OPENAI_MODEL")
        base_url = base_url or os.environ.get("LORAMEM_OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        self.base_url = (base_url or "https://api.openai.com/v1").rstrip("/")
        self.api_key = api_key or os.environ.get("LORAMEM_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.concurrency = concurrency
        self.name = f"openai:{self.model}@{self.base_url}"

    def complete(self, prompts: list[Prompt], max_tokens: int, temperature: float, seed: int) -> list[str]:
        def ask(indexed: tuple[int, Prompt]) -> str:
            index, prompt = indexed
            return self._chat(prompt, max_tokens, temperature, seed + index)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(ask, enumerate(prompts)))

    def _chat(self, prompt: Prompt, max_tokens: int, temperature: float, seed: int) -> str:
        body = {
            "model": self.model,
            "messages": _messages(prompt),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        reply = self._post("/chat/completions", body)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise LoramemError(f"{self.base_url} did not answer like a chat completion: {_snippet(reply)}") from None

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise LoramemError(f"{self.base_url} answered HTTP {err.code}: {_snippet(err.read())}") from None
        except urllib.error.URLError as err:
            raise LoramemError(f"cannot reach the OpenAI-compatible endpoint {self.base_url}: {err.reason}") from None
        except TimeoutError:
            raise LoramemError(f"{self.base_url} did not answer within {self.timeout:g} s") from None
        except json.JSONDecodeError:
            raise LoramemError(f"{self.base_url} answered with something that is not JSON") from None


def _snippet(value: object, limit: int = 200) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split())[:limit]


GENERATORS = ("hf", "openai")


def choose_generator(kind: str, memory, model: str | None = None, base_url: str | None = None,
                     formats=(), own_model_only: bool = False):
    """The synthetic-data generator of a write into `memory`: None when the formats need none (only `original`),
    a local chat model (`hf`: by default the memory's own; another one unless `own_model_only`, as the server,
    which holds one model per base, asks) or an OpenAI-compatible endpoint (`openai`)."""
    if kind not in GENERATORS:
        raise LoramemError(f"unknown generator {kind!r}: choose {' or '.join(GENERATORS)}")
    if formats and set(formats) == {"original"}:
        return None
    if kind == "openai":
        return OpenAIGenerator(base_url=base_url, model=model)
    if model is None or model == memory.model_name:
        return HFGenerator(memory.base)
    if own_model_only:
        raise LoramemError("the hf generator is the memory's own model; use generator openai for another")
    return HFGenerator(model)
