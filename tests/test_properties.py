"""Property-based tests (hypothesis) for chunking, merging and the answer metrics.

Small inputs and few examples per property, so the whole file runs in seconds on a busy CPU.
"""

from __future__ import annotations

import itertools
import math
import re
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from loramem.corpus import chunk_text
from loramem.merge import (
    apply_in_place,
    applied,
    cat_factors,
    dare_linear,
    dare_ties,
    linear,
    lora_deltas,
    lora_factors,
    magnitude_prune,
    merge,
    merged_weights,
    revert,
    ties,
)
from loramem.metrics import bleu, exact_match, normalize_answer, rouge_l, token_f1
from loramem.models import load_base

FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tokenizer():
    return load_base("tiny").tokenizer


@pytest.fixture(scope="module")
def tiny_model():
    return load_base("tiny").model


# ---------------------------------------------------------------------------------------------------
# Chunking

# Unicode text with plenty of whitespace, multi-byte characters (several byte-level tokens with one
# character offset) and combining marks.
texts = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list(" \t\n\r\u00a0\u3000") + ["é", "日", "😀", "\u0301", "ß"]),
        st.sampled_from(list(string.ascii_letters + string.digits + string.punctuation)),
    ),
    max_size=120,
)
ascii_texts = st.text(alphabet=string.printable, max_size=120)
windows = st.integers(1, 12).flatmap(lambda c: st.tuples(st.just(c), st.integers(0, c - 1)))


def token_starts(tokenizer, text: str) -> list[int]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [start for start, _ in encoding["offset_mapping"]]


def longest_run_of_one_start(tokenizer, text: str) -> int:
    """The most consecutive tokens of the text that start on the same character (starts made non-decreasing,
    as chunk_text makes them)."""
    starts = list(itertools.accumulate(token_starts(tokenizer, text), max))
    longest = run = 0
    for i, start in enumerate(starts):
        run = run + 1 if i and start == starts[i - 1] else 1
        longest = max(longest, run)
    return longest


def split_at(prev, nxt) -> bool:
    """Whether the character where `nxt` starts is also the last one of `prev` (its tokens were split)."""
    return prev.text[-1:] == nxt.text[:1] != ""


def check_common(tokenizer, text: str, chunk_tokens: int, overlap: int):
    chunks = chunk_text(text, tokenizer, chunk_tokens, overlap, doc_id="d")
    n = len(token_starts(tokenizer, text))
    if n == 0:
        assert chunks == []  # "a text without tokens gives no chunks"
        return chunks
    assert chunks, "a text with tokens must give chunks"
    # Coverage: first starts at 0, last ends at len(text), each an exact slice, indices in order.
    assert chunks[0].start_char == 0
    assert chunks[-1].end_char == len(text)
    for i, c in enumerate(chunks):
        assert c.index == i and c.doc_id == "d"
        assert 0 <= c.start_char <= c.end_char <= len(text)
        assert c.text == text[c.start_char:c.end_char]
        # Window of the text's own tokens: chunk i holds tokens [i*step, min(i*step + C, n)).
        step = chunk_tokens - overlap
        assert 1 <= c.n_tokens <= chunk_tokens
        assert c.n_tokens == min(chunk_tokens, n - i * step)
    # No gaps and never backwards: nothing is lost between consecutive chunks.
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.start_char <= nxt.start_char <= prev.end_char
        assert prev.end_char <= nxt.end_char
        if overlap == 0:
            # Exact tiling, except that a character whose tokens a window boundary splits is in both chunks.
            assert nxt.start_char == prev.end_char or (nxt.start_char + 1 == prev.end_char and split_at(prev, nxt))
    if overlap == 0:
        if all(prev.end_char == nxt.start_char for prev, nxt in zip(chunks, chunks[1:])):
            assert "".join(c.text for c in chunks) == text
        assert sum(c.n_tokens for c in chunks) == n
    else:
        # Every token is in some chunk and the last chunk reaches the last token.
        assert (len(chunks) - 1) * (chunk_tokens - overlap) + chunks[-1].n_tokens == n
    # The union of the spans is the whole text.
    covered = 0
    for c in chunks:
        assert c.start_char <= covered
        covered = max(covered, c.end_char)
    assert covered == len(text)
    return chunks


