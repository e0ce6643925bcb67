#!/usr/bin/env bash
# The portal's scale, stage by stage: wall time, CPU time and peak memory of each step a user runs on a synthetic
# portal-shaped archive (hsflow.synth: long-tailed codes, small drawn photos).
#   bash bench/scale.sh                 # 10,000 rulings / 3,000 codes (~26,000 photos) -> bench/scale_3000.json
#   bash bench/scale.sh 955 42          # the demo's size, for the growth figures     -> bench/scale_42.json
# Extra arguments after the two numbers go to hsflow.train (e.g. trainer.max_epochs=5).
# On a CPU shared with other jobs, OMP_NUM_THREADS=1 keeps torch's threads from spinning on busy cores (the
# README's table says which setting and what load it ran with).
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
stage generate $PY -m hsflow.synth "$WORK/archive" --rulings "$N" --codes "$M" --seed 0
stage import $PY -m hsflow.store import-archive "$WORK/archive" "$WORK/store"
stage info $PY -m hsflow.store info "$WORK/store"
stage train $PY -m hsflow.train paths.raw_store="$WORK/store" paths.cache_dir="$WORK/cache" \
  logger.tracking_uri="$MLFLOW_TRACKING_URI" logger.experiment_name="scale-$M" hydra.run.dir="$WORK/outputs" \
  model.input_size=64 model.resize_size=64 trainer.max_epochs=3 timings_file="$WORK/timings.json" "$@"
grep -q '^run_id=' "$WORK/train.out"
RUN=$(sed -n 's/^run_id=\([0-9a-f]*\).*/\1/p' "$WORK/train.out")
stage report $PY -m hsflow.report --experiment "scale-$M" --layout list
mkdir -p "$WORK/shipment"; ls "$WORK/store/photos" | sed -n 1,1000p | sed "s|^|$WORK/store/photos/|" | xargs cp -t "$WORK/shipment"
stage recommend $PY -m hsflow.recommend --model "runs:/$RUN/model" --format json --top-k 3 "$WORK/shipment"
$PY - "$WORK" "$N" "$M" <<'PY'
import json, os, sys
from pathlib import Path
work, n, m = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def t(name):
    wall, rss, user, sys_ = (work / f"{name}.time").read_text().split()[-4:]
    return {"seconds": float(wall), "cpu_seconds": round(float(user) + float(sys_), 2), "peak_rss_mb": round(int(rss) / 1024, 1)}
info = json.loads((work / "info.out").read_text())
timings = json.loads((work / "timings.json").read_text())
train_line = (work / "train.out").read_text().strip().splitlines()[-1]
err = (work / "train.err").read_text().splitlines()
out = {"archive": json.loads((work / "generate.out").read_text()),
       "store": {k: info[k] for k in ("rulings", "photos", "codes", "undecodable_photos")},
       "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
       "stages": {"generate": t("generate"), "import": t("import"), "info": t("info"), "train_process": t("train"),
                  **{f"train.{s['stage']}": s for s in timings["stages"]},
                  "report": t("report"), "recommend_1000_photos": t("recommend")},
       "train_last_line": train_line,
       "dataset_summary": [l for l in err if l.startswith(("dataset ", "  "))][:20],
       "warnings": [l for l in err if l.startswith("warning: ") and "not logged" in l]}
fit = timings["stages"][[s["stage"] for s in timings["stages"]].index("fit")]
out["fit_epoch_cpu_us_per_photo"] = [round(c / fit["train_photos"] * 1e6, 1) for c in fit["epoch_cpu_seconds"]]
out["fit_epoch_wall_us_per_photo"] = [round(c / fit["train_photos"] * 1e6, 1) for c in fit["epoch_seconds"]]
end = ["import", "info", "train_process", "report", "recommend_1000_photos"]
out["end_to_end_seconds"] = round(sum(out["stages"][k]["seconds"] for k in end), 1)
out["peak_rss_mb"] = max(out["stages"][k]["peak_rss_mb"] for k in end)
Path(f"bench/scale_{m}.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
print(json.dumps({k: out[k] for k in ("end_to_end_seconds", "peak_rss_mb", "fit_epoch_cpu_us_per_photo", "train_last_line")}))
PY
