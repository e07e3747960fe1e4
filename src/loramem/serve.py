"""An OpenAI-compatible server over memories: `loramem serve --memory NAME=PATH ...`.

    GET  /v1/models                      the memories (id = memory name) and their base models
    POST /v1/chat/completions            model = a memory: the last user message is the question, answered
                                         through Memory.ask_many; options in the extra body field "loramem"
    POST /v1/memories/{name}/documents   write documents into a memory as a background job
    POST /v1/memories/{name}/sync        a job: rewrite a folder's changed documents, forget its removed ones
    POST /v1/memories/{name}/forget      a job: forget a module, or every module written from a document
    GET  /v1/jobs/{id}                   a job's progress
    GET  /v1/memories                    each memory's modules and documents (what `loramem inspect` shows)
    GET  /                               a page over all of it: the memories, and an ask box (page.html)

Every memory shares its base model object with the others of the same base and with the writer, and answering
merges modules into the weights in place, so all model work takes one lock: answers run in one thread (the
micro-batcher, which answers concurrent questions with the same options in one ask_many call), jobs in
another, advancing one module at a time so that questions are answered between a job's modules.
(Over 400 lines: the app, its request models, the micro-batcher and the job runner share that one lock and the
memories' registry; split apart they would pass both through every call.)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import re
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramem.answer import Answer, parse_mode
from loramem.config import AUTO, AskSpec, LoraSpec, TrainSpec, build_settings, group_help, option_fields
from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.memory import Memory
from loramem.store import MANIFEST
from loramem.synth import SynthSpec, choose_generator
from loramem.synth.selfstudy import SelfStudySpec
from loramem.writing import self_study_recipe

log = logging.getLogger("loramem.serve")
DEFAULT_MAX_BODY = 1_000_000  # bytes
MAX_TOKENS_LIMIT = 1024
DEFAULT_BATCH_WINDOW = 0.005  # seconds the batcher waits for another question before answering those it has
DEFAULT_MAX_BATCH = AskSpec.batch_size  # questions per ask_many call (ask_many's own generation batch)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PAGE = Path(__file__).with_name("page.html")  # served at / without the API key: it holds no data, asks for the key


# --- errors: OpenAI's shape {"error": {"message", "type", "code"}} -------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _validation_message(err: RequestValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    return f"{where}: {first['msg']}" if where else first["msg"]


# --- serializing model work ---------------------------------------------------------------------------------

class FairLock:
    """A lock granted in arrival order: a job taking it again right after each module cannot starve the
    answering thread waiting for it (threading.Lock makes no such promise)."""

    def __init__(self):
        self._turns = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self):
        with self._turns:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._turns.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        with self._turns:
            self._serving += 1
            self._turns.notify_all()


@dataclass(frozen=True)
class AskKey:
    """What questions must share to be answered in one ask_many call."""

    memory: str
    spec: AskSpec
    module: str | tuple[str, ...] | None = None


@dataclass
class Reply:
    answer: Answer
    module_names: list[str]
    prompt_tokens: int
    completion_tokens: int
    batch: int  # questions answered in the same ask_many call


class Batcher:
    """Answers questions in one thread, grouping those that arrive together with the same memory and options into
    one ask_many call: a batch of 16 costs little more than one question on the same weights."""

    def __init__(self, answer_group, lock: FairLock, window_s: float, max_batch: int):
        self._answer_group = answer_group
        self._lock = lock
        self._window_s = window_s
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="loramem-answers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, key: AskKey, question: str) -> Future:
        future: Future = Future()
        self._queue.put((key, question, future))
        return future

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            # Questions arriving less than a window apart join the batch; then, under the lock, so do those that
            # queued up while a job held the model.
            batch = [first, *self._more(self._max_batch - 1, self._window_s)]
            with self._lock:
                batch += self._more(self._max_batch - len(batch), 0)
                groups: dict[AskKey, list] = {}
                for key, question, future in batch:
                    if future.set_running_or_notify_cancel():  # a client that went away is not answered
                        groups.setdefault(key, []).append((question, future))
                for key, items in groups.items():
                    self._answer(key, items)

    def _more(self, limit: int, wait_s: float) -> list:
        """Up to `limit` more queued questions, each waited for at most `wait_s`."""
        items = []
        while len(items) < limit:
            try:
                item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # stopping: answer this batch, then let the loop see it
                self._queue.put(None)
                break
            items.append(item)
        return items

    def _answer(self, key: AskKey, items: list) -> None:
        try:
            replies = self._answer_group(key, [question for question, _ in items])
        except Exception as err:  # noqa: BLE001 - every error must reach the waiting requests (same options: all fail)
            for _, future in items:
                future.set_exception(err)
            return
        for (_, future), reply in zip(items, replies):
            future.set_result(reply)


# --- documents jobs -----------------------------------------------------------------------------------------

@dataclass
class Job:
    id: str
    memory: str
    documents: int
    kind: str = "documents"  # documents, sync or forget
    status: str = "queued"  # queued, running, done, failed
    modules: list[dict] = field(default_factory=list)  # the modules written so far
    forgotten: list[dict] = field(default_factory=list)  # the modules a sync or a forget retired
    no_data: int = 0  # documents the generator gave no usable training data for
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict:
        return {"object": "loramem.job"} | asdict(self)


_DONE = object()


class JobRunner:
    """Runs documents jobs one after another in one thread, one module at a time under the model lock."""

    def __init__(self, lock: FairLock):
        self._lock = lock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[str, Job] = {}
        self._thread = threading.Thread(target=self._loop, name="loramem-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=1)  # a job still training is cut off: commits are atomic, nothing half-written

    def submit(self, memory: str, documents: int, steps, finish=None, kind: str = "documents") -> Job:
        """`steps()` returns the write's iterator of (record, reports), one item per module; `finish()`, run last
        under the model lock, returns the rows of the modules it retired."""
        job = Job(uuid.uuid4().hex, memory, documents, kind)
        self._jobs[job.id] = job
        self._queue.put((job, steps, finish))
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._run(*item)

    def _run(self, job: Job, steps, finish) -> None:
        job.status = "running"
        try:
            for record, _reports in self._one_module_at_a_time(steps()):
                if record is None:
                    job.no_data += 1
                else:
                    job.modules.append({"id": record.id, "name": record.name, "examples": record.n_examples,
                                        "recall": record.recall, "train_seconds": record.train_seconds})
            if job.documents and not job.modules:
                raise LoramemError("the generator gave no usable training data for any document; nothing written")
            if finish is not None:
                with self._lock:
                    job.forgotten = finish()
            job.status = "done"
        except LoramemError as err:
            job.status, job.error = "failed", str(err)
        except Exception as err:  # a bug: keep the server up, say what happened
            log.exception("job %s failed", job.id)
            job.status, job.error = "failed", f"internal error: {type(err).__name__}: {err}"
        job.finished_at = time.time()

    def _one_module_at_a_time(self, steps):
        while True:
            with self._lock:
                step = next(steps, _DONE)
            if step is _DONE:
                return
            yield step


# --- request bodies -----------------------------------------------------------------------------------------

def settings_fields_of(classes, exclude: tuple[str, ...] = (), optional: bool = False) -> dict:
    """Request fields from settings dataclasses (config.option_fields, as the command line's options), each with its
    help as the description. `optional`: every field defaults to None (unset: the receiver's default)."""
    plain, groups = option_fields(classes, exclude)
    out = {f.name: (f.type | None if optional else f.type,
                    Field(None if optional else f.default, description=f.help, ge=f.options.get("ge"),
                          gt=f.options.get("gt"), lt=f.options.get("lt")))
           for f in plain}
    return out | {group: (str, Field("", description=group_help(members))) for group, members in groups.items()}


FORBID = ConfigDict(extra="forbid")
AskOptions = create_model(
    "AskOptions", __config__=FORBID,
    **settings_fields_of([AskSpec], exclude=("max_new_tokens", "batch_size"), optional=True),  # OpenAI's fields, the server's
    context=(Literal["none", "rag", "icl"] | None, Field(None, description="sets the mode's context part")),
    module=(str | list[str] | None, Field(None, description="module id or name, or several to merge")),
)


class Message(BaseModel):
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text is read
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    stream: bool = False
    stream_options: dict | None = None
    loramem: AskOptions | None = None  # other OpenAI fields (temperature...) are ignored: answers are greedy


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    title: str | None = None


WRITE_FIELDS = dict(
    format=(str, Field("qa", description="synthetic data formats: original, qa, summary, rewrite or a mix (qa+summary), "
                                        "or self-study (prompts answered by the model that reads the document)")),
    one_module=(bool, Field(False, description="one module for all the documents")),
    generator=(Literal["hf", "openai"], Field("hf", description="hf: the memory's own model; openai: the endpoint "
                                                 "and key from $LORAMEM_OPENAI_BASE_URL/_API_KEY")),
    generator_model=(str | None, None),
    **settings_fields_of([SynthSpec, SelfStudySpec, LoraSpec, TrainSpec]),
)
DocumentsRequest = create_model("DocumentsRequest", __config__=FORBID,
                                documents=(list[DocumentIn], Field(min_length=1)), **WRITE_FIELDS)
SyncRequest = create_model("SyncRequest", __config__=FORBID, **WRITE_FIELDS, folder=(str, Field(
    description="a folder on the server's machine that the memory was written from: its changed documents are "
                "rewritten (their old modules retired), its removed ones forgotten")))


class ForgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module: str | None = Field(None, description="a module's id, id prefix or name")
    document: str | None = Field(None, description="a document's path or id: every module written from it")


# --- the service: memories, options, answers ----------------------------------------------------------------

class Service:
    def __init__(self, memories: dict[str, Memory], window_s: float = DEFAULT_BATCH_WINDOW,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.memories = memories
        # A base model is served under its name, answered through the first memory over it.
        self.bases: dict[str, str] = {}
        for name, memory in memories.items():
            self.bases.setdefault(memory.base.name, name)
        self.lock = FairLock()
        self.max_batch = max_batch
        self.batcher = Batcher(self._answer_group, self.lock, window_s, max_batch)
        self.jobs = JobRunner(self.lock)
        self.started = int(time.time())

    def memory(self, name: str) -> Memory:
        if name not in self.memories:
            raise ApiError(404, f"no memory {name!r}; GET /v1/models lists them", "model_not_found")
        memory = self.memories[name]
        if memory.store is None and (memory.path / MANIFEST).is_file():  # created by another process meanwhile
            memory = self.memories[name] = Memory.open(memory.path, memory.model_name, base=memory.base)
        return memory

    def models(self) -> list[dict]:
        rows = []
        for name in self.memories:
            memory = self.memory(name)
            modules = [{"id": m.id, "name": m.name} for m in memory.modules()]
            rows.append(self._model_row(name, {"base_model": memory.base.name, "modules": modules}))
        return rows + [self._model_row(base, {"base_model": base, "modules": []}) for base in self.bases]

    def _model_row(self, name: str, extra: dict) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "loramem", "loramem": extra}

    def ask_key(self, request: ChatRequest) -> AskKey:
        max_new_tokens = request.max_completion_tokens or request.max_tokens or AskSpec.max_new_tokens
        if request.model in self.bases and request.model not in self.memories:
            if request.loramem is not None:
                raise ApiError(400, f"{request.model} is the base model: loramem options need a memory")
            return AskKey(self.bases[request.model], AskSpec(mode="base", max_new_tokens=max_new_tokens))
        memory = self.memory(request.model)
        options = request.loramem or AskOptions()
        module = tuple(options.module) if isinstance(options.module, list) else options.module
        given = {k: v for k, v in options.model_dump(exclude={"context", "module", "mode"}).items() if v is not None}
        spec = AskSpec(mode=self._mode(memory, options), max_new_tokens=max_new_tokens, **given)
        return AskKey(request.model, spec, module)

    @staticmethod
    def _mode(memory: Memory, options: AskOptions) -> str:
        """The given mode, else one module's (the memory has one, or one is named), else the router's top-k
        merged; a "context" option sets the mode's context part (multi + rag -> multi+rag)."""
        one_module = isinstance(options.module, str) or len(memory.modules()) == 1
        mode = options.mode or ("lora" if one_module else "multi")
        weights, context = parse_mode(mode)
        if options.context is not None:
            context = None if options.context == "none" else options.context
        if weights == "base":
            return context or "base"
        return f"{weights}+{context}" if context else weights

    def _answer_group(self, key: AskKey, questions: list[str]) -> list[Reply]:
        """Runs in the batcher's thread, under the model lock (the tokenizer is not safe to share either)."""
        memory = self.memories[key.memory]
        answers = memory.ask_many(questions, key.spec, module=key.module, batch_size=self.max_batch)
        names = {m.id: m.name for m in memory.modules()}
        # Usage as generation counted it: the whole prompt read (ICL or RAG context included) and the tokens written.
        return [Reply(a, [names.get(i, i) for i in a.modules], a.prompt_tokens, a.completion_tokens, len(questions))
                for a in answers]

    def submit_documents(self, name: str, request: DocumentsRequest) -> Job:
        memory = self.memory(name)
        documents = [Document.from_text(d.text, title=d.title) for d in request.documents]
        if any(not d.text.strip() for d in documents):
            raise ApiError(400, "a document has no text")
        return self._write_job(name, memory, documents, request)

    def submit_sync(self, name: str, request: SyncRequest) -> Job:
        """A folder written again: checked and read now (a folder that is not the memory's source is a 400 and
        changes nothing), written one module at a time, the removed documents' modules retired last."""
        from loramem.writing import forget_removed, read_sources, removed_sources

        memory, folder = self.memory(name), Path(request.folder)
        if not folder.is_dir():
            raise ApiError(400, f"{folder} is not a folder on this server")
        documents, _ = read_sources([folder])
        removed = removed_sources(memory, [folder], documents, sync=True)
        return self._write_job(name, memory, documents, request, kind="sync",
                               finish=lambda: forget_removed(memory, removed, [folder]))

    def submit_forget(self, name: str, request: ForgetRequest) -> Job:
        memory = self.memory(name)
        if (request.module is None) == (request.document is None):
            raise ApiError(400, "forget needs a module or a document, not both")
        if memory.store is None:
            raise ApiError(400, f"memory {name!r} has no modules yet; nothing to forget")
        memory.store.get(request.module) if request.module else memory.written_from(request.document)  # 400 now

        def forget() -> list[dict]:
            return [{"id": m.id, "name": m.name} for m in memory.forget(request.module, request.document)]

        return self.jobs.submit(name, 0, lambda: iter(()), forget, kind="forget")

    def describe(self) -> list[dict]:
        from loramem.store import describe

        rows = []
        for name in self.memories:
            memory = self.memory(name)
            held = describe(memory.store) if memory.store else {"base_model": memory.model_name, "modules": [],
                                                                 "documents": [], "retired": 0}
            rows.append({"name": name, "path": str(memory.path), "prompt": memory.prompt} | held)
        return rows

    def _write_job(self, name: str, memory: Memory, documents: list[Document], request, kind: str = "documents",
                   finish=None) -> Job:
        values = request.model_dump()
        lora, train_spec = build_settings(LoraSpec, values), build_settings(TrainSpec, values)
        if request.format == "self-study":  # its recipe where the request left the training fields out
            synth, train_spec = build_settings(SelfStudySpec, values), self_study_recipe(train_spec,
                                                                                         request.model_fields_set)
        else:
            synth = build_settings(SynthSpec, values | {"formats": request.format})
        if lora.layers != AUTO:
            lora.layer_indices(memory.base.num_layers)  # a bad layer range fails now, not in the job
        generator = choose_generator(request.generator, memory, request.generator_model, formats=synth.formats,
                                     own_model_only=True)
        return self.jobs.submit(name, len(documents), lambda: memory.write_documents(
            documents, synth, generator, lora, train_spec, request.one_module, progress=False), finish, kind)


# --- HTTP ---------------------------------------------------------------------------------------------------

class ApiKeyMiddleware:
    """401 unless the request carries `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/":  # the page itself holds no data
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                          "invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body above the limit, by its Content-Length and by the bytes actually sent (chunked bodies)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body larger than {self.max_bytes} bytes", "request_too_large")
        await response(scope, receive, send)


def _replay(body: bytes, receive):
    """A receive that hands the app the body already read, then waits on the client as usual (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


def create_app(memories: dict[str, Memory], api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               batch_window_s: float = DEFAULT_BATCH_WINDOW, max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """The server's ASGI app over `memories` (name -> Memory); app.state.service holds the model lock."""
    service = Service(memories, batch_window_s, max_batch)

    @asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        service.jobs.start()
        yield
        service.batcher.stop()
        service.jobs.stop()

    app = FastAPI(title="loramem", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)  # added last: checked first
    _add_error_handlers(app)

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": service.models()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        key = service.ask_key(request)
        reply: Reply = await asyncio.wrap_future(service.batcher.submit(key, _question(request)))
        completion = _completion(request.model, reply, key.spec.max_new_tokens)
        if not request.stream:
            return completion
        include_usage = bool((request.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(_chunks(completion, include_usage)), media_type="text/event-stream")

    @app.post("/v1/memories/{name}/documents", status_code=202)
    def add_documents(name: str, request: DocumentsRequest):
        return service.submit_documents(name, request).to_dict()

    @app.post("/v1/memories/{name}/sync", status_code=202)
    def sync_folder(name: str, request: SyncRequest):
        return service.submit_sync(name, request).to_dict()

    @app.post("/v1/memories/{name}/forget", status_code=202)
    def forget(name: str, request: ForgetRequest):
        return service.submit_forget(name, request).to_dict()

    @app.get("/v1/memories")
    def list_memories():
        return {"object": "list", "data": service.describe()}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str):
        job = service.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "job_not_found")
        return job.to_dict()

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        return error_response(err.status, err.message, err.code)

    @app.exception_handler(LoramemError)
    async def loramem_error(_request: Request, err: LoramemError):
        return error_response(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, err: RequestValidationError):
        return error_response(400, _validation_message(err), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception):
        log.exception("request failed")
        return error_response(500, f"internal error: {type(err).__name__}")


def _question(request: ChatRequest) -> str:
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "no user message: the last user message is the question")
    question = users[-1].text()
    if not question.strip():
        raise ApiError(400, "empty question")
    return question


def _completion(model: str, reply: Reply, max_new_tokens: int) -> dict:
    answer = reply.answer
    finish = "length" if reply.completion_tokens >= max_new_tokens else "stop"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens},
        "loramem": {"mode": answer.mode, "modules": answer.modules, "module_names": reply.module_names,
                    "module_scores": answer.module_scores, "module_weights": answer.module_weights,
                    "supplied_by": answer.supplied_by, "chunks": answer.chunks, "timing": answer.timing,
                    "seconds": answer.seconds, "batch": reply.batch},
    }


