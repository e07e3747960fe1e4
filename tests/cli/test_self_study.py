"""`loramem write --format self-study`: its defaults, the locality record shown by inspect, and bad input."""

from __future__ import annotations

import json

import pytest
from command_line import loramem

TEXT = ("The Aurora telescope was built in Chile in 1998 by the Northern Sky Consortium. It observes distant "
        "galaxies in infrared light. Its main mirror is eight metres wide and made of beryllium. ") * 3


def test_self_study_write_distills_in_chat_and_records_locality(tmp_path):
    (tmp_path / "aurora.txt").write_text(TEXT)
    out = loramem("write", tmp_path / "m", tmp_path / "aurora.txt", "--format", "self-study", "--prompts", "3",
                  "--kinds", "question+continue", "--model", "tiny", "--rank", "2", "--epochs", "1", "--json")
    assert out.returncode == 0, out.stderr
    [module] = json.loads(out.stdout)["modules"]
    assert module["asked"] == 3 and 0 < module["usable"] <= 3 + 16 and 0.0 <= module["locality_changed"] <= 1.0
    shown = json.loads(loramem("inspect", tmp_path / "m", "--json").stdout)["modules"][0]
    assert shown["locality_changed"] == module["locality_changed"]
    assert shown["locality_delta"] == pytest.approx(module["locality_delta"])
    from loramem.store import Store

    store = Store.open(tmp_path / "m")
    record = store.modules()[0]
    assert record.train_spec["objective"] == "distill" and record.train_spec["lr"] == 1e-3
    assert record.train_spec["target_recall"] is None and store.meta()["prompt"] == "chat"


@pytest.mark.parametrize("text, extra, message", [
    (TEXT, ["--prompts", "0"], "prompt count must be at least 1"),
    (TEXT, ["--anchors", "-1"], "anchors must be between 0 and 48"),
    ("word " * 2100, ["--prompts", "2"], "more than the model's window"),
])
def test_bad_self_study_writes_are_one_line_errors_and_write_nothing(tmp_path, text, extra, message):
    (tmp_path / "doc.txt").write_text(text)
    out = loramem("write", tmp_path / "m", tmp_path / "doc.txt", "--format", "self-study", "--model", "tiny", *extra)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_self_study_recipe_keeps_what_was_given():
    from loramem.config import TrainSpec
    from loramem.synth import selfstudy
    from loramem.writing import self_study_recipe

    recipe = self_study_recipe(TrainSpec(), set())
    assert (recipe.objective, recipe.lr, recipe.epochs, recipe.target_recall, recipe.candidates) == (
        "distill", selfstudy.TRAIN_LR, selfstudy.TRAIN_EPOCHS, None, 0)
    kept = self_study_recipe(TrainSpec(lr=5e-3, objective="ntp"), {"lr", "objective"})
    assert (kept.objective, kept.lr, kept.epochs, kept.candidates) == ("ntp", 5e-3, selfstudy.TRAIN_EPOCHS, 0)


def test_bench_self_study_is_a_bench_command_with_clear_errors():
    out = loramem("bench", "self-study", "--dataset", "poems")
    assert out.returncode == 2 and out.stderr.strip() == "error: unknown dataset 'poems': choose paperqa or narrativeqa"
    for weights, message in (("0.5,x", "--base-weights takes numbers, comma-separated, not '0.5,x'"),
                             ("1.5", "base_weight must be at least 0 and below 1, not 1.5")):
        out = loramem("bench", "self-study", "--merges", "mix", "--base-weights", weights)
        assert out.returncode == 2 and out.stderr.strip() == f"error: {message}"
    shown = loramem("bench", "self-study", "--help").stdout
    assert "--prompts" in shown and "--seed-types" in shown and "--objective" not in shown and "--base-weights" in shown
