"""Routing questions to modules and chunks: dense, bm25, hybrid and oracle routers, abstention, saving."""

from __future__ import annotations

import numpy as np
import pytest

from loramem import route
from loramem.errors import LoramemError
from loramem.route import Hit, Index, calibrate, make_router, recall_at_k

# Five modules on distinct topics, each keyed by a short introduction and two of its own questions.
KEYS = {
    "volcano": [
        (
            "Volcanoes form where magma from the mantle rises through the crust. Eruptions release lava, ash "
            "and gases; Mount Etna in Sicily is one of the most active volcanoes in Europe."
        ),
        "What is molten rock called before it erupts?",
        "Which volcano in Sicily erupts often?",
    ],
    "bread": [
        (
            "Sourdough bread is leavened by a starter of wild yeast and lactic acid bacteria. The dough is "
            "kneaded, left to proof for hours and baked in a hot oven until the crust browns."
        ),
        "How long should dough proof?",
        "What makes a sourdough starter rise?",
    ],
    "chess": [
        (
            "Chess is a board game for two players on a board of 64 squares. Each player commands sixteen "
            "pieces; the aim is to checkmate the opposing king. Openings such as the Sicilian Defence are "
            "studied."
        ),
        "How does a knight move in chess?",
        "What is castling?",
    ],
    "photosynthesis": [
        (
            "Photosynthesis is how plants turn light into chemical energy. Chlorophyll in the chloroplasts "
            "absorbs sunlight, and carbon dioxide and water become glucose and oxygen."
        ),
        "Which pigment absorbs light in leaves?",
        "What gas do plants release?",
    ],
    "jazz": [
        (
            "Jazz grew out of blues and ragtime in New Orleans in the early twentieth century. Louis "
            "Armstrong's trumpet solos and Miles Davis's modal album Kind of Blue shaped its improvisation."
        ),
        "Who recorded Kind of Blue?",
        "Where did jazz music begin?",
    ],
}
MODULES = list(KEYS)
# Paraphrases that share few words with the keys (a test for meaning, not words).
PARAPHRASES = {
    "volcano": "Why does a mountain spew fire and smoke?",
    "bread": "How do I get my loaf to be fluffy and tangy?",
    "chess": "What's a good strategy to trap the opponent's monarch on the board?",
    "photosynthesis": "How do green leaves make food from sunshine?",
    "jazz": "Which trumpeter made improvised music famous?",
}
# Questions that repeat the keys' rare words (a test for words).
KEYWORD_QUESTIONS = {
    "volcano": "Mount Etna magma eruption",
    "bread": "sourdough starter yeast",
    "chess": "checkmate the king, Sicilian Defence",
    "photosynthesis": "chlorophyll chloroplasts glucose",
    "jazz": "Louis Armstrong Miles Davis",
}
OFF_TOPIC_CALIBRATION = [
    "What is the capital of Australia?",
    "How do I renew my passport?",
    "What time does the football match start tonight?",
    "Which programming language should I learn first?",
]
OFF_TOPIC_UNSEEN = "How many days are there in a leap year?"


def ask(questions: dict[str, str]) -> tuple[list[str], list[str]]:
    return list(questions.values()), list(questions)


@pytest.fixture(scope="module")
def routers():
    # One encoder thread: on a small shared machine, torch's thread pool makes each call ~50x slower.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {kind: make_router(kind, KEYS) for kind in ("dense", "bm25", "hybrid")}
    torch.set_num_threads(threads)


def test_dense_routes_paraphrases_to_their_module(routers):
    questions, gold = ask(PARAPHRASES)
    hits = routers["dense"].route(questions, k=1)
    assert [h[0].id for h in hits] == gold
    # a module's score is the best cosine between the question and its keys (unit-length embeddings)
    best = [float((route.encode([q]) @ route.encode(KEYS[m]).T).max()) for q, m in zip(questions, gold)]
    np.testing.assert_allclose([h[0].score for h in hits], best, rtol=1e-5, atol=1e-5)


