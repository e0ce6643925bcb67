#!/usr/bin/env bash
# The evidence behind `make train`'s default model (issue 7): each line one configuration on dataset=demo,
# all in the MLflow experiment "default-search"; chosen by val_top1, the test split is only reported.
# Table: .venv/bin/python -m hsflow.report --experiment default-search --layout list
set -uo pipefail
cd "$(dirname "$0")/.."
T=".venv/bin/python -m hsflow.train logger.experiment_name=default-search logger.log_model=false"
run() { echo "== $*"; $T "logger.run_name=$1" "${@:2}" 2>&1 | tail -1; }
run study-lite0                                                       # the study's setting
run lite0-hidden512          model.head.hidden=512
run lite0-adamw-cosine-ls    optimizer=adamw optimizer.lr=1e-3 scheduler=cosine label_smoothing=0.1 trainer.max_epochs=60
run lite0-hidden512-adamw    model.head.hidden=512 optimizer=adamw optimizer.lr=1e-3 scheduler=cosine label_smoothing=0.1 trainer.max_epochs=60
run lite0-tta                tta=true
run lite0-hidden512-tta      model.head.hidden=512 tta=true
run lite1                    model=efficientnet_lite1
run lite1-hidden512          model=efficientnet_lite1 model.head.hidden=512
run lite0-aug2               dataset.train_views=2
run lite0-unfreeze1          model.unfreeze=1 optimizer=adamw optimizer.lr=1e-3 scheduler=cosine label_smoothing=0.1 trainer.max_epochs=15
run lite2                    model=efficientnet_lite2
