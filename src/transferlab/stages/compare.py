"""Stage ``compare``: what ImageNet pretraining buys, from the stages' result files alone (no dvc calls).

Three models: the linear probe, the fine-tuned model and the one trained from scratch. Writes
``metrics/comparison.md`` (test metrics of each with its gain over scratch, training budgets, the classes
that gain and lose most from pretraining, the most confused pairs), ``metrics/comparison.json`` (the
gains, as DVC metrics), ``plots/learning_curves.png`` (both trained models), ``plots/per_class_gain.png``,
and ``metrics/report.html``: one self-contained page (every picture embedded) with the tables, curves,
confusion matrices, calibration, Grad-CAM panel, misclassification galleries and the params of each run.
"""

from __future__ import annotations

import csv
import html
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import MODEL_NAMES, MODELS, TRAINED_MODELS, load_params
from ..entrypoint import run_stage
from ..figures import plt, save_figure
from ..fileio import read_json, write_json, write_text
from ..paths import (
    COMPARISON_JSON,
    COMPARISON_MD,
    CURVES_PNG,
    EFFICIENCY_HTML,
    GAIN_PNG,
    GRADCAM_IMAGE,
    REPORT_HTML,
    evaluation_dir,
    holdout,
    train_dir,
)
from ..report import Table, embedded_image, html_table, markdown, page

# panels of the learning-curve plot: the final fits' training curves, then the holdout twins' accuracy on the
# validation images they never trained on (what generalises); a panel without data is left out
CURVES = [
    ("train/acc", "Training accuracy (augmented batches)", ""),
    ("train/loss", "Training loss", ""),
    ("val/acc", "Held-out accuracy (trained on the train split only)", "holdout"),
]
EVALUATION_PICTURES = [
    ("confusion_matrix.png", "Confusion matrices"),
    ("calibration.png", "Calibration"),
    ("misclassified.jpg", "Most confident mistakes"),
]


def metric_labels(metrics: dict) -> dict[str, str]:
    """The test metrics every model reports, in display order (top-k in order of k)."""
    topk = sorted(
        (key for key in metrics if key.startswith("top") and key[3:].isdigit()), key=lambda key: int(key[3:])
    )
    return {
        "mean_per_class_acc": "Mean per-class accuracy",
        **{key: f"Top-{key[3:]} accuracy" for key in topk},
    }


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


def read_interpolation() -> tuple[list[float], list[float]]:
    """The fine-tuned model's holdout twin: validation accuracy against the mixing weight of start and end
    (WiSE-FT)."""
    path = train_dir(holdout("finetune")) / "interpolation.csv"
    if not path.is_file():
        return [], []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [float(r["interpolation"]) for r in rows], [float(r["val_acc"]) for r in rows]


def training_budget(run: str) -> tuple[dict, dict]:
    """The run's settings (dvclive's params.yaml) and its summary (metrics.json), from the training stage's
    folder."""
    return yaml.safe_load((train_dir(run) / "params.yaml").read_text()), read_json(
        train_dir(run) / "metrics.json"
    )


def model_name(model: str, cfg: dict) -> str:
    return MODEL_NAMES[model] + (
        " (LP-FT)" if model == "finetune" and cfg.get("init_head") == "probe" else ""
    )


def gains_over_scratch(results: dict[str, dict]) -> dict[str, float]:
    """``<model>/<metric>``: how many points each pretrained model adds to the scratch model's test metric."""
    return {
        f"{model}/{key}": results[model][key] - results["scratch"][key]
        for model in MODELS
        if model != "scratch"
        for key in metric_labels(results[model])
    }


def metrics_table(results: dict[str, dict], names: dict[str, str]) -> Table:
    labels = metric_labels(results["scratch"])
    headers = ["Model", *labels.values(), "ECE (lower is better)", "Gain over scratch (mean per-class)"]
    rows = []
    for model, metrics in results.items():
        gain = metrics["mean_per_class_acc"] - results["scratch"]["mean_per_class_acc"]
        ece = f"{metrics['ece']:.3f}" if "ece" in metrics else "n/a"
        flag = " (ended at chance in training: its scores mean nothing)" if metrics.get("at_chance") else ""
        rows.append(
            [
                names[model] + flag,
                *(f"{metrics[key]:.2%}" for key in labels),
                ece,
                "-" if model == "scratch" else f"{gain:+.2%}",
            ]
        )
    return Table("Linear probe, fine-tuned and from scratch, test split", headers, rows)


