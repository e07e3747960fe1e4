"""synthesize(): a document in, training examples and a report of what was asked and obtained out.

Generation works chunk by chunk so every prompt fits the generator's window, and each chunk's result per
format is cached (see cache.py), so re-running a corpus only generates for new or changed text.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import TypeVar

from loramem.config import setting
from loramem.corpus import Chunk, Document, chunk_text, content_id
from loramem.errors import LoramemError
from loramem.synth import cache as disk
from loramem.synth.formats import (
    doc_label,
    original_example,
    parse_formats,
    qa_examples,
    rewrite_example,
    summary_example,
)
from loramem.synth.generators import Generator
from loramem.synth.parse import (
    QAPair,
    clean_text,
    content_words,
    normalise_question,
    parse_pairs,
    usable,
)
from loramem.synth.prompts import (
    PROMPT_VERSION,
    Prompt,
    json_qa_prompt,
    lines_qa_prompt,
    passages,
    rewrite_prompt,
    summary_prompt,
)
from loramem.examples import Example

log = logging.getLogger("loramem.synth")
T = TypeVar("T")

CHARS_PER_TOKEN = 4  # to size chunks when the generator's tokenizer is unknown
PASSAGE_CHARS = 200  # "lines" style: a small model is shown one sentence (or two short ones) at a time
SUMMARY_TOKENS = 256
LINES_QA_TOKENS = 48  # one short pair; a small model rambles on until the limit
JSON_TOKENS_PER_PAIR = 64


@dataclass
class SynthSpec:
    """What to generate for each document (the training data a module is written from)."""

    formats: tuple[str, ...] | str = setting(("qa",), "kinds of data, a tuple or +-joined (original+qa); see "
                                             "formats.FORMATS", cli=False)  # the commands' --format
    questions: int = setting(40, "synthetic QA pairs asked for per document, shared evenly among its chunks")
    summaries: int = setting(1, "summaries per chunk (a document of at most chunk_tokens tokens is one chunk)")
    rewrites: int = setting(1, "rewrites per chunk")
    refine_rounds: int = setting(1, "extra QA rounds asking for questions not covered yet, while fewer usable pairs "
                                 "than asked were obtained")
    chunk_tokens: int = setting(768, "longest text put in one generator prompt, in generator tokens")
    original_tokens: int = setting(1024, "longest original example text, in tokens of the memory's tokenizer")
    seed: int = setting(0, "sampling seed; with the same seed the same generator gives the same data")
    min_support: float = setting(0.5, "share of a QA answer's own content words, and of its question's, that must "
                                 "appear in the source text (see parse.usable)")
    max_retries: int = setting(2, "times a reply that cannot be parsed is asked again before it counts as malformed")
    temperature: float = setting(0.5, "generator sampling temperature (0: greedy)")

    def __post_init__(self) -> None:
        self.formats = parse_formats(self.formats)
        for name in ("questions", "summaries", "rewrites", "refine_rounds", "max_retries"):
            if getattr(self, name) < 0:
                raise LoramemError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.chunk_tokens < 1 or self.original_tokens < 1:
            raise LoramemError("chunk_tokens and original_tokens must be at least 1")
        if not 0.0 <= self.min_support <= 1.0:
            raise LoramemError(f"min_support must be in [0, 1], got {self.min_support}")
        if self.temperature < 0:
            raise LoramemError(f"temperature must be at least 0, got {self.temperature}")


@dataclass
class SynthReport:
    """Per format, how many items were asked and how many usable ones came back, and why the rest did not.

    dropped_unsupported: QA pairs that failed parse.usable: an answer not supported by the text, a question
                         not about it, or one that cannot be asked without it.
    duplicates:          QA pairs whose question had already been produced.
    malformed:           replies that still could not be parsed after max_retries.
    cached:              everything generated came from the cache (the generator was not called).
    """

    doc_id: str
    asked: dict[str, int] = field(default_factory=dict)
    produced: dict[str, int] = field(default_factory=dict)
    dropped_unsupported: int = 0
    duplicates: int = 0
    malformed: int = 0
    cached: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def synthesize(
    doc: Document, spec: SynthSpec | None = None, generator: Generator | None = None, cache: bool = True,
    tokenizer=None,
) -> tuple[list[Example], SynthReport]:
    """Training examples for one document, in the order of spec.formats.

    `tokenizer` (the one of the model to be trained) sizes `original` examples; without it the
    generator's tokenizer is used, else characters.
    """
    spec = spec or SynthSpec()
    needs_generator = [name for name in spec.formats if name != "original"]
    if needs_generator and generator is None:
        raise LoramemError(f"format {'+'.join(needs_generator)} needs a generator; only 'original' works without one")
    start = time.perf_counter()
    report = SynthReport(doc.id)
    examples: list[Example] = []
    hits: list[bool] = []
    for name in spec.formats:
        if name == "original":
            examples += _original(doc, spec, tokenizer or getattr(generator, "tokenizer", None), report)
        else:
            examples += _generated(name, doc, spec, generator, cache, report, hits)
    report.cached = bool(hits) and all(hits)
    report.seconds = time.perf_counter() - start
    if report.malformed:
        log.warning("%s: %d replies could not be parsed after %d retries", doc.id, report.malformed, spec.max_retries)
    return examples, report


def _original(doc: Document, spec: SynthSpec, tokenizer, report: SynthReport) -> list[Example]:
    chunks = split_text(doc.text, spec.original_tokens, tokenizer, doc.id)
    report.asked["original"] = report.produced["original"] = len(chunks)
    return [original_example(doc_label(doc.id, c.index, len(chunks)), c.text) for c in chunks]


def _generated(
    name: str, doc: Document, spec: SynthSpec, generator: Generator, cache: bool, report: SynthReport,
    hits: list[bool],
) -> list[Example]:
    chunks = split_text(doc.text, spec.chunk_tokens, getattr(generator, "tokenizer", None), doc.id)
    results = []
    for chunk in chunks:
        count = _chunk_count(name, spec, chunk.index, len(chunks))
        result, hit = _cached_result(name, chunk.text, count, spec, generator, cache)
        hits.append(hit)
        results.append(result)
    report.asked[name] = sum(result["asked"] for result in results)
    report.malformed += sum(result["malformed"] for result in results)
    examples = _qa_examples(results, report) if name == "qa" else _text_examples(name, doc.id, results)
    report.produced[name] = len(examples)
    return examples


def _chunk_count(name: str, spec: SynthSpec, index: int, parts: int) -> int:
    """Items asked about chunk `index`: the document's questions shared evenly; summaries, rewrites per chunk."""
    if name == "qa":
        return spec.questions // parts + (1 if index < spec.questions % parts else 0)
    return spec.summaries if name == "summary" else spec.rewrites


