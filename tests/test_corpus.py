"""Reading documents and facts files from real files, and cutting text into token chunks.

Chunking is checked on three tokenizers: two built in the test (a word-level one, and a byte-level BPE
trained on a few sentences) and the bundled one, whose byte-level tokens split multi-byte characters.
"""

import hashlib
import itertools
import string
from functools import cache

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pypdf import PdfWriter
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loramem.corpus import (Chunk, Document, chunk_documents, chunk_text, content_id, facts_from_file, facts_from_text,
                            read_documents)
from loramem.errors import LoramemError
from loramem.examples import Example
from loramem.models import load_base

# --- tokenizers ----------------------------------------------------------------------------------


@cache
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words and punctuation runs, all mapped to [UNK]: the offsets are what chunking uses."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


@cache
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE: tokens carry their leading space and may split a character."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["Alice's phone number is 555-123-4567.", "The quick brown fox jumps over the lazy dog."] * 5
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def token_starts(text: str, tokenizer) -> list[int]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [start for start, _ in encoding["offset_mapping"]]


@pytest.fixture(scope="module")
def bundled_tokenizer():
    """The bundled SmolLM2 byte-level BPE (the tiny model's)."""
    return load_base("tiny").tokenizer


# --- file builders -------------------------------------------------------------------------------


def pdf_with_text(text: str, title: str | None = None) -> bytes:
    """A minimal one-page PDF with a Helvetica text line (and an /Info title), xref offsets exact."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Title (%s) >>" % (title or "").encode(),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    info = b" /Info 6 0 R" if title else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, info, xref)
    return bytes(out)


def blank_pdf(path) -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    with open(path, "wb") as file:
        writer.write(file)


HTML = """<!doctype html>
<html><head><title> Phone  book </title><style>p { color: red }</style>
<script>var secret = "not text";</script></head>
<body><h1>Contacts</h1>
<p>Alice:   555-123-4567</p>


