"""CounterFact (the paper's second capacity benchmark): counterfactual edits written into a module.

Each edit is a prompt ("Lenta.ru is written in") whose true object (" Russian") is replaced by a new one
(" Italian"). A module is trained to complete the prompt with the new object, and scored teacher-forced:

- efficacy: after the edit's prompt, the first token of target_new outscores the first token of target_true;
- paraphrase: the same on a rephrased prompt (generalisation);
- locality: on a neighbouring prompt the edit must not touch, the first token of its true answer still
  outscores the first token of the edit's target_new (ROME's neighbourhood score);
- unchanged: the stricter EasyEdit score, the share of the neighbour's answer tokens whose greedy prediction
  (teacher-forced) is the base model's. A small model that did not know the neighbour's answer, and after the
  edit names the right kind of object, counts as changed here.

Reads `counterfact/counterfact_edits.jsonl`; a size ("1K".."20K") takes as many edits as the paper's
`paper/pb_cf/counterfact_edit_{size}.csv` holds (each file is a prefix of the next); a size under 1K ("0.25K")
takes that share of the 1K file's edits.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from loramem.bench import Benchmark, register
from loramem.config import data_dir as resolve_data_dir
from loramem.errors import LoramemError
from loramem.merge import MergeCache
from loramem.examples import Example


@dataclass(frozen=True)
class Edit:
    prompt: str
    target_new: str
    target_true: str
    paraphrase: str
    neighbour: str
    neighbour_answer: str

    @property
    def line(self) -> str:
        return f"{self.prompt} {self.target_new}"


def _root(data_dir) -> Path:
    root = resolve_data_dir(data_dir)
    if root is None:
        raise LoramemError("CounterFact needs the data directory (--data-dir or LORAMEM_DATA)")
    return root


def size_count(size: str, data_dir: str | Path | None = None) -> int:
    """Edits in the paper's CounterFact file of this size; a size without a file (0.5K) scales the 1K file's count."""
    folder = _root(data_dir) / "paper" / "pb_cf"
    label = str(size).strip().upper()
    path = folder / f"counterfact_edit_{label}.csv"
    if not path.exists():
        match = re.fullmatch(r"(\d*\.?\d+)K", label)
        if not match or float(match.group(1)) >= 1 or not (folder / "counterfact_edit_1K.csv").exists():
            raise LoramemError(f"no CounterFact file for size {size!r} ({path.name} is not in the data directory)")
        return max(1, round(float(match.group(1)) * size_count("1K", data_dir)))
    with open(path, newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))


def load(size: str = "1K", data_dir: str | Path | None = None) -> list[Edit]:
    """The first edits of counterfact_edits.jsonl, as many as the paper's file of this size."""
    count = size_count(size, data_dir)
    path = _root(data_dir) / "counterfact" / "counterfact_edits.jsonl"
    edits = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in zip(range(1, count + 1), f):
                row = json.loads(line)
                edits.append(Edit(row["prompt"], row["target_new"], row["target_true"], row["rephrase_prompt"],
                                  row["locality_prompt"], row["locality_ground_truth"]))
    except OSError as e:
        raise LoramemError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise LoramemError(f"{path}:{lineno}: not a CounterFact edit ({e})") from None
    return edits


def examples(edits: list[Edit]) -> list[Example]:
    """What a module is trained on: each prompt completed with its new object."""
    return [Example(e.prompt, f" {e.target_new}") for e in edits]


def _first_token(tokenizer, text: str) -> int:
    return tokenizer(f" {text}", add_special_tokens=False).input_ids[0]


def _preferred(memory, prompts: list[str], preferred: list[str], other: list[str], module):
    """Per prompt (one forward each): is the first token of `preferred` above the first token of `other`? Also
    returns the scored continuations (`preferred`, teacher-forced)."""
    tokenizer = memory.base.tokenizer
    scored = memory.score([Example(p, f" {a}") for p, a in zip(prompts, preferred)], module,
                          rivals=[[_first_token(tokenizer, b)] for b in other])
    return [bool(s.logp[0] > s.rivals[0]) for s in scored], scored


# The base model's neighbour scores, by weights and edits: the same for every module (the last few edit sets kept).
_BASE = MergeCache(maxsize=8)


def score(memory, edits: list[Edit], module) -> dict:
    """Efficacy, paraphrase, locality and unchanged of `module` (an id, or a list to merge) on these edits, and the
    base model's own locality (how often a neighbour preferred its true object before any edit)."""
    new, true = [e.target_new for e in edits], [e.target_true for e in edits]
    neighbours, answers = [e.neighbour for e in edits], [e.neighbour_answer for e in edits]
    efficacy, _ = _preferred(memory, [e.prompt for e in edits], new, true, module)
    paraphrase, _ = _preferred(memory, [e.paraphrase for e in edits], new, true, module)
    locality, after = _preferred(memory, neighbours, answers, new, module)
    key = (memory.base.fingerprint["weights_sha256"], tuple(neighbours), tuple(answers), tuple(new), memory.prompt)
    base_locality, before = _BASE.get_or_compute(key, lambda: _preferred(memory, neighbours, answers, new, None))
    mean = lambda flags: sum(flags) / len(flags)  # noqa: E731
    return {"efficacy": mean(efficacy), "paraphrase": mean(paraphrase), "locality": mean(locality),
            "base_locality": mean(base_locality),
            "unchanged": mean([float((a.argmax == b.argmax).float().mean()) for a, b in zip(after, before)])}



def _score(memory, edits: list[Edit], module, precision: str = "auto") -> dict:
    """The registered score: efficacy is the headline. (`precision` is not passed on: CounterFact has always been
    scored at the precision of the run, LORAMEM_PRECISION.)"""
    scores = score(memory, edits, module)
    return scores | {"score": scores["efficacy"]}


register(Benchmark("counterfact", "facts", lambda selection=None, data_dir=None: load(selection or "1K", data_dir),
                   examples, lambda edits: [e.prompt for e in edits], _score, in_studies=True))
