"""`loramem report RESULTS`: one Markdown page with tables and PNG plots of every study in a results folder.

Study rows come from `<study>.jsonl` (loramem exp ...); benchmark JSON files in the same folder (`loramem bench
... --out`, with a "rows" list) get a table each, so format, routing and merge results sit beside the studies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loramem.errors import LoramemError
from loramem.experiments.runner import read_rows
from loramem.experiments.studies import DEFAULT_THRESHOLD, capacity_summary, group_key

CURVE_STUDIES = ("capacity", "scale")  # studies whose rows form score-against-size curves per rank


def write_report(folder: str | Path, threshold: float = DEFAULT_THRESHOLD) -> Path:
    folder = Path(folder)
    studies = {path.stem: read_rows(path) for path in sorted(folder.glob("*.jsonl"))}
    others = sorted(p for p in folder.glob("*.json") if _rows_of(p))
    if not any(studies.values()) and not others:
        raise LoramemError(f"{folder} holds no study results (*.jsonl from `loramem exp`) or benchmark JSON")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    lines = [f"# loramem studies: {folder.name}", "",
             f"Written by `loramem report {folder}` from the rows in this folder. Scores: PhoneBook exact match "
             "(teacher-forced greedy), CounterFact efficacy (with paraphrase efficacy, locality as ROME's neighbourhood "
             "score, and the share of neighbour tokens unchanged); T_max is the largest size up to which every size scored "
             f">= {threshold:g}.", ""]
    curves = {r["key"]: r for name in CURVE_STUDIES for r in studies.get(name, [])}
    if curves:
        lines += _capacity_section(folder, list(curves.values()), threshold)
    for name, section in (("placement", _bars_section), ("variants", _bars_section), ("budget", _budget_section)):
        if studies.get(name):
            lines += section(folder, name, studies[name])
    for path in others:
        lines += [f"## {path.stem} (`{path.name}`)", "", *_markdown_table(_rows_of(path)), ""]
    out = folder / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _rows_of(path: Path) -> list[dict]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    rows = loaded.get("rows") if isinstance(loaded, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(str(p) for p in parts)).strip("-")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:.3f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return "" if value is None else str(value)


def _markdown_table(rows: list[dict], keys: list[str] | None = None) -> list[str]:
    keys = keys or [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows)]


def _family_title(row: dict) -> str:
    return f"{row['dataset']}, {row['model']}, {row['targets']} of layers {row['layers']}, {row['variant']}"


def _capacity_section(folder: Path, rows: list[dict], threshold: float) -> list[str]:
    import matplotlib.pyplot as plt

    lines = ["## Capacity: score against size per rank", ""]
    families: dict[tuple, list[dict]] = {}
    for row in rows:
        families.setdefault(group_key(row), []).append(row)
    summary = capacity_summary(rows, threshold)
    for family, members in families.items():
        title = _family_title(members[0])
        sizes = sorted({(r["data_tokens"], r["size"]) for r in members})
        ranks = sorted({r["rank"] for r in members})
        score = {(r["rank"], r["size"]): r for r in members}
        extra = " (paraphrase / locality / unchanged)" if members[0]["dataset"] == "counterfact" else ""
        lines += [f"### {title}", "", f"Score by rank (rows) and size (columns){extra}:", "",
                  "| rank | params | " + " | ".join(s for _, s in sizes) + " |", "|---|---|" + "---|" * len(sizes)]
        for rank in ranks:
            cells = []
            for _, size in sizes:
                r = score.get((rank, size))
                cell = "" if r is None else f"{r['score']:.3f}"
                if r is not None and r["dataset"] == "counterfact":
                    cell += f" ({r['paraphrase']:.2f} / {r['locality']:.2f} / {r.get('unchanged', float('nan')):.2f})"
                cells.append(cell)
            params = next(r["trainable_params"] for r in members if r["rank"] == rank)
            lines.append(f"| {rank} | {params:,} | " + " | ".join(cells) + " |")
        fig, ax = plt.subplots(figsize=(6, 4))
        for rank in ranks:
            pts = sorted((r["data_tokens"], r["score"]) for r in members if r["rank"] == rank)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"rank {rank}")
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="data tokens", ylabel="score", title=title, ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
        png = f"{_slug('capacity', *family[:5])}.png"
        fig.tight_layout()
        fig.savefig(folder / png, dpi=110)
        plt.close(fig)
        mine = [s for s in summary if (s["dataset"], s["model"], s["targets"], s["layers"], s["variant"]) == family[:5]]
        lines += ["", f"![{title}]({png})", "", *_summary_table(mine), ""]
    lines += _efficiency_plot(folder, summary)
    return lines


def _summary_table(summary: list[dict]) -> list[str]:
    lines = ["| rank | params | T_max (size) | T_max tokens | tokens / param | bits / param at T_max | most facts stored "
             "(at size) | bits / param, most stored |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        at_least = ">= " if s["censored"] else ""
        bits = [_fmt(b) if b is not None else "n/a" for b in (s["bits_per_param"], s["most_bits_per_param"])]
        lines.append(f"| {s['rank']} | {s['trainable_params']:,} | {at_least}{s['t_max_size'] or 'none'} | "
                     f"{at_least}{s['t_max_tokens']:,} | {at_least}{s['efficiency']:.3f} | {bits[0]} | "
                     f"{s['most_stored']:.0f} ({s['most_stored_size']}) | {bits[1]} |")
    first = summary[0]
    saturation = first["saturation_rank"]
    if not any(s["t_max_tokens"] for s in summary):
        return lines + ["", "No rank held even the smallest size measured."]
    lines += ["", f"Efficiency peaks at rank {first['efficiency_peak_rank']}; "
              + (f"T_max stops growing after rank {saturation}." if saturation is not None else
                 "no saturation seen: T_max grew up to the largest rank, or the largest size measured cut it off.")]
    return lines


def _efficiency_plot(folder: Path, summary: list[dict]) -> list[str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    families: dict[tuple, list[dict]] = {}
    for s in summary:
        families.setdefault((s["dataset"], s["model"], s["targets"], s["layers"], s["variant"]), []).append(s)
    for family, members in families.items():
        ax.plot([s["rank"] for s in members], [s["efficiency"] for s in members], marker="o",
                label=", ".join(map(str, family[:2] + family[3:4])))
    ax.set_xscale("log", base=2)
    ax.set(xlabel="rank", ylabel="T_max tokens per trainable parameter", title="Efficiency against rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "efficiency.png", dpi=110)
    plt.close(fig)
    return ["### Efficiency against rank", "", "![efficiency](efficiency.png)", ""]


def _label(row: dict) -> str:
    return f"{row['layers']} {row['targets']} r{row['rank']} {row['variant']}".replace(" lora", "")


def _bars_section(folder: Path, name: str, rows: list[dict]) -> list[str]:
    import matplotlib.pyplot as plt

    keys = ["dataset", "model", "size", "layers", "targets", "rank", "variant", "trainable_params", "score",
            *(["paraphrase", "locality", "unchanged"] if rows[0]["dataset"] == "counterfact" else []), "steps",
            "train_seconds"]
    sizes = sorted({(r["data_tokens"], r["size"]) for r in rows})
    labels = list(dict.fromkeys(_label(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
    width = 0.8 / len(sizes)
    for i, (_, size) in enumerate(sizes):
        by_label = {_label(r): r["score"] for r in rows if r["size"] == size}
        ax.bar([j + i * width for j in range(len(labels))], [by_label.get(lab, 0.0) for lab in labels], width,
               label=size)
    ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(labels))], labels, rotation=30, ha="right",
                  fontsize=8)
    ax.set(ylabel="score", title=name, ylim=(0, 1.02))
    ax.legend(title="size", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / f"{name}.png", dpi=110)
    plt.close(fig)
    return [f"## {name.capitalize()}", "", f"![{name}]({name}.png)", "", *_markdown_table(rows, keys), ""]


def _budget_section(folder: Path, name: str, rows: list[dict]) -> list[str]:
    """Score against the steps allowed, one line per cell that was given more steps."""
    import matplotlib.pyplot as plt

    curves: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["train"]["max_steps"] or 0):
        curves.setdefault((_family_title(row), row["rank"], row["size"]), []).append(row)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for (title, rank, size), members in curves.items():
        ax.plot([r["train"]["max_steps"] for r in members], [r["score"] for r in members], marker="o",
                label=f"{title}, rank {rank}, {size}")
    ax.set(xlabel="steps allowed", ylabel="score", title="Training budget", ylim=(-0.02, 1.02))
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "budget.png", dpi=110)
    plt.close(fig)
    table = [{"steps allowed": r["train"]["max_steps"], **{k: r[k] for k in ("size", "rank", "score", "steps", "epochs",
                                                                             "train_seconds")}}
             for members in curves.values() for r in members]
    return ["## Training budget", "", "![budget](budget.png)", "", *_markdown_table(table), ""]
