"""Documents and facts files in, token-based chunks out.

`read_documents` turns files and folders into plain-text Documents and lists the files (or JSONL
lines) it skipped with the reason, so one bad file in a folder of notes does not stop ingestion;
strict=True makes the first such problem an error instead. `chunk_text` cuts a text into
overlapping windows of the model's own tokens, so a chunk's size is exact in training, and each
chunk is an exact slice of the text, so it can be traced back to where it came from. A facts file
(`facts_from_file`) is read whole into training examples, one fact per line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

from loramem.errors import LoramemError
from loramem.examples import Example

SUPPORTED_SUFFIXES = (".htm", ".html", ".jsonl", ".md", ".pdf", ".txt")
DEFAULT_MAX_BYTES = 100_000_000
# Elements whose content a browser does not show as text.
_HIDDEN_HTML = ("script", "style", "noscript", "template")
# An ATX level-1 heading; an optional closing run of '#' is not part of the title.
_MD_TITLE_RE = re.compile(r"^# +(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)

_Report = Callable[[str, str], None]  # (where, reason): record a skip or raise in strict mode


@dataclass
class Document:
    """One text to memorise, with where it came from.

    id:    first 16 hex digits of the SHA-256 of the text, so the same text always gets the same id
           wherever it is read from (and re-reading a folder does not duplicate documents).
    path:  the file it was read from, as given (None for text that did not come from a file).
    title: the Markdown '# ' heading, the HTML <title> or PDF title, a JSONL record's "title",
           else the file name without extension.
    meta:  "format" (txt, md, html, pdf, jsonl); "pages" for PDFs; for JSONL the record's other
           fields plus "line", its line number.
    """

    id: str
    text: str
    path: str | None = None
    title: str | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_text(
        cls, text: str, path: str | None = None, title: str | None = None, meta: dict | None = None
    ) -> Document:
        return cls(content_id(text), text, path, title, dict(meta or {}))


@dataclass
class Chunk:
    """A window of at most chunk_tokens tokens; text == document.text[start_char:end_char]."""

    doc_id: str
    index: int
    text: str
    start_char: int
    end_char: int
    n_tokens: int


def content_id(text: str) -> str:
    """Stable content hash (surrogatepass: JSON escapes can yield lone surrogates, which must not crash)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class _Skip(Exception):
    """A file or record that cannot become a document; the message is the one-line reason."""


# --- reading -------------------------------------------------------------------------------------


