"""`loramem exp STUDY` (the paper's module studies) and `loramem report`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loramem.cli import app
from loramem.cli.options import DataDirOpt, PrecisionOpt, console, csv, notices, table, use_precision
from loramem.models import DEFAULT_MODEL

exp_app = typer.Typer(no_args_is_help=True, help="The paper's module studies: each cell's row is appended to OUT/<study>.jsonl "
                      "as it is measured, and a rerun resumes where a stopped one ended.")
app.add_typer(exp_app, name="exp")
DatasetOpt = typer.Option("phonebook", "--dataset", help="phonebook or counterfact")
PresetOpt = typer.Option("cpu", "--preset", help="cpu (FFN of the last 4 layers, loramem's recipe) or paper (the "
                         "paper's setting, for GPUs)")
RanksOpt = typer.Option(None, "--ranks", help="comma-separated ranks (default: the preset's)")
SizesOpt = typer.Option(None, "--sizes", help="comma-separated sizes such as 1K,2K,4K (default: the preset's)")
StudyOutOpt = typer.Option(Path("studies"), "--out", help="results folder (one JSONL file per study)")
StudyExecutorOpt = typer.Option("inprocess", "--executor", help="inprocess, or ray (each cell a Ray task)")
StudyAddressOpt = typer.Option(None, "--address", help="Ray cluster address (auto, ray://host:10001); default a local Ray")
StepsOpt = typer.Option(None, "--steps", help="every cell's step budget (default: the preset's)")


def _study(name: str, cells, out: Path, executor: str, address: str | None, data_dir: Path | None,
           floor: float = 0.0) -> None:
    from loramem.experiments.runner import run_study

    def show(row: dict) -> None:
        notices.print(f"{name}: {row['dataset']} {row['size']} {row['model']} rank {row['rank']} {row['targets']}"
                      f"/{row['layers']} {row['variant']}: score {row['score']:.3f} in {row['cell_seconds']:.0f} s")

    rows = run_study(name, cells, out, executor, address, data_dir, on_row=show, floor=floor)
    keys = ("dataset", "model", "size", "rank", "targets", "layers", "variant", "trainable_params", "score", "epochs",
            "train_seconds")
    table(f"{name}: {len(rows)} cells in {out / (name + '.jsonl')}", [{k: r[k] for k in keys} for r in rows])


@exp_app.command("capacity")
def exp_capacity(dataset: str = DatasetOpt, ranks: Optional[str] = RanksOpt, sizes: Optional[str] = SizesOpt,
                 preset: str = PresetOpt, steps: Optional[int] = StepsOpt, model: str = typer.Option(DEFAULT_MODEL, "--model"),
                 out: Path = StudyOutOpt, executor: str = StudyExecutorOpt, address: Optional[str] = StudyAddressOpt,
                 data_dir: Optional[Path] = DataDirOpt,
                 floor: float = typer.Option(0.0, "--floor", help="skip a rank's larger sizes once one scored below "
                                             "this (0: measure every cell)"),
                 precision: str = PrecisionOpt):
    """Ranks x sizes: how much one module stores, and where it saturates."""
    precision = use_precision(precision)
    from loramem.experiments import studies

    cells = studies.capacity(studies.preset(preset, steps, precision), dataset, csv(ranks, int), csv(sizes), model)
    _study("capacity", cells, out, executor, address, data_dir, floor)


@exp_app.command("placement")
def exp_placement(dataset: str = DatasetOpt, sizes: str = typer.Option("1K,2K", "--sizes"),
                  budget_rank: int = typer.Option(4, "--budget-rank", help="the budget: trainable parameters of the "
                                                  "preset's placement at this rank"),
                  layer_sets: Optional[str] = typer.Option(None, "--layer-sets", help="e.g. first4,last4 (default: the "
                                                           "preset's early and late sets)"),
                  targets: str = typer.Option("ffn,attention,all", "--targets"), preset: str = PresetOpt, steps: Optional[int] = StepsOpt,
                  model: str = typer.Option(DEFAULT_MODEL, "--model"), out: Path = StudyOutOpt,
                  executor: str = StudyExecutorOpt, address: Optional[str] = StudyAddressOpt, data_dir: Optional[Path] = DataDirOpt,
               precision: str = PrecisionOpt):
    """Early vs late layers x FFN / attention / all, at equal parameter budgets."""
    precision = use_precision(precision)
    from loramem.experiments import studies
    from loramem.models import load_base

    cells = studies.placement(studies.preset(preset, steps, precision), dataset, csv(sizes), budget_rank, load_base(model),
                              csv(targets), csv(layer_sets))
    _study("placement", cells, out, executor, address, data_dir)


@exp_app.command("variants")
def exp_variants(dataset: str = DatasetOpt, ranks: str = typer.Option("1,4", "--ranks"),
                 sizes: str = typer.Option("1K,2K,4K", "--sizes"),
                 variants: str = typer.Option("lora,rslora,dora,pissa", "--variants"), preset: str = PresetOpt, steps: Optional[int] = StepsOpt,
                 model: str = typer.Option(DEFAULT_MODEL, "--model"), out: Path = StudyOutOpt,
                 executor: str = StudyExecutorOpt, address: Optional[str] = StudyAddressOpt, data_dir: Optional[Path] = DataDirOpt,
               precision: str = PrecisionOpt):
    """LoRA, rsLoRA, DoRA and PiSSA on the same cells."""
    precision = use_precision(precision)
    from loramem.experiments import studies

    cells = studies.variants(studies.preset(preset, steps, precision), dataset, csv(ranks, int), csv(sizes), model, csv(variants))
    _study("variants", cells, out, executor, address, data_dir)


@exp_app.command("scale")
def exp_scale(dataset: str = DatasetOpt, models: str = typer.Option("smollm2-135m,gemma3-270m", "--models",
                                                                    help="registry names or local HF folders"),
              ranks: str = typer.Option("1,4", "--ranks"), sizes: str = typer.Option("1K,2K,4K", "--sizes"),
              preset: str = PresetOpt, steps: Optional[int] = StepsOpt, out: Path = StudyOutOpt, executor: str = StudyExecutorOpt,
              address: Optional[str] = StudyAddressOpt, data_dir: Optional[Path] = DataDirOpt,
               precision: str = PrecisionOpt):
    """The same capacity cells on several base models."""
    precision = use_precision(precision)
    from loramem.experiments import studies

    cells = studies.scale(studies.preset(preset, steps, precision), dataset, csv(models), csv(ranks, int), csv(sizes))
    _study("scale", cells, out, executor, address, data_dir)


@exp_app.command("budget")
def exp_budget(dataset: str = DatasetOpt, rank: int = typer.Option(1, "--rank"), size: str = typer.Option("4K", "--size"),
               steps: str = typer.Option("400,800,1600", "--steps"), preset: str = PresetOpt,
               model: str = typer.Option(DEFAULT_MODEL, "--model"), out: Path = StudyOutOpt,
               executor: str = StudyExecutorOpt, address: Optional[str] = StudyAddressOpt, data_dir: Optional[Path] = DataDirOpt,
               precision: str = PrecisionOpt):
    """One cell trained for more and more steps: does more training remove the limit?"""
    precision = use_precision(precision)
    from loramem.experiments import studies

    cells = studies.budget(studies.preset(preset, precision=precision), dataset, rank, size, csv(steps, int), model)
    _study("budget", cells, out, executor, address, data_dir)


@app.command()
def report(results: Path = typer.Argument(..., help="a studies folder (loramem exp ... --out)"),
           threshold: float = typer.Option(0.95, "--threshold", help="score a size must keep to count in T_max")):
    """Write RESULTS/report.md with tables and PNG plots of every study found there."""
    from loramem.experiments.report import write_report

    path = write_report(results, threshold)
    console.print(f"wrote {path}")
