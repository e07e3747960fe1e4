"""The Python API: a Memory you write facts into and ask questions of.

    memory = Memory.open("notes.mem", create=True)
    memory.write(facts_from_file("facts.txt"), lora=LoraSpec(rank=4))
    memory.ask("What is the phone number of Jeffrey Buck?").text

It wires the rooms together and adds no logic of its own beyond deciding which base model and modules a call
uses: write is examples (corpus.py, synth/) -> prompts.py -> executor.py (train/) -> store.py; ask is
route.py -> answer.py (merge.py) with prompts.py. (Over 400 lines: the class is the whole public API, one
documented method per call.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from loramem.answer import (Answer, Caches, Timing, adapter_config, adapter_scale, generate, generate_composed,
                            modules_applied, parse_mode, read_adapter)
from loramem.config import AUTO, AskSpec, LoraSpec, TrainSpec
from loramem.corpus import Document, chunk_text
from loramem.errors import LoramemError
from loramem.merge import lora_factors, low_rank
from loramem.mix import COMPOSITIONS, mixture_weights, with_base_row
from loramem.executor import InProcess, TrainJob
from loramem.models import (
    DEFAULT_MODEL,
    KNOWN,
    Base,
    cached_fingerprint,
    load_base,
    resolve,
    same_base,
)
from loramem.examples import Example, data_hash, even_shards
from loramem.precision import requested
from loramem.prompts import check_style, documents_context, fit_context, module_context, render_example, render_prompt
from loramem.route import Hit, IndexCache, Router, make_router
from loramem.store import MANIFEST, ModuleRecord, Store, now, write_module_files, writer_lock
from loramem.train.score import Scored, teacher_forced

log = logging.getLogger("loramem")
# RAG passages and routing keys: windows that fit the sentence encoder (all-MiniLM-L6-v2 reads 256 word pieces).
RAG_CHUNK_TOKENS, RAG_OVERLAP = 192, 32
DEFAULT_TOP_K = 3  # modules merged (multi) and passages retrieved (rag) when top_k is not given


@dataclass
class _Pending:
    """A module submitted for training: what its commit needs beside the trained adapter."""

    name: str | None
    examples: list[Example]  # as given (stored so), not as rendered for training
    documents: list[Document]
    digest: str
    tags: list  # what the caller gets back with the record (one per identical batch)
    replaces: list[str]  # modules of earlier versions of its documents, retired in its commit


class Memory:
    """A folder of memory modules over one base model."""

    def __init__(self, path: Path, model: str, store: Store | None, base: Base | None = None, prompt: str = "plain",
                 answer_only: bool = False):
        self.path = path
        self.answer_only = answer_only  # the base loads without transformers' model code (models.load_base)
        self.model_name = model
        self.store = store  # None until the first module is committed
        self.prompt = store.meta().get("prompt", "plain") if store else prompt  # see prompts.PROMPT_STYLES
        self._base = base
        self._indexes = IndexCache(path / "index")  # routers per module set, kept in memory and under MEMORY/index/
        # Merged weights of the last module sets answered with (a set asked again costs a pointer swap); each
        # holds a copy of the weights its modules touch, so keep few.
        self._caches = Caches()  # prepared factors, merged weights and TIES thresholds, kept between questions

    @classmethod
    def open(cls, path: str | Path, model: str | None = None, create: bool = False, base: Base | None = None,
             prompt: str | None = None, answer_only: bool = False) -> Memory:
        """Open a memory; with create=True a missing one is created on the first write.

        `model` defaults to the memory's own base model (or smollm2-135m for a new memory); a different
        one is refused when loaded. `base` passes an already loaded model (it must be the same one).
        `prompt` is the prompt style of a new memory (prompts.PROMPT_STYLES; default plain); an existing memory
        keeps its own, and asking for another is refused. `answer_only` is for a process that only asks (the CLI's
        `ask`): its base model loads faster and cannot be trained.
        """
        if prompt is not None:
            check_style(prompt)
        path = Path(path)
        if model is not None and model not in KNOWN and Path(model).exists():
            model = str(Path(model).resolve())  # the manifest must find it from any working directory
        empty_folder = path.is_dir() and not any(path.iterdir())
        if not create or (path.exists() and not empty_folder):
            store = Store.open(path)
            memory = cls(path, model or store.base_model, store, base, answer_only=answer_only)
            if prompt is not None and prompt != memory.prompt:
                raise LoramemError(f"{path} was written with {memory.prompt} prompts; it cannot take {prompt} ones")
            return memory
        return cls(path, model or (base.name if base else DEFAULT_MODEL), None, base, prompt or "plain", answer_only)

    @property
    def base(self) -> Base:
        if self._base is None:
            self._check_base(cached_fingerprint(self.model_name), self.model_name)  # fail before loading
            self._base = load_base(self.model_name, answer_only=self.answer_only)
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
              name: str | None = None, progress: bool = True, documents: list[Document] = (),
              executor=None) -> ModuleRecord:
        """Train one module on the examples and commit it; an identical earlier write is returned as is.

        `documents` are the texts the examples were made from, kept beside the module for ICL and routing.
        `executor` trains elsewhere (an executor.RayExecutor); by default the module trains in this process.
        """
        if not examples:
            raise LoramemError("nothing to write: no facts")
        [(record, _)] = self._write_modules([(examples, name, documents, None)], lora, train_spec, progress, executor)
        return record

    def _write_modules(self, batches, lora, train_spec, progress, executor):
        """Train a module for each (examples, name, documents, tag) batch not committed yet, and commit it.

        Yields (record, tag) as each module is committed (in completion order under a parallel executor) and
        (None, tag) for a batch without examples. Committed modules are yielded without training, so an
        interrupted write resumes. The write lock is taken at the first module to train and held to the end.
        """
        lora, train_spec = lora or LoraSpec(), train_spec or TrainSpec()
        executor = executor or InProcess(self.base, progress)
        waiting: dict[str, _Pending] = {}  # submitted, not committed yet, by module id
        locked = False
        with ExitStack() as lock:
            try:
                for examples, name, documents, tag in batches:
                    if not examples:
                        yield None, tag
                        continue
                    job, digest = self._job(examples, documents, lora, train_spec)
                    done = self._committed(job.module_id)
                    if done is None and not locked:
                        lock.enter_context(writer_lock(self.path))
                        locked = True
                        done = self._committed(job.module_id, reopen=True)  # another writer may have been first
                    if done is not None:
                        yield done, tag
                        continue
                    if job.module_id not in waiting:
                        executor.submit(job)
                        waiting[job.module_id] = _Pending(name, examples, list(documents), digest, [],
                                                          self._superseded(documents))
                    waiting[job.module_id].tags.append(tag)
                    yield from self._commit_finished(executor, waiting, wait=False)
                yield from self._commit_finished(executor, waiting, wait=True)
            finally:
                executor.cancel()

    def _job(self, examples, documents, lora, train_spec) -> tuple[TrainJob, str]:
        """The training job for a module (its id hashes everything that determines its weights), and its data hash."""
        base = self.base
        digest = data_hash(examples)
        trained_on = [render_example(base.tokenizer, e, self.prompt) for e in examples]  # stored plain, trained styled
        lora = self._placed(lora, trained_on, train_spec)
        train_spec = train_spec.with_lr_for(len(lora.layer_indices(base.num_layers) or range(base.num_layers)))
        # LORAMEM_PRECISION in the spec (as `--precision` puts it): the same run hashes alike from the CLI and the API
        train_spec = replace(train_spec, precision=requested(train_spec.precision))
        distill = train_spec.objective == "distill"
        teacher_prompts = self._teacher_prompts(examples, documents) if distill else ()
        module_id = hashlib.sha256(json.dumps(
            [digest, [d.id for d in documents], lora.to_dict(), train_spec.to_dict(),
             base.fingerprint["weights_sha256"]] + ([self.prompt] if self.prompt != "plain" else [])
            + (["teacher-in-prompt"] if teacher_prompts else []), sort_keys=True,
        ).encode()).hexdigest()[:16]
        context = documents_context(documents) if distill else ""
        if distill and not context:
            raise LoramemError("the distill objective needs documents (the teacher reads them); facts have none")
        job = TrainJob(module_id, trained_on, lora, train_spec, self.model_name, base.fingerprint, context,
                       teacher_prompts)
        return job, digest

    def _teacher_prompts(self, examples: list[Example], documents) -> tuple[str | None, ...]:
        """With a chat template, the distill teacher reads each question as ICL asks it, the documents inside the
        user turn (train.distill.teacher_targets); plain prompts put them first either way, so they keep the shared
        prefix. An anchor example's teacher reads its prompt without the documents, in either style."""
        anchored = any(e.anchor for e in examples)
        if (self.prompt == "plain" and not anchored) or not documents:
            return ()
        context = documents_context(documents)
        return tuple(self._prompt(e.prompt) if e.anchor
                     else self._prompt(e.prompt, context) if self.prompt != "plain" and e.prompt.startswith("Question:")
                     else None for e in examples)

    def _placed(self, lora: LoraSpec, examples: list[Example], train_spec: TrainSpec) -> LoraSpec:
        """The spec with layers "auto" resolved from what the base model does not know of these examples."""
        if lora.layers != AUTO:
            return lora
        from loramem.capacity import answer_bits, auto_layers

        bits = answer_bits(self.base.model, self.base.tokenizer, examples, train_spec.precision)
        placed = replace(lora, layers=auto_layers(self.base.model, lora, bits))
        log.info("layers auto: %.0f bits of answers to store -> layers %s", bits, placed.layers)
        return placed

    def _committed(self, module_id: str, reopen: bool = False) -> ModuleRecord | None:
        """The module's record if it is in the store; `reopen` first picks up a memory another writer created."""
        if reopen and self.store is None and (self.path / MANIFEST).exists():
            self.store = Store.open(self.path)
            self._check_base(self.base.fingerprint, self.base.name)
            if self.store.meta().get("prompt", "plain") != self.prompt:
                raise LoramemError(f"{self.path} was created meanwhile with other prompts than {self.prompt} ones")
        return self.store.get(module_id) if self.store is not None and self.store.has(module_id) else None

    def _commit_finished(self, executor, waiting: dict[str, _Pending], wait: bool):
        """Commit the modules the executor has finished (all of them with `wait`); yields (record, tag)."""
        for job, staged, stats in executor.finished(self._staging, wait):
            pending = waiting.pop(job.module_id)
            record = self._commit(job, staged, stats, pending)
            for tag in pending.tags:
                yield record, tag

    def _staging(self) -> Path:
        """A fresh folder under the store's tmp/ for one trained module; the memory is created for its first one."""
        if self.store is None:
            self.store = Store.create(self.path, self.model_name, self.base.fingerprint, {"prompt": self.prompt})
        self.store.sweep()
        return self.store.staging_dir()

    def _commit(self, job: TrainJob, staged: Path, stats, pending: _Pending) -> ModuleRecord:
        write_module_files(staged, pending.examples, pending.documents)
        record = ModuleRecord(
            id=job.module_id, name=pending.name or f"module-{len(self.modules()) + 1}", created_at=now(),
            base_model=self.model_name, base_fingerprint=job.fingerprint, lora_spec=job.lora.to_dict(),
            train_spec=job.train_spec.to_dict(), data_hash=pending.digest, n_examples=len(pending.examples),
            train_tokens=stats.tokens, trainable_params=stats.trainable_params, recall=stats.recall,
            train_seconds=stats.seconds, stats=stats.to_dict(),
        )
        self.store.commit(staged, record, retire=pending.replaces)
        return record

    def write_shards(self, examples: list[Example], shard_tokens: int, lora: LoraSpec | None = None,
                     train_spec: TrainSpec | None = None, name: str = "shard", progress: bool = True, executor=None):
        """Write consecutive runs of examples of at most `shard_tokens` tokens each into a module of their own
        (the paper's 8K-token PhoneBook sectors); yields each record as it is committed. Resumable like write.
        The runs are as even as the examples allow (5.2K tokens at 2.6K per module: three of ~1.7K, not two
        full ones and a one-fact runt). With a parallel `executor` the modules train at once and come back in
        the order they finish."""
        if shard_tokens < 1:
            raise LoramemError(f"shard size must be at least 1 token, got {shard_tokens}")
        tokenizer = self.base.tokenizer
        sizes = [len(tokenizer(e.prompt + e.answer, add_special_tokens=False).input_ids) for e in examples]
        shards = even_shards(examples, sizes, shard_tokens)
        batches = ((shard, f"{name}-{i}", (), None) for i, shard in enumerate(shards))
        for record, _ in self._write_modules(batches, lora, train_spec, progress, executor):
            yield record

    def write_documents(self, documents: list[Document], synth=None, generator=None, lora: LoraSpec | None = None,
                        train_spec: TrainSpec | None = None, one_module: bool = False, progress: bool = True,
                        executor=None):
        """Turn documents into synthetic training data (`synth`, a SynthSpec, or a synth.selfstudy.SelfStudySpec:
        prompts answered by this memory's model reading the document) and write one module per document,
        or one for all with `one_module`. Yields (record, reports) as each module is committed.

        A document that yields no usable data is reported with record None. Resumable: generated data is cached
        and a module already committed is not trained again, so running the same write after an interruption
        continues where it stopped. With a parallel `executor` (Ray) each document's module trains while the next
        document's data is generated here, and modules come back in the order they finish.
        """
        from loramem.synth import SynthSpec

        synth = synth or SynthSpec()
        if not documents:
            raise LoramemError("nothing to write: no documents")
        batches = self._synthesized(documents, synth, generator, one_module)
        yield from self._write_modules(batches, lora, train_spec, progress, executor)

    def _synthesized(self, documents, synth, generator, one_module):
        """(examples, name, documents, reports) per module to write, generated as they are asked for."""
        from loramem.synth import synthesize
        from loramem.synth.selfstudy import SelfStudySpec, self_study

        for group in [documents] if one_module else [[d] for d in documents]:
            examples, reports = [], []
            for doc in group:
                if isinstance(synth, SelfStudySpec):  # answered by this memory's model reading the document
                    made, report = self_study(doc, synth, generator, self.base, self.prompt)
                else:
                    made, report = synthesize(doc, synth, generator, tokenizer=self.base.tokenizer)
                examples += made
                reports.append(report)
            name = (group[0].title or group[0].id) if len(group) == 1 else f"documents-{len(group)}"
            if not examples:  # e.g. a weak generator gave no usable pair: reported, the other documents go on
                log.warning("%s: no usable training data was generated; nothing written", name)
            yield examples, name, group, reports

    def examples(self, module: ModuleRecord) -> list[Example]:
        return self.store.examples(module.id)

    def documents(self, module: ModuleRecord) -> list[Document]:
        """The documents a module was written from (none for modules written from facts)."""
        return self.store.documents(module.id)

    def context(self, module: ModuleRecord) -> str:
        """What ICL puts in the prompt for a module: its documents, else its facts."""
        documents = self.documents(module)
        return module_context(documents, [] if documents else self.examples(module))

    # --- documents that change: replacing, forgetting, compacting ----------------------------------------

    def _superseded(self, documents: list[Document]) -> list[str]:
        """The modules an earlier version of these documents was written into: every document of theirs has a
        source (path, JSONL line) among these, and one of them has other text now. (Documents without a path, and
        the same text written again in another format, replace nothing.)"""
        new_sources, new_ids = {_source(d) for d in documents if d.path}, {d.id for d in documents}
        if not new_sources:
            return []
        out = []
        for m in self.modules():
            docs = self.documents(m)
            if docs and all(d.path and _source(d) in new_sources for d in docs) and \
                    any(d.id not in new_ids for d in docs):
                out.append(m.id)
        return out

    def removed_sources(self, folders: list[Path], present: list[Document], sync: bool = False) -> list[ModuleRecord]:
        """The modules written from a document under `folders` that is no longer among `present` (a sync forgets
        them); for a `sync`, a LoramemError when none of the memory's documents came from these folders."""
        roots = [str(Path(f).resolve()) for f in folders]
        under = lambda d: d.path and any(d.path == r or d.path.startswith(r.rstrip("/") + "/") for r in roots)
        read = {_source(d) for d in present}
        documented = [(m, self.documents(m)) for m in self.modules()]
        if sync and any(docs for _, docs in documented) and not any(under(d) for _, docs in documented for d in docs):
            raise LoramemError(f"{', '.join(map(str, folders))} is not the source of any document in {self.path}; "
                               "sync only the folders this memory was written from")
        return [m for m, docs in documented if any(under(d) and _source(d) not in read for d in docs)]

    def forget(self, module: str | None = None, document: str | None = None) -> list[ModuleRecord]:
        """Retire one module, or every module written from a document (its path, or its id or an id prefix), in one
        commit; its routing keys and passages go with it (indexes are kept per module set). Asked afterwards, the
        memory answers as if it had never been written. Folders are deleted by `compact`."""
        if (module is None) == (document is None):
            raise LoramemError("forget needs a module or a document, not both")
        if self.store is None:
            raise LoramemError(f"{self.path} has no modules yet; nothing to forget")
        with writer_lock(self.path):
            gone = [self.store.get(module)] if module is not None else self.written_from(document)
            self.store.retire([m.id for m in gone], "forgotten")
        return gone

    def retire(self, modules: list[ModuleRecord], reason: str) -> list[str]:
        """Retire these modules in one commit (a sync's removed documents); one retired meanwhile (replaced) is
        skipped. Returns the ids retired."""
        if not modules:
            return []
        with writer_lock(self.path):
            return self.store.retire([m.id for m in modules], reason, missing_ok=True)

    def written_from(self, document: str) -> list[ModuleRecord]:
        """The modules written from a document, given by its path or its id (or an id prefix of 4 or more)."""
        path = str(Path(document).resolve())
        found = [m for m in self.modules()
                 if any(d.path in (path, document) or (len(document) >= 4 and d.id.startswith(document))
                        for d in self.documents(m))]
        if not found:
            raise LoramemError(f"no document {document!r} in {self.path} (by path or id; `loramem inspect` lists them)")
        return found

    def compact(self) -> dict:
        """Delete the retired modules' folders and the indexes of module sets that no longer exist."""
        if self.store is None:
            raise LoramemError(f"no memory at {self.path}")
        with writer_lock(self.path):
            modules, module_bytes = self.store.compact()
            indexes, index_bytes = self._indexes.prune([m.id for m in self.modules()])
        return {"modules_deleted": modules, "indexes_deleted": indexes, "bytes_freed": module_bytes + index_bytes}

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
        return self._indexes.get(f"route-{kind}", [m.id for m in modules],
                                 lambda: make_router(kind, {m.id: self.keys(m) for m in modules}))

    def retriever(self, kind: str = "dense") -> Router:
        """RAG: an index of every module's passages (ids "<module>:<n>"); a document written into several modules
        is indexed once, so its passages do not crowd each other out of the top k."""
        kind = "dense" if kind == "oracle" else kind
        modules = self._require_modules()

        def passages() -> dict[str, str]:
            first_id = {}
            for m in modules:
                for n, text in enumerate(self.chunks(m)):
                    first_id.setdefault(text, f"{m.id}:{n}")
            return {i: text for text, i in first_id.items()}

        return self._indexes.get(f"rag-{kind}", [m.id for m in modules], lambda: make_router(kind, passages()))

    def _require_modules(self) -> list[ModuleRecord]:
        modules = self.modules()
        if not modules:
            raise LoramemError(f"{self.path} has no modules yet; write something first")
        return modules

    # --- asking ------------------------------------------------------------------------------------------

    def ask(self, question: str, spec: AskSpec | None = None, **options) -> Answer:
        """One question; see ask_many."""
        return self.ask_many([question], spec, **options)[0]

    def ask_many(self, questions: list[str], spec: AskSpec | None = None, module: str | list[str] | None = None,
                 gold: list[str] | None = None, context: str | None = None, **settings) -> list[Answer]:
        """Answer questions in batches, as `spec` (an AskSpec; its defaults when None) says, with any of its fields
        given by keyword instead (`mode="multi", top_k=2`).

        The weights: `base`, `lora` (one module: `module`, the only one, or the router's top 1) or `multi` (the
        modules listed in `module`, or the router's top_k, merged by `merge`; top_k defaults to 3, or all modules
        when fewer). The context: none, `icl` (the chosen modules' documents, or the given `context`) or `rag`
        (the top_k passages retrieved by `router`). `gold` names each question's module for the
        oracle router; `threshold` makes the router abstain (answer with the base weights) below that score.
        """
        spec = replace(spec or AskSpec(), **settings)
        mode, router, top_k, merge, threshold = spec.mode, spec.router, spec.top_k, spec.merge, spec.threshold
        max_new_tokens, batch_size = spec.max_new_tokens, spec.batch_size
        weights, extra = parse_mode(mode)
        if any(not q.strip() for q in questions):
            raise LoramemError("empty question")
        base = self.base
        window = base.model.config.max_position_embeddings - max_new_tokens
        longest = max(len(base.tokenizer(q, add_special_tokens=False).input_ids) for q in questions)
        if longest > window:  # checked before routing and generation, which would run for minutes
            raise LoramemError(f"question too long: {longest} tokens; this model reads {window} besides its answer")
        if weights == "multi" and merge in COMPOSITIONS and top_k is not None and top_k > len(self.modules()):
            raise LoramemError(f"top-k {top_k} is more than the {len(self.modules())} modules of {self.path}")
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
                prompts.append(self._prompt(question, fitted(text)))
            elif extra == "rag":
                prompts.append(self._prompt(question, fitted("\n\n".join(passage[h.id] for h in passages))))
            else:
                prompts.append(self._prompt(question))
        if weights == "multi" and merge in COMPOSITIONS:
            return self._answer_composed(questions, prompts, picks, chunks, mode, spec, route_seconds)
        answers: list[Answer | None] = [None] * len(questions)
        in_weights = picks if weights != "base" else [[] for _ in questions]
        for ids, members in _group_by_modules(in_weights).items():
            timing = Timing()
            counts: list[tuple[int, int]] = []
            with self._weights_applied(ids, merge, timing) as model:
                texts = generate(model, base.tokenizer, [prompts[i] for i in members], max_new_tokens, batch_size,
                                 timing=timing, counts=counts)
            per_question = timing.share(len(members))
            per_question.route = route_seconds
            for i, text, (read, written) in zip(members, texts, counts):
                answers[i] = Answer(
                    questions[i], text.strip(), mode, [h.id for h in picks[i]], seconds=per_question.total,
                    module_scores=[h.score for h in picks[i]],
                    chunks=[{"id": h.id, "score": h.score} for h in chunks[i]], timing=asdict(per_question),
                    prompt_tokens=read, completion_tokens=written,
                )
        return answers

    def _answer_composed(self, questions, prompts, picks, chunks, mode, spec: AskSpec, route_seconds) -> list[Answer]:
        """Each question's modules composed in output space (loramem.mix, by `spec.merge`), all questions in one batched
        pass, weighted by the softmax of their router scores over `spec.router_temperature`; a question with fewer
        modules (an abstaining router) fills its rows with the base weights at weight 0, and `spec.base_weight` adds a
        base row to every question at that weight."""
        started = time.perf_counter()
        k = max(1, max(len(hits) for hits in picks))
        prepared = {i: self._low_rank(i) for i in {h.id for hits in picks for h in hits}}
        modules = [[prepared[h.id] for h in hits] + [None] * (k - len(hits)) for hits in picks]
        scores = [[h.score / spec.router_temperature for h in hits] + [-math.inf] * (k - len(hits)) if hits
                  else [0.0] * k for hits in picks]
        modules, scores = with_base_row(modules, scores, spec.base_weight)
        timing, counts = Timing(merge=time.perf_counter() - started), []
        texts, supplied = generate_composed(self.base.model, self.base.tokenizer, prompts, modules, scores, spec.merge,
                                            spec.max_new_tokens, spec.batch_size, timing=timing, counts=counts)
        per_question = timing.share(len(questions))
        per_question.route = route_seconds
        weights = mixture_weights(scores).tolist()
        return [Answer(question, text.strip(), mode, [h.id for h in hits], seconds=per_question.total,
                       module_scores=[h.score for h in hits], chunks=[{"id": h.id, "score": h.score} for h in passages],
                       timing=asdict(per_question), prompt_tokens=read, completion_tokens=written,
                       module_weights=w[: len(hits)],
                       supplied_by=[hits[j].id if j < len(hits) else "base" for j in rows])
                for question, text, hits, passages, (read, written), w, rows
                in zip(questions, texts, picks, chunks, counts, weights, supplied)]

    def _low_rank(self, module_id: str):
        """A module's factors prepared to run beside the base weights, kept between questions (as one module's answer
        keeps them); DoRA modules, whose update is no plain delta, cannot be composed."""
        folder = self.store.module_dir(module_id)
        self._check_adapter_base(folder)
        if adapter_config(folder).get("use_dora"):
            raise LoramemError(f"module {module_id} is a DoRA module: its outputs cannot be composed; answer with it alone")

        def prepared():
            config, tensors = read_adapter(folder)
            return low_rank(self.base.model, lora_factors(tensors, adapter_scale(config)))

        return self._caches.low_rank.get_or_compute(("low_rank", str(folder)), prepared)

    def score(self, examples: list[Example], module: str | list[str] | None = None, merge: str = "ties",
              rivals: list[list[int]] | None = None, precision: str = "auto") -> list[Scored]:
        """Read each example's answer teacher-forced after its prompt, with the base weights (module None), one
        module, or several merged: per-token log-probabilities and whether greedy decoding reproduces it.

        Examples are put in the memory's prompt style exactly as training puts them (prompts.render_example).
        `rivals` (token ids per example) are scored where each answer's first token stands."""
        ids = tuple(sorted(self._module_ids(module))) if module else ()
        styled = [render_example(self.base.tokenizer, e, self.prompt) for e in examples]
        with self._weights_applied(ids, merge, Timing()) as model:
            return teacher_forced(model, self.base.tokenizer, styled, rivals=rivals, precision=precision)

    def _module_ids(self, module: str | list[str]) -> list[str]:
        """The ids of one module or a list of them, each given by id, id prefix or name."""
        return [self.store.get(m).id for m in ([module] if isinstance(module, str) else module)]

    def _prompt(self, question: str, context: str | None = None) -> str:
        return render_prompt(self.base.tokenizer, question, context, self.prompt)

    def _modules_for(self, questions, weights, extra, module, router, top_k, gold, threshold, context) -> list[list[Hit]]:
        """The modules each question is answered with (weights) or whose documents go into its prompt (icl)."""
        wants_modules = weights != "base" or (extra == "icl" and context is None)
        if not wants_modules:
            return [[] for _ in questions]
        modules = self._require_modules()
        if module is not None:  # one module by id or name, or a list of them to merge
            chosen = [Hit(i, 1.0) for i in self._module_ids(module)]
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

    @functools.cached_property
    def _base_folder_name(self) -> str:
        """The name of the base model's folder, which loramem writes into each module's adapter_config.json
        (resolved once: resolving stats the model cache, and this is checked on every answer)."""
        return resolve(self.model_name).name

    def _check_adapter_base(self, folder: Path) -> None:
        """Refuse a module whose adapter_config.json names another base model than the one loramem wrote there
        (the model's folder; compared by name, so a memory moved to another cache or machine still loads)."""
        named = adapter_config(folder).get("base_model_name_or_path") or ""
        if Path(named).name != self._base_folder_name:
            raise LoramemError(f"module {folder.name}: its adapter_config.json names base model {named!r}, "
                               f"not this memory's {self.model_name!r}")

    @contextmanager
    def _weights_applied(self, module_ids: tuple[str, ...], method: str, timing: Timing):
        started = time.perf_counter()
        if not module_ids:
            yield self.base.model
            return
        folders = [self.store.module_dir(i) for i in module_ids]
        for folder in folders:
            self._check_adapter_base(folder)
        with modules_applied(self.base.model, folders, method if len(folders) > 1 else "linear",
                             caches=self._caches) as model:
            timing.merge += time.perf_counter() - started
            yield model


def _group_by_modules(picks: list[list[Hit]]) -> dict[tuple[str, ...], list[int]]:
    """Question positions grouped by the module set they are answered with, so each set is merged once. A merge
    weighs its modules alike whatever the router's order, so the set is keyed in sorted order: top 3 of 5
    modules is at most 10 merges, not 60."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, hits in enumerate(picks):
        groups.setdefault(tuple(sorted(h.id for h in hits)), []).append(i)
    return groups


def _source(document: Document) -> tuple:
    """Where a document came from, whatever its text: its file and, for JSONL, its line."""
    return document.path, document.meta.get("line")
