"""PhoneBook (the paper's capacity benchmark): names and 10-digit numbers, scored by exact match.

Reads the paper's files from the data directory (`paper/pb_cf/phonebook_qa_{N}K.csv`); without one it
generates a phonebook in the same format, sized in tokens like the paper's (1K is about 48 entries).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

from loramem.bench import Benchmark, register, sibling_memory
from loramem.config import LoraSpec, TrainSpec
from loramem.config import data_dir as resolve_data_dir
from loramem.errors import LoramemError
from loramem.metrics import phone_exact_match
from loramem.examples import Example

LINE_RE = re.compile(r"^Question: What is the phone number of (?P<name>.+)\? Answer: (?P<phone>\d{3}-\d{3}-\d{4})$")
# Tokens per entry in the paper's files with the SmolLM2 tokenizer: 1K = 48 entries (~21 tokens each).
ENTRIES_PER_K = 48
PAPER_SIZES = {f"{k}K" for k in range(1, 21)} | {"128K"}


@dataclass(frozen=True)
class Entry:
    name: str
    phone: str

    @property
    def question(self) -> str:
        return f"What is the phone number of {self.name}?"

    @property
    def line(self) -> str:
        return f"Question: {self.question} Answer: {self.phone}"


def prompt(question: str) -> str:
    """The closed-book prompt format the paper trains and asks in."""
    return f"Question: {question} Answer:"


def examples(entries: list[Entry]) -> list[Example]:
    return [Example(prompt(e.question), f" {e.phone}") for e in entries]


def parse_size(size: str | int) -> int:
    """'1K' -> 1000 tokens; a bare integer is a number of entries given in tokens*1000 as well."""
    text = str(size).strip().upper()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)K?", text)
    if not match or float(match.group(1)) <= 0:
        raise LoramemError(f"phonebook size must look like 1K, 8K or 0.5K, got {size!r}")
    return round(float(match.group(1)) * 1000) if text.endswith("K") else int(match.group(1))


def load(size: str = "1K", data_dir: str | Path | None = None, seed: int = 0) -> list[Entry]:
    """The paper's phonebook of this size when the data directory has it (another size up to 20K: a prefix of
    its 20K file, as the paper's files are prefixes of each other), else a generated one."""
    root = resolve_data_dir(data_dir)
    label = str(size).strip().upper()
    entries = max(1, round(parse_size(size) / 1000 * ENTRIES_PER_K) if label.endswith("K") else parse_size(size))
    if root is not None:
        path = root / "paper" / "pb_cf" / f"phonebook_qa_{label}.csv"
        if label in PAPER_SIZES and path.exists():
            return read_csv(path)
        largest = root / "paper" / "pb_cf" / "phonebook_qa_20K.csv"
        paper = read_csv(largest) if largest.exists() else []
        if len(paper) >= entries:
            return paper[:entries]
    return generate(entries, seed)


def read_csv(path: Path) -> list[Entry]:
    entries = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            match = LINE_RE.match((row.get("text") or "").strip())
            if not match:
                raise LoramemError(f"{path}:{lineno}: not a PhoneBook line")
            entries.append(Entry(match["name"], match["phone"]))
    return entries


def generate(n: int, seed: int = 0) -> list[Entry]:
    """n entries with unique faker names and random numbers, reproducible from the seed."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    names: dict[str, None] = {}
    while len(names) < n:
        names[f"{fake.first_name()} {fake.last_name()}"] = None
    rng = fake.random
    return [Entry(name, f"{rng.randint(200, 999)}-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}") for name in names]


BITS_PER_NUMBER = math.log2(10**10)  # a 10-digit number


def evaluate(memory, entries: list[Entry], mode: str = "lora", **ask) -> tuple[float, float]:
    """(exact match, seconds per question) of asking every entry's question (`ask`: Memory.ask_many options)."""
    answers = memory.ask_many([e.question for e in entries], mode=mode, **ask)
    hits = sum(phone_exact_match(a.text, e.phone) for a, e in zip(answers, entries))
    return hits / len(entries), sum(a.seconds for a in answers) / len(answers)