<p>Bob: 555-987-6543</p></body></html>
"""


@pytest.fixture
def notes(tmp_path):
    """A folder with one file of each kind, good and bad."""
    (tmp_path / "a.txt").write_text("Plain notes.\r\nSecond line.\n")
    (tmp_path / "b.md").write_text("Intro line\n\n# The Guide ##\n\nBody text.\n")
    (tmp_path / "c.html").write_text(HTML)
    (tmp_path / "d.pdf").write_bytes(pdf_with_text("Carol 555-000-1111", title="Carol's card"))
    blank_pdf(tmp_path / "e_blank.pdf")
    (tmp_path / "f.jsonl").write_text(
        '{"text": "first record", "title": "One", "source": "x"}\n'
        "{not json}\n"
        "\n"
        '{"body": "no text field"}\n'
        '["a list"]\n'
        '{"text": "fourth record"}\n'
    )
    (tmp_path / "g_binary.txt").write_bytes(b"abc\x00\x01\x02")
    (tmp_path / "h_latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "i_empty.txt").write_bytes(b"")
    (tmp_path / "j_spaces.md").write_text("  \n\t\n")
    (tmp_path / "k.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / ".hidden.txt").write_text("hidden files are left out")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nested.txt").write_text("Nested file.")
    return tmp_path


SUPPORTED = ".htm, .html, .jsonl, .md, .pdf, .txt"


def name_of(doc: Document) -> str:
    """File name, plus ':line' for a JSONL record."""
    name = doc.path.rsplit("/", 1)[-1]
    return f"{name}:{doc.meta['line']}" if doc.meta["format"] == "jsonl" else name


# --- reading -------------------------------------------------------------------------------------


def test_read_folder_reads_each_format(notes):
    docs, _ = read_documents([notes])
    by_name = {name_of(doc): doc for doc in docs}
    assert list(by_name) == ["a.txt", "b.md", "c.html", "d.pdf", "f.jsonl:1", "f.jsonl:6", "nested.txt"]

    assert by_name["a.txt"].text == "Plain notes.\nSecond line.\n"  # CRLF made LF, otherwise verbatim
    assert by_name["a.txt"].title == "a"
    assert by_name["a.txt"].meta == {"format": "txt"}
    assert by_name["b.md"].title == "The Guide"

    html = by_name["c.html"]
    assert html.title == "Phone book"
    assert html.text == "Phone book\n\nContacts\n\nAlice: 555-123-4567\n\nBob: 555-987-6543"
    assert "secret" not in html.text and "color" not in html.text

    pdf = by_name["d.pdf"]
    assert pdf.text == "Carol 555-000-1111"
    assert pdf.title == "Carol's card"
    assert pdf.meta == {"format": "pdf", "pages": 1}

    first, fourth = by_name["f.jsonl:1"], by_name["f.jsonl:6"]
    assert (first.text, first.title) == ("first record", "One")
    assert first.meta == {"title": "One", "source": "x", "format": "jsonl", "line": 1}
    assert (fourth.text, fourth.title) == ("fourth record", "f")


def test_read_folder_reports_each_skip_with_its_reason(notes):
    _, skipped = read_documents([notes])
    reasons = {(path.rsplit("/", 1)[-1], reason) for path, reason in skipped}
    assert reasons == {
        ("e_blank.pdf", "PDF has no extractable text (scanned images need OCR first)"),
        ("f.jsonl", "line 2: not valid JSON"),
        ("f.jsonl", "line 4: no string field 'text'"),
        ("f.jsonl", "line 5: not a JSON object"),
        ("g_binary.txt", "binary file (contains NUL bytes)"),
        ("h_latin1.txt", "not UTF-8 text (byte 0xe9 at offset 3)"),
        ("i_empty.txt", "empty file"),
        ("j_spaces.md", "only whitespace"),
        ("k.docx", f"unsupported file type '.docx' (supported: {SUPPORTED})"),
    }
    assert len(skipped) == len(reasons)


def test_document_id_is_the_sha256_prefix_of_the_text(notes):
    docs, _ = read_documents([notes / "a.txt"])
    text = "Plain notes.\nSecond line.\n"
    assert docs[0].id == hashlib.sha256(text.encode()).hexdigest()[:16] == content_id(text)
    assert Document.from_text(text).id == docs[0].id


def test_reading_is_deterministic(notes):
    assert read_documents([notes]) == read_documents([str(notes)])


def test_strict_raises_on_the_first_problem(notes):
    with pytest.raises(LoramemError) as raised:
        read_documents([notes], strict=True)
    message = str(raised.value)
    assert message.endswith("e_blank.pdf: PDF has no extractable text (scanned images need OCR first)")
    assert "\n" not in message


def test_strict_names_the_bad_jsonl_line(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": broken\n')
    with pytest.raises(LoramemError, match=r"notes\.jsonl: line 3: not valid JSON$"):
        read_documents(path, strict=True)


def test_strict_passes_good_files(notes):
    docs, skipped = read_documents([notes / "a.txt", notes / "sub"], strict=True)
    assert [doc.text for doc in docs] == ["Plain notes.\nSecond line.\n", "Nested file."]
    assert skipped == []


@pytest.mark.parametrize("strict", [False, True])
def test_missing_path_always_raises(tmp_path, strict):
    missing = tmp_path / "nope.txt"
    with pytest.raises(LoramemError, match=f"^no such file or folder: {missing}$"):
        read_documents([missing], strict=strict)


def test_files_over_max_bytes_are_refused_unread(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 101)
    (tmp_path / "small.txt").write_text("y" * 100)
    docs, skipped = read_documents([tmp_path], max_bytes=100)
    assert [doc.text for doc in docs] == ["y" * 100]
    assert skipped == [(str(tmp_path / "big.txt"), "too large (101 bytes, max_bytes is 100)")]
    with pytest.raises(LoramemError, match="max_bytes must be positive"):
        read_documents([tmp_path], max_bytes=0)


def test_jsonl_text_field_is_settable(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"answer": "555-123-4567", "q": "Alice?"}\n')
    docs, skipped = read_documents([path], text_field="answer")
    assert [doc.text for doc in docs] == ["555-123-4567"]
    assert docs[0].meta == {"q": "Alice?", "format": "jsonl", "line": 1}
    assert skipped == []
    _, skipped = read_documents([path])
    assert skipped == [(str(path), "line 1: no string field 'text'")]


def test_the_same_text_is_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("same")
    (tmp_path / "b.txt").write_text("same")
    (tmp_path / "c.jsonl").write_text('{"text": "same"}\n')
    docs, skipped = read_documents([tmp_path])
    assert [doc.path for doc in docs] == [str(tmp_path / "a.txt")]
    assert skipped == [
        (str(tmp_path / "b.txt"), f"same text as {tmp_path / 'a.txt'}"),
        (str(tmp_path / "c.jsonl"), f"line 1: same text as {tmp_path / 'a.txt'}"),
    ]


def test_damaged_pdf_and_odd_files_are_skipped(tmp_path):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf body\n")
    (tmp_path / "NOTES.TXT").write_text("upper-case extension")
    (tmp_path / "README").write_text("no extension")
    (tmp_path / "only-markup.html").write_text("<html><script>x()</script></html>")
    (tmp_path / "blank-lines.jsonl").write_text("\n\n")
    docs, skipped = read_documents([tmp_path])
    assert [doc.text for doc in docs] == ["upper-case extension"]
    reasons = dict((path.rsplit("/", 1)[-1], reason) for path, reason in skipped)
    assert reasons["broken.pdf"].startswith("unreadable PDF (")
    assert reasons["README"] == f"unsupported file type without extension (supported: {SUPPORTED})"
    assert reasons["only-markup.html"] == "no text after removing the HTML markup"
    assert reasons["blank-lines.jsonl"] == "no records"
    assert all("\n" not in reason for reason in reasons.values())


def test_broken_link_is_skipped(tmp_path):
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing-target.txt")
    assert read_documents([tmp_path]) == ([], [(str(tmp_path / "gone.txt"), "broken link")])


# --- chunking ------------------------------------------------------------------------------------


def test_chunks_of_a_known_text():
    text = "one two three four five six seven"
    chunks = chunk_text(text, word_tokenizer(), chunk_tokens=3, overlap=1, doc_id="d")
    assert chunks == [
        Chunk("d", 0, "one two three ", 0, 14, 3),
        Chunk("d", 1, "three four five ", 8, 24, 3),
        Chunk("d", 2, "five six seven", 19, 33, 3),
    ]


def test_first_chunk_starts_at_zero_and_last_runs_to_the_end():
    text = "  \n leading and trailing space \n\n"
    chunks = chunk_text(text, word_tokenizer(), chunk_tokens=2, overlap=0)
    assert [chunk.text for chunk in chunks] == ["  \n leading and ", "trailing space \n\n"]


def test_text_without_tokens_has_no_chunks():
    assert chunk_text("", word_tokenizer()) == []
    assert chunk_text(" \n\t ", word_tokenizer()) == []


@pytest.mark.parametrize(
    ("chunk_tokens", "overlap", "message"),
    [
        (0, 0, "chunk_tokens must be positive, got 0"),
        (-5, 0, "chunk_tokens must be positive, got -5"),
        (4, 4, r"overlap must be at least 0 and less than chunk_tokens \(4\), got 4"),
        (4, -1, r"overlap must be at least 0 and less than chunk_tokens \(4\), got -1"),
    ],
)
def test_chunk_window_is_validated(chunk_tokens, overlap, message):
    with pytest.raises(LoramemError, match=f"^{message}$"):
        chunk_text("some text", word_tokenizer(), chunk_tokens, overlap)
    with pytest.raises(LoramemError, match=f"^{message}$"):
        chunk_documents([], word_tokenizer(), chunk_tokens, overlap)


def test_slow_tokenizer_is_refused():
    with pytest.raises(LoramemError, match="needs a fast tokenizer"):
        chunk_text("text", lambda text, **kwargs: {}, 4, 0)


def test_chunk_documents_labels_chunks_by_document():
    docs = [Document.from_text("a b c d e"), Document.from_text("f g")]
    chunks = chunk_documents(docs, word_tokenizer(), chunk_tokens=2, overlap=0)
    assert [(chunk.doc_id, chunk.index, chunk.text) for chunk in chunks] == [
        (docs[0].id, 0, "a b "),
        (docs[0].id, 1, "c d "),
        (docs[0].id, 2, "e"),
        (docs[1].id, 0, "f g"),
    ]


def split_at(prev, nxt) -> bool:
    """Whether the character where `nxt` starts is also the last one of `prev` (its tokens were split)."""
    return prev.text[-1:] == nxt.text[:1] != ""


def check_chunks(text: str, tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """The chunking guarantees, checked against the tokenizer's own offsets; returns the chunks."""
    chunks = chunk_text(text, tokenizer, chunk_tokens, overlap, doc_id="doc")
    n_tokens = len(token_starts(text, tokenizer))
    if n_tokens == 0:
        assert chunks == []  # a text without tokens gives no chunks
        return chunks
    assert chunks, "a text with tokens must give chunks"
    # Coverage: first starts at 0, last ends at len(text), each an exact slice, indices in order.
    assert chunks[0].start_char == 0 and chunks[-1].end_char == len(text)
    step = chunk_tokens - overlap
    for index, chunk in enumerate(chunks):
        assert (chunk.doc_id, chunk.index) == ("doc", index)
        assert 0 <= chunk.start_char <= chunk.end_char <= len(text)
        assert chunk.text == text[chunk.start_char : chunk.end_char]
        # Window of the text's own tokens: chunk i holds tokens [i*step, min(i*step + C, n)).
        assert 1 <= chunk.n_tokens <= chunk_tokens
        assert chunk.n_tokens == min(chunk_tokens, n_tokens - index * step)
    assert all(chunk.n_tokens == chunk_tokens for chunk in chunks[:-1])
    # No gaps and never backwards: nothing is lost between consecutive chunks.
    for before, after in zip(chunks, chunks[1:]):
        assert before.start_char <= after.start_char <= before.end_char
        assert before.end_char <= after.end_char
        if overlap == 0:
            # Exact tiling, except that a character whose tokens a window boundary splits is in both chunks.
            assert after.start_char == before.end_char or (
                after.start_char + 1 == before.end_char and split_at(before, after))
    if overlap == 0:
        if all(before.end_char == after.start_char for before, after in zip(chunks, chunks[1:])):
            assert "".join(chunk.text for chunk in chunks) == text
    # Consecutive chunks share exactly `overlap` tokens, so the windows add up to the whole text, and the last
    # chunk reaches the last token.
    assert sum(chunk.n_tokens for chunk in chunks) - overlap * (len(chunks) - 1) == n_tokens
    assert (len(chunks) - 1) * step + chunks[-1].n_tokens == n_tokens
    # The union of the spans is the whole text.
    covered = 0
    for chunk in chunks:
        assert chunk.start_char <= covered
        covered = max(covered, chunk.end_char)
    assert covered == len(text)
    return chunks


