"""OpenAIGenerator over real HTTP against a small fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import socket

import pytest
from fake_openai import FakeServer, chat_reply

from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.synth import OpenAIGenerator, SynthSpec, synthesize

DOC = Document.from_text("The Eiffel Tower in Paris was designed by Gustave Eiffel and completed in 1889.")
PAIRS = json.dumps([{"question": "Who designed the Eiffel Tower?", "answer": "Gustave Eiffel"}])


@pytest.fixture
def serve():
    servers = []

    def start(respond) -> FakeServer:
        servers.append(FakeServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_chat_completion_request_and_reply(serve):
    server = serve(lambda body: chat_reply("echo: " + body["messages"][-1]["content"]))
    generator = OpenAIGenerator(model="m", base_url=server.url + "/", api_key="sk-test")
    replies = generator.complete(["one", [{"role": "user", "content": "two"}]], max_tokens=10, temperature=0.0, seed=5)
    assert replies == ["echo: one", "echo: two"]
    assert generator.name == f"openai:m@{server.url}"
    bodies = sorted((body for _, body in server.requests), key=lambda body: body["seed"])
    assert [body["seed"] for body in bodies] == [5, 6]  # each prompt its own seed
    assert bodies[0]["model"] == "m" and bodies[0]["max_tokens"] == 10
    assert bodies[0]["messages"] == [{"role": "user", "content": "one"}]
    assert all(headers["Authorization"] == "Bearer sk-test" for headers, _ in server.requests)


def test_settings_from_the_environment(monkeypatch):
    for name in ("LORAMEM_OPENAI_BASE_URL", "LORAMEM_OPENAI_MODEL", "LORAMEM_OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://fallback/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "fallback-key")
    monkeypatch.setenv("LORAMEM_OPENAI_MODEL", "llama")
    generator = OpenAIGenerator()
    assert (generator.base_url, generator.model, generator.api_key) == ("http://fallback/v1", "llama", "fallback-key")
    monkeypatch.setenv("LORAMEM_OPENAI_BASE_URL", "http://mine:8000/v1")
    monkeypatch.setenv("LORAMEM_OPENAI_API_KEY", "my-key")
    generator = OpenAIGenerator()
    assert (generator.base_url, generator.api_key) == ("http://mine:8000/v1", "my-key")
    monkeypatch.delenv("LORAMEM_OPENAI_MODEL")
    with pytest.raises(LoramemError, match="LORAMEM_OPENAI_MODEL"):
        OpenAIGenerator()


def test_qa_over_http(serve):
    server = serve(lambda body: chat_reply(f"```json\n{PAIRS}\n```"))
    examples, report = synthesize(DOC, SynthSpec(questions=1), OpenAIGenerator(model="m", base_url=server.url))
    assert [e.answer for e in examples] == [" Gustave Eiffel"]
    assert report.produced == {"qa": 1} and len(server.requests) == 1
    assert "JSON" in server.requests[0][1]["messages"][0]["content"]


def test_malformed_reply_is_retried_then_reported(serve):
    replies = ["Sorry, I can't help with that.", PAIRS]
    server = serve(lambda body: chat_reply(replies.pop(0) if len(replies) > 1 else replies[0]))
    generator = OpenAIGenerator(model="m", base_url=server.url)
    _, report = synthesize(DOC, SynthSpec(questions=1), generator)
    assert report.produced == {"qa": 1} and report.malformed == 0 and len(server.requests) == 2

    server = serve(lambda body: chat_reply("[not json"))
    generator = OpenAIGenerator(model="m", base_url=server.url)
    examples, report = synthesize(DOC, SynthSpec(questions=1, max_retries=2, refine_rounds=0), generator)
    assert examples == [] and report.malformed == 1 and report.produced == {"qa": 0}
    assert len(server.requests) == 3


def test_unreachable_endpoint_is_one_clear_error():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    generator = OpenAIGenerator(model="m", base_url=f"http://127.0.0.1:{port}/v1", timeout=5)
    with pytest.raises(LoramemError) as err:
        synthesize(DOC, SynthSpec(questions=4), generator)
    message = str(err.value)
    assert message.startswith(f"cannot reach the OpenAI-compatible endpoint http://127.0.0.1:{port}/v1")
    assert "\n" not in message


@pytest.mark.parametrize("status, body, expected", [
    (500, {"error": "model crashed"}, "answered HTTP 500: {\"error\": \"model crashed\"}"),
    (200, {"result": "hello"}, "did not answer like a chat completion"),
])
def test_bad_answers_are_errors(serve, status, body, expected):
    server = serve(lambda request: (status, body))
    with pytest.raises(LoramemError) as err:
        OpenAIGenerator(model="m", base_url=server.url).complete(["hi"], 5, 0.0, 0)
    assert expected in str(err.value)
