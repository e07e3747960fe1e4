"""`loramem report`: Markdown with tables and PNG plots from a results folder."""

import json

import pytest

from loramem.errors import LoramemError
from loramem.experiments.report import write_report
from loramem.experiments.runner import append_row


def row(key: str, rank: int, tokens: int, score: float, dataset="phonebook", **extra) -> dict:
    return {"key": key, "dataset": dataset, "model": "m", "targets": "ffn", "layers": "last4", "variant": "lora",
            "train": {"max_steps": 400}, "rank": rank, "trainable_params": 100 * rank, "size": f"{tokens // 1000}K",
            "data_tokens": tokens, "items": tokens // 20, "score": score, "bits_per_param": 0.1, "epochs": 9,
            "steps": 50, "train_seconds": 3.0, "paraphrase": 0.4, "locality": 0.9, "unchanged": 0.2, **extra}


def test_report_has_tables_and_plots_for_every_study(tmp_path):
    for i, (rank, tokens, score) in enumerate([(1, 1000, 1.0), (1, 2000, 0.5), (4, 1000, 1.0), (4, 2000, 1.0)]):
        append_row(tmp_path / "capacity.jsonl", row(f"c{i}", rank, tokens, score))
    append_row(tmp_path / "capacity.jsonl", row("cf", 1, 1000, 0.7, dataset="counterfact"))
    append_row(tmp_path / "placement.jsonl", row("p1", 4, 1000, 0.8, layers="first4"))
    append_row(tmp_path / "budget.jsonl", row("b1", 1, 2000, 0.5))
    append_row(tmp_path / "budget.jsonl", row("b2", 1, 2000, 0.6, train={"max_steps": 800}))
    append_row(tmp_path / "budget.jsonl", row("b3", 16, 8000, 0.0))  # a second cell given more steps
    (tmp_path / "paperqa.json").write_text(json.dumps({"rows": [{"setting": "icl", "rouge_l": 0.125}]}))
    page = write_report(tmp_path).read_text()
    assert "| 1 | 100 | 1.000 | 0.500 |" in page  # rank 1: held 1K, lost 2K
    assert "| 1 | 100 | 1K | 1,000 | 10.000 | 0.100 | 50 (1K) |" in page  # T_max, tokens per parameter, most stored
    assert "| 4 | 400 | >= 2K |" in page  # censored: the largest size still held
    assert "0.700 (0.40 / 0.90 / 0.20)" in page  # CounterFact efficacy (paraphrase / locality / unchanged)
    assert "## Placement" in page and "## Training budget" in page and "| icl | 0.125 |" in page
    assert "| 800 | 2K | 1 | 0.600 |" in page and "| 400 | 8K | 16 | 0.000 |" in page
    for name in ("efficiency.png", "placement.png", "budget.png", "capacity-phonebook-m-ffn-last4-lora.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in page


def test_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(LoramemError, match="no study results"):
        write_report(tmp_path)
