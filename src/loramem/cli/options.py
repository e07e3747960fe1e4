"""What the commands share: options built from the settings dataclasses, the common options, the output."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from loramem.config import build_settings, group_help, option_fields
from loramem.models import DEFAULT_MODEL

console = Console()
notices = Console(stderr=True, soft_wrap=True)  # warnings and skips: stdout stays a clean table or JSON

ModelOpt = typer.Option(None, "--model", help=f"registry name ({DEFAULT_MODEL}, tiny), HF folder or .gguf file")
DataDirOpt = typer.Option(None, "--data-dir", help="benchmark data directory (default: $LORAMEM_DATA)")
GeneratorOpt = typer.Option("hf", "--generator", help="synthetic data: hf (a local chat model) or openai")
GeneratorModelOpt = typer.Option(None, "--generator-model", help="hf: model (default: the memory's); openai: model name")
BaseUrlOpt = typer.Option(None, "--base-url", help="openai: endpoint (default $LORAMEM_OPENAI_BASE_URL)")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (bf16 where the hardware multiplies bf16 natively, "
                            "else fp32), bf16 or fp32; for the whole run, as LORAMEM_PRECISION")
PromptOpt = typer.Option(None, "--prompt", help="prompt style of a new memory, the same in training and answering: "
                         "plain (\"Question: ... Answer:\") or chat (the model's chat template)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object instead of a table")
ExecutorOpt = typer.Option("inprocess", "--executor", help="where modules train: inprocess, or ray (a task each, one "
                           "GPU each on a cluster with GPUs); the store is written here either way")
AddressOpt = typer.Option(None, "--address", help="ray: the cluster (auto, or ray://host:10001); default: a Ray "
                          "started for this run")

# The keyword argument a command receives each built settings object under.
SETTINGS_ARGS = {"LoraSpec": "lora", "TrainSpec": "train_spec", "SynthSpec": "synth", "AskSpec": "ask_spec",
                 "SelfStudySpec": "study"}


def _option_type(annotation):
    """Typer wants Optional[X] for `X | None`; a field that also takes a +-joined string (`tuple[str, ...] | str`)
    is a string option."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if str in args and len(args) > 1:
        return Optional[str] if type(None) in typing.get_args(annotation) else str
    if type(None) in typing.get_args(annotation) and len(args) == 1:
        return Optional[args[0]]
    return annotation


def settings_parameters(classes, defaults: dict, helps: dict, exclude=()) -> list[inspect.Parameter]:
    """One keyword parameter with a typer option per settings field (config.option_fields)."""
    plain, groups = option_fields(classes, exclude)
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_option_type(f.type),
                                default=typer.Option(_shown(defaults.get(f.name, f.default)),
                                                     "--" + f.name.replace("_", "-"), help=helps.get(f.name, f.help)))
              for f in plain]
    return params + [inspect.Parameter(group, inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                       default=typer.Option(defaults.get(group, ""), "--" + group,
                                                            help=helps.get(group, group_help(members))))
                     for group, members in groups.items()]


def _shown(default):
    """A tuple default of a string option (`kinds`) as the +-joined string it is typed as."""
    return "+".join(map(str, default)) if isinstance(default, tuple) else default


def given_options(context: typer.Context) -> set[str]:
    """The options of the running command (its typer.Context) given on the command line, not left at defaults."""
    return {name for name in context.params if context.get_parameter_source(name).name != "DEFAULT"}


def with_settings(*classes, defaults: dict | None = None, helps: dict | None = None, exclude: tuple[str, ...] = ()):
    """Give a command an option per field of each settings class; it receives the built settings as keyword
    arguments (SETTINGS_ARGS: lora, train_spec, synth, ask_spec). `defaults` and `helps` override a field's for this
    command; `exclude` leaves fields at their defaults (where the command's own option of that name means something
    else). A command with TrainSpec also takes --precision, which forces the whole run (see use_precision) and is
    recorded in the TrainSpec."""
    added = settings_parameters(classes, defaults or {}, helps or {}, exclude)
    trains = any(cls.__name__ == "TrainSpec" for cls in classes)
    if trains:
        added.append(inspect.Parameter("precision", inspect.Parameter.KEYWORD_ONLY, default=PrecisionOpt,
                                       annotation=str))
    names = {p.name for p in added}

    def decorate(command):
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name not in SETTINGS_ARGS.values()]
        clash = names & {p.name for p in own}
        if clash:
            raise TypeError(f"{command.__name__}: its own options {sorted(clash)} are settings fields; exclude them")

        @functools.wraps(command)
        def run(**values):
            chosen = {name: values.pop(name) for name in names}
            if trains:
                chosen["precision"] = use_precision(chosen["precision"])
            built = {SETTINGS_ARGS[cls.__name__]: build_settings(cls, chosen) for cls in classes}
            return command(**values, **built)

        run.__signature__ = signature.replace(parameters=own + added)
        return run

    return decorate


def use_precision(precision: str) -> str:
    """--precision: forces the whole run (training, answering, scoring) through LORAMEM_PRECISION; returns the
    request (the option, else the variable) for the specs that Ray tasks carry."""
    from loramem.precision import ENV, check_precision, requested, run_precision

    if check_precision(precision) != "auto":
        os.environ[ENV] = precision
    run_precision()  # refuses bf16 on a device that cannot run it before anything is written
    return requested()


def csv(value: str | None, cast=str) -> list | None:
    return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None


# --- output -------------------------------------------------------------------------------------------------

def table(title: str, rows: list[dict]) -> None:
    out = Table(title=title)
    for key in rows[0]:
        out.add_column(key)
    for row in rows:
        out.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(out)


def print_json(obj, ran: bool = True) -> None:
    """A --json result; one that ran a model also says at which precision and on what hardware."""
    if ran and isinstance(obj, dict):
        from loramem.precision import hardware, run_precision

        obj = obj | {"precision": run_precision(), "hardware": hardware()}
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


def emit(result: dict, out: Path | None, as_json: bool, title: str, columns: tuple[str, ...]) -> None:
    """Print a study's rows as a table (or the whole result as JSON), and save it as JSON when asked."""
    if out:
        out.write_text(json.dumps(result, indent=1))
    if as_json:
        print_json(result)
    else:
        table(title, [{k: row[k] for k in columns if k in row} for row in result["rows"]])
