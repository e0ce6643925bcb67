#!/usr/bin/env bash
# The evidence behind `make train`'s default model (issue 11; conf/experiment/recommended.yaml): each line is one
# configuration on dataset=demo with its dated split (train < 2018, validation 2018, test 2019), all in the MLflow
# experiment "default-search". Chosen by val_top1 (2018 rulings); the 2019 test rulings are only reported.
# Table: .venv/bin/python -m hsflow.report --experiment default-search --layout list
# The refit on train + validation is decided on validation alone too: studies/refit_evidence.py (run "refit-evidence").
# Usage: bash studies/default_search.sh [NAME ...]   (no names: every configuration below)
set -uo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1
T=".venv/bin/python -m hsflow.train logger.experiment_name=default-search logger.log_model=false"
W="model.head.hidden=512 optimizer=adamw optimizer.lr=1e-3 scheduler=cosine label_smoothing=0.1 trainer.max_epochs=60"
declare -A RUNS=(
  [study-lite0]=""                                                    # the study's setting (RMSprop 1e-4, 150 epochs)
  [lite0-hidden512-adamw]="$W"
  [lite1-hidden512-adamw]="$W model=efficientnet_lite1"               # issue 7's winner on the random split
  [lite2-hidden512-adamw]="$W model=efficientnet_lite2"
  [lite1-linear-adamw]="$W model=efficientnet_lite1 model.head.hidden=0"
  [lite1-hidden512-adamw-tta]="$W model=efficientnet_lite1 tta=true"
  [lite1-strongaug4]="$W model=efficientnet_lite1 +augment=strong dataset.train_views=4"
  [lite1-hidden512-adamw-refit]="$W model=efficientnet_lite1 refit.enabled=true"
  [lite1-strongaug4-refit]="experiment=recommended"                  # the chosen one (make train)
  [lite1-random-split]="$W model=efficientnet_lite1 dataset.split.by=ruling"   # the leak: a random split by ruling
  [lite0-unfreeze1-strongaug2]="$W trainer.max_epochs=15 model.unfreeze=1 +augment=strong dataset.train_views=2"
)
ORDER=(lite1-strongaug4-refit lite0-hidden512-adamw lite1-hidden512-adamw lite2-hidden512-adamw lite1-linear-adamw lite1-hidden512-adamw-tta
       lite1-hidden512-adamw-refit lite1-random-split lite1-strongaug4 lite0-unfreeze1-strongaug2 study-lite0)
for name in "${@:-${ORDER[@]}}"; do
  echo "== $name $(date +%T)"
  $T "logger.run_name=$name" ${RUNS[$name]} 2>&1 | grep -E "run_id=|error|test \("
done
