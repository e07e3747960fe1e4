"""The kill-trial harness: `loramem write` killed by SIGKILL at a chosen point of a multi-module write, then what a
reader finds on disk checked, then the same write run to completion. tests/test_crash.py kills one memory's write 3
times; benchmarks/crash_trials.py runs 20 trials on fresh memories. A failed check is an AssertionError.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loramem import Memory
from loramem.errors import LoramemError
from loramem.store import Store

PEOPLE = [("Ann Lee", "603-556-7631"), ("Bo Kim", "705-882-9365"), ("Cy Ortega", "212-340-1187"),
          ("Di Novak", "319-450-2298")]
FACTS = "".join(f"Question: What is the phone number of {name}? Answer: {phone}\n" for name, phone in PEOPLE)
# --shard-tokens 30: each ~25-token fact is a module of its own, so one write commits len(PEOPLE) modules.
# A linear decay to zero on every layer (tests/sample_facts.py's linear_to_zero_flags(80)): the recipe whose timing
# the kill delays below were chosen for.
WRITE = ("--model", "tiny", "--rank", "8", "--lr", "1e-2", "--epochs", "80", "--layers", "all", "--decay-epochs", "80",
         "--lr-floor", "0", "--candidates", "0", "--shard-tokens", "30", "--json")
MODULE_FILES = {"adapter_config.json", "adapter_model.safetensors", "examples.jsonl"}
MAX_DELAY = 1.5  # seconds after the kill point's event; about one module's training on this machine
MAX_STAGING_DELAY = 0.05  # a module is saved and committed within some tens of milliseconds


def start_cli(*args, logs: Path) -> subprocess.Popen:
    """`loramem ARGS` as a user runs it, its output going to files (a pipe nobody reads could block it)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "loramem.cli", *map(str, args)], env=env, stdout=out, stderr=err)


def run_cli(*args, logs: Path, timeout: float = 300) -> tuple[int, str, str]:
    proc = start_cli(*args, logs=logs)
    proc.wait(timeout=timeout)
    return proc.returncode, logs.with_suffix(".out").read_text(), logs.with_suffix(".err").read_text()


def lock_file(memory: Path) -> Path:
    return memory.parent / f".{memory.name}.lock"


def question_of(memory: Memory, record) -> tuple[str, str]:
    [example] = memory.examples(record)
    return example.prompt.removeprefix("Question:").removesuffix("Answer:").strip(), example.answer.strip()


def read_committed(path: Path, base) -> dict:
    """What a reader sees: {module id: (record, answer)}, each listed module checked whole and answering."""
    memory = Memory.open(path, base=base)
    seen = {}
    for record in memory.modules():
        folder = memory.store.module_dir(record.id)
        assert MODULE_FILES <= {p.name for p in folder.iterdir()}, f"partial module {record.id} is listed"
        question, phone = question_of(memory, record)
        answer = memory.ask(question, module=record.id).text
        if record.recall == 1.0:  # it learned its fact: a damaged module would not say it
            assert answer.startswith(phone), (record.name, answer)
        seen[record.id] = (record, answer)
    return seen


def leftovers(memory: Path) -> list[str]:
    """What dead writers left inside the memory that is not a module: staging folders, folders without a row."""
    if not memory.exists():
        return []
    known = {m.id for m in Store.open(memory).modules()}
    staging = [f"tmp/{p.name}" for p in (memory / "tmp").iterdir()] if (memory / "tmp").is_dir() else []
    return staging + [f"modules/{p.name}" for p in (memory / "modules").iterdir() if p.name not in known]


def staging(memory: Path) -> bool:
    """Whether a module is being saved under tmp/ (between training and its commit)."""
    try:
        return any((memory / "tmp").iterdir())
    except OSError:  # no tmp/ (yet, or swept just now)
        return False