def run(memory, size: str = "1K", lora: LoraSpec | None = None, train_spec: TrainSpec | None = None,
        data_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Write a phonebook into one module of `memory` and score it: the figures of `loramem bench phonebook`."""
    entries = load(size, data_dir)
    lora = lora or LoraSpec()
    record = memory.write(examples(entries), lora=lora, train_spec=train_spec, name=f"phonebook-{size}",
                          progress=progress)
    score, seconds = evaluate(memory, entries, module=record.id)
    data_tokens = sum(len(memory.base.tokenizer(e.line).input_ids) for e in entries)
    return {
        "size": str(size),
        "entries": len(entries),
        "rank": lora.rank,
        "targets": lora.targets,
        "layers": record.lora_spec["layers"],  # what "auto" resolved to
        "exact_match": score,
        "train_seconds": record.train_seconds,
        "epochs": record.stats["epochs"],
        "steps": record.stats["steps"],
        "tokens_per_second": record.stats["tokens_per_second"],
        "trainable_params": record.trainable_params,
        "data_tokens": data_tokens,
        "tokens_per_param": data_tokens / record.trainable_params,
        "bits_per_param": score * len(entries) * BITS_PER_NUMBER / record.trainable_params,
        "seconds_per_question": seconds,
        "module": record.id,
    }


def sectors(entries: list[Entry], sector_size: str, count: int) -> list[list[Entry]]:
    """The first `count` consecutive sectors of `sector_size` tokens (the paper's 8K-token shards)."""
    per_sector = max(1, round(parse_size(sector_size) / 1000 * ENTRIES_PER_K))
    if count < 1 or per_sector * count > len(entries):
        raise LoramemError(f"{count} sectors of {sector_size} need {per_sector * count} entries; the phonebook has "
                           f"{len(entries)}")
    return [entries[i * per_sector:(i + 1) * per_sector] for i in range(count)]


def _scored(memory, entries: list[Entry], **ask) -> dict:
    score, seconds = evaluate(memory, entries, **ask)
    return {"exact_match": score, "questions": len(entries), "seconds_per_question": seconds}


def run_sectors(memory, source: str = "128K", sector_size: str = "8K", count: int = 8, rank: int = 4,
                lora: LoraSpec | None = None, train_spec: TrainSpec | None = None, context_questions: int = 48,
                data_dir: str | Path | None = None, progress: bool = True) -> dict:
    """The paper's multi-module PhoneBook: one rank-`rank` module per sector against one module of rank
    rank x count on all sectors, ICL (all facts in the prompt) and RAG; module routing by oracle and routers.

    The ICL row is scored on an even sample of `context_questions` questions (every prompt holds the whole
    phonebook, which is slow on a CPU; 0 skips it).
    """
    from dataclasses import replace

    from loramem.route import recall_at_k

    lora = replace(lora or LoraSpec(), rank=rank)
    parts = sectors(load(source, data_dir), sector_size, count)
    everything = [e for part in parts for e in part]
    modules = [memory.write(examples(part), lora, train_spec, name=f"sector-{i}", progress=progress)
               for i, part in enumerate(parts)]
    gold = [m.id for m, part in zip(modules, parts) for _ in part]
    # The single module lives in a memory of its own, so routing and retrieval see only the sectors.
    alone = sibling_memory(memory, "single")
    single = alone.write(examples(everything), replace(lora, rank=rank * count), train_spec,
                         name=f"single-{count}x{sector_size}", progress=progress)
    sample = everything[:: max(1, len(everything) // max(1, context_questions))][:context_questions]
    rows = [{"setting": f"multi ({count} x rank {rank}), oracle routing",
             **_scored(memory, everything, mode="lora", router="oracle", gold=gold)}]
    routing = {}
    for router in ("bm25", "dense", "hybrid"):
        ranked = memory.router(router).route([e.question for e in everything], min(3, count))
        routing[router] = {"recall@1": recall_at_k(ranked, gold, 1), "recall@3": recall_at_k(ranked, gold, 3)}
        rows.append({"setting": f"multi ({count} x rank {rank}), {router} routing",
                     **_scored(memory, everything, mode="lora", router=router)})
    rows.append({"setting": f"single (rank {rank * count})", **_scored(alone, everything, mode="lora")})
    rows.append({"setting": "rag (top 3 facts, bm25)", **_scored(memory, everything, mode="rag", router="bm25", top_k=3)})
    if sample:  # every ICL prompt holds the whole phonebook: on a CPU, score a sample
        facts = "\n".join(e.line for e in everything)
        rows.append({"setting": "icl (all facts in the prompt)", **_scored(memory, sample, mode="icl", context=facts)})
    return {"source": source, "sector_size": sector_size, "sectors": count, "entries": len(everything),
            "rank": rank, "layers": lora.layers, "targets": lora.targets, "rows": rows, "routing": routing,
            "train_seconds": {"sectors": sum(m.train_seconds or 0 for m in modules),
                              "single": single.train_seconds}}


def demo(memory, entries: list[Entry], lora: LoraSpec, questions: int = 10, on_written=lambda record, seconds: None
         ) -> dict:
    """`loramem demo`: write the entries into one module, then score base, module and ICL on an even sample of
    `questions` of them; `on_written(record, seconds)` once the module is committed."""
    import time

    start = time.perf_counter()
    record = memory.write(examples(entries), lora=lora, name="phonebook-1K")
    on_written(record, time.perf_counter() - start)
    asked = entries[:: max(1, len(entries) // questions)][:questions]
    rows = []
    for mode in ("base", "lora", "icl"):
        score, seconds = evaluate(memory, asked, mode=mode)
        rows.append({"mode": mode, "exact_match": score, "seconds_per_question": seconds})
    return {"record": record, "asked": asked, "rows": rows, "sample": memory.ask(asked[0].question).text}


def score(memory, entries: list[Entry], module, precision: str = "auto") -> dict:
    """Exact match of each number read teacher-forced through `module` (what greedy decoding produces)."""
    exact = sum(s.exact for s in memory.score(examples(entries), module, precision=precision)) / len(entries)
    return {"score": exact, "exact_match": exact}


def _questions(entries: list[Entry]) -> list[str]:
    return [e.question for e in entries]


def _load(selection: str | None = None, data_dir: str | Path | None = None) -> list[Entry]:
    return load(selection or "1K", data_dir)


register(Benchmark("phonebook", "facts", _load, examples, _questions, score, run, bits_per_item=BITS_PER_NUMBER,
                   in_studies=True))
register(Benchmark("sectors", "facts", lambda selection=None, data_dir=None: load(selection or "128K", data_dir),
                   examples, _questions, score, run_sectors, bits_per_item=BITS_PER_NUMBER))
