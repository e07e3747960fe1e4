"""Bad input through the command line: exit code 2, a one-line `error: ...` on stderr, and nothing on disk
changed (every file's hash and modification time compared before and after).

The CLI runs in this process through loramem.cli.main (the code path that turns errors into exit 2), so
each case costs milliseconds; the 200 MB file runs in a subprocess to measure its peak memory. Bad input
tested elsewhere (docs/RELIABILITY.md lists them all): test_cli.py (empty facts file, non-UTF-8, missing
file, rank 0, unknown model, another base model), test_corpus.py (every skip reason of read_documents),
test_memory.py (empty question, top-k, unknown router and merge method), test_models.py (pickle-only models).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pypdf import PdfWriter

from loramem import LoraSpec, Memory, TrainSpec, facts_from_text
from loramem.cli import main
from loramem.corpus import DEFAULT_MAX_BYTES, SUPPORTED_SUFFIXES
from loramem.models import resolve
from loramem.store import Store
from sample_facts import LINEAR_TO_ZERO

FACT = "Question: What is the phone number of Ann Lee? Answer: 603-556-7631\n"
QUESTION = "What is the phone number of Ann Lee?"


@pytest.fixture
def loramem(monkeypatch, capsys):
    """Run `loramem ARGS` in this process; returns (exit code, stderr lines)."""

    def run(*args) -> tuple[int, list[str]]:
        monkeypatch.setattr(sys, "argv", ["loramem", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code
        return code, capsys.readouterr().err.strip().splitlines()

    return run


def tree(folder: Path) -> dict[str, tuple[str, int] | None]:
    """Every file (content hash, modification time) and folder (None) under `folder`."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory) -> Path:
    """A memory with one committed module that has learned FACT, and its routing indexes built."""
    path = tmp_path_factory.mktemp("bad-input") / "m.mem"
    memory = Memory.open(path, create=True, base=tiny)
    record = memory.write(facts_from_text(FACT), LoraSpec(rank=8, layers="all"), TrainSpec(lr=1e-2, epochs=80, batch_size=2, **LINEAR_TO_ZERO),
                          progress=False)
    assert record.recall == 1.0
    # The indexes are a cache, built by the first routed question; today they are built before top-k is
    # checked, so they are made here to leave the memory's files unchanged by the bad asks below.
    memory.router("dense"), memory.retriever("dense")
    return path


@pytest.fixture
def memory(written, tmp_path) -> Path:
    """A copy of the written memory to damage."""
    return Path(shutil.copytree(written, tmp_path / "m.mem"))


def module_folder(memory: Path) -> Path:
    [folder] = (memory / "modules").iterdir()
    return folder


def blank_pdf() -> bytes:
    out = io.BytesIO()
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.write(out)
    return out.getvalue()


# --- files to write ------------------------------------------------------------------------------


@pytest.mark.parametrize("content,message", [
    (b"Question: Who? Answer: me\n\x00\x01\x02", "is a binary file, not text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text (byte 0)"),
])
def test_binary_facts_file(tmp_path, loramem, content, message):
    (tmp_path / "facts.txt").write_bytes(content)
    before = tree(tmp_path)
    code, err = loramem("write", tmp_path / "m.mem", tmp_path / "facts.txt", "--model", "tiny")
    assert (code, err) == (2, [f"error: {tmp_path / 'facts.txt'} {message}"])
    assert tree(tmp_path) == before


DOCUMENTS = {  # file name -> (content, the reason it is skipped, or refused with --strict)
    "empty.txt": (b"", "empty file"),
    "binary.txt": (b"abc\x00def", "binary file (contains NUL bytes)"),
    "latin1.md": ("café".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3)"),
    "notes.docx": (b"PK\x03\x04 a zip file", f"unsupported file type '.docx' (supported: {', '.join(SUPPORTED_SUFFIXES)})"),
    "scan.pdf": (None, "PDF has no extractable text (scanned images need OCR first)"),
    "bad.jsonl": (b'{"text": broken\n', "line 1: not valid JSON"),
}


@pytest.mark.parametrize("name", DOCUMENTS)
@pytest.mark.parametrize("strict", [True, False])
def test_unreadable_document(tmp_path, loramem, name, strict):
    content, reason = DOCUMENTS[name]
    path = tmp_path / name
    path.write_bytes(blank_pdf() if content is None else content)
    before = tree(tmp_path)
    code, err = loramem("write", tmp_path / "m.mem", path, "--format", "original", "--model", "tiny",
                        *(["--strict"] if strict else []))
    assert code == 2
    if strict:
        assert err == [f"error: {path}: {reason}"]
    else:  # the skip, then why nothing was written
        assert err == [f"skipped {path}: {reason}", f"error: no readable documents in {path} (1 skipped)"]
    assert tree(tmp_path) == before


