"""Cells and the runner: one cell is one module written and scored; a study is a list of cells.

A cell writes one data set of one size into a fresh memory through `Memory.write` (the same write path as
every user) and scores the module through `Memory.score` (the answering weights, read teacher-forced). Its
result is one JSON row, appended to the study's JSONL file as soon as it is measured, so a stopped or
crashed study resumes where it stopped: a cell whose key is already in the file (or in another study's file
in the same folder, as shared cells are) is not run again.

Cells run in this process or as Ray tasks (`--executor ray`): each is a pure function of its spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loramem.bench.phonebook import parse_size
from loramem.config import LoraSpec, TrainSpec
from loramem.precision import hardware



@dataclass(frozen=True)
class Cell:
    """One measurement: a module of `lora` trained by `train` on `size` of `dataset`, on base model `model`."""

    dataset: str
    size: str
    lora: LoraSpec
    train: TrainSpec = field(default_factory=TrainSpec)
    model: str = "smollm2-135m"
    prompt: str = "plain"  # the memory's prompt style (the paper asks PhoneBook through the chat template)

    def __post_init__(self) -> None:
        from loramem.bench import get

        get(self.dataset, in_studies=True)  # a clear error for an unknown one

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "size": self.size, "model": self.model, "prompt": self.prompt,
                "lora": self.lora.to_dict(), "train": self.train.to_dict()}

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def variant(self) -> str:
        return next((v for v in ("dora", "pissa", "rslora") if getattr(self.lora, v)), "lora")


def run_cell(cell: Cell, base=None, data_dir: str | Path | None = None, workdir: str | Path | None = None) -> dict:
    """Write the cell's data into one module of a fresh memory, score it and return the result row."""
    from loramem.bench import get
    from loramem.memory import Memory

    bench = get(cell.dataset, in_studies=True)
    items = bench.load(cell.size, data_dir)
    with tempfile.TemporaryDirectory(prefix="loramem-cell-", dir=workdir) as tmp:
        memory = Memory.open(Path(tmp) / "memory", model=cell.model, create=True, base=base, prompt=cell.prompt)
        started = time.perf_counter()
        record = memory.write(bench.to_write(items), cell.lora, cell.train, name=f"{cell.dataset}-{cell.size}",
                              progress=False)
        tokenizer = memory.base.tokenizer
        data_tokens = sum(len(tokenizer(item.line, add_special_tokens=False).input_ids) for item in items)
        scores = bench.score(memory, items, record.id, precision=cell.train.precision)
        if bench.bits_per_item:  # the items stored exactly, in bits, per trainable parameter
            stored = round(scores["score"] * len(items))
            scores["bits_per_param"] = stored * bench.bits_per_item / record.trainable_params
        return {"key": cell.key, **cell.to_dict(), "rank": cell.lora.rank, "targets": cell.lora.targets,
                "layers": cell.lora.layers, "variant": cell.variant,
                "base_sha256": memory.base.fingerprint["weights_sha256"][:16], "items": len(items), "data_tokens": data_tokens,
                "trainable_params": record.trainable_params, "tokens_per_param": data_tokens / record.trainable_params,
                **scores, "train_recall": record.recall, "steps": record.stats["steps"],
                "precision": record.stats["precision"], "hardware": hardware(memory.base.device),
                "epochs": record.stats["epochs"], "train_seconds": record.train_seconds,
                "cell_seconds": time.perf_counter() - started, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def read_rows(path: Path) -> list[dict]:
    """The rows of a study file; a line cut short by a crash is skipped (its cell runs again)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "key" in r]


def append_row(path: Path, row: dict) -> None:
    """Append one row and make it durable before the next cell starts (after a line a crash cut short, on a
    line of its own)."""
    with open(path, "a+b") as f:
        cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
        f.write((("\n" if cut else "") + json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def measured(folder: Path) -> dict[str, dict]:
    """Every row measured in this results folder, by cell key."""
    return {row["key"]: row for path in sorted(folder.glob("*.jsonl")) for row in read_rows(path)}


def run_study(name: str, cells: list[Cell], out: str | Path, executor: str = "inprocess", address: str | None = None,
              data_dir: str | Path | None = None, on_row: Callable[[dict], None] | None = None,
              floor: float = 0.0) -> list[dict]:
    """Run the cells not measured yet and append each row to `out/<name>.jsonl`; returns the study's measured rows
    in cell order. Rows measured by another study in `out` are copied, not re-run. With a `floor`, a cell is skipped
    when a smaller size of the same spec scored below it (a curve that has fallen does not rise again in the
    paper's data, and T_max does not depend on it); a later run with floor 0 fills such cells in."""
    from loramem.executor import check_executor

    check_executor(executor, address)  # before the results folder is made
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    mine = {row["key"] for row in read_rows(path)}
    known = measured(out)
    for cell in cells:  # shared cells: copied into this study's file once
        if cell.key in known and cell.key not in mine:
            append_row(path, known[cell.key])
            mine.add(cell.key)
    todo = list({c.key: c for c in cells if c.key not in mine}.values())

    def beyond_floor(cell: Cell) -> bool:  # a smaller size of the same spec already scored under the floor
        return floor > 0 and any(r["score"] < floor and _same_but_size(r, cell)
                                 and parse_size(r["size"]) < parse_size(cell.size) for r in known.values())

    if executor == "ray":
        run = _ray_rows([c for c in todo if not beyond_floor(c)], address, data_dir)
    else:
        run = _local_rows(todo, data_dir, skip=beyond_floor)
    for row in run:
        append_row(path, row)
        known[row["key"]] = row
        if on_row:
            on_row(row)
    return [known[c.key] for c in cells if c.key in known]


def _same_but_size(row: dict, cell: Cell) -> bool:
    spec = cell.to_dict()
    return all(row.get(k) == v for k, v in spec.items() if k != "size")


def _local_rows(cells: list[Cell], data_dir, skip: Callable[[Cell], bool] = lambda cell: False) -> Iterator[dict]:
    from loramem.models import load_base

    bases = {}
    for cell in cells:
        if skip(cell):
            continue
        if cell.model not in bases:
            bases.clear()  # one base model in memory at a time
            bases[cell.model] = load_base(cell.model)
        yield run_cell(cell, bases[cell.model], data_dir)


def _ray_rows(cells: list[Cell], address: str | None, data_dir) -> Iterator[dict]:
    """Each cell as a Ray task (one GPU each on a cluster with GPUs, else one CPU); rows in completion order."""
    from loramem.executor import connect_ray, ray_result, ray_task

    ray = connect_ray(address)
    remote = ray_task(ray, _remote_cell)
    data = str(data_dir) if data_dir else os.environ.get("LORAMEM_DATA")  # workers may not share the driver's env
    pending = [remote.remote(cell, data) for cell in cells]
    try:
        while pending:
            [ready], pending = ray.wait(pending, num_returns=1)
            yield ray_result(ray, ready)
    finally:
        for ref in pending:
            ray.cancel(ref)


def _remote_cell(cell: Cell, data_dir: str | None) -> dict:
    from loramem.executor import _worker_base

    return run_cell(cell, _worker_base(cell.model), data_dir)
