import os
import sqlite3

import pytest

from loramem.errors import LoramemError
from loramem.store import MANIFEST, ModuleRecord, Store, now

FP = {"architecture": "llama", "weights_sha256": "abc"}


def record(module_id="m1"):
    return ModuleRecord(id=module_id, name=module_id, created_at=now(), base_model="tiny", base_fingerprint=FP,
                        lora_spec={"rank": 4}, train_spec={}, data_hash="h", n_examples=1, train_tokens=10,
                        trainable_params=100, recall=1.0, train_seconds=0.1, stats={})


def staged(store, content=b"weights"):
    folder = store.staging_dir()
    (folder / "adapter_model.safetensors").write_bytes(content)
    return folder


def test_create_commit_list(tmp_path):
    store = Store.create(tmp_path / "mem", "tiny", FP)
    assert Store.open(tmp_path / "mem").base_fingerprint == FP
    store.commit(staged(store), record())
    assert [m.id for m in store.modules()] == ["m1"]
    assert (store.module_dir("m1") / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not list((tmp_path / "mem" / "tmp").iterdir())


def test_create_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        Store.create(tmp_path / "mem", "tiny", FP)
    assert list(tmp_path.iterdir()) == []


def test_commit_failure_leaves_no_row_and_no_module(tmp_path, monkeypatch):
    store = Store.create(tmp_path / "mem", "tiny", FP)
    folder = staged(store)

    def boom(*a):
        raise OSError("crash during rename")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        store.commit(folder, record())
    monkeypatch.undo()
    assert store.modules() == []
    assert not store.module_dir("m1").exists()


def test_sweep_removes_folders_without_a_row(tmp_path):
    store = Store.create(tmp_path / "mem", "tiny", FP)
    store.commit(staged(store), record("kept"))
    orphan = store.module_dir("orphan")
    orphan.mkdir()  # as if killed between rename and the manifest commit
    leftover = staged(store)
    store.sweep()
    assert not orphan.exists() and not leftover.exists()
    assert [m.id for m in store.modules()] == ["kept"]


def test_duplicate_commit_is_refused_and_cleans_staging(tmp_path):
    store = Store.create(tmp_path / "mem", "tiny", FP)
    store.commit(staged(store), record())
    folder = staged(store)
    with pytest.raises(LoramemError, match="already"):
        store.commit(folder, record())
    assert not folder.exists()


def test_open_refuses_non_memories(tmp_path):
    with pytest.raises(LoramemError, match="no memory"):
        Store.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LoramemError, match="not a loramem memory"):
        Store.open(tmp_path / "plain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoramemError, match="not a loramem memory"):
        Store.create(tmp_path / "file", "tiny", FP)


def test_format_version_is_checked(tmp_path):
    Store.create(tmp_path / "mem", "tiny", FP)
    with sqlite3.connect(tmp_path / "mem" / MANIFEST) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    with pytest.raises(LoramemError, match="format"):
        Store.open(tmp_path / "mem")


def test_get_by_prefix_or_name(tmp_path):
    store = Store.create(tmp_path / "mem", "tiny", FP)
    store.commit(staged(store), record("abc123"))
    assert store.get("abc").id == "abc123"
    with pytest.raises(LoramemError, match="no module"):
        store.get("zzz")


def test_one_writer_at_a_time(tmp_path):
    import subprocess
    import sys

    from loramem.store import writer_lock

    target = tmp_path / "m.mem"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from loramem.store import writer_lock\n"
        f"with writer_lock({str(target)!r}):\n    print('locked', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LoramemError, match=f"being written by process {holder.pid}"):
            with writer_lock(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(target):  # released when its holder died
        pass
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock


def test_a_modules_examples_and_documents_are_written_beside_it_and_read_back(tmp_path):
    from loramem.corpus import Document
    from loramem.examples import Example
    from loramem.store import write_module_files

    store = Store.create(tmp_path / "mem", "tiny", FP)
    examples = [Example("Question: Who? Answer:", " Ann Lée"), Example("", "A plain text.")]
    documents = [Document.from_text("Ann Lée wrote it.", path="notes.md", title="notes", meta={"format": "md"})]
    with_documents, facts_only = staged(store), staged(store)
    write_module_files(with_documents, examples, documents)
    write_module_files(facts_only, examples, [])
    assert "Lée" in (with_documents / "examples.jsonl").read_text(encoding="utf-8")  # UTF-8 as written
    assert not (facts_only / "documents.jsonl").exists()
    store.commit(with_documents, record("m1"))
    store.commit(facts_only, record("m2"))
    assert store.examples("m1") == store.examples("m2") == examples
    assert store.documents("m1") == documents and store.documents("m2") == []
    (store.module_dir("m1") / "documents.jsonl").unlink()  # a committed module's documents are read once
    assert store.documents("m1") == documents and Store.open(store.path).documents("m1") == []


def test_retired_modules_leave_the_manifest_at_once_and_their_folders_at_compact(tmp_path):
    store = Store.create(tmp_path / "mem", "tiny", FP)
    for i in ("a", "b"):
        store.commit(staged(store, b"x" * 10), record(i))
    store.retire(["a"], "forgotten")
    assert [m.id for m in store.modules()] == ["b"] and store.retired() == ["a"]
    store.sweep()  # a writer's sweep keeps a retired folder: a reader may still be answering with it
    assert store.module_dir("a").is_dir()
    assert store.compact() == (1, 10)
    assert not store.module_dir("a").exists() and store.retired() == [] and store.compact() == (0, 0)
    with pytest.raises(LoramemError, match="no module 'a' to retire"):
        store.retire(["b", "a"], "forgotten")
    assert [m.id for m in store.modules()] == ["b"]  # one transaction: b stays too
    assert store.retire(["a", "b"], "forgotten", missing_ok=True) == ["b"]  # a, retired already, is skipped
    assert store.modules() == [] and sorted(store.retired()) == ["b"]


def test_a_commit_retires_the_modules_it_replaces_in_the_same_transaction(tmp_path, monkeypatch):
    store = Store.create(tmp_path / "mem", "tiny", FP)
    store.commit(staged(store), record("old"))

    def boom(*a):
        raise OSError("crash during rename")

    folder = staged(store)
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        store.commit(folder, record("new"), retire=["old"])
    monkeypatch.undo()
    assert [m.id for m in store.modules()] == ["old"] and store.retired() == []  # neither happened
    store.commit(staged(store), record("new"), retire=["old"])
    assert [m.id for m in store.modules()] == ["new"] and store.retired() == ["old"]
    store.retire(["new"], "forgotten")
    store.commit(staged(store), record("new"))  # written again before a compact: back, no longer retired
    assert [m.id for m in store.modules()] == ["new"] and store.retired() == ["old"]


def test_memories_made_before_the_retired_table_read_and_retire(tmp_path):
    store = Store.create(tmp_path / "mem", "tiny", FP)
    store.commit(staged(store), record("a"))
    with sqlite3.connect(tmp_path / "mem" / MANIFEST) as db:
        db.execute("DROP TABLE retired")
    db.close()
    assert store.retired() == []
    store.sweep()
    store.retire(["a"], "forgotten")
    assert store.retired() == ["a"]