def committed_count(memory: Path) -> int:
    try:
        return len(Store.open(memory).modules())
    except LoramemError:  # not created yet
        return 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll until the condition holds (True) or the process has exited (False); on a failure (the condition's
    assertion, a timeout) the process is killed, so no writer outlives its test."""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if condition():
                return True
            assert time.monotonic() < deadline, "timed out waiting for the writer"
            time.sleep(0.01)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return False


@dataclass
class Trial:
    """One kill: after `wait_modules` commits (0: once the write lock is taken), or with `staging` once the next
    module is being saved, plus `delay` seconds."""

    wait_modules: int
    delay: float
    staging: bool = False
    killed: bool = False
    committed: int = 0  # modules committed when the writer died
    stale_lock: bool = False  # the dead writer's lock file was still there
    leftovers: list[str] = field(default_factory=list)  # staging and unlisted folders, swept by the next write
    create_leftovers: list[str] = field(default_factory=list)  # half-created memory folders beside the memory
    seconds: float = 0.0  # the killed run and its checks (kill_trial: with the completing run)


def kill_point(memory: Path, trial: Trial) -> bool:
    if trial.staging:
        return staging(memory) and committed_count(memory) >= trial.wait_modules
    return committed_count(memory) >= trial.wait_modules if trial.wait_modules else lock_file(memory).exists()


def kill_write(root: Path, trial: Trial, base, seen: dict) -> dict:
    """Run the write and SIGKILL it at the trial's point; check what a reader then finds on disk: whole modules
    only, each answering, and the modules `seen` before unchanged. Returns what is committed now."""
    started = time.perf_counter()
    memory = root / "m.mem"
    writer = start_cli("write", memory, root / "facts.txt", *WRITE, logs=root / f"killed-{trial.wait_modules}")
    if wait_for(lambda: kill_point(memory, trial), writer):
        time.sleep(trial.delay)
        writer.send_signal(signal.SIGKILL)
    writer.wait()
    trial.killed = writer.returncode == -signal.SIGKILL
    assert trial.killed or writer.returncode == 0, (root / f"killed-{trial.wait_modules}.err").read_text()

    now = read_committed(memory, base) if memory.exists() else {}
    for module_id, (record, answer) in seen.items():  # not retrained, not changed
        assert now[module_id] == (record, answer), f"{record.name} changed"
    trial.committed, trial.leftovers = len(now), leftovers(memory)
    trial.create_leftovers = [p.name for p in root.iterdir() if p.name.startswith(f".{memory.name}.") and p.is_dir()]
    trial.stale_lock = lock_file(memory).exists()
    if trial.stale_lock:  # its flock died with the process; the file only names a dead holder
        assert names_a_dead_process(lock_file(memory).read_text())
    trial.seconds = time.perf_counter() - started
    return now


def names_a_dead_process(text: str) -> bool:
    """A lock file is empty or names its last holder: this writer, or an earlier killed one when this writer
    was killed before it took the lock. Either way no process of that id runs any more."""
    if text == "":
        return True
    pid = int(text.removeprefix("process "))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def complete_write(root: Path, base, seen: dict) -> None:
    """The same write again: not blocked by a dead writer's lock file, it commits the modules still missing
    and retrains none of those `seen` committed; no staging or unlisted folder is left."""
    memory = root / "m.mem"
    code, _, err = run_cli("write", memory, root / "facts.txt", *WRITE, logs=root / "complete")
    assert code == 0, err
    after = read_committed(memory, base)
    assert sorted(r.name for r, _ in after.values()) == sorted(f"shard-{i}" for i in range(len(PEOPLE)))
    for module_id, (record, answer) in seen.items():
        assert after[module_id] == (record, answer), f"{record.name} changed"
    assert leftovers(memory) == [] and not lock_file(memory).exists()


def kill_trial(root: Path, wait_modules: int, delay: float, base, staging: bool = False) -> Trial:
    """A fresh memory: one kill, then the same write to completion (benchmarks/crash_trials.py runs 20)."""
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / "facts.txt").write_text(FACTS)
    trial = Trial(wait_modules, delay, staging)
    complete_write(root, base, kill_write(root, trial, base, {}))
    trial.seconds = time.perf_counter() - started  # both runs and the checks
    return trial
