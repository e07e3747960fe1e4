"""PaperQA (the paper's document benchmark): 15 papers, 30 questions each, asked of a module per paper.

Each paper's introduction is written into its own module in the chosen synthetic format; the 450
evaluation questions never enter training: the generator sees only the introduction, and any synthetic
example that repeats an evaluation question is dropped before training (`bench.without_leaks`). Answers are
scored by ROUGE-L, BLEU and token F1 per question level, and by an LLM judge when one is configured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from loramem.bench import Benchmark, register, seconds, sibling_memory, without_leaks
from loramem.bench.judge import Judge
from loramem.config import LoraSpec, TrainSpec
from loramem.config import data_dir as resolve_data_dir
from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.metrics import bleu, mean, rouge_l, token_f1

log = logging.getLogger("loramem.paperqa")
FILE = "paper/paper_dataset/paperQA.json"
FORMATS = ("original", "qa", "summary+qa", "rewrite+qa", "original+summary+rewrite+qa")
MAX_NEW_TOKENS = 48  # reference answers are one sentence


@dataclass(frozen=True)
class Question:
    paper: int
    level: int
    question: str
    answer: str


@dataclass(frozen=True)
class Paper:
    id: int
    title: str
    introduction: str
    questions: tuple[Question, ...]

    def document(self) -> Document:
        return Document.from_text(self.introduction, title=self.title, meta={"paper": self.id})


def load(data_dir: str | Path | None = None, papers: str | None = None) -> list[Paper]:
    """The papers of paperQA.json; `papers` picks a subset by position ("0-4", "0,3,7")."""
    root = resolve_data_dir(data_dir)
    path = root / FILE if root else None
    if path is None or not path.is_file():
        raise LoramemError(f"PaperQA data not found at {path}; set --data-dir or LORAMEM_DATA")
    rows = json.loads(path.read_text(encoding="utf-8"))
    all_papers = [
        Paper(int(r["id"]), r["title"], r["introduction"],
              tuple(Question(int(r["id"]), int(q["level"]), q["question"], q["answer"]) for q in r["QA"]))
        for r in rows
    ]
    return [all_papers[i] for i in _positions(papers, len(all_papers))]


def _positions(spec: str | None, n: int) -> list[int]:
    if not spec:
        return list(range(n))
    picked: list[int] = []
    try:
        for part in spec.split(","):
            first, _, last = part.partition("-")
            picked += range(int(first), int(last or first) + 1)
    except ValueError:
        raise LoramemError(f"bad paper selection {spec!r}: use positions like 0-4 or 0,3,7") from None
    if not picked or min(picked) < 0 or max(picked) >= n:
        raise LoramemError(f"paper selection {spec!r} is outside 0-{n - 1}")
    return sorted(set(picked))


def score(answers: list[str], questions: list[Question], judge: Judge | None = None) -> dict:
    """Mean ROUGE-L, BLEU and token F1 (and judge score) overall and per question level."""
    per_question = [
        {"level": q.level, "rouge_l": rouge_l(a, q.answer), "bleu": bleu(a, q.answer), "f1": token_f1(a, q.answer)}
        for a, q in zip(answers, questions)
    ]
    if judge is not None:
        for row, verdict in zip(per_question, judge.score([q.question for q in questions],
                                                          [q.answer for q in questions], answers)):
            row["judge"] = verdict
    metrics = [k for k in per_question[0] if k != "level"]
    out = {m: mean(r[m] for r in per_question if r[m] is not None) for m in metrics}
    for level in sorted({q.level for q in questions}):
        rows = [r for r in per_question if r["level"] == level]
        out |= {f"{m}_l{level}": mean(r[m] for r in rows if r[m] is not None) for m in metrics}
    return out


def _ask_paper(memory, paper: Paper, mode: str, module: str | None = None, context: str | None = None) -> list[str]:
    questions = [q.question for q in paper.questions]
    answers = memory.ask_many(questions, mode=mode, module=module, context=context, max_new_tokens=MAX_NEW_TOKENS)
    return [a.text for a in answers]


def write_format(memory, papers: list[Paper], fmt: str, synth_spec, generator, lora: LoraSpec,
                 train_spec: TrainSpec, progress: bool = True) -> list[dict]:
    """One module per paper in format `fmt`; returns per paper the module id and synthetic-data counts."""
    from loramem.synth import parse_formats, synthesize

    written = []
    for paper in papers:
        examples, report = synthesize(paper.document(), replace(synth_spec, formats=parse_formats(fmt)), generator,
                                     tokenizer=memory.base.tokenizer)
        examples, leaks = without_leaks(examples, [q.question for q in paper.questions])
        record = memory.write(examples, lora, train_spec, name=f"paper-{paper.id}-{fmt}", progress=progress,
                              documents=[paper.document()])
        written.append({"paper": paper.id, "module": record.id, "examples": len(examples), "leaks_dropped": leaks,
                        "train_tokens": record.train_tokens, "train_seconds": record.train_seconds,
                        "synth": report.to_dict()})
        log.info("paper %d (%s): %d examples, %d train tokens, %.0f s", paper.id, fmt, len(examples),
                 record.train_tokens, record.train_seconds or 0)
    return written


def run(memory, papers: list[Paper], formats: list[str], synth_spec, generator, lora: LoraSpec | None = None,
        train_spec: TrainSpec | None = None, baselines: bool = True, judge: Judge | None = None,
        progress: bool = True, rag: bool = False) -> dict:
    """The paper's format table: per format, scores of each paper's questions asked of its own module.

    With `baselines`, also the base model without a module and with the introduction in the prompt; with `rag`,
    also each setting with the top 3 passages of all papers retrieved into the prompt.
    """
    lora, train_spec = lora or LoraSpec(rank=16), train_spec or TrainSpec()
    questions = [q for p in papers for q in p.questions]
    rows = []
    if baselines:
        answers = [a for p in papers for a in _ask_paper(memory, p, "base")]
        rows.append({"format": "base (no module)", "train_tokens": 0} | score(answers, questions, judge))
        answers = [a for p in papers for a in _ask_paper(memory, p, "icl", context=p.introduction)]
        rows.append({"format": "icl (introduction in prompt)", "train_tokens": 0} | score(answers, questions, judge))
    details = {}
    for fmt in formats:
        written = write_format(memory, papers, fmt, synth_spec, generator, lora, train_spec, progress)
        details[fmt] = written
        tokens = sum(w["train_tokens"] for w in written)
        for mode in ("lora", "lora+rag") if rag else ("lora",):
            answers = [a for p, w in zip(papers, written) for a in _ask_paper(memory, p, mode, w["module"])]
            label = fmt if mode == "lora" else f"{fmt} + rag top 3"
            rows.append({"format": label, "train_tokens": tokens} | score(answers, questions, judge))
    if rag and baselines:  # passages from every paper written so far, as a user's memory would retrieve them
        answers = [a for p in papers for a in _ask_paper(memory, p, "rag")]
        rows.insert(2, {"format": "rag top 3 (base model)", "train_tokens": 0} | score(answers, questions, judge))
    return {"papers": [p.id for p in papers], "questions": len(questions), "rank": lora.rank,
            "layers": lora.layers, "targets": lora.targets, "rows": rows, "modules": details}


def run_routing(memory, papers: list[Paper], fmt: str, synth_spec, generator, lora: LoraSpec | None = None,
                train_spec: TrainSpec | None = None, router: str = "dense", merges: tuple[str, ...] = (
                    "ties", "linear", "dare_ties", "cat"), max_merged: int = 5, judge: Judge | None = None,
                progress: bool = True, rag: bool = False) -> dict:
    """One module per paper: oracle and routed answers against one module on all papers, merge methods (or output
    compositions, mix.COMPOSITIONS) over the router's top 3, and TIES merges of the gold module with
    0..max_merged-1 others; with `rag`, the routed top 1 and every method again with the top 3 passages."""
    from loramem.route import recall_at_k

    lora, train_spec = lora or LoraSpec(rank=16), train_spec or TrainSpec()
    written = write_format(memory, papers, fmt, synth_spec, generator, lora, train_spec, progress)
    module_of = {p.id: w["module"] for p, w in zip(papers, written)}
    questions = [q for p in papers for q in p.questions]
    texts, gold = [q.question for q in questions], [module_of[q.paper] for q in questions]

    def row(setting: str, **ask) -> dict:
        answers = memory.ask_many(texts, max_new_tokens=MAX_NEW_TOKENS, **ask)
        return {"setting": setting} | score([a.text for a in answers], questions, judge) | seconds(answers)

    rows = [row("oracle", mode="lora", router="oracle", gold=gold)]
    routing = {}
    for kind in ("dense", "bm25", "hybrid"):
        ranked = memory.router(kind).route(texts, min(3, len(papers)))
        routing[kind] = {"recall@1": recall_at_k(ranked, gold, 1), "recall@3": recall_at_k(ranked, gold, 3)}
        rows.append(row(f"routed top-1 ({kind})", mode="lora", router=kind))
    rows.append(_single_module_row(memory, papers, fmt, written, lora, train_spec, questions, judge, progress))
    top = min(3, len(papers))
    for method in merges:
        rows.append(row(f"{method} over top {top} ({router})", mode="multi", router=router, top_k=top, merge=method))
    if rag:
        rows.append(row("rag top 3 (base model)", mode="rag", router=router, top_k=3))
        rows.append(row(f"routed top-1 ({router}) + rag", mode="lora+rag", router=router, top_k=3))
        for method in merges:
            rows.append(row(f"{method} over top {top} ({router}) + rag", mode="multi+rag", router=router, top_k=top,
                            merge=method))
    for n in range(2, min(max_merged, len(papers)) + 1):
        answers = []
        for i, paper in enumerate(papers):  # the gold module and the next n-1 papers' modules
            chosen = [module_of[papers[(i + j) % len(papers)].id] for j in range(n)]
            answers += memory.ask_many([q.question for q in paper.questions], mode="multi", module=chosen,
                                       merge="ties", max_new_tokens=MAX_NEW_TOKENS)
        rows.append({"setting": f"ties of gold + {n - 1} others"} | score([a.text for a in answers], questions, judge)
                    | seconds(answers))
    return {"papers": [p.id for p in papers], "questions": len(questions), "format": fmt, "rank": lora.rank,
            "layers": lora.layers, "rows": rows, "routing": routing}


def _single_module_row(memory, papers, fmt, written, lora, train_spec, questions, judge, progress):
    """All papers' training data (as their own modules were trained on it) in one module of the same rank,
    in a memory of its own."""
    examples = [e for w in written for e in memory.examples(memory.store.get(w["module"]))]
    alone = sibling_memory(memory, "single")
    record = alone.write(examples, lora, train_spec, name=f"all-papers-{fmt}", progress=progress,
                         documents=[p.document() for p in papers])
    answers = alone.ask_many([q.question for q in questions], mode="lora", module=record.id,
                             max_new_tokens=MAX_NEW_TOKENS)
    return ({"setting": f"single module (rank {lora.rank}) on all papers"}
            | score([a.text for a in answers], questions, judge) | seconds(answers))


def _score_module(memory, papers: list[Paper], module, precision: str = "auto") -> dict:
    """The registered score: each paper's questions asked of `module`, ROUGE-L the headline."""
    answers = [a for p in papers for a in _ask_paper(memory, p, "lora" if isinstance(module, str) else "multi", module)]
    scores = score(answers, [q for p in papers for q in p.questions])
    return scores | {"score": scores["rouge_l"]}


register(Benchmark("paperqa", "documents", lambda selection=None, data_dir=None: load(data_dir, selection),
                   lambda papers: [p.document() for p in papers],
                   lambda papers: [q.question for p in papers for q in p.questions], _score_module, run))
register(Benchmark("paperqa-multi", "documents", lambda selection=None, data_dir=None: load(data_dir, selection),
                   lambda papers: [p.document() for p in papers],
                   lambda papers: [q.question for p in papers for q in p.questions], _score_module, run_routing))
