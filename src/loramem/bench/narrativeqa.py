"""NarrativeQA (story summaries and their questions): the grid of context (none, icl, rag) against modules
(none, one for all stories, per story or per chunk routed top 1, top 3 merged), scored by ROUGE-L (max over the
two reference answers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from loramem.bench import Benchmark, register, seconds, sibling_memory, without_leaks
from loramem.config import LoraSpec, TrainSpec
from loramem.config import data_dir as resolve_data_dir
from loramem.corpus import Document, chunk_text
from loramem.errors import LoramemError
from loramem.metrics import mean, rouge_l

FILE = "narrativeqa/stories_dev.jsonl"
MAX_NEW_TOKENS = 24  # reference answers are a few words
CONTEXTS = {"none": "", "icl": "+icl", "rag": "+rag"}


@dataclass(frozen=True)
class Story:
    id: str
    text: str
    questions: tuple[tuple[str, tuple[str, ...]], ...]  # (question, reference answers)

    def document(self) -> Document:
        return Document.from_text(self.text, title=f"story {self.id}", meta={"story": self.id})


def load(data_dir: str | Path | None = None, stories: int | None = None) -> list[Story]:
    root = resolve_data_dir(data_dir)
    path = root / FILE if root else None
    if path is None or not path.is_file():
        raise LoramemError(f"NarrativeQA data not found at {path}; set --data-dir or LORAMEM_DATA")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked = rows[:stories] if stories else rows
    return [Story(r["doc_id"], r["summary"], tuple((q["question"], tuple(q["answers"])) for q in r["questions"]))
            for r in picked]


def _parts(story: Story, per: str, tokenizer, chunk_tokens: int) -> list[Document]:
    if per == "story":
        return [story.document()]
    return [Document.from_text(c.text, title=f"story {story.id} part {c.index}", meta={"story": story.id})
            for c in chunk_text(story.text, tokenizer, chunk_tokens, chunk_tokens // 8, doc_id=story.id)]


def run(memory, stories: list[Story], fmt: str, synth_spec, generator, lora: LoraSpec | None = None,
        train_spec: TrainSpec | None = None, per: str = "story", chunk_tokens: int = 256, router: str = "dense",
        progress: bool = True, merges: tuple[str, ...] = ("ties",)) -> dict:
    """Write a module per story (or per chunk of one), one module for all, then score the whole grid: the top 3
    combined by each of `merges` (weight merges or output compositions)."""
    from loramem.synth import parse_formats, synthesize

    if per not in ("story", "chunk"):
        raise LoramemError(f"per must be story or chunk, got {per!r}")
    lora, train_spec = lora or LoraSpec(rank=16), train_spec or TrainSpec()
    spec = replace(synth_spec, formats=parse_formats(fmt))
    documents = [d for s in stories for d in _parts(s, per, memory.base.tokenizer, chunk_tokens)]
    all_examples, no_data = [], []
    for doc in documents:
        made = synthesize(doc, spec, generator, tokenizer=memory.base.tokenizer)[0]
        examples = without_leaks(made, [q for s in stories for q, _ in s.questions])[0]
        if not examples:  # a weak generator can give nothing usable: that part has no module (counted)
            no_data.append(doc.title)
            continue
        memory.write(examples, lora, train_spec, name=doc.title, progress=progress, documents=[doc])
        all_examples += examples
    if not all_examples:
        raise LoramemError("the generator gave no usable training data for any story")
    alone = sibling_memory(memory, "single")
    single = alone.write(all_examples, lora, train_spec, name="all-stories", progress=progress,
                         documents=[s.document() for s in stories])
    questions = [q for s in stories for q, _ in s.questions]
    references = [refs for s in stories for _, refs in s.questions]
    k3 = min(3, len(memory.modules()))
    weights = {"none": ("base", memory, {"top_k": k3}), "single": ("lora", alone, {"module": single.id}),
               "multi top-1": ("lora", memory, {"top_k": k3})}
    weights |= {f"multi top-{k3}" + ("" if merges == ("ties",) else f" {m}"): ("multi", memory, {"top_k": k3, "merge": m})
                for m in merges}
    rows = []
    for context, suffix in CONTEXTS.items():
        for setting, (mode, target, kw) in weights.items():
            full_mode = mode + suffix if mode != "base" else (suffix.lstrip("+") or "base")
            answers = target.ask_many(questions, mode=full_mode, router=router, max_new_tokens=MAX_NEW_TOKENS,
                                      **{"merge": "ties"} | kw)
            rows.append({"context": context, "modules": setting,
                         "rouge_l": mean(rouge_l(a.text, refs) for a, refs in zip(answers, references))}
                        | seconds(answers))
    return {"stories": len(stories), "questions": len(questions), "per": per, "modules": len(memory.modules()),
            "no_data": no_data,
            "format": fmt, "rank": lora.rank, "rows": rows}


def _score_module(memory, stories: list[Story], module, precision: str = "auto") -> dict:
    """The registered score: every story's questions asked of `module`, ROUGE-L (max over the references)."""
    answers = memory.ask_many([q for s in stories for q, _ in s.questions],
                              mode="lora" if isinstance(module, str) else "multi", module=module,
                              max_new_tokens=MAX_NEW_TOKENS)
    references = [refs for s in stories for _, refs in s.questions]
    rouge = mean(rouge_l(a.text, refs) for a, refs in zip(answers, references))
    return {"score": rouge, "rouge_l": rouge}


register(Benchmark("narrativeqa", "documents", lambda selection=None, data_dir=None: load(data_dir, selection),
                   lambda stories: [s.document() for s in stories],
                   lambda stories: [q for s in stories for q, _ in s.questions], _score_module, run))