def _qa_examples(results: list[dict], report: SynthReport) -> list[Example]:
    """Every chunk's pairs; a question that came up for two chunks is kept once."""
    unique: dict[str, QAPair] = {}
    for result in results:
        report.dropped_unsupported += result["dropped_unsupported"]
        report.duplicates += result["duplicates"]
        for pair in result["pairs"]:
            unique.setdefault(normalise_question(pair["question"]), QAPair(**pair))
    report.duplicates += sum(len(result["pairs"]) for result in results) - len(unique)
    return qa_examples(list(unique.values()))


def _text_examples(name: str, doc_id: str, results: list[dict]) -> list[Example]:
    make = summary_example if name == "summary" else rewrite_example
    return [make(doc_label(doc_id, i, len(results)), text) for i, result in enumerate(results) for text in result["texts"]]


def _cached_result(
    name: str, text: str, count: int, spec: SynthSpec, generator: Generator, cache: bool
) -> tuple[dict, bool]:
    """(result, whether it came from the cache) for `count` items of one format about one chunk."""
    key = _cache_key(name, text, count, spec, generator)
    if cache and (result := disk.load(key)) is not None:
        return result, True
    asker = _Asker(generator, spec.temperature, spec.max_retries, spec.seed)
    if name == "qa":
        result = _generate_qa(text, count, spec, asker, getattr(generator, "qa_style", "lines"))
    elif name == "summary":
        result = _generate_texts(summary_prompt(text), count, SUMMARY_TOKENS, asker)
    else:
        budget = int(_count_tokens(text, getattr(generator, "tokenizer", None)) * 1.3) + 32
        result = _generate_texts(rewrite_prompt(text), count, budget, asker)
    if cache:
        disk.store(key, result)
    return result, False


def _cache_key(name: str, text: str, count: int, spec: SynthSpec, generator: Generator) -> dict:
    key = {
        "text": content_id(text), "format": name, "generator": generator.name, "prompts": PROMPT_VERSION,
        "count": count, "seed": spec.seed, "temperature": spec.temperature, "max_retries": spec.max_retries,
    }
    if name == "qa":
        key |= {"refine_rounds": spec.refine_rounds, "min_support": spec.min_support,
                "style": getattr(generator, "qa_style", "lines")}
    return key


