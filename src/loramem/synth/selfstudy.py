"""Self-study training prompts (Cartridges, Eyuboglu et al. 2025): many prompts about a document, answered by the
teacher (the model with the document in its prompt), so that no generator-validated answer is needed.

Each prompt is about one window of the document (several window sizes and offsets) and is one of four kinds:
- "question":  a question made without any generator, as a reader would ask it: what the text says about a phrase of
               the window, what a phrase is, or (one in four) a question about the whole document;
- "seed":      the generator reads the window and writes a request of one of the generic SEED_TYPES (they never
               name the domain); the request is sampled, so the same window gives different prompts;
- "template":  a prompt made without any generator: what the text says about a phrase of the window, continue a
               passage, fill a gap;
- "continue":  a continuation pair (Knowledge Modules' DDCD): the end of window k as the cue, the document's own
               next window as the answer.
Beside them go `anchors` general prompts (locality.ANCHOR_QUESTIONS), answered by the model without the document
and marked as anchors, so that the distilled module learns to leave what its document does not cover as it was.
The answer of "question", "seed" and "template" prompts is the teacher's greedy reply; "continue" keeps the true text. There
is no support filter: the distillation objective trains the module to match the teacher on every answer token,
so a loose answer still carries the teacher's view of the document. Replies are cached like synthetic data.

    examples, report = self_study(doc, SelfStudySpec(prompts=32), generator, teacher_base, style="chat")
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field

from loramem.answer import generate
from loramem.config import setting
from loramem.corpus import Document, chunk_text, content_id
from loramem.errors import LoramemError
from loramem.examples import Example
from loramem.locality import ANCHOR_QUESTIONS
from loramem.prompts import closed_book_prompt, render_prompt
from loramem.synth import cache as disk
from loramem.synth.parse import content_words
from loramem.synth.prompts import passages

VERSION = 2  # bump on any change of wording or selection below (it is in cache keys)
KINDS = ("question", "seed", "template", "continue")
SEED_TYPES = {
    "structuring": "Ask for one part of the text above to be organised as a short list. Write only the request.",
    "summarization": "Ask for a summary of one part of the text above. Write only the request.",
    "question": "Write one question about a specific fact stated in the text above. Write only the question.",
    "use_case": "Write a question that someone who needs the information above would ask. Write only the question.",
    "creative": "Write a request that uses the text above in a creative way. Write only the request.",
}
TEMPLATES = (
    "What does the text say about {phrase}?",
    "Explain {phrase}.",
    "Continue this passage: {sentence}",
    "Fill the gap marked ___: {gapped}",
)
QUESTIONS = (
    "What does the text say about {phrase}?",
    "According to the text, what is {phrase}?",
    "What is stated about {phrase} in the text?",
)
DOCUMENT_QUESTIONS = (
    "What is the main idea of the text?",
    "What problem does the text address?",
    "What does the text propose or describe?",
    "What are the key points of the text?",
    "What is the name of the main subject of the text?",
    "What conclusion does the text reach?",
)
QUESTION_TOKENS = 48
PASSAGES = 3  # in a passage prompt's context, as many as RAG retrieves (memory.DEFAULT_TOP_K)
# How self-study modules are trained (docs/RESULTS.md, "Documents that come back"): distillation at a rate far
# below the fact-memorising default, for a fixed number of epochs (a distilled module never "recalls" exactly).
TRAIN_LR = 1e-3
TRAIN_EPOCHS = 8
_LABEL_RE = re.compile(r"^\W*(?:question|request|q)\s*\d*\s*:\s*", re.IGNORECASE)
_PHRASE_RE = re.compile(r"\b(?:[A-Z][\w-]+(?:\s+(?:of\s+)?[A-Z][\w-]+)*|[a-z][\w-]{3,}\s+[a-z][\w-]{3,})\b")


@dataclass
class SelfStudySpec:
    """How many self-study prompts to make about a document, and of which kinds (`write --format self-study`; the
    command line's and the server's options are these fields)."""

    prompts: int = setting(32, "self-study: prompts per document, shared round-robin among the kinds (at least 1)")
    # question alone is the default: on PaperQA papers 0-1 no mix of kinds scored above it, and it needs no generator
    # (docs/RESULTS.md, "Documents that come back")
    kinds: tuple[str, ...] | str = setting(("question",), "self-study: kinds of prompts, +-joined: " + ", ".join(KINDS))
    seed_types: tuple[str, ...] | str = setting(tuple(SEED_TYPES), "self-study: the generic requests the generator "
                                                "is asked for, +-joined: " + ", ".join(SEED_TYPES))
    windows: tuple[int, ...] = setting((128, 256), "window sizes in tokens; windows of each size start every half "
                                       "window (offsets)", cli=False)
    answer_tokens: int = setting(64, "self-study: longest teacher reply (and continuation) in tokens")
    seed_temperature: float = setting(0.7, "self-study: the generator's sampling temperature for seed prompts (the "
                                      "teacher answers greedily)")
    # 16 anchors: the other documents' questions lost 0.017 ROUGE-L on PaperQA (0.042 without them, session 10) and
    # 0.005 on NarrativeQA (docs/RESULTS.md)
    anchors: int = setting(16, "self-study: general prompts answered without the document, trained as locality "
                           "anchors (at most %d)" % len(ANCHOR_QUESTIONS))
    passage_prompts: int = setting(0, "self-study: how many of the teacher-answered prompts are trained a second "
                                   "time with passages of the document before the question (the window asked about "
                                   "among %d others), as +rag answers read retrieved passages" % (PASSAGES - 1))
    seed: int = setting(0, "picks windows, kinds and phrases, and seeds the generator")

    formats = ("self-study",)  # read like SynthSpec.formats by the writers

    def __post_init__(self) -> None:
        self.kinds = _names(self.kinds, KINDS, "self-study kind")
        self.seed_types = _names(self.seed_types, tuple(SEED_TYPES), "seed type")
        if self.prompts < 1:
            raise LoramemError(f"the self-study prompt count must be at least 1, got {self.prompts}")
        if not self.windows or min(self.windows) < 16:
            raise LoramemError(f"self-study windows must be at least 16 tokens, got {self.windows}")
        if not 0 <= self.anchors <= len(ANCHOR_QUESTIONS):
            raise LoramemError(f"self-study anchors must be between 0 and {len(ANCHOR_QUESTIONS)}, got {self.anchors}")
        if not 0 <= self.passage_prompts <= self.prompts:
            raise LoramemError(f"self-study passage prompts must be between 0 and the prompt count {self.prompts}, "
                               f"got {self.passage_prompts}")
        if self.answer_tokens < 1 or self.seed_temperature < 0:
            raise LoramemError("answer_tokens must be at least 1 and seed_temperature at least 0")


@dataclass
class SelfStudyReport:
    doc_id: str
    asked: dict[str, int] = field(default_factory=dict)  # {"self-study": prompts asked}, read like SynthReport's
    produced: dict[str, int] = field(default_factory=dict)  # examples per kind
    skipped_empty: int = 0  # generator requests or teacher replies that came back empty
    windows: int = 0
    cached: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _names(value, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = [n.strip().lower().replace("-", "_") for n in (value.split("+") if isinstance(value, str) else value)]
    allowed_keys = [a.replace("-", "_") for a in allowed]
    unknown = [n for n in names if n not in allowed_keys]
    if unknown or not names:
        raise LoramemError(f"unknown {what} {unknown[0] if unknown else ''!r}: choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(allowed[allowed_keys.index(n)] for n in names))


def self_study(doc: Document, spec: SelfStudySpec, generator, teacher, style: str = "chat",
               cache: bool = True) -> tuple[list[Example], SelfStudyReport]:
    """Self-study examples for one document: (question, teacher's answer) in the closed-book prompt form.

    `teacher` is a models.Base; it answers with the whole document in its prompt, in prompt `style`.
    `generator` (synth.Generator) writes the seed requests; it is needed only when kinds include "seed".
    """
    start = time.perf_counter()
    report = SelfStudyReport(doc.id)
    tokenizer = teacher.tokenizer
    _check_fits(doc, spec, teacher)
    windows = _windows(doc, spec, tokenizer)
    if not windows:
        raise LoramemError(f"document {doc.title or doc.id} is too short for self-study: it has no text to chunk")
    report.windows = len(windows)
    if "seed" in spec.kinds and generator is None:
        raise LoramemError("self-study seed prompts need a generator; use kinds template+continue without one")
    key = {"text": content_id(doc.text), "format": "self-study", "version": VERSION, "style": style,
           "teacher": teacher.fingerprint["weights_sha256"], "generator": getattr(generator, "name", None),
           "spec": _key_spec(spec)}
    rows = disk.load(key) if cache else None
    report.cached = rows is not None
    if rows is None:
        rows = _rows(doc, spec, windows, generator, teacher, style, report)
        if cache:
            disk.store(key, {"rows": rows, "skipped_empty": report.skipped_empty})
    else:
        rows, report.skipped_empty = rows["rows"], rows["skipped_empty"]
    report.asked = {"self-study": spec.prompts}
    for row in rows:
        report.produced[row["kind"]] = report.produced.get(row["kind"], 0) + 1
    report.seconds = time.perf_counter() - start
    return [Example(closed_book_prompt(r["question"]), " " + r["answer"], anchor=r["kind"] == "anchor",
                    context=r.get("context", "")) for r in rows], report


def _key_spec(spec: SelfStudySpec) -> dict:
    """The spec as the cache key holds it: a setting at the value that leaves the data as it was before the setting
    existed is left out, so cached data (and the module ids hashed from it) stay valid."""
    return {k: v for k, v in asdict(spec).items() if not (k == "passage_prompts" and v == 0)}


def _check_fits(doc: Document, spec: SelfStudySpec, teacher) -> None:
    """The teacher reads the whole document: refuse one longer than its window (one line, before any work)."""
    window = getattr(teacher.model.config, "max_position_embeddings", 1 << 30)
    need = len(teacher.tokenizer(doc.text, add_special_tokens=False).input_ids) + spec.answer_tokens + 128
    if need > window:
        raise LoramemError(f"document {doc.title or doc.id} needs {need} tokens of teacher context, more than the "
                           f"model's window of {window}: split it into smaller documents")


def _windows(doc: Document, spec: SelfStudySpec, tokenizer) -> list[str]:
    """Windows of each size, starting every half window, so prompts see the text at several offsets."""
    out: list[str] = []
    for size in spec.windows:
        out += [c.text for c in chunk_text(doc.text, tokenizer, size, size // 2, doc_id=doc.id) if c.text.strip()]
    return list(dict.fromkeys(out))


def _rows(doc, spec, windows, generator, teacher, style, report) -> list[dict]:
    rng = random.Random(spec.seed)
    plan = [(spec.kinds[i % len(spec.kinds)], rng.randrange(len(windows))) for i in range(spec.prompts)]
    rows: list[dict] = []
    seeds = [(i, w) for i, (kind, w) in enumerate(plan) if kind == "seed"]
    requests = _seed_requests([windows[w] for _, w in seeds], spec, generator, rng) if seeds else []
    questions: dict[int, tuple[str, str, int]] = {}
    for (i, w), (seed_type, request) in zip(seeds, requests):
        questions[i] = ("seed:" + seed_type, request, w)
    for i, (kind, w) in enumerate(plan):
        if kind == "template":
            questions[i] = ("template", _template(windows[w], rng), w)
        elif kind == "question":
            questions[i] = ("question", _question(windows[w], rng), w)
        elif kind == "continue":
            pair = _continuation(doc, windows[w], spec, teacher.tokenizer)
            if pair:
                rows.append({"kind": "continue", "question": pair[0], "answer": pair[1]})
            else:
                report.skipped_empty += 1
    asked = [(k, q, w) for k, q, w in questions.values() if q]
    report.skipped_empty += len(questions) - len(asked)
    prompts = [render_prompt(teacher.tokenizer, q, context=doc.text, style=style) for _, q, _ in asked]
    replies = generate(teacher.model, teacher.tokenizer, prompts, max_new_tokens=spec.answer_tokens, batch_size=8)
    answered = _kept(asked, replies, report)
    rows += [{"kind": kind, "question": q, "answer": reply} for (kind, q, _), reply in answered]
    anchors = [ANCHOR_QUESTIONS[i] for i in sorted(rng.sample(range(len(ANCHOR_QUESTIONS)), spec.anchors))]
    rows += [{"kind": "passage", "question": q, "answer": reply, "context": _passages_around(windows, w, rng)}
             for (_, q, w), reply in answered[: spec.passage_prompts]]  # drawn last: the other rows stay as they were
    replies = [] if not anchors else generate(teacher.model, teacher.tokenizer, [render_prompt(
        teacher.tokenizer, q, style=style) for q in anchors], max_new_tokens=spec.answer_tokens, batch_size=8)
    rows += [{"kind": "anchor", "question": q, "answer": reply} for q, reply in _kept(anchors, replies, report)]
    return rows


def _kept(asked: list, replies: list[str], report: SelfStudyReport) -> list[tuple]:
    """(asked, reply stripped) for the teacher's replies that are not empty; the empty ones are counted as skipped."""
    kept = [(a, reply.strip()) for a, reply in zip(asked, replies) if reply.strip()]
    report.skipped_empty += len(asked) - len(kept)
    return kept


def _passages_around(windows: list[str], asked: int, rng: random.Random) -> str:
    """A passage prompt's context: the window its question was drawn from among other windows of the document, in
    a random order, joined as retrieved passages are."""
    others = [i for i in range(len(windows)) if i != asked]
    picked = rng.sample(others, min(PASSAGES - 1, len(others))) + [asked]
    rng.shuffle(picked)
    return "\n\n".join(windows[i] for i in picked)


def _seed_requests(texts: list[str], spec: SelfStudySpec, generator, rng: random.Random) -> list[tuple[str, str]]:
    types = [spec.seed_types[rng.randrange(len(spec.seed_types))] for _ in texts]
    prompts = [f"{text.strip()}\n\n{SEED_TYPES[t]}" for text, t in zip(texts, types)]
    replies = generator.complete(prompts, QUESTION_TOKENS, spec.seed_temperature, spec.seed)
    return [(t, _first_line(reply)) for t, reply in zip(types, replies)]


def _first_line(reply: str) -> str:
    for line in reply.splitlines():
        line = _LABEL_RE.sub("", line.strip().strip('*"')).strip()
        if len(line) > 8:
            return line[:300]
    return ""


def _phrases(window: str) -> list[str]:
    return list(dict.fromkeys(p for p in _PHRASE_RE.findall(window) if content_words(p)))


def _question(window: str, rng: random.Random) -> str:
    """A reader's question: about a phrase of the window, or one time in four about the whole document."""
    phrases = _phrases(window)
    if not phrases or rng.random() < 0.25:
        return DOCUMENT_QUESTIONS[rng.randrange(len(DOCUMENT_QUESTIONS))]
    return QUESTIONS[rng.randrange(len(QUESTIONS))].format(phrase=phrases[rng.randrange(len(phrases))])


def _template(window: str, rng: random.Random) -> str:
    sentences = [s for s in passages(window, 400) if len(s.split()) >= 6] or [" ".join(window.split())]
    sentence = sentences[rng.randrange(len(sentences))]
    template = TEMPLATES[rng.randrange(len(TEMPLATES))]
    if "{phrase}" in template:
        phrases = [p for p in _PHRASE_RE.findall(window) if content_words(p)]  # repeats kept: VERSION 1's draws
        if not phrases:
            template, phrases = TEMPLATES[2], [""]
        return template.format(phrase=phrases[rng.randrange(len(phrases))], sentence=sentence)
    if "{gapped}" in template:
        words = sentence.split()
        candidates = [i for i, w in enumerate(words) if content_words(w)] or [len(words) // 2]
        gap = candidates[rng.randrange(len(candidates))]
        return template.format(gapped=" ".join(words[:gap] + ["___"] + words[gap + 1:]))
    return template.format(sentence=sentence)


def _continuation(doc: Document, window: str, spec: SelfStudySpec, tokenizer) -> tuple[str, str] | None:
    """(cue, next text): the last sentence of the window as the cue, the document's text after it as the answer."""
    end = doc.text.find(window) + len(window)
    following = doc.text[end:].strip()
    if not following:  # the last window: use its own second half, cued by its first sentence
        parts = passages(window, 300)
        if len(parts) < 2:
            return None
        cue, following = parts[0], " ".join(parts[1:])
    else:
        cue = (passages(window, 300) or [window])[-1]
    ids = tokenizer(following, add_special_tokens=False).input_ids[: spec.answer_tokens]
    return f"Continue this passage: {cue}", tokenizer.decode(ids).strip()
