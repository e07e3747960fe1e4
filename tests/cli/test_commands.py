"""The command line, run as a user runs it: a subprocess, its output and exit code."""

import json

import pytest
from command_line import loramem
from sample_facts import linear_to_zero_flags

FACTS = "Question: What is the phone number of Ann Lee? Answer: 603-556-7631\n"


@pytest.fixture(scope="module")
def memory(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("cli")
    (root / "facts.txt").write_text(FACTS)
    out = loramem("write", root / "m", root / "facts.txt", "--model", "tiny", "--rank", "8", "--lr", "1e-2",
                  *linear_to_zero_flags(80), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["recall"] == 1.0
    return root / "m"


def test_write_inspect_ask(memory):
    listing = json.loads(loramem("inspect", memory, "--json").stdout)
    assert listing["base_model"] == "tiny" and listing["modules"][0]["rank"] == 8
    out = loramem("ask", memory, "What is the phone number of Ann Lee?", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"].startswith("603-556-7631")
    plain = loramem("ask", memory, "What is the phone number of Ann Lee?")  # ends without the interpreter's teardown
    assert plain.returncode == 0 and plain.stdout.startswith("603-556-7631") and plain.stdout.endswith("\n")


def test_verbose_logs_each_epoch(tmp_path):
    (tmp_path / "facts.txt").write_text(FACTS)
    def write(*flags, into):
        return loramem(*flags, "write", tmp_path / into, tmp_path / "facts.txt", "--model", "tiny", "--epochs", "2")

    quiet, verbose = write(into="quiet"), write("-v", into="verbose")
    assert quiet.returncode == verbose.returncode == 0, verbose.stderr
    assert "epoch 2: mean loss" in verbose.stderr and "epoch" not in quiet.stderr


@pytest.mark.parametrize("args,message", [
    (["ask", "{tmp}/nowhere", "q?"], "no memory at"),
    (["inspect", "{tmp}"], "not a loramem memory"),
    (["write", "{tmp}/new", "{tmp}/empty.txt", "--model", "tiny"], "no facts"),
    (["write", "{tmp}/new", "{tmp}/latin1.txt", "--model", "tiny"], "not UTF-8"),
    (["write", "{tmp}/new", "{tmp}/facts.txt", "--model", "tiny", "--rank", "0"], "rank must be a positive integer"),
    (["write", "{tmp}/new", "{tmp}/facts.txt", "--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["write", "{tmp}/new", "{tmp}/facts.txt", "--model", "{tmp}"], "is not a model"),
    (["write", "{tmp}/new", "{tmp}/missing.txt", "--model", "tiny"], "no such file"),
    (["exp", "capacity", "--preset", "gpu", "--out", "{tmp}/st"], "unknown preset 'gpu'"),
    (["exp", "capacity", "--dataset", "wiki", "--model", "tiny", "--out", "{tmp}/st"], "unknown dataset 'wiki'"),
    (["exp", "variants", "--variants", "lokr", "--model", "tiny", "--out", "{tmp}/st"], "unknown variant 'lokr'"),
    (["exp", "capacity", "--executor", "slurm", "--model", "tiny", "--out", "{tmp}/st"], "unknown executor 'slurm'"),
    (["report", "{tmp}"], "no study results"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "facts.txt").write_text(FACTS)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = loramem(*[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_module_of_another_base_model_is_refused(memory, tmp_path):
    out = loramem("ask", memory, "q?", "--model", "smollm2-135m")
    assert out.returncode == 2 and "different model" in out.stderr


def test_write_into_another_models_memory_is_refused(memory, tmp_path):
    (tmp_path / "f.txt").write_text(FACTS)
    out = loramem("write", memory, tmp_path / "f.txt", "--model", "smollm2-135m")
    assert out.returncode == 2 and "different model" in out.stderr


def test_write_documents_one_module_each_then_resume(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Gears\nZorblat engines use quantum gears built in Oslo.\n")
    (docs / "b.txt").write_text("Mira Tan designed the first Quix engine in 1984.\n")
    (docs / "empty.txt").write_text("")
    args = ("write", tmp_path / "docs.mem", docs, "--format", "original", "--model", "tiny", "--rank", "4",
            "--epochs", "2", "--json")
    out = loramem(*args)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["documents"] == 2 and result["skipped"] == 1 and len(result["modules"]) == 2
    assert {m["name"] for m in result["modules"]} == {"Gears", "b"}
    again = json.loads(loramem(*args).stdout)  # nothing left to do: the same modules, not retrained
    assert [m["module"] for m in again["modules"]] == [m["module"] for m in result["modules"]]
    ask = loramem("ask", tmp_path / "docs.mem", "Who designed the Quix engine?", "--mode", "icl", "--router", "bm25",
                  "--top-k", "1", "--json")
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["modules"] == [m["module"] for m in result["modules"] if m["name"] == "b"]


@pytest.mark.parametrize("args,message", [
    (["--format", "poetry"], "unknown format"),
    (["--format", "qa", "--generator", "telegraph"], "unknown generator"),
    (["--format", "qa", "--strict"], "empty.txt"),
])
def test_bad_document_writes(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("Mira Tan designed the first Quix engine in 1984.\n")
    out = loramem("write", tmp_path / "m", tmp_path, "--model", "tiny", *args)
    assert out.returncode == 2 and message in out.stderr.lower() and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_a_study_then_its_report(tmp_path):
    out = loramem("exp", "capacity", "--model", "tiny", "--ranks", "2", "--sizes", "0.1K", "--steps", "10",
                  "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "rank 2" in out.stderr and len((tmp_path / "capacity.jsonl").read_text().splitlines()) == 1
    out = loramem("report", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "| 2 |" in (tmp_path / "report.md").read_text() and (tmp_path / "efficiency.png").exists()


def test_precision_is_forced_stored_shown_and_reported(tmp_path):
    from loramem.precision import hardware

    (tmp_path / "facts.txt").write_text(FACTS)
    out = loramem("write", tmp_path / "m", tmp_path / "facts.txt", "--model", "tiny", "--rank", "8", "--lr", "1e-2",
                  "--epochs", "80", "--precision", "bf16", "--json")
    assert out.returncode == 0, out.stderr
    written = json.loads(out.stdout)
    assert written["precision"] == "bf16" and written["hardware"]["cpu_features"] == hardware()["cpu_features"]
    listing = json.loads(loramem("inspect", tmp_path / "m", "--json").stdout)
    assert listing["modules"][0]["precision"] == "bf16" and "precision" not in listing  # inspect runs nothing
    bad = loramem("write", tmp_path / "n", tmp_path / "facts.txt", "--model", "tiny", "--precision", "fp16")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "precision must be" in bad.stderr
    assert not (tmp_path / "n").exists()