@FAST
@given(text=texts, window=windows)
def test_chunks_cover_unicode_text_in_order(tokenizer, text, window):
    check_common(tokenizer, text, *window)


@FAST
@given(text=texts, chunk_tokens=st.integers(5, 12), data=st.data())
def test_chunks_share_characters_when_overlap_is_at_least_a_character(tokenizer, text, chunk_tokens, data):
    # Byte-level tokens of one character (and BPE merges across a character's last byte) all report the same
    # start, so a window or overlap no longer than such a run can lie inside one character: '\U00040000:'
    # gives five tokens starting at character 0. Longer windows and overlaps always hold a character.
    overlap = data.draw(st.integers(4, chunk_tokens - 1))
    assume(overlap > longest_run_of_one_start(tokenizer, text))
    chunks = check_common(tokenizer, text, chunk_tokens, overlap)
    for c in chunks:
        assert c.text, c
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start_char < prev.end_char


@FAST
@given(text=texts, chunk_tokens=st.integers(4, 12))
@example(text="\U00040000:\x08", chunk_tokens=6)  # five tokens start on its first character
def test_chunks_longer_than_one_characters_tokens_are_never_empty(tokenizer, text, chunk_tokens):
    # A window no longer than the tokens that start on one character can lie inside it and come out empty
    # ('😀' is 3 tokens; '\U00040000:' is 5 tokens starting at character 0).
    assume(chunk_tokens > longest_run_of_one_start(tokenizer, text))
    for c in check_common(tokenizer, text, chunk_tokens, 0):
        assert c.text, c


@FAST
@given(text=texts, window=windows)
@example(text="\U00040000:\x08", window=(2, 0))  # five tokens start on one character: two windows inside it
@example(text="a\U0001f600b", window=(1, 0))  # the emoji's three byte tokens, one window each
def test_every_chunk_holds_the_characters_its_tokens_touch(tokenizer, text, window):
    # However small the window, no chunk is empty and none loses part of a token: a character whose
    # bytes are split between windows is in each of them.
    chunk_tokens, overlap = window
    chunks = check_common(tokenizer, text, chunk_tokens, overlap)
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    step = chunk_tokens - overlap
    for i, c in enumerate(chunks):
        assert c.text, c
        for start, end in spans[i * step : i * step + c.n_tokens]:
            assert c.start_char <= start and end <= c.end_char, (c, start, end)


@FAST
@given(text=ascii_texts, window=windows)
def test_ascii_chunks_overlap_exactly_when_asked(tokenizer, text, window):
    chunk_tokens, overlap = window
    chunks = check_common(tokenizer, text, chunk_tokens, overlap)
    starts = token_starts(tokenizer, text)
    assert starts == sorted(set(starts))  # ASCII: one token per distinct character offset
    for c in chunks:
        assert c.text
        # The text's tokens that begin inside the chunk (the first chunk also owns what precedes its
        # first token) are exactly the chunk's n_tokens <= chunk_tokens tokens.
        inside = [s for s in starts if c.start_char <= s < c.end_char]
        assert len(inside) == c.n_tokens <= chunk_tokens
    for prev, nxt in zip(chunks, chunks[1:]):
        shared = [s for s in starts if nxt.start_char <= s < prev.end_char]
        assert len(shared) == overlap
        assert (nxt.start_char < prev.end_char) == (overlap > 0)


# ---------------------------------------------------------------------------------------------------
# Merging

SHAPES = [{"a.weight": (8, 5), "b.weight": (3, 7)},
          {"a.weight": (8, 5), "b.weight": (3, 7), "c.weight": (4, 4)}]


@st.composite
def task_vectors(draw, min_modules=1, max_modules=4, sparse=False):
    n = draw(st.integers(min_modules, max_modules))
    shapes = draw(st.sampled_from(SHAPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    deltas = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(n)]
    if sparse:  # a zero pattern shared by every module
        for k, s in shapes.items():
            mask = torch.rand(s, generator=gen) < 0.6
            for d in deltas:
                d[k] = d[k] * mask
    weights = draw(st.lists(st.sampled_from([-1.5, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0]), min_size=n, max_size=n))
    return deltas, weights


densities = st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.75, 0.9, 1.0])


