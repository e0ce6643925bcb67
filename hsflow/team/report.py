"""`python -m hsflow.report --experiment NAME`: an experiment's MLflow runs as the study's tables.

Grid layout (default): rows = epochs, columns = backbones, cells = test top-1, like the study's tables 2/4/6,
then the best run's confusion matrix with code labels. List layout (`--layout list`): one row per run with
top-1 / top-3 / chapter top-1 / minutes, for comparing configurations (docs/evaluation.md, "The search").
The markdown is printed and logged as an artifact of a run named `report` in the same experiment.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

import mlflow
from mlflow.tracking import MlflowClient

from hsflow.core.config import default_tracking_uri

REPORT_TAG = "hsflow.kind"


def finished_runs(experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise ValueError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()} (there are: {names})")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    return exp, [r for r in runs if r.data.tags.get(REPORT_TAG) != "report" and "test/top1" in r.data.metrics]


def _num(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def grid_table(runs, rows: str, cols: str, metric: str) -> tuple[str, dict]:
    """Markdown table rows x cols of `metric`; the newest run wins a cell that was run twice."""
    cells: dict = {}
    for r in runs:  # newest first
        key = (r.data.params.get(rows, "?"), r.data.params.get(cols, "?"))
        cells.setdefault(key, r)
    row_keys = sorted({k[0] for k in cells}, key=_num)
    col_keys = sorted({k[1] for k in cells})
    protocols = sorted({protocol(r) for r in cells.values()})
    lines = [f"split protocol: {', '.join(protocols)}", "",
             f"| {rows} \\ {cols} | " + " | ".join(col_keys) + " |", "|---" * (len(col_keys) + 1) + "|"]
    for rk in row_keys:
        vals = [cells.get((rk, ck)) for ck in col_keys]
        lines.append(f"| {rk} | " + " | ".join(f"{v.data.metrics[metric]:.4f}" if v else "–" for v in vals) + " |")
    table = {f"{rk}|{ck}": {"run_id": r.info.run_id, metric: r.data.metrics[metric]} for (rk, ck), r in cells.items()}
    return "\n".join(lines), table


LIST_COLUMNS = [("curves/top1_val", "val top-1"), ("test/top1", "test top-1 [95 % CI]"),
                ("test/top3", "test top-3 [95 % CI]"), ("test/chapter_top1", "chapter top-1"),
                ("test/unflagged_coverage", "unflagged"), ("test/unflagged_precision", "unflagged precision"),
                ("total_minutes", "minutes")]


def protocol(run) -> str:
    """How the run's splits were drawn (logged as a tag by hsflow.train; older runs only have the param)."""
    tag = run.data.tags.get("split_protocol")
    if tag:
        return tag.split(":")[0] + (" + refit" if run.data.tags.get("refit") == "True" else "")
    return run.data.params.get("dataset.split.by", "ruling")


def _cell(run, key: str) -> str:
    v = run.data.metrics.get(key)
    if v is None:
        return "–"
    if key == "total_minutes":
        return f"{v:.1f}"
    low, high = run.data.metrics.get(key + "_ci_low"), run.data.metrics.get(key + "_ci_high")
    return f"{v:.4f} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else f"{v:.4f}"


