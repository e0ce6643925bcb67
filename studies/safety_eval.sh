#!/usr/bin/env bash
# Safe by default, measured (issue 25): four training runs (all codes; choice codes held out; report codes held out;
# the collection-shift window), each unknown score's AUROC, the trade-off table, the promise on 2019 and on 2018:
#   bash studies/safety_eval.sh                                  # the default model, experiment=recommended
#   bash studies/safety_eval.sh --runs FULL CHOICE REPORT SHIFT  # re-read four runs
#   bash studies/safety_eval.sh experiment=recommended seed=43 --out studies/safety_results_seed43.json  # another seed
# Runs go to the MLflow experiment "safety-eval"; figures to studies/safety_results.json; docs/unknown.md reads them.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
exec .venv/bin/python studies/safety_eval.py "$@"
