"""The OpenAI-compatible server, driven by the official openai client against a real uvicorn on 127.0.0.1."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from loramem import LoraSpec, Memory, TrainSpec, facts_from_text
from loramem.prompts import render_prompt
from loramem.serve import create_app
from sample_facts import LINEAR_TO_ZERO

KEY = "test-key"
FACTS = "Question: What is the phone number of Ann Lee? Answer: 603-556-7631\nQuestion: What is the phone number of Bo Kim? Answer: 705-882-9365\n"
OTHER = "Question: What is the phone number of Cy Ortega? Answer: 212-340-1187\n"
FAST = TrainSpec(lr=1e-2, epochs=80, batch_size=2, **LINEAR_TO_ZERO)
QUESTION = "What is the phone number of Bo Kim?"


@pytest.fixture(scope="module")
def memories(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    facts = Memory.open(root / "facts.mem", create=True, base=tiny)
    facts.write(facts_from_text(FACTS), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, progress=False)
    docs = Memory.open(root / "docs.mem", create=True, base=tiny)
    docs.write(facts_from_text(OTHER), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, name="ortega", progress=False)
    fresh = Memory.open(root / "fresh.mem", create=True, base=tiny)  # no module yet: created by a write elsewhere
    return {"facts": facts, "docs": docs, "fresh": fresh}


@pytest.fixture(scope="module")
def server(memories):
    yield from running(memories)


def running(memories):
    """A real uvicorn over `memories` on a free port, with the API key: yields (base URL of /v1, the service)."""
    app = create_app(memories, api_key=KEY)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", app.state.service
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def ask(client, question=QUESTION, model="facts", **options):
    extra = {"loramem": options} if options else None
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          extra_body=extra)


def test_models_lists_memories_and_base(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"facts", "docs", "fresh", "tiny"}
    assert models["docs"].loramem["base_model"] == "tiny"
    assert models["docs"].loramem["modules"][0]["name"] == "ortega"


@pytest.mark.parametrize("options,mode", [({}, "lora"), ({"mode": "base"}, "base"),
                                          ({"context": "rag", "router": "bm25", "top_k": 1}, "lora+rag")])
def test_answer_equals_memory_ask(client, server, memories, options, mode):
    reply = ask(client, **options)
    with server[1].lock:  # the model is shared with the server: take its turn
        expected = memories["facts"].ask(QUESTION, mode=mode, **{k: v for k, v in options.items() if k not in ("context", "mode")})
    assert reply.choices[0].message.content == expected.text and reply.loramem["mode"] == mode
    assert reply.object == "chat.completion" and reply.model == "facts"


def test_default_answer_recalls_the_fact_with_its_module(client, memories, tiny):
    reply = ask(client)
    assert reply.choices[0].message.content.startswith("705-882-9365")
    record = memories["facts"].modules()[0]
    assert reply.loramem["modules"] == [record.id] and reply.loramem["module_names"] == [record.name]
    assert set(reply.loramem["timing"]) == {"route", "merge", "prefill", "decode"}
    text, usage = reply.choices[0].message.content, reply.usage
    assert usage.prompt_tokens == len(tiny.tokenizer(render_prompt(tiny.tokenizer, QUESTION)).input_ids)
    assert usage.completion_tokens == len(tiny.tokenizer(" " + text, add_special_tokens=False).input_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the context put into the prompt is read, so it is counted: ICL puts the module's facts, one a line
    with_context = ask(client, context="icl").usage
    facts_prompt = render_prompt(tiny.tokenizer, QUESTION, context=FACTS.strip())
    assert with_context.prompt_tokens == len(tiny.tokenizer(facts_prompt).input_ids)


def test_streaming_chunks_join_to_the_same_text(client, memories, tiny):
    whole = ask(client).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="facts", messages=[{"role": "user", "content": QUESTION}], stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].loramem["modules"] == [memories["facts"].modules()[0].id]
    assert chunks[-1].usage.completion_tokens == len(tiny.tokenizer(" " + whole, add_special_tokens=False).input_ids)
    assert not chunks[-1].choices


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "facts", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    response = httpx.post(server[0] + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_base_model_answers_with_base_weights(client, server, memories):
    reply = ask(client, model="tiny")
    with server[1].lock:
        assert reply.choices[0].message.content == memories["facts"].ask(QUESTION, mode="base").text
    assert reply.loramem["modules"] == []


def test_concurrent_questions_are_batched(client, server):
    alone = ask(client).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        with server[1].lock:  # hold the model while the questions queue up, so they are answered in one batch
            futures = [pool.submit(ask, client) for _ in range(8)]
            time.sleep(0.5)
        replies = [f.result() for f in futures]
    assert all(r.choices[0].message.content == alone for r in replies)
    assert max(r.loramem["batch"] for r in replies) > 1


def test_a_memory_created_elsewhere_is_picked_up(client, server, memories, tiny):
    with pytest.raises(openai.BadRequestError, match="no modules yet"):
        ask(client, model="fresh")
    elsewhere = Memory.open(memories["fresh"].path, create=True, base=tiny)
    with server[1].lock:
        elsewhere.write(facts_from_text(OTHER), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, name="new", progress=False)
    assert ask(client, model="fresh").loramem["module_names"] == ["new"]


def test_api_key_is_required(server):
    url = server[0] + "/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "code"}
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0], api_key="wrong", max_retries=0).models.list()


def test_oversized_bodies_are_refused(server):
    url, headers = server[0] + "/chat/completions", {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({"model": "facts", "messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode()
    assert httpx.post(url, content=big, headers=headers).status_code == 413
    chunked = iter([big[i:i + 65536] for i in range(0, len(big), 65536)])  # no Content-Length: counted as read
    response = httpx.post(url, content=chunked, headers=headers)
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]


def test_unknown_memory_is_404(client):
    with pytest.raises(openai.NotFoundError, match="no memory 'nowhere'"):
        ask(client, model="nowhere")


@pytest.mark.parametrize("question,options,message", [
    ("  ", {}, "empty question"),
    (QUESTION, {"top_k": 0}, "top_k"),
    (QUESTION, {"mode": "multi", "top_k": 4}, "top-k 4"),
    (QUESTION, {"mode": "telepathy"}, "unknown mode"),
    (QUESTION, {"colour": "blue"}, "colour"),
    (QUESTION, {"mode": "multi", "merge": "mix", "base_weight": 1.0}, "base_weight"),
    (QUESTION, {"mode": "multi", "merge": "linear", "base_weight": 0.5}, "output compositions"),
    (QUESTION, {"mode": "multi", "router_temperature": 0}, "router_temperature"),
])
def test_bad_requests_are_400(client, question, options, message):
    with pytest.raises(openai.BadRequestError, match=message):
        ask(client, question, **options)


def test_documents_job_writes_a_module_while_the_memory_answers(client, server):
    http = httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    documents = [{"text": f"The lighthouse on {place} Island was painted green in 1931.", "title": place}
                 for place in ("Vey", "Orr")]
    body = {"documents": documents, "format": "original", "epochs": 40, "target_recall": 0, "rank": 4}
    submitted = http.post("/memories/docs/documents", json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    reply = ask(client, "What is the phone number of Cy Ortega?", model="docs", module="ortega")
    assert reply.choices[0].message.content.startswith("212-340-1187")  # answered between the job's modules
    assert http.get(f"/jobs/{job_id}").json()["status"] == "running"
    deadline = time.monotonic() + 60
    while (job := http.get(f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "done" and [m["name"] for m in job["modules"]] == ["Vey", "Orr"], job
    names = [m["name"] for m in next(m for m in client.models.list().data if m.id == "docs").loramem["modules"]]
    assert names == ["ortega", "Vey", "Orr"]
    written = ask(client, "What was painted green?", model="docs", module="Vey")
    assert written.loramem["modules"] == [job["modules"][0]["id"]]


@pytest.mark.parametrize("path,body,status,message", [
    ("/memories/nowhere/documents", {"documents": [{"text": "x"}]}, 404, "no memory"),
    ("/memories/docs/documents", {"documents": []}, 400, "documents"),
    ("/memories/docs/documents", {"documents": [{"text": " "}]}, 400, "no text"),
    ("/memories/docs/documents", {"documents": [{"text": "x"}], "rank": 0}, 400, "rank"),
    ("/memories/docs/documents", {"documents": [{"text": "x"}], "format": "poem"}, 400, "poem"),
    ("/memories/docs/documents", {"documents": [{"text": "x"}], "format": "self-study", "prompts": 0}, 400,
     "prompt count must be at least 1"),
    ("/memories/docs/documents", {"documents": [{"text": "x"}], "format": "self-study", "kinds": "poems"}, 400,
     "unknown self-study kind 'poems'"),
])
def test_bad_documents_jobs(server, path, body, status, message):
    response = httpx.post(server[0] + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status and message in response.json()["error"]["message"], response.text


def test_unknown_job_is_404(server):
    response = httpx.get(server[0] + "/jobs/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404


# --- the life cycle as jobs: forget, sync; the memories' listing; the page -------------------------------------

SHARDS = [FACTS, OTHER]
GEARS = "# Gears\nZorblat engines use quantum gears built in Oslo.\n"
QUIX = "Mira Tan designed the first Quix engine in 1984.\n"


@pytest.fixture(scope="module")
def changing(tiny, tmp_path_factory):
    """A memory of two fact shards and one written from a folder of two documents, served."""
    from loramem.synth import SynthSpec
    from loramem.writing import write_documents

    root = tmp_path_factory.mktemp("lifecycle")
    shards = Memory.open(root / "shards.mem", create=True, base=tiny)
    for i, text in enumerate(SHARDS):
        shards.write(facts_from_text(text), lora=LoraSpec(rank=8, layers="all"), train_spec=FAST, name=f"shard-{i}",
                     progress=False)
    folder = root / "docs"
    folder.mkdir()
    (folder / "a.md").write_text(GEARS)
    (folder / "b.txt").write_text(QUIX)
    (root / "other").mkdir()
    (root / "other" / "c.txt").write_text(QUIX)
    write_documents(root / "docs.mem", [folder], SynthSpec(formats="original"), LoraSpec(rank=4), TrainSpec(epochs=2),
                    model="tiny", check_locality=False, progress=False)
    memories = {"shards": shards, "docs": Memory.open(root / "docs.mem", base=tiny)}
    for url, service in running(memories):
        yield root, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60), service


def _finished(http, job: dict) -> dict:
    deadline = time.monotonic() + 120
    while (job := http.get(f"/jobs/{job['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return job


def _listing(http) -> dict:
    return {m["name"]: m for m in http.get("/memories").json()["data"]}


def test_a_forget_job_retires_the_module_and_the_memory_answers_as_before_it(changing):
    _, http, _ = changing
    before = _listing(http)["shards"]
    assert [m["name"] for m in before["modules"]] == ["shard-0", "shard-1"] and before["modules"][0]["bytes"] > 0
    job = _finished(http, http.post("/memories/shards/forget", json={"module": "shard-0"}).json())
    assert job["status"] == "done" and job["kind"] == "forget" and [m["name"] for m in job["forgotten"]] == ["shard-0"]
    assert [m["name"] for m in _listing(http)["shards"]["modules"]] == ["shard-1"]
    question = {"model": "shards", "messages": [{"role": "user", "content": QUESTION}]}
    reply = http.post("/chat/completions", json=question).json()
    base = http.post("/chat/completions", json=question | {"loramem": {"mode": "base"}}).json()
    assert reply["loramem"]["module_names"] == ["shard-1"]  # the one module left, not the forgotten facts'
    assert not reply["choices"][0]["message"]["content"].startswith("705-882-9365")
    assert base["choices"][0]["message"]["content"] != ""


def test_a_sync_job_rewrites_changed_documents_and_forgets_removed_ones(changing):
    root, http, _ = changing
    before = _listing(http)["docs"]
    (root / "docs" / "a.md").write_text(GEARS.replace("Oslo", "Bergen"))
    (root / "docs" / "b.txt").unlink()
    body = {"folder": str(root / "docs"), "format": "original", "epochs": 2, "rank": 4}
    job = _finished(http, http.post("/memories/docs/sync", json=body).json())
    assert job["status"] == "done" and job["kind"] == "sync", job
    assert [m["name"] for m in job["modules"]] == ["Gears"] and [m["name"] for m in job["forgotten"]] == ["b"]
    after = _listing(http)["docs"]
    assert [m["name"] for m in after["modules"]] == ["Gears"] and after["retired"] == 2
    assert after["modules"][0]["id"] not in {m["id"] for m in before["modules"]}
    assert [d["document"] for d in after["documents"]] == [str((root / "docs" / "a.md").resolve())]


@pytest.mark.parametrize("path,body,message", [
    ("/memories/shards/forget", {"module": "nothing"}, "no module 'nothing'"),
    ("/memories/shards/forget", {"document": "nowhere.md"}, "no document 'nowhere.md'"),
    ("/memories/shards/forget", {}, "forget needs a module or a document"),
    ("/memories/docs/sync", {"folder": "{root}/other"}, "is not the source of any document"),
    ("/memories/docs/sync", {"folder": "{root}/missing"}, "is not a folder"),
])
def test_bad_life_cycle_jobs_are_400_and_change_nothing(changing, path, body, message):
    root, http, _ = changing
    before = _listing(http)
    response = http.post(path, json={k: v.format(root=root) for k, v in body.items()})
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert _listing(http) == before


def test_the_page_is_served_without_the_key_and_the_api_is_not(changing):
    _, http, _ = changing
    page = httpx.get(str(http.base_url).removesuffix("/v1/") + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="ask-form"' in page.text and "textContent" in page.text
    assert httpx.get(str(http.base_url) + "memories").status_code == 401