@st.composite
def windows(draw):
    chunk_tokens = draw(st.integers(1, 12))
    return chunk_tokens, draw(st.integers(0, chunk_tokens - 1))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab c.\n\t-é"), max_size=120), windows())
def test_chunk_guarantees_with_word_tokens(text, window):
    check_chunks(text, word_tokenizer(), *window)
    # With word tokens, a chunk's tokens are those starting inside its span: check the overlap directly.
    chunks = chunk_text(text, word_tokenizer(), *window)
    starts = token_starts(text, word_tokenizer())
    spans = [{i for i, s in enumerate(starts) if c.start_char <= s < c.end_char} for c in chunks]
    assert [len(span) for span in spans] == [chunk.n_tokens for chunk in chunks]
    assert all(len(a & b) == window[1] for a, b in zip(spans, spans[1:]))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=120), windows())
def test_chunk_guarantees_with_byte_level_bpe(text, window):
    check_chunks(text, bpe_tokenizer(), *window)


# --- chunking on the bundled byte-level tokenizer ------------------------------------------------

FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

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


def longest_run_of_one_start(text: str, tokenizer) -> int:
    """The most consecutive tokens of the text that start on the same character (starts made non-decreasing,
    as chunk_text makes them)."""
    starts = list(itertools.accumulate(token_starts(text, tokenizer), max))
    longest = run = 0
    for i, start in enumerate(starts):
        run = run + 1 if i and start == starts[i - 1] else 1
        longest = max(longest, run)
    return longest