def test_bm25_routes_keyword_questions_to_their_module(routers):
    questions, gold = ask(KEYWORD_QUESTIONS)
    assert recall_at_k(routers["bm25"].route(questions, k=1), gold, 1) == 1.0


def test_hybrid_is_at_least_as_good_as_the_worse_router(routers):
    questions, gold = ask(PARAPHRASES)
    keyword_questions, keyword_gold = ask(KEYWORD_QUESTIONS)
    questions, gold = questions + keyword_questions, gold + keyword_gold
    recall = {kind: recall_at_k(router.route(questions, k=1), gold, 1) for kind, router in routers.items()}
    assert recall["hybrid"] >= min(recall["dense"], recall["bm25"])


def test_top_k_is_ranked_best_first(routers):
    hits = routers["hybrid"].route(PARAPHRASES["jazz"], k=5)[0]
    assert sorted(hit.id for hit in hits) == sorted(MODULES)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_oracle_returns_the_gold_module():
    oracle = make_router("oracle", KEYS)
    assert oracle.route(["anything", "at all"], k=2, gold=["jazz", "chess"]) == [
        [Hit("jazz", 1.0)],
        [Hit("chess", 1.0)],
    ]
    with pytest.raises(LoramemError, match="gold module of each question"):
        oracle.route(["anything"])
    with pytest.raises(LoramemError, match="'opera' is not one of"):
        oracle.route(["anything"], gold=["opera"])
    with pytest.raises(LoramemError, match="no scores"):
        calibrate(oracle, ["a"], ["b"])


@pytest.mark.parametrize("kind", ["dense", "hybrid"])
def test_calibrated_threshold_refuses_an_off_topic_question(routers, kind):
    router = routers[kind]
    threshold = calibrate(router, list(PARAPHRASES.values()), OFF_TOPIC_CALIBRATION)
    off, known = router.route([OFF_TOPIC_UNSEEN, KEYWORD_QUESTIONS["chess"]], k=1, threshold=threshold)
    assert off == []
    assert [hit.id for hit in known] == ["chess"]


def test_calibrate_takes_the_midpoint_of_the_gap():
    class Fixed:
        def scores(self, questions):
            return np.array([[float(q)] for q in questions])

    assert calibrate(Fixed(), ["0.9", "0.8"], ["0.3", "0.5"]) == pytest.approx(0.65)
    # Overlap: 0.6 (out) above 0.55 (in); the best balanced accuracy keeps both ins and refuses one out.
    assert calibrate(Fixed(), ["0.9", "0.55"], ["0.3", "0.6"]) == pytest.approx(0.425)


@pytest.mark.parametrize("kind", ["dense", "bm25", "hybrid"])
def test_save_load_round_trip_gives_identical_scores(routers, kind, tmp_path, monkeypatch):
    router = routers[kind]
    questions = list(PARAPHRASES.values())
    expected = router.scores(questions)
    router.save(tmp_path)
    encoded = []

    def encode(texts, encoder):
        encoded.append(len(texts))
        return real_encode(texts, encoder)

    real_encode = route.encode
    monkeypatch.setattr(route, "encode", encode)
    loaded = route.Router.load(tmp_path)
    assert (loaded.kind, loaded.modules) == (kind, MODULES)
    assert np.array_equal(loaded.scores(questions), expected)
    # The keys are not encoded again: only the questions, in one call.
    assert encoded == ([] if kind == "bm25" else [len(questions)])


def test_a_module_scores_the_best_of_its_keys_or_their_mean():
    items = [("a", "red apples"), ("b", "green pears"), ("a", "yellow bananas"), ("b", "red cherries")]
    per_key = Index.build([(str(n), text) for n, (_, text) in enumerate(items)], "bm25").scores("red apples")
    by_max = Index.build(items, "bm25").scores("red apples")
    by_mean = Index.build(items, "bm25", aggregate="mean").scores("red apples")
    assert by_max.tolist() == [[max(per_key[0, 0], per_key[0, 2]), max(per_key[0, 1], per_key[0, 3])]]
    assert by_mean == pytest.approx(np.array([[per_key[0, [0, 2]].mean(), per_key[0, [1, 3]].mean()]]))


