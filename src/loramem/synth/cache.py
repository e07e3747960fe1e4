"""Generated data on disk: one JSON file per (chunk text, format, generator, prompts, settings).

A key is a small dict of everything that shapes a result; its hash names the file and the key is stored
inside too, so a hash collision or a stale file reads as a miss. Files are written to a temporary name
and renamed into place, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from loramem.config import cache_dir


def synth_dir() -> Path:
    return cache_dir() / "synth"


def _path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return synth_dir() / f"{digest}.json"


def _canonical(key: dict) -> dict:
    """The key as it reads back from JSON (tuples become lists), so stored and asked keys compare equal."""
    return json.loads(json.dumps(key))


def load(key: dict) -> dict | None:
    """The stored value for the key, or None when there is none (or it cannot be read)."""
    key = _canonical(key)
    try:
        stored = json.loads(_path(key).read_text(encoding="utf-8", errors="surrogatepass"))
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return stored.get("value") if isinstance(stored, dict) and stored.get("key") == key else None


def store(key: dict, value: dict) -> None:
    key = _canonical(key)
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        # surrogatepass: generated text may hold lone surrogates (from JSON escapes), which strict UTF-8 refuses
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
            json.dump({"key": key, "value": value}, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
