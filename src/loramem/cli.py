"""`loramem`: the command line, thin over the library (parse, call, print)."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from loramem.config import AUTO, LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Store knowledge in LoRA modules and ask it back.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; every one prints a table, or one JSON object with --json.")
app.add_typer(bench_app, name="bench")
console = Console()
notices = Console(stderr=True, soft_wrap=True)  # a notice is one line, however long its path
GENERATORS = ("hf", "openai")  # warnings and skips: stdout stays a clean table or JSON

ModelOpt = typer.Option(None, "--model", help=f"registry name ({DEFAULT_MODEL}, tiny), HF folder or .gguf file")
DataDirOpt = typer.Option(None, "--data-dir", help="benchmark data directory (default: $LORAMEM_DATA)")
PapersOpt = typer.Option(None, "--papers", help="a subset of the 15 papers by position: 0-4 or 0,3,7")
QuestionsOpt = typer.Option(40, "--questions", help="synthetic QA pairs asked for per document")
GeneratorOpt = typer.Option("hf", "--generator", help="synthetic data: hf (a local chat model) or openai")
GeneratorModelOpt = typer.Option(None, "--generator-model", help="hf: model (default: the memory's); openai: model name")
BaseUrlOpt = typer.Option(None, "--base-url", help="openai: endpoint (default $LORAMEM_OPENAI_BASE_URL)")
JudgeOpt = typer.Option(None, "--judge-model", help="also score answers with this model at the OpenAI-compatible "
                        "endpoint (0-10 rubric)")
TargetsOpt = typer.Option("all", "--targets", help="attention, ffn, all, or module names")
LayersOpt = typer.Option(LoraSpec.layers, "--layers", help="auto (the last layers, as many as the data needs), all, "
                         "early, late, firstN, lastN, a-b or a list")
LrOpt = typer.Option(TrainSpec.lr, "--lr", help="peak learning rate (AdamW)")
EpochsOpt = typer.Option(TrainSpec.epochs, "--epochs", help="upper bound; training stops at the target recall")
CandidatesOpt = typer.Option(TrainSpec.candidates, "--candidates",
                             help="train on a softmax over the answers' tokens plus the base model's top K at each "
                             "answer position (0: the whole vocabulary; default 32, 0 with --objective distill); "
                             "the stopping check stays exact")
FloorOpt = typer.Option(TrainSpec.lr_floor, "--lr-floor", help="the decay ends at this fraction of --lr and holds there "
                        "until the target recall or the last epoch (0: decay to zero)")
DecayOpt = typer.Option(TrainSpec.decay_epochs, "--decay-epochs",
                        help="epochs the learning rate decays over (default: all)")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (bf16 where the hardware multiplies bf16 natively, "
                            "else fp32), bf16 or fp32; for the whole run, as LORAMEM_PRECISION")
KeepOpt = typer.Option(None, "--memory", help="keep the modules in this memory (reruns reuse them)")
OutOpt = typer.Option(None, "--out", help="also save the result as JSON here")
ObjectiveOpt = typer.Option("ntp", "--objective", help="ntp (next-token loss on the synthetic data) or distill "
                            "(match the model that reads the document in its prompt)")
PromptOpt = typer.Option(None, "--prompt", help="prompt style of a new memory, the same in training and answering: "
                         "plain (\"Question: ... Answer:\") or chat (the model's chat template)")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress (each epoch's loss and "
                                          "recall) to stderr")):
    if verbose:
        logging.getLogger("loramem").setLevel(logging.INFO)


def _specs(rank, alpha, targets, layers, lr, epochs, batch_size, seed, loss_on, target_recall,
           variants: str = "", objective: str = "ntp", candidates: int | None = TrainSpec.candidates,
           lr_floor: float = TrainSpec.lr_floor, decay_epochs: int | None = TrainSpec.decay_epochs
           ) -> tuple[LoraSpec, TrainSpec]:
    from loramem.precision import requested

    chosen = {v.strip() for v in variants.split(",") if v.strip()}
    if chosen - {"rslora", "dora", "pissa"}:
        raise LoramemError(f"unknown LoRA variant(s) {', '.join(sorted(chosen))}: choose from rslora, dora, pissa")
    lora = LoraSpec(rank=rank, alpha=alpha, targets=targets, layers=layers,
                    rslora="rslora" in chosen, dora="dora" in chosen, pissa="pissa" in chosen)
    recall = None if target_recall <= 0 else target_recall
    return lora, TrainSpec(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, loss_on=loss_on, target_recall=recall,
                           objective=objective, candidates=candidates, lr_floor=lr_floor, decay_epochs=decay_epochs,
                           precision=requested())


def _table(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


def _print_json(obj, ran: bool = True) -> None:
    """A --json result; one that ran a model also says at which precision and on what hardware."""
    if ran and isinstance(obj, dict):
        from loramem.precision import hardware, run_precision

        obj = obj | {"precision": run_precision(), "hardware": hardware()}
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


def _use_precision(precision: str) -> str:
    """--precision: forces the whole run (training, answering, scoring) through LORAMEM_PRECISION; returns the
    request (the option, else the variable) for the specs that Ray tasks carry, as _specs reads it."""
    from loramem.precision import ENV, check_precision, requested, run_precision

    if check_precision(precision) != "auto":
        os.environ[ENV] = precision
    run_precision()  # refuses bf16 on a device that cannot run it before anything is written
    return requested()


@app.command()
def write(
    memory: Path = typer.Argument(..., help="memory folder (created on first write)"),
    files: list[Path] = typer.Argument(None, help="facts files (one fact per line), or documents and folders with --format"),
    fmt: str = typer.Option("facts", "--format", help="facts, or synthetic data from documents: original, qa, "
                            "summary, rewrite or a mix like qa+summary"),
    questions: int = QuestionsOpt,
    summaries: int = typer.Option(1), rewrites: int = typer.Option(1),
    one_module: bool = typer.Option(False, "--one-module", help="one module for all documents"),
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
    rank: int = typer.Option(4, help="LoRA rank"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default 2 x rank)"),
    targets: str = TargetsOpt,
    layers: str = LayersOpt,
    variants: str = typer.Option("", help="PEFT variants, comma-separated: rslora, dora, pissa"),
    lr: float = LrOpt,
    epochs: int = EpochsOpt,
    batch_size: int = typer.Option(TrainSpec.batch_size),
    seed: int = typer.Option(0),
    loss_on: str = typer.Option("answer", help="answer or all"),
    target_recall: float = typer.Option(1.0, help="stop at this exact recall of the facts (0: never)"),
    name: Optional[str] = typer.Option(None, help="module name"),
    prompt: Optional[str] = PromptOpt,
    objective: str = ObjectiveOpt,
    candidates: Optional[int] = CandidatesOpt,
    lr_floor: float = FloorOpt,
    decay_epochs: Optional[int] = DecayOpt,
    executor: str = typer.Option("inprocess", help="where modules train: inprocess, or ray (a task per module, "
                                 "one GPU each on a cluster with GPUs); the store is written here either way"),
    address: Optional[str] = typer.Option(None, help="ray: the cluster (auto, or ray://host:10001); "
                                          "default: a Ray started for this write"),
    as_json: bool = typer.Option(False, "--json"),
    precision: str = PrecisionOpt,
):
    """Train memory modules on facts or documents and commit them into MEMORY."""
    _use_precision(precision)
    from loramem.bench import phonebook as pb
    from loramem.executor import make_executor
    from loramem import Memory, facts_from_file

    lora, train_spec = _specs(rank, alpha, targets, layers, lr, epochs, batch_size, seed, loss_on, target_recall,
                              variants, objective, candidates, lr_floor, decay_epochs)
    if fmt != "facts":
        if phonebook or not files:
            raise LoramemError("--format writes documents: give files or folders (not --phonebook)")
        from loramem.corpus import read_documents
        from loramem.synth import SynthSpec, parse_formats

        synth = SynthSpec(formats=parse_formats(fmt), questions=questions, summaries=summaries, rewrites=rewrites,
                          seed=seed)
        if generator not in GENERATORS:
            raise LoramemError(f"unknown generator {generator!r}: choose {' or '.join(GENERATORS)}")
        docs, skipped = read_documents(files, strict=strict)
        for where, reason in skipped:
            notices.print(f"[yellow]skipped[/] {where}: {reason}", highlight=False)
        if not docs:
            raise LoramemError(f"no readable documents in {', '.join(map(str, files))} ({len(skipped)} skipped)")
        mem = Memory.open(memory, model=model, create=True, prompt=prompt)
        gen = _generator(generator, generator_model, base_url, mem) if set(synth.formats) != {"original"} else None
        rows, empty = [], 0
        total = 1 if one_module else len(docs)
        runner = make_executor(executor, address)
        for i, (record, reports) in enumerate(mem.write_documents(docs, synth, gen, lora, train_spec, one_module,
                                                                  progress=not as_json, executor=runner), 1):
            if record is None:
                empty += 1
                continue
            rows.append(_written(record) | {"usable": sum(sum(r.produced.values()) for r in reports),
                                            "asked": sum(sum(r.asked.values()) for r in reports)})
            if not as_json:
                console.print(f"[{i}/{total}] {record.name}: {record.n_examples} examples, recall {record.recall:.0%}, "
                              f"{record.train_seconds:.0f} s", highlight=False)
        if not rows:
            raise LoramemError("the generator gave no usable training data for any document; nothing written")
        out = {"memory": str(memory), "documents": len(docs), "skipped": len(skipped), "no_data": empty,
               "modules": rows}
        _print_json(out) if as_json else _table(f"wrote {memory}", rows)
        return
    if phonebook:
        examples = pb.examples(pb.load(phonebook, data_dir))
    elif files:
        examples = [e for f in files for e in facts_from_file(f)]
    else:
        raise LoramemError("give facts files or --phonebook SIZE")
    mem = Memory.open(memory, model=model, create=True, prompt=prompt)
    label = name or (f"phonebook-{phonebook}" if phonebook else None)
    per_module = _shard_tokens(shard_tokens, capacity or Path(memory), threshold, mem, lora)
    if per_module:
        rows = [_written(r) for r in mem.write_shards(examples, per_module, lora, train_spec, name=label or "shard",
                                                      executor=make_executor(executor, address))]
        _print_json({"memory": str(memory), "modules": rows}) if as_json else _table(f"wrote {memory}", rows)
        return
    summary = _written(mem.write(examples, lora=lora, train_spec=train_spec, name=label,
                                 executor=make_executor(executor, address)))
    _print_json(summary) if as_json else _table(f"wrote {memory}", [summary])


def _shard_tokens(value: str, capacity: Path, threshold: float, memory, lora) -> int:
    """--shard-tokens: a number, or auto (from measured capacity; see loramem.capacity)."""
    from loramem import capacity as cap

    if value.strip().lower() != "auto":
        try:
            return int(value)
        except ValueError:
            raise LoramemError(f"--shard-tokens must be a number of tokens or auto, got {value!r}") from None
    if lora.layers == AUTO:
        raise LoramemError("--shard-tokens auto sizes modules by the capacity measured at one placement: give --layers")
    if not capacity.exists():
        raise LoramemError(f"--shard-tokens auto needs measured capacity: {capacity} does not exist (--capacity)")
    tokens = cap.module_tokens(cap.trainable_params(memory.base.model, lora), cap.cells_from(capacity, memory), lora,
                               threshold)
    notices.print(f"capacity-aware sizing: {tokens} tokens of facts per rank-{lora.rank} module", highlight=False)
    return tokens


def _written(record) -> dict:
    return {"module": record.id, "name": record.name, "facts": record.n_examples, "layers": record.lora_spec["layers"],
            "recall": record.recall,
            "train_seconds": record.train_seconds, "trainable_params": record.trainable_params}


def _generator(kind: str, model: str | None, base_url: str | None, memory):
    """The synthetic-data generator: a local chat model (default: the memory's own) or an OpenAI-compatible endpoint."""
    from loramem.synth import HFGenerator, OpenAIGenerator

    if kind == "hf":
        return HFGenerator(memory.base if model is None or model == memory.model_name else model)
    if kind == "openai":
        return OpenAIGenerator(base_url=base_url, model=model)
    raise LoramemError(f"unknown generator {kind!r}: choose {' or '.join(GENERATORS)}")


@app.command()
def ask(
    memory: Path = typer.Argument(...),
    question: str = typer.Argument(...),
    mode: str = typer.Option("lora", help="base, icl, rag, lora, multi, or a module mode with context: lora+icl, "
                             "lora+rag, multi+icl, multi+rag"),
    module: Optional[str] = typer.Option(None, help="module id or name (default: the only one, or the router's pick)"),
    router: str = typer.Option("dense", help="dense, bm25 or hybrid"),
    top_k: Optional[int] = typer.Option(None, help="modules merged (multi) and passages retrieved (rag); default 3"),
    merge: str = typer.Option("ties", help="linear, cat, ties, dare_linear, dare_ties or magnitude_prune"),
    threshold: Optional[float] = typer.Option(None, help="abstain (no module) below this router score"),
    model: Optional[str] = ModelOpt,
    max_new_tokens: int = typer.Option(24),
    as_json: bool = typer.Option(False, "--json"),
):
    """Ask MEMORY a question."""
    from loramem.memory import Memory

    answer = Memory.open(memory, model=model, answer_only=True).ask(
        question, mode=mode, module=module, router=router, top_k=top_k, merge=merge, threshold=threshold,
        max_new_tokens=max_new_tokens,
    )
    _print_json(answer.to_dict()) if as_json else console.print(answer.text, highlight=False)
    _skip_teardown.append("ask")


@app.command()
def inspect(memory: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """List MEMORY's modules: base model, spec, parameters, training tokens, recall, date."""
    from loramem.store import Store

    store = Store.open(memory)
    rows = [{
        "id": m.id, "name": m.name, "base": m.base_model, "rank": m.lora_spec["rank"],
        "targets": m.lora_spec["targets"], "layers": m.lora_spec["layers"], "params": m.trainable_params,
        "facts": m.n_examples, "train_tokens": m.train_tokens, "recall": m.recall,
        "precision": m.stats.get("precision"), "created": m.created_at,
    } for m in store.modules()]
    if as_json:
        _print_json({"memory": str(memory), "base_model": store.base_model, "modules": rows}, ran=False)
    elif rows:
        _table(f"{memory} ({store.base_model})", rows)
    else:
        console.print(f"{memory}: no modules ({store.base_model})")


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
    as_json: bool = typer.Option(False, "--json"),
):
    """Export MEMORY's modules as PEFT adapters vLLM loads, with the `vllm serve` arguments."""
    from loramem.export import export_vllm, parse_merge_set

    chosen = [m.strip() for m in modules.split(",") if m.strip()] if modules else None
    result = export_vllm(memory, vllm, chosen, [parse_merge_set(m) for m in merged or []], merged_rank, base_model)
    if as_json:
        _print_json(result.to_dict())
        return
    _table(f"exported to {result.out}", [{
        "adapter": a.name, "rank": a.rank, "modules": ", ".join(m[:8] for m in a.modules), "merge": a.method or "",
        "svd_error": "" if a.relative_error is None else f"{a.relative_error:.2e}",
    } for a in result.adapters])
    for note in result.notes:
        notices.print(f"[yellow]note[/] {note}", highlight=False)
    console.print(result.to_dict()["command"], highlight=False, soft_wrap=True)


@app.command()
def serve(
    memories: list[str] = typer.Option(..., "--memory", help="NAME=PATH, repeatable; a missing PATH is created by "
                                       "its first documents job"),
    host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="LORAMEM_API_KEY", help="require Authorization: Bearer KEY"),
    model: Optional[str] = ModelOpt,
    max_body: int = typer.Option(1_000_000, help="largest request body in bytes (413 above)"),
    max_batch: int = typer.Option(16, help="questions answered in one batch (1: no batching)"),
    batch_window_ms: float = typer.Option(5.0, help="how long to wait for more questions to batch"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
):
    """Serve memories over an OpenAI-compatible API (/v1/models, /v1/chat/completions, documents jobs)."""
    from loramem.serve import serve as run_server

    run_server(memories, host, port, api_key, model, max_body, batch_window_ms / 1000, max_batch, log_level)


@bench_app.command("phonebook")
def bench_phonebook(
    size: str = typer.Option("1K"),
    rank: int = typer.Option(4),
    targets: str = TargetsOpt,
    layers: str = LayersOpt,
    lr: float = LrOpt,
    epochs: int = EpochsOpt,
    batch_size: int = typer.Option(TrainSpec.batch_size),
    target_recall: float = typer.Option(1.0),
    candidates: Optional[int] = CandidatesOpt,
    lr_floor: float = FloorOpt,
    decay_epochs: Optional[int] = DecayOpt,
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    memory: Optional[Path] = typer.Option(None, help="keep the module in this memory (default: a temporary one)"),
    as_json: bool = typer.Option(False, "--json"),
    precision: str = PrecisionOpt,
):
    """Write a PhoneBook into one module and score exact match."""
    _use_precision(precision)
    from loramem.bench import phonebook as pb
    from loramem.memory import Memory

    lora, train_spec = _specs(rank, None, targets, layers, lr, epochs, batch_size, 0, "answer", target_recall,
                              candidates=candidates, lr_floor=lr_floor, decay_epochs=decay_epochs)
    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory.open(memory or Path(tmp) / "memory", model=model, create=True)
        result = pb.run(mem, size, lora, train_spec, data_dir, progress=not as_json)
    _print_json(result) if as_json else _table("PhoneBook", [result])


@bench_app.command("sectors")
def bench_sectors(
    source: str = typer.Option("128K", help="the phonebook the sectors are cut from"),
    sector: str = typer.Option("8K", help="tokens per sector (the paper: 8K)"),
    count: int = typer.Option(8, help="number of sectors"),
    rank: int = typer.Option(4, help="rank of each sector's module; the single module gets rank x count"),
    targets: str = TargetsOpt,
    layers: str = LayersOpt,
    lr: float = LrOpt,
    epochs: int = EpochsOpt,
    context_questions: int = typer.Option(48, help="questions scored for ICL (each prompt holds every fact; 0: skip)"),
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = typer.Option(False, "--json"),
    precision: str = PrecisionOpt,
):
    """Multi-module PhoneBook: a module per sector (oracle and routed) against one big module, ICL and RAG."""
    _use_precision(precision)
    from loramem.bench import phonebook as pb
    from loramem.memory import Memory

    lora, train_spec = _specs(rank, None, targets, layers, lr, epochs, 8, 0, "answer", 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory.open(memory or Path(tmp) / "sectors", model=model, create=True)
        result = pb.run_sectors(mem, source, sector, count, rank, lora, train_spec, context_questions, data_dir,
                                progress=not as_json)
    _emit(result, out, as_json, f"PhoneBook: {count} sectors of {sector} from {source}",
          ("setting", "exact_match", "questions", "seconds_per_question"))


def _emit(result: dict, out: Path | None, as_json: bool, title: str, columns: tuple[str, ...]) -> None:
    """Print a study's rows as a table (or the whole result as JSON), and save it as JSON when asked."""
    if out:
        out.write_text(json.dumps(result, indent=1))
    if as_json:
        _print_json(result)
    else:
        _table(title, [{k: row[k] for k in columns if k in row} for row in result["rows"]])


@bench_app.command("paperqa")
def bench_paperqa(
    fmt: list[str] = typer.Option(["qa"], "--format", help="training formats to compare (repeat the flag): "
                                  "original, qa, summary+qa, rewrite+qa, original+summary+rewrite+qa"),
    papers: Optional[str] = PapersOpt,
    questions: int = QuestionsOpt,
    rank: int = typer.Option(16),
    targets: str = TargetsOpt,
    layers: str = LayersOpt,
    lr: float = LrOpt,
    epochs: int = EpochsOpt,
    baselines: bool = typer.Option(True, help="also score the base model alone and with the introduction in the prompt"),
    rag: bool = typer.Option(False, help="also score every setting with the top 3 retrieved passages in the prompt"),
    generator: str = GeneratorOpt,
    generator_model: Optional[str] = GeneratorModelOpt,
    base_url: Optional[str] = BaseUrlOpt,
    judge_model: Optional[str] = JudgeOpt,
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    prompt: Optional[str] = PromptOpt,
    objective: str = ObjectiveOpt,
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = typer.Option(False, "--json"),
    precision: str = PrecisionOpt,
):
    """The paper's format table: each paper's introduction written into a module in each format, its 30
    questions scored by ROUGE-L, BLEU, token F1 (and the judge)."""
    _use_precision(precision)
    from loramem.bench import paperqa
    from loramem.synth import SynthSpec

    chosen, lora, train_spec, judge = _paperqa_setup(fmt, papers, data_dir, rank, targets, layers, lr, epochs,
                                                     base_url, judge_model, objective)
    with _bench_memory(memory, model, generator, generator_model, base_url, prompt) as (mem, gen):
        result = paperqa.run(mem, chosen, fmt, SynthSpec(questions=questions), gen, lora, train_spec,
                             baselines=baselines, judge=judge, progress=not as_json, rag=rag)
    _emit(result, out, as_json, f"PaperQA: {len(chosen)} papers, {result['questions']} questions, rank {rank}",
          ("format", "train_tokens", "rouge_l", "bleu", "f1", "judge"))


@bench_app.command("paperqa-multi")
def bench_paperqa_multi(
    fmt: str = typer.Option("qa", "--format", help="training format of each paper's module"),
    papers: Optional[str] = PapersOpt,
    questions: int = QuestionsOpt,
    rank: int = typer.Option(16),
    targets: str = TargetsOpt,
    layers: str = LayersOpt,
    lr: float = LrOpt,
    epochs: int = EpochsOpt,
    router: str = typer.Option("dense", help="router for the merges over the top 3"),
    merges: str = typer.Option("ties,linear,dare_ties,cat", help="merge methods to compare, comma-separated"),
    max_merged: int = typer.Option(5, help="merge the gold module with up to this many modules in all"),
    generator: str = GeneratorOpt,
    generator_model: Optional[str] = GeneratorModelOpt,
    base_url: Optional[str] = BaseUrlOpt,
    judge_model: Optional[str] = JudgeOpt,
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    prompt: Optional[str] = PromptOpt,
    objective: str = ObjectiveOpt,
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = typer.Option(False, "--json"),
    precision: str = PrecisionOpt,
):
    """PaperQA with one module per paper: oracle vs routed vs one module on all papers, merges over the top 3,
    and merging more modules with the gold one."""
    _use_precision(precision)
    from loramem.answer import MERGE_METHODS
    from loramem.bench import paperqa
    from loramem.synth import SynthSpec

    methods = tuple(m.strip() for m in merges.split(",") if m.strip())
    unknown = [m for m in methods if m not in MERGE_METHODS]
    if unknown:
        raise LoramemError(f"unknown merge method {unknown[0]!r}; choose from {', '.join(MERGE_METHODS)}")
    chosen, lora, train_spec, judge = _paperqa_setup([fmt], papers, data_dir, rank, targets, layers, lr, epochs,
                                                     base_url, judge_model, objective)
    with _bench_memory(memory, model, generator, generator_model, base_url, prompt) as (mem, gen):
        result = paperqa.run_routing(mem, chosen, fmt, SynthSpec(questions=questions), gen, lora, train_spec, router,
                                     methods, max_merged, judge, progress=not as_json)
    _emit(result, out, as_json, f"PaperQA, a module per paper: {len(chosen)} papers, {result['questions']} questions",
          ("setting", "rouge_l", "bleu", "f1", "judge", "s_per_question", "merge_s"))


@bench_app.command("narrativeqa")
def bench_narrativeqa(
    fmt: str = typer.Option("qa", "--format", help="training format of each module"),
    stories: int = typer.Option(5, help="the first N dev stories"),
    per: str = typer.Option("story", help="a module per story, or per chunk of a story"),
    chunk_tokens: int = typer.Option(256, help="tokens per chunk with --per chunk"),
    questions: int = QuestionsOpt,
    rank: int = typer.Option(16),
    targets: str = TargetsOpt,
    layers: str = LayersOpt,
    lr: float = LrOpt,
    epochs: int = EpochsOpt,
    router: str = typer.Option("dense", help="router for the routed modules and RAG passages"),
    generator: str = GeneratorOpt,
    generator_model: Optional[str] = GeneratorModelOpt,
    base_url: Optional[str] = BaseUrlOpt,
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    prompt: Optional[str] = PromptOpt,
    objective: str = ObjectiveOpt,
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = typer.Option(False, "--json"),
    precision: str = PrecisionOpt,
):
    """NarrativeQA: context (none, icl, rag) against modules (none, one for all, routed top 1, top 3 merged),
    scored by ROUGE-L."""
    _use_precision(precision)
    from loramem.bench import narrativeqa
    from loramem.synth import SynthSpec, parse_formats

    parse_formats(fmt)
    chosen = narrativeqa.load(data_dir, stories)
    lora, train_spec = _specs(rank, None, targets, layers, lr, epochs, 8, 0, "answer", 1.0, objective=objective)
    with _bench_memory(memory, model, generator, generator_model, base_url, prompt) as (mem, gen):
        result = narrativeqa.run(mem, chosen, fmt, SynthSpec(questions=questions), gen, lora, train_spec, per,
                                 chunk_tokens, router, progress=not as_json)
    _emit(result, out, as_json, f"NarrativeQA: {len(chosen)} stories, {result['questions']} questions, "
          f"{result['modules']} modules ({per})", ("context", "modules", "rouge_l", "s_per_question"))


def _paperqa_setup(formats, papers, data_dir, rank, targets, layers, lr, epochs, base_url, judge_model,
                   objective="ntp"):
    """Check the formats, load the papers, and build the specs and the optional judge of a PaperQA study."""
    from loramem.bench import paperqa
    from loramem.bench.judge import Judge
    from loramem.synth import OpenAIGenerator, parse_formats

    for f in formats:
        parse_formats(f)
    chosen = paperqa.load(data_dir, papers)
    lora, train_spec = _specs(rank, None, targets, layers, lr, epochs, 8, 0, "answer", 1.0, objective=objective)
    judge = Judge(OpenAIGenerator(base_url=base_url, model=judge_model)) if judge_model else None
    return chosen, lora, train_spec, judge


@contextmanager
def _bench_memory(memory, model, generator, generator_model, base_url, prompt=None):
    """The memory a study writes into (kept when named, else temporary) and its data generator."""
    from loramem.memory import Memory

    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory.open(memory or Path(tmp) / "memory", model=model, create=True, prompt=prompt)
        yield mem, _generator(generator, generator_model, base_url, mem)


@app.command()
def demo(
    model: str = typer.Option(DEFAULT_MODEL),
    data_dir: Optional[Path] = DataDirOpt,
    questions: int = typer.Option(10),
):
    """Write a 1K PhoneBook into a rank-4 module; compare base, module and ICL on its questions."""
    from loramem.bench import phonebook as pb
    from loramem.memory import Memory

    entries = pb.load("1K", data_dir)
    lora = LoraSpec(rank=4)  # the defaults: layers auto (the last ones, as many as the facts need)
    console.print(f"PhoneBook 1K: {len(entries)} entries -> one rank-4 module of {model} "
                  f"(targets {lora.targets}, layers {lora.layers})")
    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory.open(Path(tmp) / "demo.mem", model=model, create=True)
        start = time.perf_counter()
        record = mem.write(pb.examples(entries), lora=lora, name="phonebook-1K")
        console.print(f"trained in {time.perf_counter() - start:.1f} s (layers {record.lora_spec['layers']}), "
                      f"recall {record.recall:.0%}")
        asked = entries[:: max(1, len(entries) // questions)][:questions]
        rows = []
        for mode in ("base", "lora", "icl"):
            score, seconds = pb.evaluate(mem, asked, mode=mode)
            rows.append({"mode": mode, "exact_match": score, "seconds_per_question": seconds})
        sample = mem.ask(asked[0].question)
        console.print(f"Q: {asked[0].question}  A: {sample.text}  (gold {asked[0].phone})")
    _table(f"{len(asked)} PhoneBook questions", rows)


# --- studies ---------------------------------------------------------------------------------------------

exp_app = typer.Typer(no_args_is_help=True, help="The paper's module studies: each cell's row is appended to OUT/<study>.jsonl "
                      "as it is measured, and a rerun resumes where a stopped one ended.")
app.add_typer(exp_app, name="exp")
DatasetOpt = typer.Option("phonebook", "--dataset", help="phonebook or counterfact")
PresetOpt = typer.Option("cpu", "--preset", help="cpu (FFN of the last 4 layers, loramem's recipe) or paper (the "
                         "paper's setting, for GPUs)")
RanksOpt = typer.Option(None, "--ranks", help="comma-separated ranks (default: the preset's)")
SizesOpt = typer.Option(None, "--sizes", help="comma-separated sizes such as 1K,2K,4K (default: the preset's)")
StudyOutOpt = typer.Option(Path("studies"), "--out", help="results folder (one JSONL file per study)")
ExecutorOpt = typer.Option("inprocess", "--executor", help="inprocess, or ray (each cell a Ray task)")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (auto, ray://host:10001); default a local Ray")
StepsOpt = typer.Option(None, "--steps", help="every cell's step budget (default: the preset's)")


def _csv(value: str | None, cast=str) -> list | None:
    return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None


def _study(name: str, cells, out: Path, executor: str, address: str | None, data_dir: Path | None,
           floor: float = 0.0) -> None:
    from loramem.executor import EXECUTORS
    from loramem.experiments.runner import run_study

    if executor not in EXECUTORS:
        raise LoramemError(f"unknown executor {executor!r}: choose {' or '.join(EXECUTORS)}")
    if address and executor != "ray":
        raise LoramemError("--address needs --executor ray")

    def show(row: dict) -> None:
        notices.print(f"{name}: {row['dataset']} {row['size']} {row['model']} rank {row['rank']} {row['targets']}"
                      f"/{row['layers']} {row['variant']}: score {row['score']:.3f} in {row['cell_seconds']:.0f} s")

    rows = run_study(name, cells, out, executor, address, data_dir, on_row=show, floor=floor)
    keys = ("dataset", "model", "size", "rank", "targets", "layers", "variant", "trainable_params", "score", "epochs",
            "train_seconds")
    _table(f"{name}: {len(rows)} cells in {out / (name + '.jsonl')}", [{k: r[k] for k in keys} for r in rows])


@exp_app.command("capacity")
def exp_capacity(dataset: str = DatasetOpt, ranks: Optional[str] = RanksOpt, sizes: Optional[str] = SizesOpt,
                 preset: str = PresetOpt, steps: Optional[int] = StepsOpt, model: str = typer.Option(DEFAULT_MODEL, "--model"),
                 out: Path = StudyOutOpt, executor: str = ExecutorOpt, address: Optional[str] = AddressOpt,
                 data_dir: Optional[Path] = DataDirOpt,
                 floor: float = typer.Option(0.0, "--floor", help="skip a rank's larger sizes once one scored below "
                                             "this (0: measure every cell)"),
                 precision: str = PrecisionOpt):
    """Ranks x sizes: how much one module stores, and where it saturates."""
    precision = _use_precision(precision)
    from loramem.experiments import studies

    cells = studies.capacity(studies.preset(preset, steps, precision), dataset, _csv(ranks, int), _csv(sizes), model)
    _study("capacity", cells, out, executor, address, data_dir, floor)


@exp_app.command("placement")
def exp_placement(dataset: str = DatasetOpt, sizes: str = typer.Option("1K,2K", "--sizes"),
                  budget_rank: int = typer.Option(4, "--budget-rank", help="the budget: trainable parameters of the "
                                                  "preset's placement at this rank"),
                  layer_sets: Optional[str] = typer.Option(None, "--layer-sets", help="e.g. first4,last4 (default: the "
                                                           "preset's early and late sets)"),
                  targets: str = typer.Option("ffn,attention,all", "--targets"), preset: str = PresetOpt, steps: Optional[int] = StepsOpt,
                  model: str = typer.Option(DEFAULT_MODEL, "--model"), out: Path = StudyOutOpt,
                  executor: str = ExecutorOpt, address: Optional[str] = AddressOpt, data_dir: Optional[Path] = DataDirOpt,
               precision: str = PrecisionOpt):
    """Early vs late layers x FFN / attention / all, at equal parameter budgets."""
    precision = _use_precision(precision)
    from loramem.experiments import studies
    from loramem.models import load_base

    cells = studies.placement(studies.preset(preset, steps, precision), dataset, _csv(sizes), budget_rank, load_base(model),
                              _csv(targets), _csv(layer_sets))
    _study("placement", cells, out, executor, address, data_dir)


@exp_app.command("variants")
def exp_variants(dataset: str = DatasetOpt, ranks: str = typer.Option("1,4", "--ranks"),
                 sizes: str = typer.Option("1K,2K,4K", "--sizes"),
                 variants: str = typer.Option("lora,rslora,dora,pissa", "--variants"), preset: str = PresetOpt, steps: Optional[int] = StepsOpt,
                 model: str = typer.Option(DEFAULT_MODEL, "--model"), out: Path = StudyOutOpt,
                 executor: str = ExecutorOpt, address: Optional[str] = AddressOpt, data_dir: Optional[Path] = DataDirOpt,
               precision: str = PrecisionOpt):
    """LoRA, rsLoRA, DoRA and PiSSA on the same cells."""
    precision = _use_precision(precision)
    from loramem.experiments import studies

    cells = studies.variants(studies.preset(preset, steps, precision), dataset, _csv(ranks, int), _csv(sizes), model, _csv(variants))
    _study("variants", cells, out, executor, address, data_dir)


@exp_app.command("scale")
def exp_scale(dataset: str = DatasetOpt, models: str = typer.Option("smollm2-135m,gemma3-270m", "--models",
                                                                    help="registry names or local HF folders"),
              ranks: str = typer.Option("1,4", "--ranks"), sizes: str = typer.Option("1K,2K,4K", "--sizes"),
              preset: str = PresetOpt, steps: Optional[int] = StepsOpt, out: Path = StudyOutOpt, executor: str = ExecutorOpt,
              address: Optional[str] = AddressOpt, data_dir: Optional[Path] = DataDirOpt,
               precision: str = PrecisionOpt):
    """The same capacity cells on several base models."""
    precision = _use_precision(precision)
    from loramem.experiments import studies

    cells = studies.scale(studies.preset(preset, steps, precision), dataset, _csv(models), _csv(ranks, int), _csv(sizes))
    _study("scale", cells, out, executor, address, data_dir)


@exp_app.command("budget")
def exp_budget(dataset: str = DatasetOpt, rank: int = typer.Option(1, "--rank"), size: str = typer.Option("4K", "--size"),
               steps: str = typer.Option("400,800,1600", "--steps"), preset: str = PresetOpt,
               model: str = typer.Option(DEFAULT_MODEL, "--model"), out: Path = StudyOutOpt,
               executor: str = ExecutorOpt, address: Optional[str] = AddressOpt, data_dir: Optional[Path] = DataDirOpt,
               precision: str = PrecisionOpt):
    """One cell trained for more and more steps: does more training remove the limit?"""
    precision = _use_precision(precision)
    from loramem.experiments import studies

    cells = studies.budget(studies.preset(preset, precision=precision), dataset, rank, size, _csv(steps, int), model)
    _study("budget", cells, out, executor, address, data_dir)


@app.command()
def report(results: Path = typer.Argument(..., help="a studies folder (loramem exp ... --out)"),
           threshold: float = typer.Option(0.95, "--threshold", help="score a size must keep to count in T_max")):
    """Write RESULTS/report.md with tables and PNG plots of every study found there."""
    from loramem.experiments.report import write_report

    path = write_report(results, threshold)
    console.print(f"wrote {path}")


# Commands that only read and print, done: the process may end without the interpreter's teardown, which takes
# ~0.6 s of a 2 s `loramem ask` on a 2-core CPU (freeing torch's and transformers' modules one by one).
_skip_teardown: list[str] = []


def _exit_at_once() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
        if _skip_teardown:
            _exit_at_once()
    except LoramemError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # click's usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