def test_an_index_retrieves_chunks_for_rag():
    chunks = [(f"{module}:{n}", text) for module, texts in KEYS.items() for n, text in enumerate(texts)]
    index = Index.build(chunks, "bm25")
    assert len(index) == len(chunks)
    hits = index.search(["Does chlorophyll absorb sunlight?", "castling"], k=2)
    assert [hits[0][0].id, hits[1][0].id] == ["photosynthesis:0", "chess:2"]
    assert index.search(["zebra quagga"], k=3, threshold=0.1) == [[]]


def test_recall_at_k_counts_gold_within_the_first_k():
    ranked = [["a", "b", "c"], [Hit("c", 0.9), Hit("a", 0.5)], []]
    assert recall_at_k(ranked, ["a", "a", "a"], 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, ["a", "a", "a"], 2) == pytest.approx(2 / 3)
    with pytest.raises(LoramemError, match="2 rankings but 1 gold"):
        recall_at_k(ranked[:2], ["a"], 1)
    with pytest.raises(LoramemError, match="k must be a positive integer"):
        recall_at_k(ranked, ["a", "a", "a"], 0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_router("semantic", KEYS), "unknown router 'semantic': choose one of oracle, dense"),
        (lambda: make_router("bm25", {}), "no modules"),
        (lambda: make_router("bm25", {"a": []}), "module 'a' has no key texts"),
        (lambda: make_router("bm25", KEYS, aggregate="median"), "unknown aggregate"),
        (lambda: make_router("bm25", KEYS).route("q", k=0), "top-k must be a positive integer, got 0"),
        (lambda: make_router("bm25", KEYS).route("q", k=6), "top-k 6 is more than the 5 entries"),
        (lambda: make_router("oracle", KEYS).route("q", k=6, gold="jazz"), "top-k 6 is more than"),
        (lambda: Index.build([], "bm25"), "cannot build an index from no items"),
        (lambda: Index.build([("a", "the of and")], "bm25"), "no text to index has a word"),
        (lambda: Index.build([("a", "text")], "oracle"), "unknown index kind 'oracle'"),
        (lambda: Index.build([("a", "text")], "dense", encoder="/no/such/model"), "unknown encoder"),
        (lambda: make_router("oracle", KEYS).save("/tmp"), "oracle router has nothing to save"),
    ],
)
def test_errors_are_one_line(call, message):
    with pytest.raises(LoramemError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_loading_from_a_folder_without_an_index_is_an_error(tmp_path):
    with pytest.raises(LoramemError, match="no routing index"):
        Index.load(tmp_path)
    (tmp_path / route.INDEX_FILE).write_bytes(b"not a zip")
    with pytest.raises(LoramemError, match="unreadable routing index"):
        Index.load(tmp_path)


def test_an_index_cache_builds_once_per_module_set_and_reloads_from_disk(tmp_path):
    from loramem.route import IndexCache

    built = []

    def build(keys):
        def make():
            built.append(sorted(keys))
            return make_router("bm25", keys)
        return make

    two = {"volcano": KEYS["volcano"], "bread": KEYS["bread"]}
    cache = IndexCache(tmp_path / "index")
    first = cache.get("route-bm25", ["volcano", "bread"], build(two))
    assert cache.get("route-bm25", ["bread", "volcano"], build(two)) is first  # a set, in any order
    assert built == [["bread", "volcano"]] and len(list((tmp_path / "index").iterdir())) == 1
    reloaded = IndexCache(tmp_path / "index").get("route-bm25", ["volcano", "bread"], build(two))
    assert built == [["bread", "volcano"]]  # read from disk, not built again
    assert np.array_equal(reloaded.scores("Which volcano erupts?"), first.scores("Which volcano erupts?"))
    three = two | {"chess": KEYS["chess"]}
    assert cache.get("route-bm25", list(three), build(three)).modules == ["volcano", "bread", "chess"]
    assert len(built) == 2 and len(list((tmp_path / "index").iterdir())) == 2  # another set, another index
