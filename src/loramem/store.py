"""A memory on disk: an SQLite manifest plus one standard PEFT adapter folder per module.

    MEMORY/
      loramem.sqlite         manifest: the base model, and one row per committed module
      modules/<id>/          adapter_config.json, adapter_model.safetensors, examples.jsonl (the facts as given)
                             (+ documents.jsonl: the documents it was written from, for icl and routing)
      tmp/                   modules being written (never read)
      index/                 routing and retrieval indexes, one per module set (route.IndexCache)

The manifest is the truth: a module exists when its row exists. A commit writes the adapter into
tmp/, renames it into modules/ and inserts the row in one transaction; a crash at any point leaves
either no row (the folder is swept at the next open) or a complete module. A new memory is built
under a temporary name and renamed into place, so a half-created memory is never visible either.

Forgetting is a commit too: a module's row moves to the `retired` table in one transaction (with the row of the
module that replaces it, when a changed document is written again), so readers see the old set or the new one.
A retired module's folder stays until `compact` deletes it: a reader that listed the module a moment before
can still finish its answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import tempfile
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from loramem.corpus import Document
from loramem.errors import LoramemError
from loramem.examples import Example

MANIFEST = "loramem.sqlite"
FORMAT_VERSION = "1"
EXAMPLES_FILE = "examples.jsonl"
DOCUMENTS_FILE = "documents.jsonl"  # the documents a module was written from: ICL context and routing keys
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE modules (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    base_model TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    lora_spec TEXT NOT NULL,
    train_spec TEXT NOT NULL,
    data_hash TEXT NOT NULL,
    n_examples INTEGER NOT NULL,
    train_tokens INTEGER NOT NULL,
    trainable_params INTEGER NOT NULL,
    recall REAL,
    train_seconds REAL,
    stats TEXT NOT NULL
);
"""
RETIRED = """CREATE TABLE IF NOT EXISTS retired (id TEXT PRIMARY KEY, name TEXT NOT NULL, retired_at TEXT NOT NULL,
    reason TEXT NOT NULL)"""


@dataclass
class ModuleRecord:
    """One manifest row."""

    id: str
    name: str
    created_at: str
    base_model: str
    base_fingerprint: dict
    lora_spec: dict
    train_spec: dict
    data_hash: str
    n_examples: int
    train_tokens: int
    trainable_params: int
    recall: float | None
    train_seconds: float | None
    stats: dict


