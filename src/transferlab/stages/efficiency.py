"""Stage ``efficiency`` (``efficiency/dvc.yaml``): the data-efficiency curve, from the points' result files.

    dvc repro efficiency/dvc.yaml      # every point (stages subset_probe@..., subset_finetune@...,
                                       # subset_scratch@...), the main models they join, then this stage

Reads each point's scores (``metrics/efficiency/test_<model>_n<n>_d<draw>/metrics.json``) and the main
models' (their point at ``data.train_per_class``), and writes ``plots/efficiency.png`` (test accuracy against
images per class, log axis, the spread over the draws, Zeiler & Fergus's published points),
``metrics/efficiency.md`` (the two findings and the table, with each point's training time),
``metrics/efficiency.json`` (each model's mean and standard deviation per size, as DVC metrics) and
``metrics/efficiency.html`` (the same on one self-contained page, linked from the main report).
"""

from __future__ import annotations

from ..config import load_params
from ..efficiency import as_metrics, findings, html_page, markdown_page, plot, read_points, summarise, table
from ..entrypoint import run_stage
from ..fileio import write_json, write_text
from ..paths import EFFICIENCY_HTML, EFFICIENCY_JSON, EFFICIENCY_MD, EFFICIENCY_PNG


def main() -> None:
    params = load_params()
    params.check_efficiency()
    summaries = summarise(read_points(params.efficiency, params.data.train_per_class))
    summary_table, sentences = table(summaries), findings(summaries)
    full = params.data.train_per_class
    note = (
        f"Every point is scored on the same test images, with evaluate.tta: {params.evaluate.tta}. Spread: "
        f"standard deviation over the draws {params.efficiency.draws} (each a different subset; the training "
        f"seed stays the recipe's); the row at {full} images per class is the main models (one run each). "
        "Time: a point's fit alone; at the full size the training stage's wall time (the probe's includes "
        "choosing C, the fine-tune's torch.compile's warm-up); the features stage, which every probe shares, "
        "is not counted."
    )
    plot(summaries, EFFICIENCY_PNG)
    write_text(EFFICIENCY_MD, markdown_page(summary_table, sentences, note))
    write_json(EFFICIENCY_JSON, as_metrics(summaries))
    write_text(EFFICIENCY_HTML, html_page(summary_table, sentences, note, EFFICIENCY_PNG))
    print(EFFICIENCY_MD.read_text())


if __name__ == "__main__":
    run_stage("efficiency", main)