@FAST
@given(text=texts, window=windows())
def test_chunks_cover_unicode_text_in_order(bundled_tokenizer, text, window):
    check_chunks(text, bundled_tokenizer, *window)


@FAST
@given(text=texts, chunk_tokens=st.integers(5, 12), data=st.data())
def test_chunks_share_characters_when_overlap_is_at_least_a_character(bundled_tokenizer, text, chunk_tokens, data):
    # Byte-level tokens of one character (and BPE merges across a character's last byte) all report the same
    # start, so a window or overlap no longer than such a run can lie inside one character: '\U00040000:'
    # gives five tokens starting at character 0. Longer windows and overlaps always hold a character.
    overlap = data.draw(st.integers(4, chunk_tokens - 1))
    assume(overlap > longest_run_of_one_start(text, bundled_tokenizer))
    chunks = check_chunks(text, bundled_tokenizer, chunk_tokens, overlap)
    for c in chunks:
        assert c.text, c
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start_char < prev.end_char


@FAST
@given(text=texts, chunk_tokens=st.integers(4, 12))
@example(text="\U00040000:\x08", chunk_tokens=6)  # five tokens start on its first character
def test_chunks_longer_than_one_characters_tokens_are_never_empty(bundled_tokenizer, text, chunk_tokens):
    # A window no longer than the tokens that start on one character can lie inside it and come out empty
    # ('😀' is 3 tokens; '\U00040000:' is 5 tokens starting at character 0).
    assume(chunk_tokens > longest_run_of_one_start(text, bundled_tokenizer))
    for c in check_chunks(text, bundled_tokenizer, chunk_tokens, 0):
        assert c.text, c