def np_trim(t: np.ndarray, density: float) -> np.ndarray:
    """Reference trim: keep the k largest magnitudes (randn has no ties)."""
    if density >= 1:
        return t
    flat = t.ravel()
    k = max(1, int(density * flat.size + 1e-9))
    out = np.zeros_like(flat)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out[keep] = flat[keep]
    return out.reshape(t.shape)


@FAST
@given(tv=task_vectors())
def test_linear_is_the_weighted_sum(tv):
    deltas, weights = tv
    out = linear(deltas, weights)
    assert out.keys() == deltas[0].keys()
    for name in out:
        expected = sum(w * d[name].double() for w, d in zip(weights, deltas))
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-5)
    # default weights are all 1
    for name, t in linear(deltas).items():
        torch.testing.assert_close(t, sum(d[name] for d in deltas), rtol=1e-5, atol=1e-5)


@FAST
@given(tv=task_vectors(min_modules=2), density=densities, data=st.data(),
       method=st.sampled_from(["linear", "ties", "magnitude_prune"]))
def test_merges_do_not_depend_on_the_order_of_the_modules(tv, density, data, method):
    deltas, weights = tv
    order = data.draw(st.permutations(range(len(deltas))))
    params = {} if method == "linear" else {"density": density}
    first = merge(deltas, method, weights, **params)
    shuffled = merge([deltas[i] for i in order], method, [weights[i] for i in order], **params)
    for name in first:
        torch.testing.assert_close(shuffled[name], first[name], rtol=1e-5, atol=1e-5)


@FAST
@given(tv=task_vectors(max_modules=1), sign_method=st.sampled_from(["total", "frequency"]))
def test_ties_of_one_module_at_full_density_is_that_module(tv, sign_method):
    (delta,), (w,) = tv
    for name, t in ties([delta], density=1.0, sign_method=sign_method).items():
        assert torch.equal(t, delta[name])
    for name, t in ties([delta], [w], density=1.0, sign_method=sign_method).items():
        torch.testing.assert_close(t, w * delta[name])


@FAST
@given(tv=task_vectors(sparse=True), density=densities)
def test_ties_zeros_and_elected_signs(tv, density):
    deltas, weights = tv
    out = ties(deltas, weights, density=density, sign_method="total")
    for name, merged in out.items():
        inputs = torch.stack([d[name] for d in deltas])
        assert torch.all(merged[(inputs == 0).all(0)] == 0)
        trimmed = np.stack([w * np_trim(d[name].double().numpy(), density) for w, d in zip(weights, deltas)])
        assert torch.all(merged[torch.from_numpy((trimmed == 0).all(0))] == 0)
        score = trimmed.sum(0)
        m = merged.double().numpy()
        # A nonzero entry has the elected sign (a score of exactly 0 elects +)...
        assert np.all(score[m > 0] >= 0)
        assert np.all(score[m < 0] < 0)
        # ...and is the mean of the trimmed inputs that agree with it, so it lies between them.
        nz = m != 0
        assert np.all(np.abs(m[nz]) <= np.abs(trimmed).max(0)[nz] + 1e-6)


@FAST
@given(tv=task_vectors(sparse=True), density=densities)
def test_ties_frequency_signs(tv, density):
    deltas, weights = tv
    out = ties(deltas, weights, density=density, sign_method="frequency")
    for name, merged in out.items():
        trimmed = np.stack([w * np_trim(d[name].double().numpy(), density) for w, d in zip(weights, deltas)])
        votes = np.sign(trimmed).sum(0)
        m = merged.double().numpy()
        assert np.all(votes[m > 0] >= 0)
        assert np.all(votes[m < 0] < 0)


