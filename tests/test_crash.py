"""Crash safety and concurrency, with real processes: `loramem write` killed by SIGKILL in the middle of a
multi-module write, two writers on one memory, and a reader while a write commits.

The kill-trial harness is benchmarks/crash.py (benchmarks/crash_trials.py runs 20 trials of it); the test here
kills one memory's write 3 times, then completes it.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from benchmarks.crash import (
    FACTS,
    MAX_DELAY,
    MAX_STAGING_DELAY,
    MODULE_FILES,
    PEOPLE,
    WRITE,
    Trial,
    complete_write,
    kill_write,
    lock_file,
    question_of,
    run_cli,
    start_cli,
    wait_for,
)
from loramem import LoraSpec, Memory, TrainSpec, facts_from_text
from loramem.answer import read_adapter
from loramem.errors import LoramemError
from loramem.store import ModuleRecord, Store, writer_lock


def test_killed_writes_leave_a_consistent_memory_that_the_same_write_completes(tmp_path, tiny):
    # One memory, three kills: while the first module trains, after the first commit, and while the third
    # module is saved; each killed run is also the rerun of the one before (4 CLI runs instead of 6).
    (tmp_path / "facts.txt").write_text(FACTS)
    rng, seen = random.Random(0), {}
    trials = [Trial(0, rng.uniform(0, MAX_DELAY)), Trial(1, rng.uniform(0, MAX_DELAY)),
              Trial(2, rng.uniform(0, MAX_STAGING_DELAY), staging=True)]
    for trial in trials:
        seen = kill_write(tmp_path, trial, tiny, seen)
    complete_write(tmp_path, tiny, seen)
    print(*trials, sep="\n")
    assert sum(t.killed for t in trials) >= 2
    assert any(0 < t.committed < len(PEOPLE) for t in trials if t.killed)  # killed between modules of the write
    assert any(t.stale_lock for t in trials)  # and the next writer went past a dead writer's lock file


def test_a_commit_flushes_the_module_to_disk_before_its_row(tmp_path, monkeypatch):
    # A kill cannot lose written data, a power cut can: the files and the rename are flushed before the row
    # that lists them is committed.
    store = Store.create(tmp_path / "m.mem", "tiny", {"weights_sha256": "x"})
    staged = store.staging_dir()
    for name in MODULE_FILES:
        (staged / name).write_text("{}")
    flushed, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    record = ModuleRecord(id="m1", name="m1", created_at="now", base_model="tiny", base_fingerprint={}, lora_spec={},
                          train_spec={}, data_hash="h", n_examples=1, train_tokens=1, trainable_params=1, recall=None,
                          train_seconds=None, stats={})
    store.commit(staged, record)
    assert sorted(flushed[:3]) == sorted(str(staged / name) for name in MODULE_FILES)
    assert flushed[3] == str(tmp_path / "m.mem" / "modules") and [m.id for m in store.modules()] == ["m1"]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under the folder: its content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_writer_is_refused_while_the_first_writes(tmp_path, tiny):
    memory = tmp_path / "m.mem"
    first_fact, second_fact, third_fact = FACTS.splitlines(keepends=True)[:3]
    mem = Memory.open(memory, create=True, base=tiny)
    committed = mem.write(facts_from_text(first_fact), LoraSpec(rank=4, layers="all"), TrainSpec(epochs=1), progress=False)
    before = snapshot(memory)
    (tmp_path / "b.txt").write_text(second_fact)
    (tmp_path / "c.txt").write_text(third_fact)
    # The first writer trains until it is killed: no recall target and an epoch budget it never reaches.
    first = start_cli("write", memory, tmp_path / "b.txt", "--model", "tiny", "--epochs", "1000000",
                      "--target-recall", "0", logs=tmp_path / "first")
    try:
        holds = wait_for(lambda: lock_file(memory).exists() and lock_file(memory).read_text() == f"process {first.pid}",
                         first)
        assert holds, (tmp_path / "first.err").read_text()
        code, _, err = run_cli("write", memory, tmp_path / "c.txt", "--model", "tiny", "--epochs", "1",
                               logs=tmp_path / "second")
        assert first.poll() is None  # still writing: the refusal came from its lock
        assert code == 2
        assert err.strip() == f"error: {memory} is being written by process {first.pid}; try again when it has finished"
        assert [m.id for m in Memory.open(memory, base=tiny).modules()] == [committed.id]  # readers are not blocked
    finally:
        first.kill()
        first.wait()
    assert snapshot(memory) == before  # neither writer changed the memory
    # The killed writer's lock file does not block the next writer.
    mem = Memory.open(memory, base=tiny)
    mem.write(facts_from_text(third_fact), LoraSpec(rank=4, layers="all"), TrainSpec(epochs=1), progress=False)
    assert len(mem.modules()) == 2 and not lock_file(memory).exists()


def test_a_second_writer_in_the_same_process_is_refused_too(tmp_path):
    # flock belongs to the open file, not the process: a server's second thread is refused like a process.
    with writer_lock(tmp_path / "m.mem"):
        with pytest.raises(LoramemError, match=f"being written by process {os.getpid()}; try again"):
            with writer_lock(tmp_path / "m.mem"):
                pass


def test_a_reader_sees_whole_modules_in_commit_order_while_a_write_commits(tmp_path, tiny):
    memory = tmp_path / "m.mem"
    (tmp_path / "facts.txt").write_text(FACTS)
    writer = start_cli("write", memory, tmp_path / "facts.txt", *WRITE, logs=tmp_path / "writer")
    views: list[tuple[str, ...]] = []

    def read() -> None:
        mem = Memory.open(memory, base=tiny)
        ids = tuple(m.id for m in mem.modules())
        if ids and (not views or ids != views[-1]):
            newest = mem.store.get(ids[-1])
            read_adapter(mem.store.module_dir(newest.id))  # whole: its safetensors load
            question, phone = question_of(mem, newest)
            assert mem.ask(question, module=newest.id).text.startswith(phone) or newest.recall < 1.0
            views.append(ids)

    wait_for(lambda: memory.exists() and read(), writer)  # read() returns None: poll until the writer exits
    assert writer.returncode == 0, (tmp_path / "writer.err").read_text()
    read()
    assert len(views[-1]) == len(PEOPLE)
    for earlier, later in zip(views, views[1:]):
        assert later[: len(earlier)] == earlier  # only grows, in commit order
    assert len(views) >= 3  # the reader really read between commits
