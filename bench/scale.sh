#!/usr/bin/env bash
# The portal's scale, stage by stage: wall time, CPU time and peak memory of each step a user runs on a synthetic
# portal-shaped archive (hsflow.synth: long-tailed codes, small drawn photos).
#   bash bench/scale.sh                 # 10,000 rulings / 3,000 codes (~26,000 photos) -> bench/scale_3000.json
#   bash bench/scale.sh 955 42          # the demo's size, for the growth figures     -> bench/scale_42.json
# Training runs `make train`'s model (experiment=recommended: hidden layer, AdamW, refit on train + validation) at
# 64 px for 3 epochs, without its generated copies (dataset.train_views=0: the archive's own ~26,000 photos are the
# scale asked for; 4 copies each would add ~100,000 forward passes). Extra arguments after the two numbers go to
# hsflow.train after these (e.g. trainer.max_epochs=5).
# On a CPU shared with other jobs, OMP_NUM_THREADS=1 keeps torch's threads from spinning on busy cores (the
# the table in docs/scale.md says which setting and what load it ran with).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}; M=${2:-3000}; shift $(( $# >= 2 ? 2 : $# ))
WORK=${WORK:-/tmp/hsflow-scale-$M}
PY=${PY:-.venv/bin/python}
export PYTHONPATH=$PWD NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736   # as `make` sets (hsflow/__init__.py)
export MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db
rm -rf "$WORK"; mkdir -p "$WORK"
stage() {  # stage NAME CMD...: /usr/bin/time's wall s, peak RSS KiB, user s, sys s
  local name=$1; shift
  echo "== $name: $*" >&2
  /usr/bin/time -f '%e %M %U %S' -o "$WORK/$name.time" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err" \
    || { echo "stage $name failed:" >&2; tail -20 "$WORK/$name.err" >&2; exit 1; }
}
stage generate $PY -m hsflow.data.synth "$WORK/archive" --rulings "$N" --codes "$M" --seed 0
stage import $PY -m hsflow.store import-archive "$WORK/archive" "$WORK/store"
stage info $PY -m hsflow.store info "$WORK/store"
TRAIN_ARGS=(experiment=recommended dataset.train_views=0 model.input_size=64 model.resize_size=64 trainer.max_epochs=3)
stage train $PY -m hsflow.train "${TRAIN_ARGS[@]}" paths.raw_store="$WORK/store" paths.cache_dir="$WORK/cache" \
  logger.tracking_uri="$MLFLOW_TRACKING_URI" logger.experiment_name="scale-$M" hydra.run.dir="$WORK/outputs" \
  timings_file="$WORK/timings.json" "$@"
grep -q '^run_id=' "$WORK/train.out"
RUN=$(sed -n 's/^run_id=\([0-9a-f]*\).*/\1/p' "$WORK/train.out")
stage report $PY -m hsflow.report --experiment "scale-$M" --layout list
mkdir -p "$WORK/shipment"; ls "$WORK/store/photos" | sed -n 1,1000p | sed "s|^|$WORK/store/photos/|" | xargs cp -t "$WORK/shipment"
stage recommend $PY -m hsflow.recommend --model "runs:/$RUN/model" --format json --top-k 3 "$WORK/shipment"
# The same store with every code its own class (long_tail.min_rulings=1, the hardest case for the head; the
# feature cache is warm, so this stage is dataset + fit + test + logging).
stage train_all_codes $PY -m hsflow.train "${TRAIN_ARGS[@]}" paths.raw_store="$WORK/store" paths.cache_dir="$WORK/cache" \
  logger.tracking_uri="$MLFLOW_TRACKING_URI" logger.experiment_name="scale-$M" hydra.run.dir="$WORK/outputs-all" \
  timings_file="$WORK/timings_all_codes.json" \
  dataset.long_tail.min_rulings=1 "$@"
$PY bench/scale_summary.py "$WORK" "$N" "$M"