def read_documents(
    paths: str | Path | Iterable[str | Path],
    strict: bool = False,
    *,
    text_field: str = "text",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[list[Document], list[tuple[str, str]]]:
    """Read files and folders (recursively, in sorted order) into documents.

    Returns the documents and the (path, reason) pairs of what was skipped: unsupported, empty,
    binary, non-UTF-8, too large (over max_bytes) or unreadable files, PDFs without text, bad JSONL
    lines (reason "line N: ...") and texts already read (duplicates keep the first). With strict=True the
    first skip raises LoramemError("<path>: <reason>") instead. A path that does not exist always
    raises, since that is a typo rather than a bad file among good ones.
    """
    if max_bytes <= 0:
        raise LoramemError(f"max_bytes must be positive, got {max_bytes}")
    documents: list[Document] = []
    skipped: list[tuple[str, str]] = []
    first_seen: dict[str, str] = {}  # document id -> where its text was first read

    def skip(where: str, reason: str) -> None:
        if strict:
            raise LoramemError(f"{where}: {reason}")
        skipped.append((where, reason))

    for path in _expand(paths):
        try:
            docs = _read_file(path, text_field, max_bytes, skip)
        except _Skip as problem:
            skip(str(path), str(problem))
            continue
        except OSError as error:
            skip(str(path), f"cannot read: {error.strerror or error}")
            continue
        for doc in docs:
            if doc.id in first_seen:
                skip(str(path), f"{_line_prefix(doc)}same text as {first_seen[doc.id]}")
                continue
            first_seen[doc.id] = _location(doc)
            documents.append(doc)
    return documents, skipped


def _expand(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The files to read: files as given, folders expanded; a missing path is an error."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise LoramemError(f"no such file or folder: {raw}")
        files.extend(_walk(path) if path.is_dir() else [path])
    return files


def _walk(folder: Path) -> list[Path]:
    """A folder's files, recursively and sorted; hidden files and folders (.git, .DS_Store) are left out."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found.extend(Path(root, name) for name in files if not name.startswith("."))
    return sorted(found)


def _location(doc: Document) -> str:
    return f"{doc.path} line {doc.meta['line']}" if doc.meta.get("format") == "jsonl" else str(doc.path)


def _line_prefix(doc: Document) -> str:
    return f"line {doc.meta['line']}: " if doc.meta.get("format") == "jsonl" else ""


def _read_file(path: Path, text_field: str, max_bytes: int, skip: _Report) -> list[Document]:
    """The file's documents (several for JSONL); cheap checks first, so a bad file is not read."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise _Skip("not a regular file" if path.exists() else "broken link")
    if suffix not in SUPPORTED_SUFFIXES:
        kind = f"'{path.suffix}'" if path.suffix else "without extension"
        raise _Skip(f"unsupported file type {kind} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    size = path.stat().st_size
    if size == 0:
        raise _Skip("empty file")
    if size > max_bytes:
        raise _Skip(f"too large ({size} bytes, max_bytes is {max_bytes})")
    if suffix == ".pdf":
        return [_read_pdf(path)]
    data = path.read_bytes()
    if b"\x00" in data:
        raise _Skip("binary file (contains NUL bytes)")
    if suffix == ".jsonl":
        return _read_jsonl(path, data, text_field, skip)
    text = _decode(data)
    if suffix in (".html", ".htm"):
        return [_from_html(text, path)]
    title = _markdown_title(text) if suffix == ".md" else None
    return [_plain_document(text, path, title, format=suffix[1:])]


def _decode(data: bytes) -> str:
    """Strict UTF-8 (a BOM dropped, CRLF made LF so a file's id does not depend on the platform).

    Guessing another encoding would silently store mojibake, so other encodings are refused.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _Skip(f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})") from None
    return text.replace("\r\n", "\n")


def _plain_document(text: str, path: Path, title: str | None, **meta: object) -> Document:
    if not text.strip():
        raise _Skip("only whitespace")
    return Document.from_text(text, str(path), title or path.stem, meta)


def _markdown_title(text: str) -> str | None:
    match = _MD_TITLE_RE.search(text)
    return match.group(1).strip() if match else None


def _from_html(html: str, path: Path) -> Document:
    """The page's visible text, one block per line (BeautifulSoup with the stdlib parser)."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = " ".join(soup.title.get_text().split()) if soup.title else ""
    for element in soup(_HIDDEN_HTML):
        element.decompose()
    text = _tidy(soup.get_text(separator="\n"))
    if not text:
        raise _Skip("no text after removing the HTML markup")
    return Document.from_text(text, str(path), title or path.stem, {"format": "html"})


def _tidy(text: str) -> str:
    """Collapse the whitespace that markup leaves behind: spaces within lines, runs of blank lines."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read_pdf(path: Path) -> Document:
    """The text layer of every page (pypdf); a PDF of scanned images has none and is skipped."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            reader.decrypt("")  # many PDFs are "encrypted" with an empty password
        pages = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except Exception as error:  # pypdf raises many types on damaged files: bad input, not a bug
        raise _Skip(f"unreadable PDF ({_one_line(error)})") from None
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise _Skip("PDF has no extractable text (scanned images need OCR first)")
    meta = {"format": "pdf", "pages": len(pages)}
    return Document.from_text(text, str(path), (title or "").strip() or path.stem, meta)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_jsonl(path: Path, data: bytes, text_field: str, skip: _Report) -> list[Document]:
    """One document per record; a bad line is skipped on its own, named by its line number."""
    documents: list[Document] = []
    n_bad = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            documents.append(_jsonl_record(raw, text_field, path, number))
        except _Skip as problem:
            n_bad += 1
            skip(str(path), f"line {number}: {problem}")
    if not documents and not n_bad:
        raise _Skip("no records")
    return documents


def _jsonl_record(raw: bytes, text_field: str, path: Path, number: int) -> Document:
    try:
        record = json.loads(_decode(raw))
    except json.JSONDecodeError:
        raise _Skip("not valid JSON") from None
    if not isinstance(record, dict):
        raise _Skip("not a JSON object")
    text = record.get(text_field)
    if not isinstance(text, str):
        raise _Skip(f"no string field '{text_field}'")
    if not text.strip():
        raise _Skip(f"field '{text_field}' is empty")
    title = record.get("title")
    title = title.strip() if isinstance(title, str) and title.strip() else path.stem
    meta = {key: value for key, value in record.items() if key != text_field}
    return Document.from_text(text, str(path), title, {**meta, "format": "jsonl", "line": number})


# --- facts files ---------------------------------------------------------------------------------

MAX_FACTS_BYTES = 100_000_000  # as DEFAULT_MAX_BYTES for documents


def facts_from_text(text: str, source: str = "text") -> list[Example]:
    """One fact per non-empty line; "Question: ... Answer: ..." lines are split into prompt and answer."""
    examples = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, tail = line.rpartition(" Answer:")
        if sep and head.startswith("Question:") and tail.strip():
            examples.append(Example(f"{head} Answer:", tail))
        else:
            examples.append(Example("", line))
    if not examples:
        raise LoramemError(f"{source} has no facts (it is empty)")
    return examples


def facts_from_file(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise LoramemError(f"no such file: {path}")
    size = path.stat().st_size
    if size > MAX_FACTS_BYTES:  # read whole and trained into one module: refuse before reading
        raise LoramemError(f"{path} is too large ({size} bytes; a facts file is read whole, at most {MAX_FACTS_BYTES})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise LoramemError(f"{path} is not UTF-8 text (byte {err.start})") from None
    if "\x00" in text:
        raise LoramemError(f"{path} is a binary file, not text")
    return facts_from_text(text, str(path))


# --- chunking ------------------------------------------------------------------------------------


def chunk_text(
    text: str, tokenizer, chunk_tokens: int = 512, overlap: int = 64, *, doc_id: str = ""
) -> list[Chunk]:
    """Cut text into windows of chunk_tokens tokens, consecutive windows sharing `overlap` tokens.

    Chunk i runs from the first character of its first token to the first character of the token
    after its last one (the first chunk from 0, the last to the end of the text), so the chunks
    cover every character and whitespace between tokens goes with the token before it. A chunk
    always holds every character its tokens touch: when a window ends inside a character (byte-level
    tokens split an emoji into several), that character is in both chunks, and no chunk is empty.
    The tokenizer must be a fast (Rust) Hugging Face tokenizer, which reports character offsets.
    A text without tokens gives no chunks.
    """
    _check_window(chunk_tokens, overlap)
    starts, ends = _token_spans(text, tokenizer)
    chunks: list[Chunk] = []
    first = 0
    while first < len(starts):
        stop = min(first + chunk_tokens, len(starts))
        start_char = starts[first] if chunks else 0
        # max: a window ending inside a character would otherwise stop before that character starts.
        end_char = max(starts[stop], ends[stop - 1]) if stop < len(starts) else len(text)
        piece = text[start_char:end_char]
        chunks.append(Chunk(doc_id, len(chunks), piece, start_char, end_char, stop - first))
        if stop == len(starts):
            break
        first += chunk_tokens - overlap
    return chunks


def chunk_documents(
    docs: Iterable[Document], tokenizer, chunk_tokens: int = 512, overlap: int = 64
) -> list[Chunk]:
    """chunk_text for each document, chunks labelled with the document's id."""
    _check_window(chunk_tokens, overlap)
    return [
        chunk
        for doc in docs
        for chunk in chunk_text(doc.text, tokenizer, chunk_tokens, overlap, doc_id=doc.id)
    ]


def _check_window(chunk_tokens: int, overlap: int) -> None:
    if chunk_tokens <= 0:
        raise LoramemError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise LoramemError(
            f"overlap must be at least 0 and less than chunk_tokens ({chunk_tokens}), got {overlap}"
        )


def _token_spans(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Each token's first character and the character after its last; both made non-decreasing so chunk
    spans can never go backwards."""
    if not getattr(tokenizer, "is_fast", False):
        raise LoramemError(f"chunking needs a fast tokenizer with offsets, got {type(tokenizer).__name__}")
    # verbose=False: a long document is expected to exceed the model's context; no warning wanted.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoding["offset_mapping"]
    return list(accumulate((start for start, _ in offsets), max)), list(accumulate((end for _, end in offsets), max))