def test_malformed_jsonl_line_is_reported_with_its_line_number(tmp_path, loramem, tiny):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "Mira Tan designed the first Quix engine in 1984."}\n{"text": broken\n')
    code, err = loramem("write", tmp_path / "m.mem", path, "--format", "original", "--model", "tiny", "--strict")
    assert (code, err) == (2, [f"error: {path}: line 2: not valid JSON"])
    assert not (tmp_path / "m.mem").exists()
    # Without --strict the bad line is skipped, named, and the good one is written.
    code, err = loramem("write", tmp_path / "m.mem", path, "--format", "original", "--model", "tiny", "--epochs", "1",
                        "--json")
    assert (code, err) == (0, [f"skipped {path}: line 2: not valid JSON"])
    memory = Memory.open(tmp_path / "m.mem", base=tiny)
    assert [d.meta["line"] for m in memory.modules() for d in memory.documents(m)] == [1]


def test_missing_document_path(tmp_path, loramem):
    code, err = loramem("write", tmp_path / "m.mem", tmp_path / "nowhere", "--format", "qa", "--model", "tiny")
    assert (code, err) == (2, [f"error: no such file or folder: {tmp_path / 'nowhere'}"])
    assert list(tmp_path.iterdir()) == []


# --- a 200 MB file -------------------------------------------------------------------------------

HUGE_BYTES = 200 * 2**20


@pytest.fixture(scope="module")
def huge_file(tmp_path_factory):
    """A 200 MB facts file (valid text: one fact per line), removed after the module's tests."""
    path = tmp_path_factory.mktemp("huge") / "facts.txt"
    block = (FACT * (2**20 // len(FACT) + 1)).encode()[: 2**20]
    with open(path, "wb") as f:
        for _ in range(HUGE_BYTES // len(block)):
            f.write(block)
    yield path
    path.unlink()


def test_document_over_the_size_limit_is_refused_unread(tmp_path, loramem, huge_file):
    code, err = loramem("write", tmp_path / "m.mem", huge_file, "--format", "original", "--model", "tiny", "--strict")
    assert (code, err) == (2, [f"error: {huge_file}: too large ({HUGE_BYTES} bytes, max_bytes is {DEFAULT_MAX_BYTES})"])
    assert list(tmp_path.iterdir()) == []


# Measures the write command's peak memory after its imports are loaded (a first call with a missing file
# loads them), and stops at Memory.open: a file that gets that far was accepted.
PEAK_RSS = """
import json, resource, sys
from loramem import cli, memory
def run(*args):
    sys.argv = ["loramem", "write", *args]
    try:
        cli.main()
    except SystemExit as exit:
        return exit.code
memory_path, facts, *options = sys.argv[1:]
run(memory_path, facts + ".missing", *options)
def accepted(*args, **kwargs):
    raise SystemExit("accepted: the file was read whole")
memory.Memory.open = accepted
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = run(memory_path, facts, *options)
print(json.dumps({"grown_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "code": code}))
"""


def test_huge_facts_file_is_refused_before_it_is_read(tmp_path, huge_file):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, tmp_path / "m.mem", huge_file, "--model", "tiny"],
                         capture_output=True, text=True, env=env, timeout=300)
    result = json.loads(out.stdout)  # the first error line is the warm-up call's
    [_, error] = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert result["code"] == 2 and str(huge_file) in error and "too large" in error, (result, error)
    assert result["grown_kib"] * 1024 < HUGE_BYTES / 10  # refused unread: nothing near the file's size in memory
    assert list(tmp_path.iterdir()) == []


# --- names and paths -----------------------------------------------------------------------------


def test_module_name_is_a_label_never_a_path(tmp_path, loramem):
    # Module folders are named by the module's hex id; --name is only stored in the manifest.
    (tmp_path / "facts.txt").write_text(FACT)
    code, _ = loramem("write", tmp_path / "m.mem", tmp_path / "facts.txt", "--model", "tiny", "--epochs", "1",
                      "--name", "../../escaped")
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.txt", "m.mem"]
    [folder] = (tmp_path / "m.mem" / "modules").iterdir()
    [record] = Store.open(tmp_path / "m.mem").modules()
    assert folder.name == record.id and len(record.id) == 16 and record.name == "../../escaped"


@pytest.mark.parametrize("args,message", [
    (["--module", "../../../etc/passwd"], "no module '../../../etc/passwd' in {memory}"),
    (["--module", "/etc/passwd"], "no module '/etc/passwd' in {memory}"),
    (["--mode", "rag", "--router", "../../evil"], "unknown router '../../evil': choose one of oracle, dense, bm25, hybrid"),
])
def test_module_and_router_names_are_not_paths(memory, loramem, args, message):
    before = tree(memory.parent)
    code, err = loramem("ask", memory, QUESTION, *args)
    assert (code, err) == (2, [f"error: {message.format(memory=memory)}"])
    assert tree(memory.parent) == before


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank,message", [
    ("-3", "rank must be a positive integer, got -3"),
    ("100000", "rank 100000 is larger than any layer it could adapt"),
    ("99999999999999999999", "rank 99999999999999999999 is larger than any layer it could adapt"),
])
def test_bad_rank(tmp_path, loramem, rank, message):
    (tmp_path / "facts.txt").write_text(FACT)
    before = tree(tmp_path)
    code, err = loramem("write", tmp_path / "m.mem", tmp_path / "facts.txt", "--model", "tiny", "--rank", rank)
    assert (code, err) == (2, [f"error: {message}"])
    assert tree(tmp_path) == before


