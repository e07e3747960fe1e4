"""The Python API: a Memory you write facts into and ask questions of.

    memory = Memory.open("notes.mem", create=True)
    memory.write(facts_from_file("facts.txt"), lora=LoraSpec(rank=4))
    memory.ask("What is the phone number of Jeffrey Buck?").text

It wires the rooms together (models -> train -> store; store -> answer) and adds no logic of its own
beyond deciding which base model and modules a call uses.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from loramem.answer import (
    Answer, Timing, closed_book_prompt, fit_context, generate, icl_prompt, modules_applied, parse_mode,
)
from loramem.config import LoraSpec, TrainSpec
from loramem.corpus import Document, chunk_text
from loramem.errors import LoramemError
from loramem.merge import MergeCache
from loramem.models import DEFAULT_MODEL, KNOWN, Base, cached_fingerprint, load_base, same_base
from loramem.route import Hit, Router, make_router
from loramem.store import MANIFEST, ModuleRecord, Store, now, writer_lock
from loramem.train import Example, attached, save_adapter, train

log = logging.getLogger("loramem")
EXAMPLES_FILE = "examples.jsonl"
DOCUMENTS_FILE = "documents.jsonl"  # the documents a module was written from: ICL context and routing keys
# RAG passages and routing keys: windows that fit the sentence encoder (all-MiniLM-L6-v2 reads 256 word pieces).
RAG_CHUNK_TOKENS, RAG_OVERLAP = 192, 32
DEFAULT_TOP_K = 3  # modules merged (multi) and passages retrieved (rag) when top_k is not given


def facts_from_text(text: str, source: str = "text") -> list[Example]:
    """One fact per non-empty line; "Question: ... Answer: ..." lines are split into prompt and answer."""
    examples = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, tail = line.rpartition(" Answer:")
        if sep and head.startswith("Question:") and tail.strip():
            examples.append(Example(f"{head} Answer:", tail))
        else:
            examples.append(Example("", line))
    if not examples:
        raise LoramemError(f"{source} has no facts (it is empty)")
    return examples


def facts_from_file(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise LoramemError(f"no such file: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise LoramemError(f"{path} is not UTF-8 text (byte {err.start})") from None
    if "\x00" in text:
        raise LoramemError(f"{path} is a binary file, not text")
    return facts_from_text(text, str(path))


def data_hash(examples: list[Example]) -> str:
    payload = json.dumps([[e.prompt, e.answer] for e in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class Memory:
    """A folder of memory modules over one base model."""

    def __init__(self, path: Path, model: str, store: Store | None, base: Base | None = None):
        self.path = path
        self.model_name = model
        self.store = store  # None until the first module is committed
        self._base = base
        self._indexes: dict[str, Router] = {}
        # Merged weights of the last module sets answered with (a set asked again costs a pointer swap); each
        # holds a copy of the weights its modules touch, so keep few.
        self._merge_cache = MergeCache(maxsize=2)

    @classmethod
    def open(cls, path: str | Path, model: str | None = None, create: bool = False, base: Base | None = None) -> Memory:
        """Open a memory; with create=True a missing one is created on the first write.

        `model` defaults to the memory's own base model (or smollm2-135m for a new memory); a different
        one is refused when loaded. `base` passes an already loaded model (it must be the same one).
        """
        path = Path(path)
        if model is not None and model not in KNOWN and Path(model).exists():
            model = str(Path(model).resolve())  # the manifest must find it from any working directory
        empty_folder = path.is_dir() and not any(path.iterdir())
        if not create or (path.exists() and not empty_folder):
            store = Store.open(path)
            return cls(path, model or store.base_model, store, base)
        return cls(path, model or (base.name if base else DEFAULT_MODEL), None, base)

    @property
    def base(self) -> Base:
        if self._base is None:
            self._check_base(cached_fingerprint(self.model_name), self.model_name)  # fail before loading
            self._base = load_base(self.model_name)
        self._check_base(self._base.fingerprint, self._base.name)
        return self._base

    def _check_base(self, fingerprint: dict | None, name: str) -> None:
        if self.store is not None and fingerprint is not None and not same_base(fingerprint, self.store.base_fingerprint):
            raise LoramemError(
                f"{self.path} was written with base model {self.store.base_model!r}; {name!r} is a different model"
            )

    def modules(self) -> list[ModuleRecord]:
        return self.store.modules() if self.store else []

    def write(self, examples: list[Example], lora: LoraSpec | None = None, train_spec: TrainSpec | None = None,
              name: str | None = None, progress: bool = True, documents: list[Document] = ()) -> ModuleRecord:
        """Train one module on the examples and commit it; an identical earlier write is returned as is.

        `documents` are the texts the examples were made from, kept beside the module for ICL and routing.
        """
        lora, train_spec = lora or LoraSpec(), train_spec or TrainSpec()
        if not examples:
            raise LoramemError("nothing to write: no facts")
        base = self.base
        digest = data_hash(examples)
        module_id = hashlib.sha256(json.dumps(
            [digest, [d.id for d in documents], lora.to_dict(), train_spec.to_dict(),
             base.fingerprint["weights_sha256"]], sort_keys=True,
        ).encode()).hexdigest()[:16]
        if self.store is not None and self.store.has(module_id):
            return self.store.get(module_id)
        with writer_lock(self.path):
            if self.store is None and (self.path / MANIFEST).exists():  # another writer created it meanwhile
                self.store = Store.open(self.path)
                self._check_base(base.fingerprint, base.name)
            if self.store is not None and self.store.has(module_id):
                return self.store.get(module_id)
            return self._train_and_commit(examples, lora, train_spec, name, progress, documents, module_id, digest)

    def _train_and_commit(self, examples, lora, train_spec, name, progress, documents, module_id, digest):
        base = self.base
        with attached(base.model, lora, seed=train_spec.seed) as peft_model:
            stats = train(peft_model, base.tokenizer, examples, train_spec, progress=progress)
            if self.store is None:
                self.store = Store.create(self.path, self.model_name, base.fingerprint)
            self.store.sweep()
            staged = self.store.staging_dir()
            save_adapter(peft_model, staged)
        _write_jsonl(staged / EXAMPLES_FILE, [{"prompt": e.prompt, "answer": e.answer} for e in examples])
        if documents:
            _write_jsonl(staged / DOCUMENTS_FILE, [asdict(d) for d in documents])
        record = ModuleRecord(
            id=module_id, name=name or f"module-{len(self.modules()) + 1}", created_at=now(),
            base_model=self.model_name, base_fingerprint=base.fingerprint, lora_spec=lora.to_dict(),
            train_spec=train_spec.to_dict(), data_hash=digest, n_examples=len(examples),
            train_tokens=stats.tokens, trainable_params=stats.trainable_params, recall=stats.recall,
            train_seconds=stats.seconds, stats=stats.to_dict(),
        )
        self.store.commit(staged, record)
        return record

    def write_shards(self, examples: list[Example], shard_tokens: int, lora: LoraSpec | None = None,
                     train_spec: TrainSpec | None = None, name: str = "shard", progress: bool = True):
        """Write consecutive runs of examples of at most `shard_tokens` tokens each into a module of their own
        (the paper's 8K-token PhoneBook sectors); yields each record as it is committed. Resumable like write."""
        if shard_tokens < 1:
            raise LoramemError(f"shard size must be at least 1 token, got {shard_tokens}")
        tokenizer = self.base.tokenizer
        shards: list[list[Example]] = [[]]
        used = 0
        for e in examples:
            size = len(tokenizer(e.prompt + e.answer, add_special_tokens=False).input_ids)
            if shards[-1] and used + size > shard_tokens:
                shards.append([])
                used = 0
            shards[-1].append(e)
            used += size
        for i, shard in enumerate(shards):
            yield self.write(shard, lora, train_spec, name=f"{name}-{i}", progress=progress)

    def write_documents(self, documents: list[Document], synth=None, generator=None, lora: LoraSpec | None = None,
                        train_spec: TrainSpec | None = None, one_module: bool = False, progress: bool = True):
        """Turn documents into synthetic training data (`synth`, a SynthSpec) and write one module per document,
        or one for all with `one_module`. Yields (record, reports) as each module is committed.

        A document that yields no usable data is reported with record None. Resumable: generated data is cached
        and a module already committed is not trained again, so running the same write after an interruption
        continues where it stopped.
        """
        from loramem.synth import SynthSpec, synthesize

        synth = synth or SynthSpec()
        if not documents:
            raise LoramemError("nothing to write: no documents")
        for group in [documents] if one_module else [[d] for d in documents]:
            examples, reports = [], []
            for doc in group:
                made, report = synthesize(doc, synth, generator, tokenizer=self.base.tokenizer)
                examples += made
                reports.append(report)
            name = (group[0].title or group[0].id) if len(group) == 1 else f"documents-{len(group)}"
            if not examples:  # e.g. a weak generator gave no usable pair: reported, the other documents go on
                log.warning("%s: no usable training data was generated; nothing written", name)
                yield None, reports
                continue
            yield self.write(examples, lora, train_spec, name=name, progress=progress, documents=group), reports

    def examples(self, module: ModuleRecord) -> list[Example]:
        return [Example(**row) for row in _read_jsonl(self.store.module_dir(module.id) / EXAMPLES_FILE)]

    def documents(self, module: ModuleRecord) -> list[Document]:
        """The documents a module was written from (none for modules written from facts)."""
        return [Document(**row) for row in _read_jsonl(self.store.module_dir(module.id) / DOCUMENTS_FILE)]

    def context(self, module: ModuleRecord) -> str:
        """What ICL puts in the prompt for a module: its documents, else its facts."""
        documents = self.documents(module)
        if documents:
            return "\n\n".join(d.text for d in documents)
        return "\n".join(e.prompt + e.answer for e in self.examples(module))

    # --- routing keys and retrieval chunks -------------------------------------------------------------

    def chunks(self, module: ModuleRecord) -> list[str]:
        """A module's retrievable passages: its documents cut into encoder-sized token windows, else its facts."""
        documents = self.documents(module)
        if not documents:
            return [e.prompt + e.answer for e in self.examples(module)]
        tokenizer = self.base.tokenizer
        return [c.text for d in documents for c in chunk_text(d.text, tokenizer, RAG_CHUNK_TOKENS, RAG_OVERLAP, doc_id=d.id)]

    def keys(self, module: ModuleRecord) -> list[str]:
        """What a module is routed by: its passages, plus its own synthetic questions when it has documents."""
        questions = [e.prompt for e in self.examples(module) if e.prompt.startswith("Question:")] \
            if self.documents(module) else []
        return self.chunks(module) + [q.removeprefix("Question:").removesuffix("Answer:").strip() for q in questions]

    def router(self, kind: str = "dense") -> Router:
        """A router over this memory's modules, built once per module set and kept under MEMORY/index/."""
        modules = self._require_modules()
        if kind == "oracle":
            return make_router("oracle", {m.id: [m.name] for m in modules})
        return self._cached_index(f"route-{kind}", modules, lambda: make_router(kind, {m.id: self.keys(m) for m in modules}))

    def retriever(self, kind: str = "dense") -> Router:
        """RAG: an index of every module's passages (ids "<module>:<n>")."""
        kind = "dense" if kind == "oracle" else kind
        modules = self._require_modules()
        return self._cached_index(f"rag-{kind}", modules, lambda: make_router(
            kind, {f"{m.id}:{n}": text for m in modules for n, text in enumerate(self.chunks(m))}))

    def _cached_index(self, name: str, modules: list[ModuleRecord], build) -> Router:
        digest = hashlib.sha256(json.dumps(sorted(m.id for m in modules)).encode()).hexdigest()[:12]
        key = f"{name}-{digest}"
        if key not in self._indexes:
            folder = self.path / "index" / key
            try:
                self._indexes[key] = Router.load(folder)
            except LoramemError:
                self._indexes[key] = build()
                try:
                    self._indexes[key].save(folder)
                except OSError:  # a read-only memory still answers; it rebuilds its index next time
                    pass
        return self._indexes[key]

    def _require_modules(self) -> list[ModuleRecord]:
        modules = self.modules()
        if not modules:
            raise LoramemError(f"{self.path} has no modules yet; write something first")
        return modules

    # --- asking ------------------------------------------------------------------------------------------

    def ask(self, question: str, mode: str = "lora", **kw) -> Answer:
        return self.ask_many([question], mode, **kw)[0]

    def ask_many(self, questions: list[str], mode: str = "lora", module: str | list[str] | None = None, router: str = "dense",
                 top_k: int | None = None, merge: str = "ties", gold: list[str] | None = None, threshold: float | None = None,
                 context: str | None = None, max_new_tokens: int = 24, batch_size: int = 16) -> list[Answer]:
        """Answer questions in batches, in one of answer.MODES.

        The weights: `base`, `lora` (one module: `module`, the only one, or the router's top 1) or `multi` (the
        modules listed in `module`, or the router's top_k, merged by `merge`; top_k defaults to 3, or all modules
        when fewer). The context: none, `icl` (the chosen modules' documents, or the given `context`) or `rag`
        (the top_k passages retrieved by `router`). `gold` names each question's module for the
        oracle router; `threshold` makes the router abstain (answer with the base weights) below that score.
        """
        weights, extra = parse_mode(mode)
        if any(not q.strip() for q in questions):
            raise LoramemError("empty question")
        base = self.base
        started = time.perf_counter()
        picks = self._modules_for(questions, weights, extra, module, router, top_k, gold, threshold, context)
        chunks, passage = self._passages(questions, router, top_k) if extra == "rag" else ([[] for _ in questions], {})
        route_seconds = (time.perf_counter() - started) / len(questions)
        budget = base.model.config.max_position_embeddings - max_new_tokens - 64

        @functools.cache
        def fitted(text: str) -> str:  # questions often share a context: tokenize it, and warn, once
            return fit_context(base.tokenizer, text, budget)

        @functools.cache
        def documents_of(module_id: str) -> str:  # read each module's documents once per call
            return self.context(self.store.get(module_id))

        prompts = []
        for question, hits, passages in zip(questions, picks, chunks):
            if extra == "icl":
                text = context if context is not None else "\n\n".join(documents_of(h.id) for h in hits)
                prompts.append(icl_prompt(question, fitted(text)))
            elif extra == "rag":
                prompts.append(icl_prompt(question, fitted("\n\n".join(passage[h.id] for h in passages))))
            else:
                prompts.append(closed_book_prompt(question))
        answers: list[Answer | None] = [None] * len(questions)
        in_weights = picks if weights != "base" else [[] for _ in questions]
        for ids, members in _group_by_modules(in_weights).items():
            timing = Timing()
            with self._weights_applied(ids, merge, timing) as model:
                texts = generate(model, base.tokenizer, [prompts[i] for i in members], max_new_tokens, batch_size,
                                 timing=timing)
            per_question = timing.share(len(members))
            per_question.route = route_seconds
            for i, text in zip(members, texts):
                answers[i] = Answer(
                    questions[i], text.strip(), mode, [h.id for h in picks[i]], seconds=per_question.total,
                    module_scores=[h.score for h in picks[i]],
                    chunks=[{"id": h.id, "score": h.score} for h in chunks[i]], timing=asdict(per_question),
                )
        return answers

    def _modules_for(self, questions, weights, extra, module, router, top_k, gold, threshold, context) -> list[list[Hit]]:
        """The modules each question is answered with (weights) or whose documents go into its prompt (icl)."""
        wants_modules = weights != "base" or (extra == "icl" and context is None)
        if not wants_modules:
            return [[] for _ in questions]
        modules = self._require_modules()
        if module is not None:  # one module by id or name, or a list of them to merge
            chosen = [Hit(self.store.get(m).id, 1.0) for m in ([module] if isinstance(module, str) else module)]
            return [chosen for _ in questions]
        k = 1 if weights == "lora" else (top_k if top_k is not None else min(DEFAULT_TOP_K, len(modules)))
        if len(modules) == 1 and k == 1:
            return [[Hit(modules[0].id, 1.0)] for _ in questions]
        return self.router(router).route(questions, k, gold=gold, threshold=threshold)

    def _passages(self, questions: list[str], router: str, top_k: int | None) -> tuple[list[list[Hit]], dict[str, str]]:
        """The top passages per question, and the text of every passage by id (as the index holds them)."""
        retriever = self.retriever(router)
        hits = retriever.route(questions, top_k if top_k is not None else min(DEFAULT_TOP_K, len(retriever.modules)))
        return hits, dict(zip(retriever.index.item_ids, retriever.index.texts))

    @contextmanager
    def _weights_applied(self, module_ids: tuple[str, ...], method: str, timing: Timing):
        started = time.perf_counter()
        if not module_ids:
            yield self.base.model
            return
        folders = [self.store.module_dir(i) for i in module_ids]
        with modules_applied(self.base.model, folders, method if len(folders) > 1 else "linear",
                             cache=self._merge_cache) as model:
            timing.merge += time.perf_counter() - started
            yield model


def _group_by_modules(picks: list[list[Hit]]) -> dict[tuple[str, ...], list[int]]:
    """Question positions grouped by the module set they are answered with, so each set is merged once."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, hits in enumerate(picks):
        groups.setdefault(tuple(h.id for h in hits), []).append(i)
    return groups


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