def list_table(runs) -> tuple[str, dict]:
    lines = ["| run | protocol | backbone | " + " | ".join(h for _, h in LIST_COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(LIST_COLUMNS)]
    table = {}
    for r in sorted(runs, key=lambda r: -r.data.metrics.get("curves/top1_val", 0)):
        name = r.data.tags.get("mlflow.runName", r.info.run_id[:8])
        lines.append(f"| {name} | {protocol(r)} | {r.data.params.get('model.name', '?')} | "
                     + " | ".join(_cell(r, k) for k, _ in LIST_COLUMNS) + " |")
        table[name] = {"run_id": r.info.run_id, "protocol": protocol(r),
                       **{k: r.data.metrics.get(k) for k, _ in LIST_COLUMNS}}
    return "\n".join(lines), table


def confusion_markdown(run) -> str:
    """The run's test confusion matrix (logged by hsflow.train) with code labels: rows decided, columns predicted."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plots/confusion_matrix.json")
    except Exception as exc:  # noqa: BLE001 - an old run without the artifact still gets its table
        try:  # over FULL_MATRIX_MAX classes a run logs no full matrix, only its most confused pairs
            path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                       artifact_path="plots/confused_pairs.json")
        except Exception:  # noqa: BLE001
            return f"(no confusion matrix for run {run.info.run_id}: {type(exc).__name__})"
        top = json.loads(open(path).read())["top_confused_pairs"][:10]
        return "most confused (decided -> predicted: photos):\n" + "\n".join(
            f"- {d['decided']} -> {d['predicted']}: {d['photos']}" for d in top)
    data = json.loads(open(path).read())
    classes, m = data["classes"], data["matrix"]
    if len(classes) > 12:  # too wide for a terminal: the most confused pairs instead
        pairs = sorted(((m[i][j], classes[i], classes[j]) for i in range(len(classes))
                        for j in range(len(classes)) if i != j and m[i][j]), reverse=True)[:10]
        return "most confused (decided -> predicted: photos):\n" + "\n".join(
            f"- {a} -> {b}: {int(n)}" for n, a, b in pairs)
    lines = ["| decided \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |" for c, row in zip(classes, m)]
    return "\n".join(lines)


def build_report(experiment: str, layout: str = "grid", rows: str = "trainer.max_epochs", cols: str = "model.name",
                 metric: str = "test/top1") -> tuple[str, dict]:
    _, runs = finished_runs(experiment)
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no finished training runs yet")
    table, data = grid_table(runs, rows, cols, metric) if layout == "grid" else list_table(runs)
    # Validation figures compare only under one split protocol: the best is chosen among the runs of the most common.
    common = collections.Counter(protocol(r).split(" ")[0] for r in runs).most_common(1)[0][0]
    best = max((r for r in runs if protocol(r).split(" ")[0] == common),
               key=lambda r: (r.data.metrics.get("curves/top1_val", 0), r.info.start_time))  # never test
    name = best.data.tags.get("mlflow.runName", best.info.run_id)
    text = (f"## {experiment}: {metric.replace('_', ' ')}\n\n{table}\n\n"
            f"Best by validation top-1: run {name} ({best.info.run_id}), {best.data.params.get(cols, '?')} × "
            f"{best.data.params.get(rows, '?')}: {metric} {best.data.metrics[metric]:.4f}\n\n"
            f"### Confusion matrix of the best run (test split)\n\n{confusion_markdown(best)}\n")
    return text, {"experiment": experiment, "metric": metric, "cells": data, "best_run_id": best.info.run_id}


def log_report(experiment: str, text: str, data: dict) -> str:
    exp = mlflow.get_experiment_by_name(experiment)
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="report", tags={REPORT_TAG: "report"}) as run:
        mlflow.log_text(text, "report.md")
        mlflow.log_dict(data, "report.json")
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hsflow.report", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name, e.g. demo_table2")
    ap.add_argument("--layout", choices=["grid", "list"], default="grid")
    ap.add_argument("--rows", default="trainer.max_epochs", help="param for the rows (grid layout)")
    ap.add_argument("--cols", default="model.name", help="param for the columns (grid layout)")
    ap.add_argument("--metric", default="test/top1")
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or the project's mlflow.db")
    ap.add_argument("--no-log", action="store_true", help="print only; do not log the report to MLflow")
    args = ap.parse_args(argv)
    mlflow.set_tracking_uri(args.tracking_uri or default_tracking_uri())
    try:
        text, data = build_report(args.experiment, args.layout, args.rows, args.cols, args.metric)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if not args.no_log:
        print(f"(logged as run {log_report(args.experiment, text, data)} of experiment {args.experiment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