def _chunks(completion: dict, include_usage: bool) -> list[dict]:
    """The finished completion as chat.completion.chunk objects: the role, the text a word at a time, the finish
    reason with the loramem fields, and the usage when asked for (stream_options.include_usage)."""
    head = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = completion["choices"][0]

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} | extra

    words = re.findall(r"\s*\S+", choice["message"]["content"])
    chunks = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": w}) for w in words]
    chunks.append(chunk({}, choice["finish_reason"], loramem=completion["loramem"]))
    if include_usage:
        chunks.append(head | {"choices": [], "usage": completion["usage"]})
    return chunks


async def _sse(chunks: list[dict]):
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


# --- running it ---------------------------------------------------------------------------------------------

def open_memories(specs: list[str], model: str | None = None) -> dict[str, Memory]:
    """NAME=PATH specs to memories, loading each base model once (memories over the same base share it).
    A missing PATH is a new memory, created by its first documents job."""
    from loramem.models import load_base

    memories: dict[str, Memory] = {}
    bases = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not NAME_RE.match(name) or not path:
            raise LoramemError(f"--memory wants NAME=PATH with a name of letters, digits, '.', '_', '-'; got {spec!r}")
        if name in memories:
            raise LoramemError(f"memory name {name!r} given twice")
        probe = Memory.open(Path(path), model=model, create=True)
        if probe.model_name not in bases:
            bases[probe.model_name] = load_base(probe.model_name)
        memories[name] = Memory.open(Path(path), model=model, create=True, base=bases[probe.model_name])
    if not memories:
        raise LoramemError("give at least one --memory NAME=PATH")
    clash = set(memories) & {m.base.name for m in memories.values()}  # .base refuses a memory of another model
    if clash:
        raise LoramemError(f"memory name {clash.pop()!r} is also a base model's name; choose another")
    return memories


def serve(specs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY, batch_window_s: float = DEFAULT_BATCH_WINDOW,
          max_batch: int = DEFAULT_MAX_BATCH, log_level: str = "info") -> None:
    import uvicorn

    if max_body_bytes < 1 or max_batch < 1 or batch_window_s < 0:
        raise LoramemError("--max-body and --max-batch must be at least 1, --batch-window-ms at least 0")
    app = create_app(open_memories(specs, model), api_key, max_body_bytes, batch_window_s, max_batch)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