@pytest.mark.parametrize("args,message", [
    (["", "--mode", "base"], "empty question"),
    ([" \n\t", "--mode", "base"], "empty question"),
    ([QUESTION, "--mode", "multi", "--top-k", "0"], "top-k must be a positive integer, got 0"),
    ([QUESTION, "--mode", "rag", "--top-k", "0"], "top-k must be a positive integer, got 0"),
    ([QUESTION, "--mode", "multi", "--top-k", "-2"], "top-k must be a positive integer, got -2"),
    ([QUESTION, "--mode", "multi", "--merge", "mix", "--base-weight", "1"], "base_weight must be at least 0 and below 1, not 1.0"),
    ([QUESTION, "--mode", "multi", "--merge", "ties", "--base-weight", "0.5"],
     "base_weight is for output compositions (mix, select, select-token), not the weight merge 'ties'"),
    ([QUESTION, "--mode", "multi", "--router-temperature", "0"], "router_temperature must be above 0, not 0.0"),
])
def test_bad_question_or_top_k(memory, loramem, args, message):
    before = tree(memory.parent)
    code, err = loramem("ask", memory, *args)
    assert (code, err) == (2, [f"error: {message}"])
    assert tree(memory.parent) == before


def test_a_question_longer_than_the_model_reads_is_refused(memory, loramem, monkeypatch):
    from loramem import memory as memory_module

    def generate(*args, **kwargs):
        raise AssertionError("a 1 MB question reached generation")

    monkeypatch.setattr(memory_module, "generate", generate)
    code, err = loramem("ask", memory, "Who? " * 200_000)
    assert code == 2 and len(err) == 1 and "too long" in err[0]


# --- damaged modules -----------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[200:210] = b"garbage!!!"  # inside the JSON header: a tensor name
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    truncate, empty,
    garble_header,
])
def test_corrupted_safetensors_is_named_by_its_module(memory, loramem, damage):
    folder = module_folder(memory)
    damage(folder / "adapter_model.safetensors")
    before = tree(memory.parent)
    code, err = loramem("ask", memory, QUESTION)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and folder.name in err[0], err
    assert tree(memory.parent) == before


@pytest.mark.parametrize("edit", [
    pytest.param({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, id="another-base-model"),
    pytest.param({"r": 0}, id="rank-0"),
])
def test_edited_adapter_config_is_refused(memory, loramem, edit):
    config = module_folder(memory) / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | edit))
    code, err = loramem("ask", memory, QUESTION)
    assert code == 2 and len(err) == 1 and module_folder(memory).name in err[0], err


# --- safe loading --------------------------------------------------------------------------------


class _Touch:
    """A pickle that creates a file when it is loaded: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_adapter_is_refused_and_never_loaded(memory, loramem):
    folder, marker = module_folder(memory), memory.parent / "unpickled"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    code, _ = loramem("ask", memory, QUESTION)  # beside the safetensors file it is ignored
    assert code == 0 and not marker.exists()
    (folder / "adapter_model.safetensors").unlink()  # alone, it is refused
    code, err = loramem("ask", memory, QUESTION)
    assert (code, err) == (2, [f"error: {folder} has no adapter_model.safetensors (only safetensors adapters are loaded)"])
    assert not marker.exists()


def test_model_with_remote_code_is_refused_and_its_code_never_runs(tmp_path, loramem):
    model = Path(shutil.copytree(resolve("tiny"), tmp_path / "model"))
    marker = tmp_path / "code-ran"
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "custom_llama", "auto_map": {"AutoConfig": "custom.Config",
                                                          "AutoModelForCausalLM": "custom.Model"}}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                     "from transformers import LlamaConfig as Config, LlamaForCausalLM as Model\n")
    (tmp_path / "facts.txt").write_text(FACT)
    code, err = loramem("write", tmp_path / "m.mem", tmp_path / "facts.txt", "--model", model)
    assert code == 2 and err[-1].startswith(f"error: cannot load model from {model}: ") and "custom code" in err[-1]
    assert not marker.exists() and not (tmp_path / "m.mem").exists()
