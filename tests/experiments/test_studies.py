"""Study definitions (presets, equal budgets) and what is derived from rows (T_max, saturation, efficiency)."""

import pytest

from loramem.capacity import trainable_params
from loramem.errors import LoramemError
from loramem.experiments import studies


def rows(rank: int, params: int, scores: dict[int, float]) -> list[dict]:
    return [{"dataset": "phonebook", "model": "m", "targets": "ffn", "layers": "last4", "variant": "lora", "train": {},
             "rank": rank, "trainable_params": params, "size": f"{tokens // 1000}K", "data_tokens": tokens,
             "items": tokens // 20, "score": score, "bits_per_param": score * tokens / params}
            for tokens, score in scores.items()]


def test_t_max_is_the_largest_size_every_smaller_size_also_held():
    grid = rows(1, 100, {1000: 1.0, 2000: 0.96, 4000: 0.5, 8000: 0.97})  # 8K passing again does not count
    best, censored = studies.t_max(grid, 0.95)
    assert best["data_tokens"] == 2000 and censored is False
    best, censored = studies.t_max(rows(1, 100, {1000: 1.0, 2000: 1.0}), 0.95)
    assert best["data_tokens"] == 2000 and censored is True  # the largest size measured held: T_max is at least that
    assert studies.t_max(rows(1, 100, {1000: 0.9}), 0.95) == (None, False)


def test_summary_finds_saturation_and_the_efficiency_peak():
    grid = (rows(1, 100, {1000: 1.0, 2000: 0.2, 4000: 0.0}) + rows(2, 200, {1000: 1.0, 2000: 1.0, 4000: 0.1})
            + rows(4, 400, {1000: 1.0, 2000: 1.0, 4000: 0.3}) + rows(8, 800, {1000: 1.0, 2000: 1.0, 4000: 0.6}))
    summary = {s["rank"]: s for s in studies.capacity_summary(grid)}
    assert [summary[r]["t_max_tokens"] for r in (1, 2, 4, 8)] == [1000, 2000, 2000, 2000]
    assert summary[1]["efficiency"] == 10.0 and summary[2]["efficiency"] == 10.0 and summary[8]["efficiency"] == 2.5
    assert summary[1]["saturation_rank"] == 2  # ranks 4 and 8 store no more than rank 2
    assert summary[1]["efficiency_peak_rank"] == 1
    assert summary[8]["most_stored"] == 0.6 * 200 and summary[8]["most_stored_size"] == "4K"  # past T_max
    growing = rows(1, 100, {1000: 1.0, 2000: 0.2}) + rows(2, 200, {1000: 1.0, 2000: 1.0, 4000: 0.1})
    assert studies.capacity_summary(growing)[0]["saturation_rank"] is None  # only the largest rank got that far


def test_placement_cells_share_one_parameter_budget(tiny):
    cpu = studies.preset("cpu")
    cells = studies.placement(cpu, "phonebook", ["1K"], 4, tiny, layer_sets=["first2", "last2"])
    assert [(c.lora.layers, c.lora.targets) for c in cells] == [
        (layers, t) for layers in ("first2", "last2") for t in ("ffn", "attention", "all")]
    goal = trainable_params(tiny.model, cpu.lora(4))  # the budget: the preset's own placement at rank 4
    per = [trainable_params(tiny.model, c.lora) for c in cells]
    assert all(abs(p - goal) / goal < 0.25 for p in per), per
    assert len({c.lora.rank for c in cells}) > 1  # attention needs a higher rank than FFN for the same budget


def test_presets_and_variants():
    paper = studies.preset("paper")
    cell = paper.cell("phonebook", "1K", 8, "m")
    assert cell.lora.lora_alpha == 8 and cell.lora.dropout == 0.1 and cell.prompt == "chat"
    assert cell.train.max_steps == 1500 and cell.train.lr == 5e-5 and cell.train.target_recall is None
    assert paper.cell("counterfact", "1K", 8, "m").prompt == "plain"
    cells = studies.variants(studies.preset("cpu"), "phonebook", [4], ["1K"])
    assert [c.variant for c in cells] == ["lora", "rslora", "dora", "pissa"]
    assert [c.train.max_steps for c in studies.budget(studies.preset("cpu"), "phonebook", 1, "4K", [400, 800])] == [400, 800]
    assert studies.preset("cpu").train.max_steps == 400  # one step budget for every cell, as in the paper
    assert studies.preset("cpu", steps=200).train.max_steps == 200
    with pytest.raises(LoramemError, match="unknown preset"):
        studies.preset("gpu")
    with pytest.raises(LoramemError, match="unknown variant"):
        studies.variants(studies.preset("cpu"), "phonebook", [4], ["1K"], names=["lokr"])
