"""`loramem write / ask / inspect / export / demo`: a memory's own commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loramem.cli import app
from loramem.cli.options import (
    AddressOpt, BaseUrlOpt, DataDirOpt, ExecutorOpt, GeneratorModelOpt, GeneratorOpt, JsonOpt, ModelOpt, PromptOpt,
    console, given_options, notices, print_json, table, with_settings,
)
from loramem.config import AskSpec, LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.models import DEFAULT_MODEL
from loramem.synth import SynthSpec
from loramem.synth.selfstudy import SelfStudySpec


@app.command()
@with_settings(LoraSpec, TrainSpec, SynthSpec, SelfStudySpec)
def write(
    ctx: typer.Context,
    memory: Path = typer.Argument(..., help="memory folder (created on first write)"),
    files: list[Path] = typer.Argument(None, help="facts files (one fact per line), or documents and folders with --format"),
    fmt: str = typer.Option("facts", "--format", help="facts, or synthetic data from documents: original, qa, "
                            "summary, rewrite or a mix like qa+summary, or self-study (prompts answered by the model "
                            "that reads the document; distilled, chat prompts in a new memory)"),
    check_locality: bool = typer.Option(True, "--locality/--no-locality", help="documents: after each module, ask "
                                        "the package's general questions with and without it (locality.py); the "
                                        "share changed and the ROUGE-L change are kept with the module"),
    one_module: bool = typer.Option(False, "--one-module", help="one module for all documents"),
    sync: bool = typer.Option(False, "--sync", help="documents: also forget the modules of documents no longer in "
                              "the given folders (changed documents are always rewritten, their old modules retired)"),
    shard_tokens: str = typer.Option("0", help="facts: one module per this many tokens of facts (0: one module), "
                                     "or auto: as many as one module of this spec was measured to hold"),
    capacity: Optional[Path] = typer.Option(None, help="with --shard-tokens auto: measured capacity, a memory folder "
                                            "or benchmark JSON (default: this memory's own modules)"),
    threshold: float = typer.Option(0.95, help="with --shard-tokens auto: the exact recall a module must keep"),
    strict: bool = typer.Option(False, help="stop at an unreadable or empty document instead of skipping it"),
    generator: str = GeneratorOpt,
    generator_model: Optional[str] = GeneratorModelOpt,
    base_url: Optional[str] = BaseUrlOpt,
    phonebook: Optional[str] = typer.Option(None, help="write a PhoneBook of this size (1K, 8K...) instead"),
    data_dir: Optional[Path] = DataDirOpt,
    model: Optional[str] = ModelOpt,
    name: Optional[str] = typer.Option(None, help="module name"),
    prompt: Optional[str] = PromptOpt,
    executor: str = ExecutorOpt,
    address: Optional[str] = AddressOpt,
    as_json: bool = JsonOpt,
    lora: LoraSpec = None, train_spec: TrainSpec = None, synth: SynthSpec = None, study: SelfStudySpec = None,
):
    """Train memory modules on facts or documents and commit them into MEMORY."""
    from dataclasses import replace

    from loramem.executor import make_executor
    from loramem.writing import self_study_recipe, write_documents

    if fmt != "facts":
        if phonebook or not files:
            raise LoramemError("--format writes documents: give files or folders (not --phonebook)")
        if fmt == "self-study":  # its recipe where the fact-memorising defaults were left as they are
            train_spec = self_study_recipe(train_spec, given_options(ctx))
            prompt = prompt or (None if Path(memory).exists() else "chat")

        def written(i: int, total: int, record) -> None:
            if not as_json:
                console.print(f"[{i}/{total}] {record.name}: {record.n_examples} examples, recall {record.recall:.0%}, "
                              f"{record.train_seconds:.0f} s", highlight=False)

        synth = study if fmt == "self-study" else replace(synth, formats=fmt)
        out = write_documents(memory, files, synth, lora, train_spec, model=model, prompt=prompt,
                              generator=generator, generator_model=generator_model, base_url=base_url,
                              one_module=one_module, strict=strict, sync=sync,
                              executor=make_executor(executor, address),
                              progress=not as_json, on_module=written, check_locality=check_locality,
                              on_skip=lambda where, why: notices.print(f"[yellow]skipped[/] {where}: {why}",
                                                                       highlight=False))
        if as_json:
            print_json(out)
            return
        table(f"wrote {memory}", out["modules"])
        for gone in out["removed"]:
            what = "forgotten" if sync else "still in memory (--sync forgets it)"
            notices.print(f"[yellow]removed[/] {', '.join(map(str, gone['documents']))}: module {gone['name']} "
                          f"{what}", highlight=False)
        return
    _write_facts(memory, files, phonebook, data_dir, model, prompt, name, shard_tokens, capacity or Path(memory),
                 threshold, lora, train_spec, make_executor(executor, address), as_json)


def _write_facts(memory, files, phonebook, data_dir, model, prompt, name, shard_tokens, capacity, threshold, lora,
                 train_spec, executor, as_json) -> None:
    from loramem.bench import phonebook as pb
    from loramem.capacity import shard_tokens as tokens_per_module
    from loramem import Memory, facts_from_file
    from loramem.writing import write_facts

    if phonebook:
        examples = pb.examples(pb.load(phonebook, data_dir))
    elif files:
        examples = [e for f in files for e in facts_from_file(f)]
    else:
        raise LoramemError("give facts files or --phonebook SIZE")
    mem = Memory.open(memory, model=model, create=True, prompt=prompt)
    per_module, sized = tokens_per_module(shard_tokens, capacity, threshold, mem, lora)
    if sized:
        notices.print(f"capacity-aware sizing: {per_module} tokens of facts per rank-{lora.rank} module", highlight=False)
    label = name or (f"phonebook-{phonebook}" if phonebook else None)
    rows = write_facts(mem, examples, lora, train_spec, label, per_module, executor)
    if per_module:
        print_json({"memory": str(memory), "modules": rows}) if as_json else table(f"wrote {memory}", rows)
    else:
        print_json(rows[0]) if as_json else table(f"wrote {memory}", rows)


@app.command()
@with_settings(AskSpec)
def ask(
    memory: Path = typer.Argument(...),
    question: str = typer.Argument(...),
    module: Optional[str] = typer.Option(None, help="module id or name (default: the only one, or the router's pick)"),
    model: Optional[str] = ModelOpt,
    as_json: bool = JsonOpt,
    ask_spec: AskSpec = None,
):
    """Ask MEMORY a question."""
    from loramem.memory import Memory

    from loramem.cli import skip_teardown

    answer = Memory.open(memory, model=model, answer_only=True).ask(question, ask_spec, module=module)
    print_json(answer.to_dict()) if as_json else console.print(answer.text, highlight=False)
    skip_teardown.append("ask")


@app.command()
def inspect(memory: Path = typer.Argument(...), as_json: bool = JsonOpt):
    """List MEMORY's modules (base model, spec, parameters, training tokens, recall, date) and the documents they
    were written from (path, content hash, modules, date)."""
    from loramem.store import Store, describe

    store = Store.open(memory)
    held = describe(store)
    if as_json:
        print_json({"memory": str(memory)} | held, ran=False)
        return
    if held["modules"]:
        table(f"{memory} ({store.base_model})", held["modules"])
    else:
        console.print(f"{memory}: no modules ({store.base_model})")
    if held["documents"]:
        table("documents", [{k: v for k, v in d.items() if k != "title"} for d in held["documents"]])
    if held["retired"]:
        console.print(f"{held['retired']} retired modules on disk (`loramem compact` deletes them)")


@app.command()
def forget(
    memory: Path = typer.Argument(...),
    module: Optional[str] = typer.Option(None, help="the module's id, id prefix or name"),
    document: Optional[str] = typer.Option(None, help="a document's path or id: every module written from it"),
    as_json: bool = JsonOpt,
):
    """Forget a module, or every module written from a document, in one commit: asked afterwards, MEMORY answers as
    if it had never been written (`loramem compact` deletes the files)."""
    from loramem.memory import Memory

    gone = Memory.open(memory).forget(module, document)
    rows = [{"module": m.id, "name": m.name, "facts": m.n_examples} for m in gone]
    print_json({"memory": str(memory), "forgotten": rows}, ran=False) if as_json else table(f"forgot from {memory}", rows)


@app.command()
def compact(memory: Path = typer.Argument(...), as_json: bool = JsonOpt):
    """Delete MEMORY's retired modules (forgotten or replaced) and its stale indexes; report what was freed."""
    from loramem.memory import Memory

    freed = Memory.open(memory).compact()
    if as_json:
        print_json({"memory": str(memory)} | freed, ran=False)
    else:
        console.print(f"{memory}: deleted {freed['modules_deleted']} retired modules and {freed['indexes_deleted']} "
                      f"stale indexes, freed {freed['bytes_freed'] / 1e6:.1f} MB", highlight=False)