def budget_row(name: str, cfg: dict, summary: dict) -> list[str]:
    mode = cfg.get("mode", "")
    trained_on = "train + val" if cfg.get("train_on_val") else "train"
    wall = f"{summary['wall_time_s'] / 60:.1f} min"
    if mode == "linear_probe":
        val = (
            f"{summary['best/val_acc']:.2%} (C {summary['best/C']:g})" if "best/val_acc" in summary else "n/a"
        )
        return [
            name,
            mode,
            cfg["weights"],
            "-",
            f"{cfg['image_size']} px",
            f"C {summary['best/C']:g}",
            trained_on,
            val,
            wall,
        ]
    body = cfg["lr"] * cfg["backbone_lr_scale"]
    lr = f"{cfg['lr']:g}" + {"finetune": f" (body {body:g})", "feature_extract": " (body frozen)"}.get(
        mode, ""
    )
    val = (
        f"{summary['best/val_acc']:.2%} (epoch {summary['best/epoch']})"
        if "best/val_acc" in summary
        else "n/a"
    )
    return [
        name,
        mode,
        cfg["weights"],
        str(cfg["epochs"]),
        f"{cfg['image_size']} / {cfg['eval_image_size']} px",
        lr,
        trained_on,
        val,
        wall,
    ]


def budget_table(budgets: dict[str, tuple[dict, dict]], names: dict[str, str]) -> Table:
    rows = [budget_row(names[model], cfg, summary) for model, (cfg, summary) in budgets.items()]
    headers = [
        "Model",
        "Mode",
        "Weights",
        "Epochs",
        "Train / eval resolution",
        "lr (probe: C)",
        "Trained on",
        "Val acc",
        "Stage wall time",
    ]
    return Table("Training budget", headers, rows)


def gain_tables(gains: list[tuple[str, float, float, float]], top: int) -> list[Table]:
    headers = ["Class", "Fine-tuned", "Scratch", "Gain"]
    return [
        Table(
            f"Classes that {title} from fine-tuning",
            headers,
            [[name, f"{ft:.1%}", f"{sc:.1%}", f"{gain:+.1%}"] for name, ft, sc, gain in rows],
        )
        for title, rows in (("gain most", gains[:top]), ("gain least (or lose)", gains[::-1][:top]))
    ]


def confusion_tables(top: int, names: dict[str, str]) -> list[Table]:
    headers = ["True class", "Predicted as", "Test images", "Share of the class"]
    tables = []
    for model in MODELS:
        pairs = read_confused_pairs(model, top)
        rows = [
            [p["true_class"], p["predicted_class"], p["count"], f"{float(p['share_of_true_class']):.0%}"]
            for p in pairs
        ]
        tables.append(Table(f"Most confused pairs, {names[model]}", headers, rows))
    return tables


def summary_line(gains: list[tuple[str, float, float, float]], finetune: dict) -> str:
    improved = sum(1 for *_, gain in gains if gain > 0)
    worse = sum(1 for *_, gain in gains if gain < 0)
    return (
        f"Test images: {finetune['test_images']}. "
        "Per class, fine-tuning the pretrained model instead of training from scratch "
        f"helps {improved} classes, hurts {worse}, ties {len(gains) - improved - worse}."
    )


@dataclass(frozen=True)
class Comparison:
    """Everything the Markdown and HTML reports show, read and computed once."""

    metrics: Table
    summary: str
    budget: Table
    gains: list[Table]
    confusions: list[Table]
    params: dict[str, dict]  # each model's settings, as its stage logged them, by display name


def build_comparison(results: dict[str, dict], gains: list, top: int, budgets: dict) -> Comparison:
    names = {model: model_name(model, cfg) for model, (cfg, _) in budgets.items()}
    return Comparison(
        metrics=metrics_table(results, names),
        summary=summary_line(gains, results["finetune"]),
        budget=budget_table(budgets, names),
        gains=gain_tables(gains, top),
        confusions=confusion_tables(top, names),
        params={names[model]: cfg for model, (cfg, _) in budgets.items()},
    )


def markdown_report(comparison: Comparison) -> str:
    lines = [f"# {comparison.metrics.title}", "", *markdown(comparison.metrics)[2:], comparison.summary, ""]
    for table in [comparison.budget, *comparison.gains, *comparison.confusions]:
        lines += markdown(table)
    return "\n".join(lines)


