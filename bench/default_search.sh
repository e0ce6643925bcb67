#!/usr/bin/env bash
# The evidence behind `make train`'s default model (issue 7; conf/experiment/recommended.yaml): each line one
# configuration on dataset=demo, all in the MLflow experiment "default-search"; chosen by curves/top1_val, the test split
# is only reported. Table: .venv/bin/python -m hsflow.report --experiment default-search --layout list
set -uo pipefail
cd "$(dirname "$0")/.."
T=".venv/bin/python -m hsflow.train logger.experiment_name=default-search logger.log_model=false"
W="model.head.hidden=512 optimizer=adamw optimizer.lr=1e-3 scheduler=cosine label_smoothing=0.1"
run() { echo "== $*"; $T "logger.run_name=$1" "${@:2}" 2>&1 | tail -1; }
run study-lite0                                                       # the study's setting
run lite0-hidden512            model.head.hidden=512
run lite0-adamw-cosine-ls      optimizer=adamw optimizer.lr=1e-3 scheduler=cosine label_smoothing=0.1 trainer.max_epochs=60
run lite0-hidden512-adamw      $W trainer.max_epochs=60
run lite0-hidden512-adamw-tta  $W trainer.max_epochs=60 tta=true
run lite1-hidden512-adamw      $W trainer.max_epochs=60 model=efficientnet_lite1      # the winner on validation
run lite0-unfreeze1-adamw      $W trainer.max_epochs=15 model.unfreeze=1              # partial fine-tuning on the prefix cache
