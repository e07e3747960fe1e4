"""Property-based tests (hypothesis) for chunking on the bundled byte-level tokenizer (the merge methods' and the
answer metrics' properties are in test_merge.py and test_metrics.py).

Small inputs and few examples per property, so the whole file runs in seconds on a busy CPU.
"""

from __future__ import annotations

import itertools
import string

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from loramem.corpus import chunk_text
from loramem.models import load_base

FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tokenizer():
    return load_base("tiny").tokenizer


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
