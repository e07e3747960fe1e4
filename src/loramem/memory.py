"""The Python API: a Memory you write facts into and ask questions of.

    memory = Memory.open("notes.mem", create=True)
    memory.write(facts_from_file("facts.txt"), lora=LoraSpec(rank=4))
    memory.ask("What is the phone number of Jeffrey Buck?").text

It wires the rooms together (models -> train -> store; store -> answer) and adds no logic of its own
beyond deciding which base model and modules a call uses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loramem.answer import MODES, Answer, closed_book_prompt, fit_context, icl_prompt, module_applied, timed_generate
from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.models import DEFAULT_MODEL, KNOWN, Base, cached_fingerprint, load_base, same_base
from loramem.store import ModuleRecord, Store, now
from loramem.train import Example, attached, save_adapter, train

EXAMPLES_FILE = "examples.jsonl"


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
              name: str | None = None, progress: bool = True) -> ModuleRecord:
        """Train one module on the examples and commit it; an identical earlier write is returned as is."""
        lora, train_spec = lora or LoraSpec(), train_spec or TrainSpec()
        if not examples:
            raise LoramemError("nothing to write: no facts")
        base = self.base
        digest = data_hash(examples)
        module_id = hashlib.sha256(json.dumps(
            [digest, lora.to_dict(), train_spec.to_dict(), base.fingerprint["weights_sha256"]], sort_keys=True
        ).encode()).hexdigest()[:16]
        if self.store is not None and self.store.has(module_id):
            return self.store.get(module_id)
        with attached(base.model, lora, seed=train_spec.seed) as peft_model:
            stats = train(peft_model, base.tokenizer, examples, train_spec, progress=progress)
            if self.store is None:
                self.store = Store.create(self.path, self.model_name, base.fingerprint)
            self.store.sweep()
            staged = self.store.staging_dir()
            save_adapter(peft_model, staged)
        with open(staged / EXAMPLES_FILE, "w", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps({"prompt": e.prompt, "answer": e.answer}, ensure_ascii=False) + "\n")
        record = ModuleRecord(
            id=module_id, name=name or f"module-{len(self.modules()) + 1}", created_at=now(),
            base_model=self.model_name, base_fingerprint=base.fingerprint, lora_spec=lora.to_dict(),
            train_spec=train_spec.to_dict(), data_hash=digest, n_examples=len(examples),
            train_tokens=stats.tokens, trainable_params=stats.trainable_params, recall=stats.recall,
            train_seconds=stats.seconds, stats=stats.to_dict(),
        )
        self.store.commit(staged, record)
        return record

    def examples(self, module: ModuleRecord) -> list[Example]:
        path = self.store.module_dir(module.id) / EXAMPLES_FILE
        return [Example(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]

    def ask(self, question: str, mode: str = "lora", module: str | None = None, max_new_tokens: int = 24) -> Answer:
        return self.ask_many([question], mode, module, max_new_tokens)[0]

    def ask_many(self, questions: list[str], mode: str = "lora", module: str | None = None,
                 max_new_tokens: int = 24, batch_size: int = 16) -> list[Answer]:
        """Answer questions in batches: `base` (no module), `lora` (one module) or `icl` (its facts in the prompt)."""
        if mode not in MODES:
            raise LoramemError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if any(not q.strip() for q in questions):
            raise LoramemError("empty question")
        base = self.base
        used = [] if mode == "base" else [self._pick(module)]
        if mode == "icl":
            context = "\n".join(e.prompt + e.answer for m in used for e in self.examples(m))
            budget = base.model.config.max_position_embeddings - max_new_tokens - 64
            context = fit_context(base.tokenizer, context, budget)
            prompts = [icl_prompt(q, context) for q in questions]
        else:
            prompts = [closed_book_prompt(q) for q in questions]
        kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
        if mode == "lora":
            with module_applied(base.model, self.store.module_dir(used[0].id)) as model:
                texts, seconds = timed_generate(model, base.tokenizer, prompts, **kw)
        else:
            texts, seconds = timed_generate(base.model, base.tokenizer, prompts, **kw)
        return [Answer(q, t.strip(), mode, [m.id for m in used], seconds) for q, t in zip(questions, texts)]

    def _pick(self, module: str | None) -> ModuleRecord:
        modules = self.modules()
        if not modules:
            raise LoramemError(f"{self.path} has no modules yet; write some facts first")
        if module is not None:
            return self.store.get(module)
        if len(modules) > 1:
            raise LoramemError(f"{self.path} has {len(modules)} modules; choose one with --module")
        return modules[0]
