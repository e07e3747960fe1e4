"""`loramem bench NAME`: the registered benchmarks' studies (loramem.bench), every one with every LoraSpec and
TrainSpec option (and the SynthSpec options where documents are written)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loramem.cli import app
from loramem.cli.options import (
    BaseUrlOpt, DataDirOpt, GeneratorModelOpt, GeneratorOpt, JsonOpt, ModelOpt, PromptOpt, emit, print_json, table,
    with_settings,
)
from loramem.config import AskSpec, LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.synth import SynthSpec
from loramem.synth.selfstudy import SelfStudySpec

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; every one prints a table, or one JSON object with --json.")
app.add_typer(bench_app, name="bench")

PapersOpt = typer.Option(None, "--papers", help="a subset of the 15 papers by position: 0-4 or 0,3,7")
JudgeOpt = typer.Option(None, "--judge-model", help="also score answers with this model at the OpenAI-compatible "
                        "endpoint (0-10 rubric)")
KeepOpt = typer.Option(None, "--memory", help="keep the modules in this memory (reruns reuse them)")
OutOpt = typer.Option(None, "--out", help="also save the result as JSON here")
DOCUMENT_BENCH_DEFAULTS = {"rank": 16}  # a paper or story holds more than a rank-4 module of facts


def _study(name: str):
    from loramem.bench import get

    return get(name).run


def _generator(kind: str, model: str | None, base_url: str | None, memory):
    from loramem.synth import choose_generator

    return choose_generator(kind, memory, model, base_url)


def _judge(base_url: str | None, model: str | None):
    from loramem.bench.judge import Judge
    from loramem.synth import OpenAIGenerator

    return Judge(OpenAIGenerator(base_url=base_url, model=model)) if model else None


@bench_app.command("phonebook")
@with_settings(LoraSpec, TrainSpec)
def bench_phonebook(
    size: str = typer.Option("1K"),
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    memory: Optional[Path] = typer.Option(None, help="keep the module in this memory (default: a temporary one)"),
    as_json: bool = JsonOpt,
    lora: LoraSpec = None, train_spec: TrainSpec = None,
):
    """Write a PhoneBook into one module and score exact match."""
    from loramem.bench import study_memory

    with study_memory(memory, model) as mem:
        result = _study("phonebook")(mem, size, lora, train_spec, data_dir, progress=not as_json)
    print_json(result) if as_json else table("PhoneBook", [result])


@bench_app.command("sectors")
@with_settings(LoraSpec, TrainSpec, helps={"rank": "rank of each sector's module; the single module gets rank x count"})
def bench_sectors(
    source: str = typer.Option("128K", help="the phonebook the sectors are cut from"),
    sector: str = typer.Option("8K", help="tokens per sector (the paper: 8K)"),
    count: int = typer.Option(8, help="number of sectors"),
    context_questions: int = typer.Option(48, help="questions scored for ICL (each prompt holds every fact; 0: skip)"),
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
    lora: LoraSpec = None, train_spec: TrainSpec = None,
):
    """Multi-module PhoneBook: a module per sector (oracle and routed) against one big module, ICL and RAG."""
    from loramem.bench import study_memory

    with study_memory(memory, model, name="sectors") as mem:
        result = _study("sectors")(mem, source, sector, count, lora.rank, lora, train_spec, context_questions,
                                   data_dir, progress=not as_json)
    emit(result, out, as_json, f"PhoneBook: {count} sectors of {sector} from {source}",
         ("setting", "exact_match", "questions", "seconds_per_question"))


@bench_app.command("paperqa")
@with_settings(LoraSpec, TrainSpec, SynthSpec, defaults=DOCUMENT_BENCH_DEFAULTS)
def bench_paperqa(
    fmt: list[str] = typer.Option(["qa"], "--format", help="training formats to compare (repeat the flag): "
                                  "original, qa, summary+qa, rewrite+qa, original+summary+rewrite+qa"),
    papers: Optional[str] = PapersOpt,
    baselines: bool = typer.Option(True, help="also score the base model alone and with the introduction in the prompt"),
    rag: bool = typer.Option(False, help="also score every setting with the top 3 retrieved passages in the prompt"),
    generator: str = GeneratorOpt,
    generator_model: Optional[str] = GeneratorModelOpt,
    base_url: Optional[str] = BaseUrlOpt,
    judge_model: Optional[str] = JudgeOpt,
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    prompt: Optional[str] = PromptOpt,
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
    lora: LoraSpec = None, train_spec: TrainSpec = None, synth: SynthSpec = None,
):
    """The paper's format table: each paper's introduction written into a module in each format, its 30
    questions scored by ROUGE-L, BLEU, token F1 (and the judge)."""
    from loramem.bench import get, study_memory
    from loramem.synth import parse_formats

    for f in fmt:
        parse_formats(f)
    bench = get("paperqa")
    chosen = bench.load(papers, data_dir)
    judge = _judge(base_url, judge_model)
    with study_memory(memory, model, prompt) as mem:
        result = bench.run(mem, chosen, fmt, synth, _generator(generator, generator_model, base_url, mem), lora,
                           train_spec, baselines=baselines, judge=judge, progress=not as_json, rag=rag)
    emit(result, out, as_json, f"PaperQA: {len(chosen)} papers, {result['questions']} questions, rank {lora.rank}",
         ("format", "train_tokens", "rouge_l", "bleu", "f1", "judge"))


@bench_app.command("paperqa-multi")
@with_settings(LoraSpec, TrainSpec, SynthSpec, defaults=DOCUMENT_BENCH_DEFAULTS)
def bench_paperqa_multi(
    fmt: str = typer.Option("qa", "--format", help="training format of each paper's module"),
    papers: Optional[str] = PapersOpt,
    router: str = typer.Option("dense", help="router for the merges over the top 3"),
    merges: str = typer.Option("ties,linear,dare_ties,cat,select,mix", help="merge methods and output compositions to "
                               "compare, comma-separated"),
    max_merged: int = typer.Option(5, help="merge the gold module with up to this many modules in all"),
    rag: bool = typer.Option(False, help="also the routed top 1 and every method with the top 3 passages"),
    generator: str = GeneratorOpt,
    generator_model: Optional[str] = GeneratorModelOpt,
    base_url: Optional[str] = BaseUrlOpt,
    judge_model: Optional[str] = JudgeOpt,
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    prompt: Optional[str] = PromptOpt,
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
    lora: LoraSpec = None, train_spec: TrainSpec = None, synth: SynthSpec = None,
):
    """PaperQA with one module per paper: oracle vs routed vs one module on all papers, merges over the top 3,
    and merging more modules with the gold one."""
    from loramem.bench import get, study_memory
    from loramem.synth import parse_formats

    methods = _methods(merges)
    parse_formats(fmt)
    bench = get("paperqa-multi")
    chosen = bench.load(papers, data_dir)
    judge = _judge(base_url, judge_model)
    with study_memory(memory, model, prompt) as mem:
        result = bench.run(mem, chosen, fmt, synth, _generator(generator, generator_model, base_url, mem), lora,
                           train_spec, router, methods, max_merged, judge, progress=not as_json, rag=rag)
    emit(result, out, as_json, f"PaperQA, a module per paper: {len(chosen)} papers, {result['questions']} questions",
         ("setting", "rouge_l", "bleu", "f1", "judge", "s_per_question", "merge_s"))


@bench_app.command("narrativeqa")
@with_settings(LoraSpec, TrainSpec, SynthSpec, defaults=DOCUMENT_BENCH_DEFAULTS, exclude=("chunk_tokens",))
def bench_narrativeqa(
    fmt: str = typer.Option("qa", "--format", help="training format of each module"),
    stories: int = typer.Option(5, help="the first N dev stories"),
    per: str = typer.Option("story", help="a module per story, or per chunk of a story"),
    chunk_tokens: int = typer.Option(256, help="tokens per chunk with --per chunk"),
    router: str = typer.Option("dense", help="router for the routed modules and RAG passages"),
    merges: str = typer.Option("ties", help="how the top 3 are combined: merge methods or output compositions "
                               "(select, mix), comma-separated"),
    generator: str = GeneratorOpt,
    generator_model: Optional[str] = GeneratorModelOpt,
    base_url: Optional[str] = BaseUrlOpt,
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    prompt: Optional[str] = PromptOpt,
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
    lora: LoraSpec = None, train_spec: TrainSpec = None, synth: SynthSpec = None,
):
    """NarrativeQA: context (none, icl, rag) against modules (none, one for all, routed top 1, top 3 merged),
    scored by ROUGE-L."""
    from loramem.bench import get, study_memory
    from loramem.synth import parse_formats

    parse_formats(fmt)
    bench = get("narrativeqa")
    chosen = bench.load(stories, data_dir)
    with study_memory(memory, model, prompt) as mem:
        result = bench.run(mem, chosen, fmt, synth, _generator(generator, generator_model, base_url, mem), lora,
                           train_spec, per, chunk_tokens, router, progress=not as_json, merges=_methods(merges))
    emit(result, out, as_json, f"NarrativeQA: {len(chosen)} stories, {result['questions']} questions, "
         f"{result['modules']} modules ({per})", ("context", "modules", "rouge_l", "s_per_question"))


def _self_study_defaults() -> dict:
    """bench self-study trains synth.selfstudy's recipe (every method's objective is its own) unless told otherwise."""
    from loramem.synth import selfstudy

    return DOCUMENT_BENCH_DEFAULTS | {"layers": "late", "lr": selfstudy.TRAIN_LR, "epochs": selfstudy.TRAIN_EPOCHS,
                                      "target_recall": 0.0, "candidates": 0}


@bench_app.command("self-study")
@with_settings(LoraSpec, TrainSpec, SynthSpec, SelfStudySpec, defaults=_self_study_defaults(), exclude=("objective",))
def bench_self_study(
    dataset: str = typer.Option("paperqa", help="paperqa or narrativeqa"),
    papers: Optional[str] = PapersOpt,
    stories: int = typer.Option(5, help="narrativeqa: the first N dev stories"),
    methods: str = typer.Option("qa-ntp,qa-distill,self-study", help="module kinds to compare, comma-separated: "
                                "qa-ntp, qa-distill, self-study, self-study-ntp"),
    generator: str = GeneratorOpt,
    generator_model: Optional[str] = GeneratorModelOpt,
    base_url: Optional[str] = BaseUrlOpt,
    model: Optional[str] = ModelOpt,
    data_dir: Optional[Path] = DataDirOpt,
    prompt: str = typer.Option("chat", "--prompt", help="prompt style of the memories (chat: as self-study is meant)"),
    merges: str = typer.Option("", help="also route every question (dense): the top 1, and the top 3 combined by "
                               "these merges or compositions, comma-separated (select,linear), closed book and with RAG"),
    base_weights: str = typer.Option("", help="with --merges: each composition also with the base model as a row at "
                                     "these mixture weights, comma-separated (0.25,0.5)"),
    memory: Optional[Path] = KeepOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
    lora: LoraSpec = None, train_spec: TrainSpec = None, synth: SynthSpec = None, study: SelfStudySpec = None,
):
    """Issue 21: base, ICL, RAG and modules from QA pairs (ntp, distill) or self-study, each closed book, with RAG
    and with ICL; write seconds per document and locality on other documents' questions."""
    from loramem.bench import get, study_memory

    bench = get("self-study")
    compose, weights = _methods(merges), _base_weights(base_weights)  # checked before the data is read
    items = bench.load(papers if dataset == "paperqa" else stories, data_dir, dataset)
    with study_memory(memory, model, prompt) as mem:
        result = bench.run(mem, items, [m.strip() for m in methods.split(",") if m.strip()], synth, study,
                           _generator(generator, generator_model, base_url, mem), lora, train_spec,
                           items[0].max_new_tokens, progress=not as_json, merges=compose,
                           base_weights=weights)
    emit(result, out, as_json, f"{dataset}: {result['documents']} documents, {result['questions']} questions",
         ("setting", "rouge_l", "write_s_per_doc", "train_s_per_doc", "locality_other_delta",
          "locality_other_changed", "locality_general_delta", "locality_general_changed"))


def _base_weights(text: str) -> tuple[float, ...]:
    """Comma-separated base-row weights, each checked as AskSpec checks it."""
    try:
        weights = tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise LoramemError(f"--base-weights takes numbers, comma-separated, not {text!r}") from None
    for weight in weights:
        AskSpec(mode="multi", merge="mix", base_weight=weight)
    return weights


def _methods(merges: str) -> tuple[str, ...]:
    """Comma-separated merge methods and output compositions, each checked."""
    from loramem.mix import check_combination

    return tuple(check_combination(m.strip()) for m in merges.split(",") if m.strip())
