"""Helpers for the synth tests: a private cache folder and a scripted, call-counting generator."""

from __future__ import annotations

import pytest

from loramem.synth import cache


@pytest.fixture(autouse=True)
def synth_cache(tmp_path, monkeypatch):
    """Every test gets its own empty synth cache (models stay in the shared cache)."""
    folder = tmp_path / "synth-cache"
    monkeypatch.setattr(cache, "synth_dir", lambda: folder)
    return folder


def last_user_message(prompt) -> str:
    return prompt if isinstance(prompt, str) else [m for m in prompt if m["role"] == "user"][-1]["content"]


class FakeGenerator:
    """Answers each prompt with reply(prompt text); counts calls and keeps every prompt it was sent."""

    def __init__(self, reply, qa_style: str = "lines", name: str = "fake"):
        self.reply = reply
        self.qa_style = qa_style
        self.name = name
        self.calls = 0
        self.prompts: list[str] = []

    def complete(self, prompts, max_tokens, temperature, seed):
        self.calls += 1
        texts = [last_user_message(prompt) for prompt in prompts]
        self.prompts += texts
        return [self.reply(text) for text in texts]


class Script:
    """Replies in turn from a list, the last one repeated."""

    def __init__(self, *replies: str):
        self.replies = list(replies)

    def __call__(self, prompt: str) -> str:
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


@pytest.fixture
def fake():
    """The FakeGenerator class (fixtures, not imports, so the tests run under any import mode)."""
    return FakeGenerator


@pytest.fixture
def script():
    return Script
