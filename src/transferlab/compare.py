"""Stage ``compare``: what ImageNet pretraining buys, from the metric files alone (no dvc calls).

Writes ``metrics/comparison.md`` (test metrics of both models, the gain, the classes that gain
and lose most), ``metrics/comparison.json`` (the gains, as DVC metrics), and two pictures:
``plots/learning_curves.png`` (both models' curves on shared axes) and ``plots/per_class_gain.png``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import RUNS, load_params  # noqa: E402
from .fileio import atomic_path, read_json, write_json, write_text  # noqa: E402
from .paths import COMPARISON_JSON, COMPARISON_MD, CURVES_PNG, GAIN_PNG, evaluation_dir, train_dir  # noqa: E402
from .stage import run_stage  # noqa: E402

METRIC_LABELS = {"mean_per_class_acc": "Mean per-class accuracy", "top1": "Top-1 accuracy", "top5": "Top-5 accuracy"}
CURVES = [("val/acc", "Validation accuracy"), ("val/loss", "Validation loss"), ("train/loss", "Training loss")]


def read_per_class(run: str) -> dict[str, float]:
    """Per-class accuracy (recall) by class name."""
    with (evaluation_dir(run) / "per_class.csv").open() as f:
        return {row["class"]: float(row["recall"]) for row in csv.DictReader(f)}


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


def budget_table(budgets: dict[str, tuple[dict, dict]]) -> list[str]:
    lines = [
        "## Training budget",
        "",
        "| Model | Mode | Weights | Epochs | Train / eval resolution | lr | Best val acc (epoch) | Training wall time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for run, (cfg, summary) in budgets.items():
        mode = cfg.get("mode", run)
        body = cfg["lr"] * cfg["backbone_lr_scale"]
        lr = f"{cfg['lr']:g}" + {"finetune": f" (body {body:g})", "feature_extract": " (body frozen)"}.get(mode, "")
        val = f"{summary['best/val_acc']:.2%} ({summary['best/epoch']})" if "best/val_acc" in summary else "n/a"
        lines.append(
            f"| {run} | {mode} | {cfg['weights']} | {cfg['epochs']} | {cfg['image_size']} / {cfg['eval_image_size']} px | {lr} "
            f"| {val} | {summary['wall_time_s'] / 60:.1f} min |"
        )
    return lines + [""]


def markdown_report(finetune: dict, scratch: dict, gains: list[tuple[str, float, float, float]], top: int, budgets: dict) -> str:
    lines = [
        "# Pretrained (fine-tuned) vs from scratch, test split",
        "",
        "| Metric | Fine-tuned | Scratch | Gain from pretraining |",
        "|---|---:|---:|---:|",
    ]
    for key, label in METRIC_LABELS.items():
        lines.append(f"| {label} | {finetune[key]:.2%} | {scratch[key]:.2%} | {finetune[key] - scratch[key]:+.2%} |")
    lines += ["", f"Test images: {finetune['test_images']}.", ""]
    lines += budget_table(budgets)
    improved = sum(1 for *_, gain in gains if gain > 0)
    worse = sum(1 for *_, gain in gains if gain < 0)
    lines += [f"Per class: pretraining helps {improved} classes, hurts {worse}, ties {len(gains) - improved - worse}.", ""]
    for title, rows in (("gain most", gains[:top]), ("gain least (or lose)", gains[::-1][:top])):
        lines += [f"## Classes that {title}", "", "| Class | Fine-tuned | Scratch | Gain |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {ft:.1%} | {sc:.1%} | {gain:+.1%} |" for name, ft, sc, gain in rows]
        lines.append("")
    return "\n".join(lines)


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


def save_figure(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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
    budgets = {run: training_budget(run) for run in RUNS}
    write_text(COMPARISON_MD, markdown_report(finetune, scratch, gains, top, budgets))
    write_json(COMPARISON_JSON, {f"gain/{key}": finetune[key] - scratch[key] for key in METRIC_LABELS})
    plot_curves(CURVES_PNG)
    plot_gains(GAIN_PNG, gains)
    print(COMPARISON_MD.read_text())


if __name__ == "__main__":
    run_stage("compare", main)