@FAST
@given(tv=task_vectors(), density=densities)
def test_magnitude_prune_keeps_at_most_ceil_density_n_per_module(tv, density):
    deltas, weights = tv
    out = magnitude_prune(deltas, weights, density=density)
    for name, merged in out.items():
        numel = merged.numel()
        cap = math.ceil(density * numel)
        # One module alone: at most ceil(density * n) nonzeros, and those are its largest entries.
        single = magnitude_prune([deltas[0]], density=density)[name]
        assert int(single.count_nonzero()) <= cap
        kept = single != 0
        if kept.any() and (~kept).any():
            assert deltas[0][name][kept].abs().min() >= deltas[0][name][~kept].abs().max()
        assert torch.equal(single[kept], deltas[0][name][kept])
        # The sum: nonzero only where some module kept an entry, and equal to the reference.
        kept_any = torch.zeros_like(merged, dtype=torch.bool)
        for d in deltas:
            kept_any |= magnitude_prune([d], density=density)[name] != 0
        assert torch.all(merged[~kept_any] == 0)
        assert int(merged.count_nonzero()) <= len(deltas) * cap
        expected = sum(w * np_trim(d[name].double().numpy(), density) for w, d in zip(weights, deltas))
        np.testing.assert_allclose(merged.double().numpy(), expected, rtol=1e-5, atol=1e-5)


@FAST
@given(tv=task_vectors(), density=st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]),
       seed=st.integers(0, 2**31 - 2), method=st.sampled_from(["dare_linear", "dare_ties"]))
def test_dare_is_reproducible_by_seed(tv, density, seed, method):
    deltas, weights = tv
    assume(any(w != 0 for w in weights))
    fn = dare_linear if method == "dare_linear" else dare_ties
    first = fn(deltas, weights, density=density, seed=seed)
    again = fn(deltas, weights, density=density, seed=seed)
    other = fn(deltas, weights, density=density, seed=seed + 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # 2-3 layers of >= 16 entries each: independent masks coincide with negligible probability.
    assert not all(torch.equal(first[k], other[k]) for k in first)
    # The inputs are not modified.
    assert all(torch.equal(a[k], b[k]) for a, b in zip(deltas, tv[0]) for k in a)


@FAST
@given(n=st.integers(1, 3), ranks=st.lists(st.integers(1, 4), min_size=3, max_size=3),
       scales=st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), min_size=3, max_size=3),
       weights=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0]), min_size=3, max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_cat_factors_product_is_the_linear_merge(n, ranks, scales, weights, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"x.weight": (8, 5), "y.weight": (6, 3)}
    factors = [
        {name: (torch.randn(ranks[i], fan_in, generator=gen), torch.randn(out, ranks[i], generator=gen), scales[i])
         for name, (out, fan_in) in shapes.items()}
        for i in range(n)
    ]
    ws = weights[:n]
    merged = cat_factors(factors, ws)
    # The same modules read as PEFT state dicts, through lora_factors / lora_deltas.
    deltas = []
    for i, f in enumerate(factors):
        state = {}
        for name, (a, b, _) in f.items():
            module = name.removesuffix(".weight")
            state[f"base_model.model.{module}.lora_A.weight"] = a
            state[f"base_model.model.{module}.lora_B.weight"] = b
        read = lora_factors(state, scales[i])
        assert all(torch.equal(read[k][0], f[k][0]) and read[k][2] == scales[i] for k in f)
        deltas.append(lora_deltas(state, scales[i]))
    expected = linear(deltas, ws)
    assert merged.keys() == expected.keys()
    for name, (a_cat, b_cat, s) in merged.items():
        assert s == 1.0 and a_cat.shape[0] == b_cat.shape[1] == sum(ranks[:n])
        torch.testing.assert_close(s * b_cat @ a_cat, expected[name], rtol=1e-4, atol=1e-4)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class TwoLinear(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.first = torch.nn.Linear(5, 8, dtype=dtype)
        self.second = torch.nn.Linear(8, 3, bias=False, dtype=dtype)


@FAST
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3]), names=st.sampled_from([["first.weight"],
                                                                          ["first.weight", "second.weight"]]))