@dataclass
class _Asker:
    """Sends prompts to the generator, asking again those whose reply does not parse; fresh seeds each call."""

    generator: Generator
    temperature: float
    max_retries: int
    seed: int
    malformed: int = 0

    def ask(self, prompts: list[Prompt], max_tokens: int, parse: Callable[[str], T]) -> list[T | None]:
        """Each prompt's parsed reply, or None when it stayed empty or unparseable (counted as malformed)."""
        results: list[T | None] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        for _ in range(1 + self.max_retries):
            if not pending:
                break
            replies = self.generator.complete([prompts[i] for i in pending], max_tokens, self.temperature, self.seed)
            self.seed += len(pending)
            for i, reply in zip(pending, replies):
                results[i] = parse(reply) or None
            pending = [i for i in pending if results[i] is None]
        self.malformed += len(pending)
        return results


def _generate_qa(text: str, count: int, spec: SynthSpec, asker: _Asker, style: str) -> dict:
    """Up to `count` usable, distinct pairs: a first round, then refinement rounds for what is missing.

    A "json" generator sees the whole chunk and is asked for all pairs at once; a "lines" generator sees
    one sentence per prompt and is asked for one pair, the prompts going round the sentences.
    """
    sources = [text] if style == "json" else passages(text, PASSAGE_CHARS)
    source_words = [content_words(source) for source in sources]
    accepted: dict[str, tuple[int, QAPair]] = {}  # normalised question -> (source index, pair)
    dropped = duplicates = 0
    next_source = 0
    for _ in range(1 + spec.refine_rounds):
        missing = count - len(accepted)
        if missing <= 0 or not sources:
            break
        per_prompt = missing if style == "json" else 1
        chosen = [(next_source + i) % len(sources) for i in range(math.ceil(missing / per_prompt))]
        next_source += len(chosen)
        prompts = [json_qa_prompt(sources[s], per_prompt, _covered(accepted, s)) if style == "json"
                   else lines_qa_prompt(sources[s], _covered(accepted, s)) for s in chosen]
        max_tokens = JSON_TOKENS_PER_PAIR * per_prompt + 32 if style == "json" else LINES_QA_TOKENS
        for s, pairs in zip(chosen, asker.ask(prompts, max_tokens, parse_pairs)):
            for pair in pairs or []:
                key = normalise_question(pair.question)
                if key in accepted:
                    duplicates += 1
                elif usable(pair, source_words[s], spec.min_support):
                    accepted[key] = (s, pair)
                else:
                    dropped += 1
    pairs = [pair.to_dict() for _, pair in accepted.values()][:count]
    return {"asked": count, "pairs": pairs, "dropped_unsupported": dropped, "duplicates": duplicates,
            "malformed": asker.malformed}


def _covered(accepted: dict[str, tuple[int, QAPair]], source: int) -> list[str]:
    return [pair.question for s, pair in accepted.values() if s == source]


def _generate_texts(prompt: Prompt, count: int, max_tokens: int, asker: _Asker) -> dict:
    texts = asker.ask([prompt] * count, max_tokens, clean_text)
    return {"asked": count, "texts": list(dict.fromkeys(t for t in texts if t)), "malformed": asker.malformed}


# --- cutting texts to size -------------------------------------------------------------------------


def split_text(text: str, max_tokens: int, tokenizer, doc_id: str = "") -> list[Chunk]:
    """Chunks of at most max_tokens tokens and of even size (no short tail), by the tokenizer when it is a
    fast one, else by characters (CHARS_PER_TOKEN a token, cut at whitespace)."""
    if getattr(tokenizer, "is_fast", False):
        total = _count_tokens(text, tokenizer)
        size = math.ceil(total / max(1, math.ceil(total / max_tokens)))
        return chunk_text(text, tokenizer, max(1, size), 0, doc_id=doc_id)
    return _split_chars(text, max_tokens * CHARS_PER_TOKEN, doc_id)


def _count_tokens(text: str, tokenizer) -> int:
    if tokenizer is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def _split_chars(text: str, max_chars: int, doc_id: str) -> list[Chunk]:
    """Even character windows of at most max_chars, each cut moved back to a space within a tenth of a window.

    Windows are sized at 90% of max_chars so that moving a cut never makes one too long.
    """
    if not text.strip():
        return []
    parts = math.ceil(len(text) / (0.9 * max_chars))
    size = len(text) / parts
    cuts = [0]
    for i in range(1, parts):
        target = round(i * size)
        space = text.rfind(" ", max(cuts[-1] + 1, target - int(size / 10)), target)
        cuts.append(space + 1 if space >= 0 else target)
    cuts.append(len(text))
    return [Chunk(doc_id, i, text[a:b], a, b, math.ceil((b - a) / CHARS_PER_TOKEN))
            for i, (a, b) in enumerate(pairwise(cuts))]
