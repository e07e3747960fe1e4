"""What several benchmark scripts share."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from loramem.errors import LoramemError
from loramem.memory import Memory


def open_memory(parser: argparse.ArgumentParser, path: Path, at_least: int, purpose: str) -> Memory:
    """An existing memory with at least `at_least` modules; otherwise the script exits with a one-line error."""
    try:
        memory = Memory.open(path)
    except LoramemError as err:
        parser.error(str(err))
    count = len(memory.modules())
    if count < at_least:
        parser.error(f"{path} has {count} modules; {purpose} needs at least {at_least}")
    return memory


def rotations(names: list[str], rounds: int) -> Iterator[list[str]]:
    """The order to run interleaved variants in, round by round: it rotates, because a fixed order favoured the
    first variant (an A/A pair of identical runs measured 1.024x apart)."""
    for r in range(rounds):
        yield names[r % len(names):] + names[: r % len(names)]


def recipe_kwargs(text: str) -> tuple[dict, dict]:
    """A recipe given on a benchmark's command line, "lr=1e-2,epochs=60,lora_layers='last1'": (LoraSpec keyword
    arguments: the `lora_*` keys without their prefix, TrainSpec and any other keyword arguments)."""
    kw = eval(f"dict({text})")  # noqa: S307 - a benchmark's own command line
    return {k[len("lora_"):]: kw.pop(k) for k in list(kw) if k.startswith("lora_")}, kw


def report(result, as_json: bool, table: Callable[[], None]) -> None:
    """A script's output: the result as one JSON object with --json, else its own table."""
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        table()
