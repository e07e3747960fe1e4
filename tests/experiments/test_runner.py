"""The study runner: cells write and score through the memory, rows are appended and a rerun resumes."""

from __future__ import annotations

import json

import pytest

from loramem.bench import phonebook
from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.experiments import runner
from loramem.experiments.runner import Cell, read_rows, run_study
from sample_facts import LINEAR_TO_ZERO

FAST = TrainSpec(lr=5e-3, epochs=12, batch_size=8, **LINEAR_TO_ZERO)


def cell(rank: int, size: str = "0.1K") -> Cell:  # 0.1K: five generated PhoneBook entries
    return Cell("phonebook", size, LoraSpec(rank=rank, targets="ffn", layers="last2"), FAST, model="tiny")


@pytest.fixture
def no_paper_data(monkeypatch):
    monkeypatch.delenv("LORAMEM_DATA", raising=False)


def test_cell_row_measures_the_module_it_wrote(tiny, no_paper_data):
    row = runner.run_cell(cell(4), tiny)
    assert row["items"] == 5 and row["rank"] == 4 and row["layers"] == "last2"
    # the score is read through the answering weights; it agrees with the training's own recall check
    assert row["score"] == pytest.approx(row["train_recall"])
    # rank 4 on gate/up/down (64 <-> 128) of the last 2 of 4 layers: 2 * 3 * 4 * (64 + 128) LoRA numbers
    assert row["trainable_params"] == 2 * 3 * 4 * (64 + 128) == 4608
    lines = [item.line for item in phonebook.load("0.1K")]
    assert row["data_tokens"] == sum(len(tiny.tokenizer(line, add_special_tokens=False).input_ids) for line in lines)
    assert row["bits_per_param"] == pytest.approx(row["score"] * 5 * phonebook.BITS_PER_NUMBER / row["trainable_params"])


def test_study_appends_rows_and_a_rerun_resumes(tiny, tmp_path, monkeypatch, no_paper_data):
    calls = []

    def counted(c, base=None, data_dir=None, workdir=None):
        calls.append(c.key)
        return {"key": c.key, **c.to_dict(), "rank": c.lora.rank, "score": 1.0}

    monkeypatch.setattr(runner, "run_cell", counted)
    monkeypatch.setattr("loramem.models.load_base", lambda name: tiny)
    cells = [cell(1), cell(2), cell(4)]
    run_study("capacity", cells[:2], tmp_path)
    assert len(calls) == 2
    # a crash mid-write leaves a cut line: it is skipped and its cell runs again
    path = tmp_path / "capacity.jsonl"
    text = path.read_text().splitlines()
    path.write_text(text[0] + "\n" + text[1][: len(text[1]) // 2])
    rows = run_study("capacity", cells, tmp_path)
    assert calls[2:] == [cells[1].key, cells[2].key]
    assert [r["key"] for r in rows] == [c.key for c in cells]
    assert [r["key"] for r in read_rows(path)] == [c.key for c in cells]  # the new rows did not join the cut line
    # another study asking for a measured cell copies its row instead of running it
    run_study("variants", [cells[0]], tmp_path)
    assert len(calls) == 4
    assert [r["key"] for r in read_rows(tmp_path / "variants.jsonl")] == [cells[0].key]


def test_cell_key_follows_every_setting():
    assert cell(4).key == cell(4).key
    assert len({cell(4).key, cell(2).key, cell(4, "0.2K").key,
                Cell("phonebook", "0.1K", LoraSpec(rank=4, targets="ffn", layers="last2", dora=True), FAST, "tiny").key,
                Cell("phonebook", "0.1K", cell(4).lora, TrainSpec(epochs=13), "tiny").key}) == 5


def test_unknown_dataset_is_refused():
    with pytest.raises(LoramemError, match="unknown dataset"):
        Cell("wikipedia", "1K", LoraSpec())


@pytest.mark.ray
def test_cells_run_as_ray_tasks_give_the_same_rows(tiny, tmp_path, local_ray):
    here = run_study("here", [cell(2)], tmp_path / "a")
    there = run_study("there", [cell(2)], tmp_path / "b", executor="ray")
    same = ("key", "score", "trainable_params", "data_tokens", "steps", "train_recall")
    assert {k: there[0][k] for k in same} == {k: here[0][k] for k in same}
    assert json.loads((tmp_path / "b" / "there.jsonl").read_text())["key"] == cell(2).key


def test_a_floor_skips_larger_sizes_of_a_fallen_curve(tiny, tmp_path, monkeypatch):
    ran = []

    def scored(c, base=None, data_dir=None, workdir=None):
        ran.append((c.lora.rank, c.size))
        return {"key": c.key, **c.to_dict(), "rank": c.lora.rank, "score": 0.0 if c.lora.rank == 1 else 1.0}

    monkeypatch.setattr(runner, "run_cell", scored)
    monkeypatch.setattr("loramem.models.load_base", lambda name: tiny)
    cells = [cell(r, s) for r in (1, 2) for s in ("0.1K", "0.2K", "0.4K")]
    rows = run_study("capacity", cells, tmp_path, floor=0.1)
    assert ran == [(1, "0.1K"), (2, "0.1K"), (2, "0.2K"), (2, "0.4K")]
    assert len(rows) == 4
    run_study("capacity", cells, tmp_path)  # without the floor, the skipped cells are filled in
    assert ran[4:] == [(1, "0.2K"), (1, "0.4K")]


def test_a_cell_runs_on_a_local_hugging_face_folder(tiny):
    from loramem.models import resolve

    folder = str(resolve("tiny"))  # the tiny model's converted folder, as a user's own model would be given
    row = runner.run_cell(Cell("phonebook", "0.1K", LoraSpec(rank=2, targets="ffn", layers="last2"), FAST, folder))
    assert row["model"] == folder and row["base_sha256"] == tiny.fingerprint["weights_sha256"][:16]
    assert row["items"] == 5 and row["trainable_params"] == 2 * 3 * 2 * (64 + 128)
    # the same weights by folder as by name: the same module, measured the same
    named = runner.run_cell(cell(2), tiny)
    same = ("score", "train_recall", "trainable_params", "data_tokens", "steps")
    assert {k: row[k] for k in same} == {k: named[k] for k in same}
