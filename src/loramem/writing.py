"""The write path from files, as `loramem write` (and any script) runs it: facts files or a PhoneBook into one
module or capacity-sized shards, documents and folders through synthetic data into a module each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError


def module_row(record) -> dict:
    """What a write reports of each module it committed."""
    return {"module": record.id, "name": record.name, "facts": record.n_examples, "layers": record.lora_spec["layers"],
            "recall": record.recall, "train_seconds": record.train_seconds, "trainable_params": record.trainable_params}


def write_facts(memory, examples, lora: LoraSpec, train_spec: TrainSpec, name: str | None = None,
                shard_tokens: int = 0, executor=None) -> list[dict]:
    """One module of all the examples, or one per `shard_tokens` tokens of them (Memory.write_shards); a row each."""
    if shard_tokens:
        return [module_row(r) for r in memory.write_shards(examples, shard_tokens, lora, train_spec,
                                                           name=name or "shard", executor=executor)]
    return [module_row(memory.write(examples, lora=lora, train_spec=train_spec, name=name, executor=executor))]


def self_study_recipe(train_spec: TrainSpec, given: set[str]) -> TrainSpec:
    """Format self-study: distillation at synth.selfstudy's rate for all its epochs (a distilled module never
    "recalls" exactly) in place of the fact-memorising defaults; a field in `given` (set explicitly) is kept."""
    from loramem.synth import selfstudy

    recipe = {"objective": "distill", "lr": selfstudy.TRAIN_LR, "epochs": selfstudy.TRAIN_EPOCHS,
              "target_recall": None, "candidates": 0}
    return replace(train_spec, **{key: value for key, value in recipe.items() if key not in given})


def module_locality(memory, record, general_base: list[str]) -> dict:
    """The write-time locality check of one module (locality.py), recorded in its stats; `general_base` caches the
    base model's answers to the general questions for the next module."""
    from loramem import locality

    if not general_base:
        general_base += [a.text for a in memory.ask_many([q for q, _ in locality.GENERAL_QUESTIONS], mode="base",
                                                          max_new_tokens=locality.MAX_NEW_TOKENS)]
    report = locality.check(memory, record.id, base_answers=general_base)
    locality.record(memory, record.id, report)
    return {"locality_changed": report.changed, "locality_delta": report.delta}


def write_documents(path: Path, files: list[Path], synth, lora: LoraSpec, train_spec: TrainSpec, *,
                    model: str | None = None, prompt: str | None = None, generator: str = "hf",
                    generator_model: str | None = None, base_url: str | None = None, one_module: bool = False,
                    strict: bool = False, sync: bool = False, executor=None, progress: bool = True,
                    check_locality: bool = True,
                    on_skip: Callable[[str, str], None] = lambda where, reason: None,
                    on_module: Callable[[int, int, object], None] = lambda i, total, record: None) -> dict:
    """Read documents and folders (unreadable or empty ones skipped, reported to `on_skip`, unless `strict`), then
    write a module per document (or one for all) into the memory at `path`; `on_module(i, total, record)` as each
    is committed. Nothing is written when no document is readable or the generator gives no usable data.
    A document read from the same file as an earlier one but with other text replaces its module (retired in the
    new module's commit); the modules of documents gone from the folders are reported as `removed`, and with
    `sync` forgotten in one commit after the writes (a folder that is not the memory's source is refused first).
    `synth` is a SynthSpec or a synth.selfstudy.SelfStudySpec. With `check_locality` each module's locality check
    (module_locality) is recorded and reported in its row."""
    from loramem.memory import Memory
    from loramem.synth import GENERATORS, choose_generator

    if generator not in GENERATORS:  # before reading anything
        raise LoramemError(f"unknown generator {generator!r}: choose {' or '.join(GENERATORS)}")
    docs, skipped = read_sources(files, strict, on_skip)
    memory = Memory.open(path, model=model, create=True, prompt=prompt)
    removed = removed_sources(memory, files, docs, sync)
    gen = choose_generator(generator, memory, generator_model, base_url, synth.formats)
    rows, empty = [], 0
    general_base: list[str] = []  # the base model's answers to the general questions, asked once for every module
    total = 1 if one_module else len(docs)
    for i, (record, reports) in enumerate(memory.write_documents(docs, synth, gen, lora, train_spec, one_module,
                                                                 progress=progress, executor=executor), 1):
        if record is None:
            empty += 1
            continue
        rows.append(module_row(record) | {"usable": sum(sum(r.produced.values()) for r in reports),
                                          "asked": sum(sum(r.asked.values()) for r in reports)}
                    | (module_locality(memory, record, general_base) if check_locality else {}))
        on_module(i, total, record)
    if not rows:
        raise LoramemError("the generator gave no usable training data for any document; nothing written")
    gone = forget_removed(memory, removed, files) if sync else removed_rows(memory, removed)
    return {"memory": str(path), "documents": len(docs), "skipped": len(skipped), "no_data": empty, "modules": rows,
            "removed": gone, "forgotten": sync and bool(gone)}


def read_sources(files: list[Path], strict: bool = False,
                 on_skip: Callable[[str, str], None] = lambda where, reason: None) -> tuple[list, list]:
    """The documents of files and folders, each with its file's absolute path (how a later write of the same
    folder finds it again, from any working directory), and what was skipped; none readable is an error."""
    from loramem.corpus import read_documents

    docs, skipped = read_documents(files, strict=strict)
    for where, reason in skipped:
        on_skip(where, reason)
    if not docs:
        raise LoramemError(f"no readable documents in {', '.join(map(str, files))} ({len(skipped)} skipped)")
    return [replace(d, path=str(Path(d.path).resolve())) if d.path else d for d in docs], skipped


def removed_sources(memory, files: list[Path], docs: list, sync: bool) -> list:
    """The modules of documents gone from the folders among `files` (Memory.removed_sources); checked before
    anything is written, so a sync of a folder that is not the memory's source changes nothing."""
    folders = [f for f in files if Path(f).is_dir()]
    if sync and not folders:
        raise LoramemError("--sync needs a folder: it forgets the modules of documents no longer in it")
    return memory.removed_sources(folders, docs, sync) if folders and memory.store is not None else []


def removed_rows(memory, removed: list) -> list[dict]:
    return [{"module": m.id, "name": m.name, "documents": [d.path for d in memory.store.documents(m.id)]}
            for m in removed]


def forget_removed(memory, removed: list, files: list[Path]) -> list[dict]:
    """A sync's last step: the removed documents' modules retired in one commit; a row each."""
    retired = set(memory.retire(removed, "its document was removed from " + ", ".join(map(str, files))))
    return [row for row in removed_rows(memory, removed) if row["module"] in retired]  # not one replaced meanwhile