class Store:
    """The on-disk side of a memory: create, open, commit, list, locate."""

    def __init__(self, path: Path):
        self.path = path
        self._documents: dict[str, list[dict]] = {}  # module id -> its documents.jsonl rows (a module never changes)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        path = Path(path)
        if not path.exists():
            raise LoramemError(f"no memory at {path}")
        if not (path / MANIFEST).is_file():
            raise LoramemError(f"{path} is not a loramem memory (no {MANIFEST})")
        store = cls(path)
        version = store.meta().get("format_version")
        if version != FORMAT_VERSION:
            raise LoramemError(f"{path} has memory format {version!r}; this loramem reads {FORMAT_VERSION!r}")
        return store

    @classmethod
    def create(cls, path: str | Path, base_model: str, base_fingerprint: dict, settings: dict | None = None) -> Store:
        """Create an empty memory bound to one base model (and memory-wide `settings`), atomically."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise LoramemError(f"{path} exists and is not a loramem memory")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            with sqlite3.connect(tmp / MANIFEST) as db:
                db.executescript(SCHEMA)
                db.execute(RETIRED)
                db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("format_version", FORMAT_VERSION),
                    ("base_model", base_model),
                    ("base_fingerprint", json.dumps(base_fingerprint, sort_keys=True)),
                    ("created_at", now()),
                    *sorted((settings or {}).items()),
                ])
            db.close()
            (tmp / "modules").mkdir()
            if path.exists():
                path.rmdir()  # an empty folder the user made for it
            os.rename(tmp, path)
            _fsync(path.parent)  # the rename itself survives a power cut
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path / MANIFEST, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def meta(self) -> dict[str, str]:
        with self._connect() as db:
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
        db.close()
        return rows

    @property
    def base_model(self) -> str:
        return self.meta()["base_model"]

    @property
    def base_fingerprint(self) -> dict:
        return json.loads(self.meta()["base_fingerprint"])

    def modules(self) -> list[ModuleRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM modules ORDER BY rowid").fetchall()  # commit order
        db.close()
        return [_record(row) for row in rows]

    def get(self, module_id: str) -> ModuleRecord:
        matches = [m for m in self.modules() if m.id == module_id or m.id.startswith(module_id) or m.name == module_id]
        if len(matches) != 1:
            raise LoramemError(f"no module {module_id!r} in {self.path}" if not matches
                               else f"{module_id!r} matches {len(matches)} modules; give more of the id")
        return matches[0]

    def has(self, module_id: str) -> bool:
        with self._connect() as db:
            found = db.execute("SELECT 1 FROM modules WHERE id = ?", (module_id,)).fetchone()
        db.close()
        return found is not None

    def module_dir(self, module_id: str) -> Path:
        return self.path / "modules" / module_id

    def examples(self, module_id: str) -> list[Example]:
        """The examples a module was trained on, as they were given (plain prompts, whatever the prompt style)."""
        return [Example(**row) for row in _read_jsonl(self.module_dir(module_id) / EXAMPLES_FILE)]

    def documents(self, module_id: str) -> list[Document]:
        """The documents a module was written from (none for modules written from facts)."""
        rows = self._documents.get(module_id)
        if rows is None:  # read once: writing a folder checks every module's documents for each document written
            rows = _read_jsonl(self.module_dir(module_id) / DOCUMENTS_FILE)
            if self.module_dir(module_id).is_dir():  # committed: its files are final
                self._documents[module_id] = rows
        return [Document(**row) for row in rows]

    def sources(self) -> list[dict]:
        """Every document the modules were written from: path, id (its content hash), title, and the modules
        written from it with their dates."""
        rows: dict[tuple, dict] = {}
        for m in self.modules():
            for d in self.documents(m.id):
                row = rows.setdefault((d.path, d.id), {"path": d.path, "id": d.id, "title": d.title, "modules": []})
                row["modules"].append({"id": m.id, "name": m.name, "created_at": m.created_at})
        return list(rows.values())

    def size(self, module_id: str) -> int:
        """Bytes on disk of a module's folder."""
        return _size(self.module_dir(module_id))

    def staging_dir(self) -> Path:
        """A fresh folder under tmp/ to write a module into before commit."""
        tmp = self.path / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, staged: Path, record: ModuleRecord, retire: list[str] = ()) -> None:
        """Move a fully written module folder into place and add its manifest row, atomically; the modules in
        `retire` (those it replaces) leave the manifest in the same transaction."""
        target = self.module_dir(record.id)
        for file in staged.rglob("*"):  # on disk before the row that lists them (a power cut, not just a kill)
            if file.is_file():
                _fsync(file)
        db = self._connect()
        try:
            with db:  # one transaction: the row becomes visible only if the rename succeeded
                db.execute(RETIRED)
                db.execute("DELETE FROM retired WHERE id = ?", (record.id,))  # written again before a compact
                _retire(db, retire, f"replaced by {record.id}", missing_ok=True)  # already gone: nothing to do
                db.execute(
                    "INSERT INTO modules VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (record.id, record.name, record.created_at, record.base_model,
                     json.dumps(record.base_fingerprint, sort_keys=True), json.dumps(record.lora_spec),
                     json.dumps(record.train_spec), record.data_hash, record.n_examples, record.train_tokens,
                     record.trainable_params, record.recall, record.train_seconds, json.dumps(record.stats)),
                )
                if target.exists():  # left by a crash between rename and commit: no row, so not a module
                    shutil.rmtree(target)
                os.rename(staged, target)
                _fsync(target.parent)
        except sqlite3.IntegrityError:
            shutil.rmtree(staged, ignore_errors=True)
            raise LoramemError(f"module {record.id} is already in {self.path}") from None
        finally:
            db.close()

    def retire(self, module_ids: list[str], reason: str, missing_ok: bool = False) -> list[str]:
        """Take modules out of the manifest in one transaction (their folders stay until `compact`); returns the ids
        retired. A module not in the manifest is an error, or with `missing_ok` (retired meanwhile) skipped."""
        db = self._connect()
        try:
            with db:
                db.execute(RETIRED)
                return _retire(db, module_ids, reason, missing_ok)
        finally:
            db.close()

    def retired(self) -> list[str]:
        with self._connect() as db:
            found = db.execute("SELECT name FROM sqlite_master WHERE name = 'retired'").fetchone()
            ids = [row[0] for row in db.execute("SELECT id FROM retired")] if found else []
        db.close()
        return ids

    def compact(self) -> tuple[int, int]:
        """Writers only: delete the retired modules' folders; returns (folders deleted, bytes freed)."""
        ids = self.retired()
        freed = sum(_size(self.module_dir(i)) for i in ids)
        for module_id in ids:
            shutil.rmtree(self.module_dir(module_id), ignore_errors=True)
        db = self._connect()
        try:
            with db:
                db.executemany("DELETE FROM retired WHERE id = ?", [(i,) for i in ids])
        finally:
            db.close()
        return len(ids), freed

    def update_stats(self, module_id: str, extra: dict) -> None:
        """Merge `extra` into a committed module's stats (nested dicts merged one level deep), in one transaction."""
        db = self._connect()
        try:
            with db:
                row = db.execute("SELECT stats FROM modules WHERE id = ?", (module_id,)).fetchone()
                if row is None:
                    raise LoramemError(f"no module {module_id!r} in {self.path}")
                stats = json.loads(row[0])
                for key, value in extra.items():
                    merged = stats.get(key)
                    stats[key] = merged | value if isinstance(merged, dict) and isinstance(value, dict) else value
                db.execute("UPDATE modules SET stats = ? WHERE id = ?", (json.dumps(stats), module_id))
        finally:
            db.close()

    def sweep(self) -> None:
        """Writers only: remove what crashed writes left: staging folders and module folders with no manifest row."""
        shutil.rmtree(self.path / "tmp", ignore_errors=True)
        modules = self.path / "modules"
        if not modules.is_dir():
            return
        with self._connect() as db:
            known = {row[0] for row in db.execute("SELECT id FROM modules")}
        db.close()
        known |= set(self.retired())  # kept for readers until compact
        for folder in modules.iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)


