"""Documents that come back (issue 21): base, ICL and RAG against a module per document written three ways, each
module closed book, with RAG and with ICL, on PaperQA or NarrativeQA; with write seconds and locality.

The module kinds (METHODS): the generator's validated QA pairs trained by next-token loss ("qa-ntp") or by
distillation from the model that reads the document ("qa-distill"), and self-study prompts answered by that
teacher, distilled ("self-study"). Each kind's modules go in a memory of their own beside the given one, so RAG
retrieves every document's passages once. Locality: each module answers other documents' questions (and the
package's general questions, locality.GENERAL_QUESTIONS) closed book; the share changed against the base model's
answers and the ROUGE-L change are reported, and recorded with the module.

Registered as "self-study" (`loramem bench self-study`); its items are PaperQA's papers unless the dataset is
narrativeqa.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from loramem import locality
from loramem.bench import Benchmark, narrativeqa, paperqa, register, sibling_memory, without_leaks
from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.metrics import mean, rouge_l

METHODS = {"qa-ntp": ("qa", "ntp"), "qa-distill": ("qa", "distill"), "self-study": ("self-study", "distill"),
           "self-study-ntp": ("self-study", "ntp")}
CONTEXTS = {"closed book": "lora", "+ rag": "lora+rag", "+ icl": "lora+icl"}
DATASETS = ("paperqa", "narrativeqa")


@dataclass(frozen=True)
class Item:
    """A document and its evaluation questions (each reference a string, or several accepted answers)."""

    doc: Document
    questions: tuple[str, ...]
    references: tuple
    max_new_tokens: int = paperqa.MAX_NEW_TOKENS  # longest answer asked for: the dataset's


def paperqa_items(papers) -> list[Item]:
    return [Item(p.document(), tuple(q.question for q in p.questions), tuple(q.answer for q in p.questions))
            for p in papers]


def narrativeqa_items(stories) -> list[Item]:
    return [Item(s.document(), tuple(q for q, _ in s.questions), tuple(list(r) for _, r in s.questions),
                 narrativeqa.MAX_NEW_TOKENS) for s in stories]


def load(selection=None, data_dir=None, dataset: str = "paperqa") -> list[Item]:
    """The items of `dataset`: PaperQA's papers by position (selection "0-4"), or NarrativeQA's first N stories."""
    if dataset not in DATASETS:
        raise LoramemError(f"unknown dataset {dataset!r}: choose {' or '.join(DATASETS)}")
    items = (paperqa_items(paperqa.load(data_dir, selection)) if dataset == "paperqa"
             else narrativeqa_items(narrativeqa.load(data_dir, selection)))
    if not items:
        raise LoramemError(f"no {dataset} documents selected")
    return items


def _score(answers: list[str], references: list) -> float:
    return mean(rouge_l(a, r) for a, r in zip(answers, references))


def run(memory, items: list[Item], methods: list[str], synth_spec, study_spec, generator, lora, train_spec,
        max_new_tokens: int, locality_questions: int = 30, progress: bool = False, merges: tuple[str, ...] = (),
        base_weights: tuple[float, ...] = ()) -> dict:
    """All rows of the comparison; `memory` holds nothing of its own (each method writes into a sibling). With
    `merges`, each method's modules also answer every question routed (dense): the top 1, and the top 3 combined by
    each merge (weight merges or output compositions), closed book and with RAG; each composition also with the base
    model as a row at each of `base_weights`."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise LoramemError(f"unknown method {unknown[0] if unknown else ''!r}: choose from {', '.join(METHODS)}")
    questions = [q for it in items for q in it.questions]
    references = [r for it in items for r in it.references]

    def ask(target, mode: str, **kw) -> list[str]:
        return [a.text for a in target.ask_many(questions, mode=mode, max_new_tokens=max_new_tokens, **kw)]

    base_answers = ask(memory, "base")
    rows = [{"setting": "base", "rouge_l": _score(base_answers, references)},
            {"setting": "icl", "rouge_l": _score([a for it in items for a in [x.text for x in memory.ask_many(
                list(it.questions), mode="icl", context=it.doc.text, max_new_tokens=max_new_tokens)]], references)}]
    general_base = [a.text for a in memory.ask_many([q for q, _ in locality.GENERAL_QUESTIONS], mode="base",
                                                     max_new_tokens=locality.MAX_NEW_TOKENS)]
    details = {}
    for method in methods:
        target = sibling_memory(memory, method)
        written = _write(target, items, method, synth_spec, study_spec, generator, lora, train_spec, progress)
        details[method] = written
        if len(rows) == 2:  # the base model with RAG over every document's passages (the first method's memory)
            rows.append({"setting": "rag", "rouge_l": _score(ask(target, "rag"), references)})
        for label, mode in CONTEXTS.items():
            answers = _module_answers(target, items, written, mode, base_answers, max_new_tokens)
            rows.append({"setting": f"{method} {label}", "rouge_l": _score(answers, references)})
        local = _locality(target, items, written, base_answers, general_base, locality_questions, max_new_tokens)
        rows[-3] |= local | {"write_s_per_doc": mean(w["synth_s"] + w["train_s"] for w in written),
                             "train_s_per_doc": mean(w["train_s"] for w in written),
                             "doc_tokens": mean(w["doc_tokens"] for w in written)}
        rows += _routed(target, method, merges, base_weights, questions, references, max_new_tokens) if merges else []
    return {"documents": len(items), "questions": len(questions), "rank": lora.rank, "layers": lora.layers,
            "lr": train_spec.lr, "epochs": train_spec.epochs, "rows": rows, "modules": details}


