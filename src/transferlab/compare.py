"""Stage ``compare``: what ImageNet pretraining buys, from the stages' result files alone (no dvc calls).

Writes ``metrics/comparison.md`` (test metrics of both models, the gain, training budgets, the classes
that gain and lose most, the most confused pairs), ``metrics/comparison.json`` (the gains, as DVC
metrics), ``plots/learning_curves.png``, ``plots/per_class_gain.png``, and ``metrics/report.html``:
one self-contained page (every picture embedded) with the tables, curves, confusion matrices,
calibration, Grad-CAM panel, misclassification galleries and the params of both runs.
"""

from __future__ import annotations

import base64
import csv
import html
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .analysis import save_figure  # noqa: E402
from .config import RUNS, load_params  # noqa: E402
from .fileio import read_json, write_json, write_text  # noqa: E402
from .paths import COMPARISON_JSON, COMPARISON_MD, CURVES_PNG, GAIN_PNG, GRADCAM_IMAGE, REPORT_HTML, evaluation_dir, train_dir  # noqa: E402
from .stage import run_stage  # noqa: E402

CURVES = [("val/acc", "Validation accuracy"), ("val/loss", "Validation loss"), ("train/loss", "Training loss")]
EVALUATION_PICTURES = [
    ("confusion_matrix.png", "Confusion matrices"),
    ("calibration.png", "Calibration"),
    ("misclassified.jpg", "Most confident mistakes"),
]


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


def metric_labels(metrics: dict) -> dict[str, str]:
    """The test metrics both models report, in display order (top-k in order of k)."""
    topk = sorted((key for key in metrics if key.startswith("top") and key[3:].isdigit()), key=lambda key: int(key[3:]))
    return {"mean_per_class_acc": "Mean per-class accuracy", **{key: f"Top-{key[3:]} accuracy" for key in topk}}


def read_per_class(run: str) -> dict[str, float]:
    """Per-class accuracy (recall) by class name."""
    with (evaluation_dir(run) / "per_class.csv").open() as f:
        return {row["class"]: float(row["recall"]) for row in csv.DictReader(f)}


def read_confused_pairs(run: str, count: int) -> list[dict]:
    path = evaluation_dir(run) / "confused_pairs.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))[:count]


def read_curve(run: str, metric: str) -> tuple[list[int], list[float]]:
    path = train_dir(run) / "plots" / "metrics" / f"{metric}.tsv"
    if not path.is_file():
        return [], []
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    name = metric.rsplit("/", 1)[-1]
    return [int(r["step"]) + 1 for r in rows], [float(r[name]) for r in rows]


def training_budget(run: str) -> tuple[dict, dict]:
    """The run's settings (dvclive's params.yaml) and its summary (metrics.json), from the training stage's folder."""
    return yaml.safe_load((train_dir(run) / "params.yaml").read_text()), read_json(train_dir(run) / "metrics.json")


def metrics_table(finetune: dict, scratch: dict) -> Table:
    rows = [[label, f"{finetune[key]:.2%}", f"{scratch[key]:.2%}", f"{finetune[key] - scratch[key]:+.2%}"] for key, label in metric_labels(finetune).items()]
    if "ece" in finetune and "ece" in scratch:
        rows.append(["Expected calibration error (lower is better)", f"{finetune['ece']:.3f}", f"{scratch['ece']:.3f}", f"{finetune['ece'] - scratch['ece']:+.3f}"])
    return Table("Pretrained (fine-tuned) vs from scratch, test split", ["Metric", "Fine-tuned", "Scratch", "Gain from pretraining"], rows)


def budget_table(budgets: dict[str, tuple[dict, dict]]) -> Table:
    rows = []
    for run, (cfg, summary) in budgets.items():
        mode = cfg.get("mode", run)
        body = cfg["lr"] * cfg["backbone_lr_scale"]
        lr = f"{cfg['lr']:g}" + {"finetune": f" (body {body:g})", "feature_extract": " (body frozen)"}.get(mode, "")
        val = f"{summary['best/val_acc']:.2%} ({summary['best/epoch']})" if "best/val_acc" in summary else "n/a"
        rows.append(
            [run, mode, cfg["weights"], str(cfg["epochs"]), f"{cfg['image_size']} / {cfg['eval_image_size']} px", lr, val, f"{summary['wall_time_s'] / 60:.1f} min"]
        )
    headers = ["Model", "Mode", "Weights", "Epochs", "Train / eval resolution", "lr", "Best val acc (epoch)", "Training wall time"]
    return Table("Training budget", headers, rows)


def gain_tables(gains: list[tuple[str, float, float, float]], top: int) -> list[Table]:
    headers = ["Class", "Fine-tuned", "Scratch", "Gain"]
    return [
        Table(f"Classes that {title}", headers, [[name, f"{ft:.1%}", f"{sc:.1%}", f"{gain:+.1%}"] for name, ft, sc, gain in rows])
        for title, rows in (("gain most", gains[:top]), ("gain least (or lose)", gains[::-1][:top]))
    ]


def confusion_tables(top: int) -> list[Table]:
    headers = ["True class", "Predicted as", "Test images", "Share of the class"]
    tables = []
    for run in RUNS:
        pairs = read_confused_pairs(run, top)
        rows = [[p["true_class"], p["predicted_class"], p["count"], f"{float(p['share_of_true_class']):.0%}"] for p in pairs]
        tables.append(Table(f"Most confused pairs, {run}", headers, rows))
    return tables