def describe(store: Store) -> dict:
    """What `loramem inspect` and the server's page show of a memory: each module (spec, placement, parameters,
    recall on its own data, locality where measured, size on disk) and each document with its modules."""
    modules = [{
        "id": m.id, "name": m.name, "base": m.base_model, "rank": m.lora_spec["rank"],
        "targets": m.lora_spec["targets"], "layers": m.lora_spec["layers"], "params": m.trainable_params,
        "facts": m.n_examples, "train_tokens": m.train_tokens, "recall": m.recall,
        "precision": m.stats.get("precision"), "created": m.created_at,
    } | _locality_columns(m.stats) | {"bytes": store.size(m.id)} for m in store.modules()]
    if any("locality_changed" in row for row in modules):  # one table: modules without the check show blanks
        modules = [row | {key: row.get(key) for key in ("locality_changed", "locality_delta")} for row in modules]
    documents = [{"document": d["path"] or d["title"], "id": d["id"], "title": d["title"],
                  "modules": ", ".join(m["name"] for m in d["modules"]),
                  "written": max(m["created_at"] for m in d["modules"])} for d in store.sources()]
    return {"base_model": store.base_model, "modules": modules, "documents": documents, "retired": len(store.retired())}


def _locality_columns(stats: dict) -> dict:
    """The write-time locality check (locality.py), when the module has one: share of unrelated answers changed,
    and their ROUGE-L change."""
    general = stats.get("locality", {}).get("general")
    return {"locality_changed": general["changed"], "locality_delta": general["delta"]} if general else {}


def _retire(db: sqlite3.Connection, module_ids, reason: str, missing_ok: bool = False) -> list[str]:
    retired = []
    for module_id in module_ids:
        row = db.execute("SELECT name FROM modules WHERE id = ?", (module_id,)).fetchone()
        if row is None:
            if missing_ok:
                continue
            raise LoramemError(f"no module {module_id!r} to retire")
        db.execute("DELETE FROM modules WHERE id = ?", (module_id,))
        db.execute("INSERT OR REPLACE INTO retired VALUES (?, ?, ?, ?)", (module_id, row[0], now(), reason))
        retired.append(module_id)
    return retired


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def write_module_files(staged: Path, examples: list[Example], documents: list[Document]) -> None:
    """Write a staged module's examples (and documents, when it has them) beside its adapter, before commit."""
    _write_jsonl(staged / EXAMPLES_FILE, [{"prompt": e.prompt, "answer": e.answer} | ({"anchor": True} if e.anchor else {})
                                          | ({"context": e.context} if e.context else {}) for e in examples])
    if documents:
        _write_jsonl(staged / DOCUMENTS_FILE, [asdict(d) for d in documents])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _record(row: sqlite3.Row) -> ModuleRecord:
    data = dict(row)
    for key in ("base_fingerprint", "lora_spec", "train_spec", "stats"):
        data[key] = json.loads(data[key])
    return ModuleRecord(**data)


@contextlib.contextmanager
def writer_lock(path: str | Path):
    """Hold the one write lock of the memory at `path` (which may not exist yet), or fail at once with a clear
    error when another process holds it. Readers never take it: a commit is atomic for them anyway.

    The lock file sits beside the memory (so a memory not yet created can be locked) and is removed on
    release; a waiter that locked a file already removed retries on the new one.
    """
    path = Path(path)
    lock_path = path.parent / f".{path.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LoramemError(f"{path} is being written by {holder}; try again when it has finished") from None
        if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # the file was removed by the previous holder between our open and our lock
    try:
        handle.truncate(0)
        handle.write(f"process {os.getpid()}")
        handle.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
