"""`loramem`: the command line, thin over the library (parse, call, print)."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Store knowledge in LoRA modules and ask it back.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; every one prints a table, or one JSON object with --json.")
app.add_typer(bench_app, name="bench")
console = Console()

ModelOpt = typer.Option(None, "--model", help=f"registry name ({DEFAULT_MODEL}, tiny), HF folder or .gguf file")
DataDirOpt = typer.Option(None, "--data-dir", help="benchmark data directory (default: $LORAMEM_DATA)")


def _specs(rank, alpha, targets, layers, lr, epochs, batch_size, seed, loss_on, target_recall,
           variants: str = "") -> tuple[LoraSpec, TrainSpec]:
    chosen = {v.strip() for v in variants.split(",") if v.strip()}
    if chosen - {"rslora", "dora", "pissa"}:
        raise LoramemError(f"unknown LoRA variant(s) {', '.join(sorted(chosen))}: choose from rslora, dora, pissa")
    lora = LoraSpec(rank=rank, alpha=alpha, targets=targets, layers=layers,
                    rslora="rslora" in chosen, dora="dora" in chosen, pissa="pissa" in chosen)
    recall = None if target_recall <= 0 else target_recall
    return lora, TrainSpec(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, loss_on=loss_on, target_recall=recall)


def _table(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


@app.command()
def write(
    memory: Path = typer.Argument(..., help="memory folder (created on first write)"),
    files: list[Path] = typer.Argument(None, help="facts files: one fact per line"),
    phonebook: Optional[str] = typer.Option(None, help="write a PhoneBook of this size (1K, 8K...) instead"),
    data_dir: Optional[Path] = DataDirOpt,
    model: Optional[str] = ModelOpt,
    rank: int = typer.Option(4, help="LoRA rank"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default 2 x rank)"),
    targets: str = typer.Option("all", help="attention, ffn, all, or module names"),
    layers: str = typer.Option("all", help="all, early, late, a-b or a list"),
    variants: str = typer.Option("", help="PEFT variants, comma-separated: rslora, dora, pissa"),
    lr: float = typer.Option(TrainSpec.lr),
    epochs: int = typer.Option(TrainSpec.epochs, help="upper bound; training stops at the target recall"),
    batch_size: int = typer.Option(TrainSpec.batch_size),
    seed: int = typer.Option(0),
    loss_on: str = typer.Option("answer", help="answer or all"),
    target_recall: float = typer.Option(1.0, help="stop at this exact recall of the facts (0: never)"),
    name: Optional[str] = typer.Option(None, help="module name"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Train one memory module on facts and commit it into MEMORY."""
    from loramem.bench import phonebook as pb
    from loramem.memory import Memory, facts_from_file

    lora, train_spec = _specs(rank, alpha, targets, layers, lr, epochs, batch_size, seed, loss_on, target_recall,
                              variants)
    if phonebook:
        examples = pb.examples(pb.load(phonebook, data_dir))
    elif files:
        examples = [e for f in files for e in facts_from_file(f)]
    else:
        raise LoramemError("give facts files or --phonebook SIZE")
    mem = Memory.open(memory, model=model, create=True)
    record = mem.write(examples, lora=lora, train_spec=train_spec, name=name or (f"phonebook-{phonebook}" if phonebook else None))
    summary = {"module": record.id, "name": record.name, "facts": record.n_examples, "recall": record.recall,
               "train_seconds": record.train_seconds, "trainable_params": record.trainable_params}
    _print_json(summary) if as_json else _table(f"wrote {memory}", [summary])


@app.command()
def ask(
    memory: Path = typer.Argument(...),
    question: str = typer.Argument(...),
    mode: str = typer.Option("lora", help="base, lora or icl"),
    module: Optional[str] = typer.Option(None, help="module id or name (default: the only one)"),
    model: Optional[str] = ModelOpt,
    max_new_tokens: int = typer.Option(24),
    as_json: bool = typer.Option(False, "--json"),
):
    """Ask MEMORY a question."""
    from loramem.memory import Memory

    answer = Memory.open(memory, model=model).ask(question, mode=mode, module=module, max_new_tokens=max_new_tokens)
    _print_json(answer.to_dict()) if as_json else console.print(answer.text)


@app.command()
def inspect(memory: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """List MEMORY's modules: base model, spec, parameters, training tokens, recall, date."""
    from loramem.store import Store

    store = Store.open(memory)
    rows = [{
        "id": m.id, "name": m.name, "base": m.base_model, "rank": m.lora_spec["rank"],
        "targets": m.lora_spec["targets"], "layers": m.lora_spec["layers"], "params": m.trainable_params,
        "facts": m.n_examples, "train_tokens": m.train_tokens, "recall": m.recall, "created": m.created_at,
    } for m in store.modules()]
    if as_json:
        _print_json({"memory": str(memory), "base_model": store.base_model, "modules": rows})
    elif rows:
        _table(f"{memory} ({store.base_model})", rows)
    else:
        console.print(f"{memory}: no modules ({store.base_model})")


@bench_app.command("phonebook")
def bench_phonebook(
    size: str = typer.Option("1K"),
    rank: int = typer.Option(4),
    targets: str = typer.Option("all"),
    layers: str = typer.Option("all"),
    lr: float = typer.Option(TrainSpec.lr),
    epochs: int = typer.Option(TrainSpec.epochs),
    batch_size: int = typer.Option(TrainSpec.batch_size),
    target_recall: float = typer.Option(1.0),
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    memory: Optional[Path] = typer.Option(None, help="keep the module in this memory (default: a temporary one)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Write a PhoneBook into one module and score exact match."""
    from loramem.bench import phonebook as pb
    from loramem.memory import Memory

    lora, train_spec = _specs(rank, None, targets, layers, lr, epochs, batch_size, 0, "answer", target_recall)
    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory.open(memory or Path(tmp) / "memory", model=model, create=True)
        result = pb.run(mem, size, lora, train_spec, data_dir, progress=not as_json)
    _print_json(result) if as_json else _table("PhoneBook", [result])


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
    # Late layers: the frozen early layers are computed once, so this trains ~4x faster than all layers.
    lora = LoraSpec(rank=4, targets="all", layers="late")
    console.print(f"PhoneBook 1K: {len(entries)} entries -> one rank-4 module of {model} "
                  f"(targets {lora.targets}, layers {lora.layers})")
    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory.open(Path(tmp) / "demo.mem", model=model, create=True)
        start = time.perf_counter()
        record = mem.write(pb.examples(entries), lora=lora, name="phonebook-1K")
        console.print(f"trained in {time.perf_counter() - start:.1f} s, recall {record.recall:.0%}")
        asked = entries[:: max(1, len(entries) // questions)][:questions]
        rows = []
        for mode in ("base", "lora", "icl"):
            score, seconds = pb.evaluate(mem, asked, mode=mode)
            rows.append({"mode": mode, "exact_match": score, "seconds_per_question": seconds})
        sample = mem.ask(asked[0].question)
        console.print(f"Q: {asked[0].question}  A: {sample.text}  (gold {asked[0].phone})")
    _table(f"{len(asked)} PhoneBook questions", rows)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
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