def _write(target, items, method, synth_spec, study_spec, generator, lora, train_spec, progress) -> list[dict]:
    """A module per document (None where the data came out empty: a counted skip), with its write seconds."""
    from loramem.synth import synthesize
    from loramem.synth.selfstudy import self_study

    fmt, objective = METHODS[method]
    spec = replace(train_spec, objective=objective)
    held_out = [q for it in items for q in it.questions]
    tokenizer = target.base.tokenizer
    written = []
    for it in items:
        start = time.perf_counter()
        if fmt == "self-study":
            made, report = self_study(it.doc, study_spec, generator, target.base, style=target.prompt)
        else:
            made, report = synthesize(it.doc, replace(synth_spec, formats=(fmt,)), generator, tokenizer=tokenizer)
        examples, leaks = without_leaks(made, held_out)
        synth_s = report.seconds if report.cached else time.perf_counter() - start
        record = target.write(examples, lora, spec, name=f"{it.doc.title}-{method}", progress=progress,
                              documents=[it.doc]) if examples else None
        written.append({"module": record.id if record else None, "examples": len(examples), "leaks_dropped": leaks,
                        "synth_s": synth_s, "synth_cached": report.cached,
                        "train_s": (record.train_seconds or 0.0) if record else 0.0,
                        "doc_tokens": len(tokenizer(it.doc.text, add_special_tokens=False).input_ids),
                        "report": report.to_dict()})
    return written


def _routed(target, method, merges, base_weights, questions, references, max_new_tokens) -> list[dict]:
    """Rows of the routed answers: the dense router's top 1 and its top 3 combined by each of `merges`, each output
    composition also with a base row at each of `base_weights`."""
    from loramem.mix import COMPOSITIONS

    k = routed_k(target)
    settings = {"routed top 1": ("lora", {})} | {f"top {k} {m}": ("multi", {"merge": m}) for m in merges}
    settings |= {f"top {k} {m} base {b:g}": ("multi", {"merge": m, "base_weight": b})
                 for m in merges if m in COMPOSITIONS for b in base_weights if b}
    return [{"setting": f"{method} {setting} {label}",
             "rouge_l": routed_score(target, k, mode + suffix, kw, questions, references, max_new_tokens)}
            for label, suffix in (("closed book", ""), ("+ rag", "+rag")) for setting, (mode, kw) in settings.items()]


def routed_k(target) -> int:
    """How many modules a routed row takes: the top 3, or all of them when there are fewer."""
    return min(3, len(target.modules()))


def routed_score(target, k: int, mode: str, options: dict, questions, references, max_new_tokens) -> float:
    """ROUGE-L of every question asked through the dense router's top `k` in `mode` (lora: the top 1; multi: the
    top k combined by `options`' merge): one routed row of the study."""
    answers = target.ask_many(questions, mode=mode, router="dense", top_k=k, max_new_tokens=max_new_tokens, **options)
    return _score([a.text for a in answers], references)


def _module_answers(target, items, written, mode, base_answers, max_new_tokens) -> list[str]:
    """Each document's questions asked of its own module in `mode`; a document without a module keeps the base
    model's answers (closed book) or is asked in the context mode alone."""
    answers, at = [], 0
    for it, w in zip(items, written):
        n = len(it.questions)
        if w["module"] is None:
            answers += base_answers[at:at + n] if mode == "lora" else [a.text for a in target.ask_many(
                list(it.questions), mode=mode.split("+")[1], max_new_tokens=max_new_tokens,
                **({"context": it.doc.text} if mode.endswith("icl") else {}))]
        else:
            answers += [a.text for a in target.ask_many(list(it.questions), mode=mode, module=w["module"],
                                                        max_new_tokens=max_new_tokens)]
        at += n
    return answers


def _locality(target, items, written, base_answers, general_base, per_module, max_new_tokens) -> dict:
    """Mean over modules of the changed share and ROUGE-L change on other documents' questions (up to per_module,
    picked evenly) and on the general questions; each module's figures are recorded in its stats."""
    offsets = [0]
    for it in items:
        offsets.append(offsets[-1] + len(it.questions))
    others, general = [], []
    for i, w in enumerate(written):
        if w["module"] is None:
            continue
        pool = [j for j in range(offsets[-1]) if not offsets[i] <= j < offsets[i + 1]]
        picked = pool[:: max(1, len(pool) // per_module)][:per_module] if pool else []
        if picked:
            flat_q = [q for it in items for q in it.questions]
            flat_r = [r for it in items for r in it.references]
            report = locality.check(target, w["module"], [flat_q[j] for j in picked], [flat_r[j] for j in picked],
                                    [base_answers[j] for j in picked], max_new_tokens)
            locality.record(target, w["module"], report, "other_documents")
            others.append(report)
        report = locality.check(target, w["module"], base_answers=general_base)
        locality.record(target, w["module"], report)
        general.append(report)
    return {"locality_other_delta": mean(r.delta for r in others), "locality_other_changed": mean(r.changed for r in others),
            "locality_general_delta": mean(r.delta for r in general),
            "locality_general_changed": mean(r.changed for r in general)}


def _score_module(memory, items: list[Item], module) -> dict:
    """The registered score: each document's questions asked of `module` closed book, ROUGE-L the headline."""
    mode = "lora" if isinstance(module, str) else "multi"
    answers = [a.text for it in items for a in memory.ask_many(list(it.questions), mode=mode, module=module,
                                                               max_new_tokens=it.max_new_tokens)]
    rouge = _score(answers, [r for it in items for r in it.references])
    return {"score": rouge, "rouge_l": rouge}


register(Benchmark("self-study", "documents", load, lambda items: [it.doc for it in items],
                   lambda items: [q for it in items for q in it.questions], _score_module, run))