def test_apply_then_revert_is_bit_exact_on_a_small_module(dtype, seed, scale, names):
    torch.manual_seed(seed)
    model = TwoLinear(dtype)
    before = {k: bits(v) for k, v in model.state_dict().items()}
    shapes = dict(model.named_parameters())
    deltas = {name: torch.randn(shapes[name].shape) * scale for name in names}
    expected = merged_weights(model, deltas=deltas)
    handle = apply_in_place(model, deltas)
    for name, p in model.named_parameters():
        if name in deltas:
            assert p.dtype == dtype and torch.equal(bits(p), bits(expected[name]))
        else:
            assert torch.equal(bits(p), before[name])
    revert(model, handle)
    after = {k: bits(v) for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@settings(max_examples=10, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-4, 1.0, 100.0]), raises=st.booleans())
def test_applied_restores_the_tiny_model_bit_for_bit(tiny_model, seed, scale, raises):
    params = dict(tiny_model.named_parameters())
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    gen = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(params[n].shape, generator=gen) * scale for n in names}
    before = {k: bits(v) for k, v in tiny_model.state_dict().items()}
    with pytest.raises(RuntimeError) if raises else _nothing():
        with applied(tiny_model, deltas=deltas):
            inside = dict(tiny_model.named_parameters())
            assert not torch.equal(bits(inside[names[0]]), before[names[0]])
            if raises:
                raise RuntimeError("boom")
    after = {k: bits(v) for k, v in tiny_model.state_dict().items()}
    assert all(torch.equal(after[k], before[k]) for k in before)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------------
# Metrics

any_text = st.text(max_size=40)
words = st.text(alphabet=string.ascii_letters + string.digits + " ,.!?'-", max_size=40)


@settings(max_examples=60, deadline=None, database=None)
@given(pred=st.one_of(any_text, words), ref=st.one_of(any_text, words))
def test_scores_are_between_zero_and_one(pred, ref):
    for score in (token_f1(pred, ref), rouge_l(pred, ref), bleu(pred, ref), rouge_l(pred, [ref, pred + ref])):
        assert 0.0 <= score <= 1.0 and not math.isnan(score)


@settings(max_examples=60, deadline=None, database=None)
@given(text=st.one_of(any_text, words))
def test_identical_answer_scores_one(text):
    assert exact_match(text, text)
    # SQuAD v2: F1 is 1 for identical answers, including two answers with no tokens.
    assert token_f1(text, text) == 1.0
    if normalize_answer(text).split() and re.search(r"[a-z0-9]", text.lower()):
        # rouge-score only keeps ASCII letters and digits, so ROUGE-L needs one of those.
        assert rouge_l(text, text) == pytest.approx(1.0)
        assert rouge_l(text, ["zzz unrelated", text]) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None, database=None)
@given(a=st.one_of(any_text, words), b=st.one_of(any_text, words))
def test_exact_match_is_symmetric_and_implies_full_f1(a, b):
    assert exact_match(a, b) == exact_match(b, a)
    assert token_f1(a, b) == pytest.approx(token_f1(b, a))
    if exact_match(a, b):
        assert token_f1(a, b) == 1.0


@st.composite
def noisy(draw, text):
    """The same answer up to case, punctuation, articles and whitespace."""
    out = "".join(c.swapcase() if draw(st.booleans()) else c for c in text)
    marks = draw(st.lists(st.tuples(st.integers(0, len(out)), st.sampled_from(string.punctuation)), max_size=4))
    for pos, mark in sorted(marks, reverse=True):
        out = out[:pos] + mark + out[pos:]
    out = re.sub(" ", lambda _: draw(st.sampled_from([" ", "  ", " \t", "\n "])), out)
    article = draw(st.sampled_from(["", "the ", "A ", "an ", "The. "]))
    lead = draw(st.sampled_from(["", " ", " \t"]))
    tail = draw(st.sampled_from(["", "the", "a"]))
    return f"{lead}{article}{out} {tail}"


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data(), text=words)
def test_exact_match_ignores_case_punctuation_articles(data, text):
    variant = data.draw(noisy(text))
    assert normalize_answer(variant) == normalize_answer(text)
    assert exact_match(variant, text) and exact_match(text, variant)
    assert token_f1(variant, text) == 1.0
    other = data.draw(noisy(text))
    assert exact_match(variant, other)