def markdown(table: Table) -> list[str]:
    lines = [f"## {table.title}", "", "| " + " | ".join(table.headers) + " |", "|---|" + "---:|" * (len(table.headers) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in table.rows] + [""]


def html_table(table: Table, heading: bool = True) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in table.rows)
    title = f"<h2>{html.escape(table.title)}</h2>\n" if heading else ""
    return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_line(gains: list[tuple[str, float, float, float]], finetune: dict) -> str:
    improved = sum(1 for *_, gain in gains if gain > 0)
    worse = sum(1 for *_, gain in gains if gain < 0)
    return f"Test images: {finetune['test_images']}. Per class: pretraining helps {improved} classes, hurts {worse}, ties {len(gains) - improved - worse}."


@dataclass(frozen=True)
class Comparison:
    """Everything the Markdown and HTML reports show, read and computed once."""

    metrics: Table
    summary: str
    budget: Table
    gains: list[Table]
    confusions: list[Table]
    params: dict[str, dict]  # each run's settings, as its training stage logged them


def build_comparison(finetune: dict, scratch: dict, gains: list, top: int, budgets: dict) -> Comparison:
    return Comparison(
        metrics=metrics_table(finetune, scratch),
        summary=summary_line(gains, finetune),
        budget=budget_table(budgets),
        gains=gain_tables(gains, top),
        confusions=confusion_tables(top),
        params={run: cfg for run, (cfg, _) in budgets.items()},
    )


def markdown_report(comparison: Comparison) -> str:
    lines = [f"# {comparison.metrics.title}", "", *markdown(comparison.metrics)[2:], comparison.summary, ""]
    for table in [comparison.budget, *comparison.gains, *comparison.confusions]:
        lines += markdown(table)
    return "\n".join(lines)


def embedded_image(path: Path, alt: str) -> str:
    """An <img> carrying the picture itself, so the report is one file."""
    if not path.is_file():
        return f"<p class='missing'>{html.escape(alt)}: not produced ({html.escape(str(path))})</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
.row { display: flex; gap: 1em; flex-wrap: wrap; } .row figure { flex: 1 1 45%; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
"""


def html_report(comparison: Comparison) -> str:
    def pictures(name: str) -> str:
        return "<div class='row'>" + "".join(embedded_image(evaluation_dir(run) / name, run) for run in RUNS) + "</div>"

    def params_of(run: str, cfg: dict) -> str:
        return f"<h3>{run}</h3><pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"

    parts = [
        f"<h1>{html.escape(comparison.metrics.title)}</h1>",
        html_table(comparison.metrics, heading=False),
        f"<p>{html.escape(comparison.summary)}</p>",
        "<h2>Learning curves</h2>",
        embedded_image(CURVES_PNG, "learning curves of both models"),
        html_table(comparison.budget),
        "<h2>Grad-CAM: where each model looks</h2>",
        embedded_image(GRADCAM_IMAGE, "Grad-CAM panel, fixed test images"),
        "<h2>Per-class gain</h2>",
        embedded_image(GAIN_PNG, "fine-tuned minus scratch, per class"),
        *(html_table(t) for t in comparison.gains),
    ]
    for name, title in EVALUATION_PICTURES:
        parts += [f"<h2>{html.escape(title)}</h2>", pictures(name)]
    parts += [html_table(t) for t in comparison.confusions]
    parts += ["<h2>Params of both runs</h2>", *(params_of(run, cfg) for run, cfg in comparison.params.items())]
    body = "\n".join(parts)
    return f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>transferlab report</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"


def plot_curves(path: Path) -> None:
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for ax, (metric, title) in zip(axes, CURVES):
        for run, style in zip(RUNS, ("-o", "-s")):
            epochs, values = read_curve(run, metric)
            ax.plot(epochs, values, style, markersize=3, label=run)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_gains(path: Path, gains: list[tuple[str, float, float, float]]) -> None:
    fig, ax = plt.subplots(figsize=(8, max(4, 0.16 * len(gains))))
    names = [g[0] for g in gains][::-1]
    values = [g[3] * 100 for g in gains][::-1]
    ax.barh(names, values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.set(xlabel="fine-tuned minus scratch, per-class test accuracy (points)", title="Gain from ImageNet pretraining per class")
    ax.tick_params(axis="y", labelsize=6)
    ax.axvline(0, color="black", linewidth=0.8)
    save_figure(fig, path)


def main() -> None:
    top = load_params().evaluate.top_classes
    finetune, scratch = (read_json(evaluation_dir(run) / "metrics.json") for run in RUNS)
    per_ft, per_sc = read_per_class("finetune"), read_per_class("scratch")
    gains = sorted(((c, per_ft[c], per_sc[c], per_ft[c] - per_sc[c]) for c in per_ft), key=lambda g: (-g[3], g[0]))
    comparison = build_comparison(finetune, scratch, gains, top, {run: training_budget(run) for run in RUNS})
    write_text(COMPARISON_MD, markdown_report(comparison))
    write_json(COMPARISON_JSON, {f"gain/{key}": finetune[key] - scratch[key] for key in metric_labels(finetune)})
    plot_curves(CURVES_PNG)
    plot_gains(GAIN_PNG, gains)
    write_text(REPORT_HTML, html_report(comparison))
    print(COMPARISON_MD.read_text())


if __name__ == "__main__":
    run_stage("compare", main)
