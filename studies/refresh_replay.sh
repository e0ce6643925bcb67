#!/usr/bin/env bash
# The refresh loop replayed on the whole shipped demo (docs/refresh.md): the portal stand-in serves the demo's rulings
# up to 2018, they are crawled and refreshed (window 2018: the first champion); then the portal serves 2019 too, the
# second crawl fetches only those, the second refresh decides on 2019; a third refresh with a weakened configuration
# (one epoch) must leave the champion. Then `mlflow server` on 127.0.0.1 and headless Chromium screenshots of the
# registry and the refresh run -> docs/refresh_*.png (tools/refresh_screenshots.py; needs Debian's chromium).
# Everything goes to REPLAY_DIR (default: a new temporary folder, kept); the feature cache is CACHE (default cache/).
# Usage: bash studies/refresh_replay.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${1:-5078}
DIR=${REPLAY_DIR:-$(mktemp -d)}
CACHE=${CACHE:-cache}
mkdir -p "$DIR"
export PYTHONPATH=$PWD MLFLOW_TRACKING_URI="sqlite:///$DIR/mlflow.db" NO_ALBUMENTATIONS_UPDATE=1 MLFLOW_DISABLE_TELEMETRY=true
COMMON=(experiment=recommended paths.raw_store="$DIR/crawl" paths.cache_dir="$CACHE")
crawl() {  # the stand-in portal over $1 on 127.0.0.1, crawled into $DIR/crawl (only what is missing is fetched)
    $PY -m crawler.crawl_demo --archive "$1" --out "$DIR/crawl" --port 8799 2>>"$DIR/crawl.err" | grep -E "^crawl: \{"
}
refresh() {  # one refresh, timed; its last line is version=... decision=... champion=... run_id=...
    local start=$SECONDS
    $PY -m hsflow.refresh "${COMMON[@]}" hydra.run.dir="$DIR/out$1" "${@:2}" > "$DIR/refresh$1.log" 2>&1 ||
        { tail -5 "$DIR/refresh$1.log"; exit 1; }
    tail -2 "$DIR/refresh$1.log"
    echo "refresh $1: $((SECONDS - start)) s"
}
if [ ! -f "$DIR/mlflow.db" ]; then
    # The portal as it stood before the 2019 rulings: the demo store seen up to 2019-01-01 (hsflow.periods).
    $PY -c "from pathlib import Path; from hsflow.periods import store_until; from hsflow.store import RawStore; \
print(store_until(RawStore('data/demo'), '2019-01-01', Path('$DIR')))"
    crawl "$DIR/store_before_2019-01-01"
    refresh 1
    crawl data/demo
    refresh 2
    refresh 3 trainer.max_epochs=1
fi
setsid .venv/bin/mlflow server --backend-store-uri "$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port "$PORT" \
    --workers 1 > "$DIR/server.log" 2>&1 &
SERVER=$!
trap 'kill -- -$SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
$PY tools/refresh_screenshots.py --url "http://127.0.0.1:$PORT" --out docs
echo "replay store: $DIR"
