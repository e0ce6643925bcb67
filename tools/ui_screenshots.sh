#!/usr/bin/env bash
# The MLflow UI as a person sees it: a two-run sweep and one single run (Lite0 on dataset=demo_top5: one feature
# cache for all three) into a temporary tracking store, `mlflow server` on 127.0.0.1, then headless Chromium
# screenshots of the experiment's runs table, a run's metric charts and the runs compared -> docs/ui_*.png.
# Needs Debian's chromium (apt-get install -y chromium). UI_STORE=DIR keeps the store there (trains only once).
# Usage: bash tools/ui_screenshots.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${1:-5077}
STORE=${UI_STORE:-$(mktemp -d)}
[ -n "${UI_STORE:-}" ] || trap 'rm -rf "$STORE"' EXIT
mkdir -p "$STORE"
export PYTHONPATH=$PWD MLFLOW_TRACKING_URI="sqlite:///$STORE/mlflow.db" NO_ALBUMENTATIONS_UPDATE=1
COMMON=(dataset=demo_top5 logger.experiment_name=ui-demo logger.log_model=false trainer.max_epochs=20
        hydra.sweep.dir="$STORE/multirun" hydra.run.dir="$STORE/run")
if [ ! -f "$STORE/mlflow.db" ]; then
    $PY -m hsflow.train -m model.head.hidden=0,512 "${COMMON[@]}" 2>&1 | grep -E "run_id=|error"
    $PY -m hsflow.train model.head.hidden=512 optimizer=adamw "${COMMON[@]}" logger.run_name=lite0-hidden512-adamw \
        2>&1 | grep -E "run_id=|error"
fi
# Its own process group (setsid), so the exit trap stops the server and its uvicorn worker together.
setsid .venv/bin/mlflow server --backend-store-uri "$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port "$PORT" \
    --workers 1 > "$STORE/server.log" 2>&1 &
SERVER=$!
trap 'kill -- -$SERVER 2>/dev/null || true; [ -n "${UI_STORE:-}" ] || rm -rf "$STORE"' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
$PY tools/ui_screenshots.py --url "http://127.0.0.1:$PORT" --experiment ui-demo --out docs