@FAST
@given(text=texts, window=windows())
@example(text="\U00040000:\x08", window=(2, 0))  # five tokens start on one character: two windows inside it
@example(text="a\U0001f600b", window=(1, 0))  # the emoji's three byte tokens, one window each
def test_every_chunk_holds_the_characters_its_tokens_touch(bundled_tokenizer, text, window):
    # However small the window, no chunk is empty and none loses part of a token: a character whose
    # bytes are split between windows is in each of them.
    chunk_tokens, overlap = window
    chunks = check_chunks(text, bundled_tokenizer, chunk_tokens, overlap)
    encoding = bundled_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans = encoding["offset_mapping"]
    step = chunk_tokens - overlap
    for i, c in enumerate(chunks):
        assert c.text, c
        for start, end in spans[i * step : i * step + c.n_tokens]:
            assert c.start_char <= start and end <= c.end_char, (c, start, end)


@FAST
@given(text=ascii_texts, window=windows())
def test_ascii_chunks_overlap_exactly_when_asked(bundled_tokenizer, text, window):
    chunk_tokens, overlap = window
    chunks = check_chunks(text, bundled_tokenizer, chunk_tokens, overlap)
    starts = token_starts(text, bundled_tokenizer)
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


# --- facts files ---------------------------------------------------------------------------------

FACTS = "Question: What is the phone number of Ann Lee? Answer: 603-556-7631\nQuestion: What is the phone number of Bo Kim? Answer: 705-882-9365\n"


def test_facts_parsing():
    examples = facts_from_text(FACTS + "\n  The sky is green.  \n")
    assert examples[0] == Example("Question: What is the phone number of Ann Lee? Answer:", " 603-556-7631")
    assert examples[2] == Example("", "The sky is green.")


@pytest.mark.parametrize("content,message", [(b"", "no facts"), (b"\n \n", "no facts"), (b"caf\xe9\n", "not UTF-8"),
                                             (b"\x00\x01bin", "binary")])
def test_bad_facts_files(tmp_path, content, message):
    path = tmp_path / "facts.txt"
    path.write_bytes(content)
    with pytest.raises(LoramemError, match=message):
        facts_from_file(path)
    with pytest.raises(LoramemError, match="no such file"):
        facts_from_file(tmp_path / "missing.txt")