@app.command()
def export(
    memory: Path = typer.Argument(...),
    vllm: Path = typer.Option(..., "--vllm", help="new folder to write the adapters and vLLM arguments into"),
    modules: Optional[str] = typer.Option(None, "--modules", help="module ids or names, comma-separated (default: all)"),
    merged: list[str] = typer.Option(None, "--merged", help="also a merged set as one adapter: id+id+id[:method] "
                                     "(default ties); repeatable"),
    merged_rank: Optional[int] = typer.Option(None, help="rank of merged adapters (default: the members' ranks "
                                              "summed, rounded up to a rank vLLM accepts)"),
    base_model: Optional[str] = typer.Option(None, help="the model vLLM serves (default: the memory's base model "
                                             "folder)"),
    as_json: bool = JsonOpt,
):
    """Export MEMORY's modules as PEFT adapters vLLM loads, with the `vllm serve` arguments."""
    from loramem.export import export_vllm, parse_merge_set

    chosen = [m.strip() for m in modules.split(",") if m.strip()] if modules else None
    result = export_vllm(memory, vllm, chosen, [parse_merge_set(m) for m in merged or []], merged_rank, base_model)
    if as_json:
        print_json(result.to_dict())
        return
    table(f"exported to {result.out}", [{
        "adapter": a.name, "rank": a.rank, "modules": ", ".join(m[:8] for m in a.modules), "merge": a.method or "",
        "svd_error": "" if a.relative_error is None else f"{a.relative_error:.2e}",
    } for a in result.adapters])
    for note in result.notes:
        notices.print(f"[yellow]note[/] {note}", highlight=False)
    console.print(result.to_dict()["command"], highlight=False, soft_wrap=True)


@app.command()
def demo(
    model: str = typer.Option(DEFAULT_MODEL),
    data_dir: Optional[Path] = DataDirOpt,
    questions: int = typer.Option(10),
):
    """Write a 1K PhoneBook into a rank-4 module; compare base, module and ICL on its questions."""
    import tempfile

    from loramem.bench import phonebook as pb
    from loramem.memory import Memory

    entries = pb.load("1K", data_dir)
    lora = LoraSpec(rank=4)  # the defaults: layers auto (the last ones, as many as the facts need)
    console.print(f"PhoneBook 1K: {len(entries)} entries -> one rank-4 module of {model} "
                  f"(targets {lora.targets}, layers {lora.layers})")
    with tempfile.TemporaryDirectory() as tmp:
        result = pb.demo(Memory.open(Path(tmp) / "demo.mem", model=model, create=True), entries, lora, questions,
                         on_written=lambda record, seconds: console.print(
                             f"trained in {seconds:.1f} s (layers {record.lora_spec['layers']}), "
                             f"recall {record.recall:.0%}"))
    asked = result["asked"]
    console.print(f"Q: {asked[0].question}  A: {result['sample']}  (gold {asked[0].phone})")
    table(f"{len(asked)} PhoneBook questions", result["rows"])