def html_report(comparison: Comparison) -> str:
    def pictures(name: str) -> str:
        return (
            "<div class='row'>"
            + "".join(embedded_image(evaluation_dir(model) / name, MODEL_NAMES[model]) for model in MODELS)
            + "</div>"
        )

    def params_of(run: str, cfg: dict) -> str:
        return f"<h3>{run}</h3><pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"

    parts = [
        f"<h1>{html.escape(comparison.metrics.title)}</h1>",
        html_table(comparison.metrics, heading=False),
        f"<p>{html.escape(comparison.summary)}</p>",
        "<p>How the three models do with fewer labelled images per class: the data-efficiency "
        f"curve, <a href='{EFFICIENCY_HTML.name}'>{EFFICIENCY_HTML.name}</a> (written by "
        "<code>dvc repro efficiency/dvc.yaml</code>).</p>",
        "<h2>Learning curves</h2>",
        embedded_image(CURVES_PNG, "learning curves of both trained models"),
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
    parts += [
        "<h2>Params of each model</h2>",
        *(params_of(name, cfg) for name, cfg in comparison.params.items()),
    ]
    return page("transferlab report", parts)


def plot_curves(path: Path) -> None:
    curves = {
        (metric, title, source): {
            run: read_curve(holdout(run) if source else run, metric) for run in TRAINED_MODELS
        }
        for metric, title, source in CURVES
    }
    curves = {panel: runs for panel, runs in curves.items() if any(epochs for epochs, _ in runs.values())}
    probe_val = read_json(train_dir("probe") / "metrics.json").get("best/val_acc")
    weights, accuracies = read_interpolation()
    panels = len(curves) + bool(weights)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    if weights:
        ax = axes[0][-1]
        ax.plot(weights, accuracies, "-o", markersize=3, color="tab:blue")
        ax.set(
            title=f"{MODEL_NAMES['finetune']}: start + w (end - start), held out",
            xlabel="w (0: where fine-tuning starts, 1: fine-tuned)",
            ylabel="validation accuracy (no TTA)",
        )
        ax.grid(alpha=0.3)
    for ax, ((_metric, title, source), runs) in zip(axes[0], curves.items(), strict=False):
        for (run, (epochs, values)), style in zip(runs.items(), ("-o", "-s"), strict=False):
            ax.plot(epochs, values, style, markersize=3, label=MODEL_NAMES[run])
        if source and probe_val is not None:  # the probe has no epochs: its validation accuracy, as a level
            ax.axhline(
                probe_val,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"{MODEL_NAMES['probe']} ({probe_val:.1%}, with flip TTA)",
            )
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_gains(path: Path, gains: list[tuple[str, float, float, float]]) -> None:
    fig, ax = plt.subplots(figsize=(8, max(4, 0.16 * len(gains))))
    names = [g[0] for g in gains][::-1]
    values = [g[3] * 100 for g in gains][::-1]
    ax.barh(names, values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.set(
        xlabel="fine-tuned minus scratch, per-class test accuracy (points)",
        title="Gain from ImageNet pretraining per class",
    )
    ax.tick_params(axis="y", labelsize=6)
    ax.axvline(0, color="black", linewidth=0.8)
    save_figure(fig, path)


def main() -> None:
    top = load_params().evaluate.top_classes
    results = {model: read_json(evaluation_dir(model) / "metrics.json") for model in MODELS}
    per_ft, per_sc = read_per_class("finetune"), read_per_class("scratch")
    gains = sorted(
        ((c, per_ft[c], per_sc[c], per_ft[c] - per_sc[c]) for c in per_ft), key=lambda g: (-g[3], g[0])
    )
    comparison = build_comparison(results, gains, top, {model: training_budget(model) for model in MODELS})
    write_text(COMPARISON_MD, markdown_report(comparison))
    write_json(
        COMPARISON_JSON,
        {f"gain_over_scratch/{key}": gain for key, gain in gains_over_scratch(results).items()},
    )
    plot_curves(CURVES_PNG)
    plot_gains(GAIN_PNG, gains)
    write_text(REPORT_HTML, html_report(comparison))
    print(COMPARISON_MD.read_text())


if __name__ == "__main__":
    run_stage("compare", main)
