"""A memory that follows its documents: changed ones rewritten, removed ones forgotten (`--sync`, `forget`), retired
files deleted (`compact`); every step through the command line, as a user runs it."""

import json

import pytest
from command_line import loramem

GEARS = "# Gears\nZorblat engines use quantum gears built in Oslo.\n"
QUIX = "Mira Tan designed the first Quix engine in 1984.\n"


def _write(memory, docs, *flags):
    out = loramem("write", memory, docs, "--format", "original", "--model", "tiny", "--rank", "4", "--epochs", "2",
                  "--no-locality", "--json", *flags)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _inspect(memory):
    """What `loramem inspect --json` prints (store.describe), read in this process: a subprocess costs seconds."""
    from loramem.store import Store, describe

    return {"memory": str(memory)} | describe(Store.open(memory))


def _docs(root):
    folder = root / "docs"
    folder.mkdir()
    (folder / "a.md").write_text(GEARS)
    (folder / "b.txt").write_text(QUIX)
    return folder


@pytest.fixture
def docs(tmp_path):
    return _docs(tmp_path)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A memory of two documents that the bad-input tests must leave as it is."""
    root = tmp_path_factory.mktemp("lifecycle")
    _write(root / "m.mem", _docs(root))
    (root / "other").mkdir()
    (root / "other" / "c.txt").write_text("Ola Berg keeps bees in Tromso.\n")
    return root


def _write_here(memory, docs, sync=False):
    """The same write in this process (writing.write_documents, which `loramem write` calls): quicker."""
    from loramem.config import LoraSpec, TrainSpec
    from loramem.synth import SynthSpec
    from loramem.writing import write_documents

    return write_documents(memory, [docs], SynthSpec(formats="original"), LoraSpec(rank=4), TrainSpec(epochs=2),
                           model="tiny", sync=sync, check_locality=False, progress=False)


def test_changed_documents_replace_their_modules_removed_ones_go_with_sync_then_compact(tmp_path, docs):
    memory = tmp_path / "m.mem"
    first = {m["name"]: m["module"] for m in _write(memory, docs)["modules"]}
    (docs / "a.md").write_text(GEARS.replace("Oslo", "Bergen"))
    second = {m["name"]: m["module"] for m in _write_here(memory, docs)["modules"]}
    assert second["b"] == first["b"] and second["Gears"] != first["Gears"]  # only the changed one is rewritten
    listing = json.loads(loramem("inspect", memory, "--json").stdout)
    assert listing == _inspect(memory)
    assert {m["id"] for m in listing["modules"]} == set(second.values()) and listing["retired"] == 1
    assert {d["document"]: d["modules"] for d in listing["documents"]} == {
        str((docs / "a.md").resolve()): "Gears", str((docs / "b.txt").resolve()): "b"}

    (docs / "b.txt").unlink()
    kept = _write_here(memory, docs)
    assert [r["module"] for r in kept["removed"]] == [second["b"]] and kept["forgotten"] is False
    assert len(_inspect(memory)["modules"]) == 2  # reported, not forgotten without --sync
    synced = _write(memory, docs, "--sync")
    assert synced["forgotten"] is True and [m["id"] for m in _inspect(memory)["modules"]] == [second["Gears"]]

    freed = json.loads(loramem("compact", memory, "--json").stdout)
    assert freed["modules_deleted"] == 2 and freed["bytes_freed"] > 0
    assert sorted(p.name for p in (memory / "modules").iterdir()) == [second["Gears"]]
    out = loramem("forget", memory, "--document", docs / "a.md", "--json")
    assert out.returncode == 0, out.stderr
    assert [m["module"] for m in json.loads(out.stdout)["forgotten"]] == [second["Gears"]]
    assert _inspect(memory)["modules"] == []


@pytest.mark.parametrize("args,message", [  # a subprocess each (seconds): the others are checked in this process below
    (["forget", "{mem}", "--module", "nothing"], "no module 'nothing'"),
    (["compact", "{tmp}/nowhere"], "no memory at"),
    (["write", "{mem}", "{tmp}/other", "--format", "original", "--model", "tiny", "--sync"], "is not the source"),
])
def test_bad_life_cycle_input_one_line_exit_2_nothing_changed(written, args, message):
    memory = written / "m.mem"
    before = _inspect(memory)
    out = loramem(*[a.format(mem=memory, tmp=written) for a in args])
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert _inspect(memory) == before


def test_forgetting_while_another_process_writes_is_refused(written):
    from loramem.store import writer_lock

    memory = written / "m.mem"
    with writer_lock(memory):
        out = loramem("forget", memory, "--module", "b")
    assert out.returncode == 2 and "is being written" in out.stderr
    assert len(_inspect(memory)["modules"]) == 2


def test_more_bad_life_cycle_input_in_this_process(written):
    from loramem.errors import LoramemError
    from loramem.memory import Memory

    memory = Memory.open(written / "m.mem")
    before = _inspect(written / "m.mem")
    for call, message in [(lambda: memory.forget(document=str(written / "nowhere.md")), "no document"),
                          (lambda: memory.forget(), "forget needs a module or a document"),
                          (lambda: Memory.open(written / "nowhere").forget(module="a"), "no memory at"),
                          (lambda: _write_here(written / "m.mem", written / "other" / "c.txt", sync=True),
                           "needs a folder")]:
        with pytest.raises(LoramemError, match=message):
            call()
    assert _inspect(written / "m.mem") == before
