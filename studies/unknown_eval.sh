#!/usr/bin/env bash
# The unknown score's evaluations (out-of-scope photos, held-out codes, test rulings), rerun from scratch:
#   bash studies/unknown_eval.sh                                   # the default model, experiment=recommended
#   bash studies/unknown_eval.sh experiment=study_frozen           # another model: any training overrides
#   bash studies/unknown_eval.sh --runs <full run id> <held-out run id>   # evaluate two existing runs again
# Two training runs go to the MLflow experiment "unknown-eval"; figures to studies/unknown_results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python studies/unknown_eval.py "$@"
