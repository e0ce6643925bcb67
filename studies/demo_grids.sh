#!/usr/bin/env bash
# The study's tables 2/4/6 over the shipped demo (issue 4), and the size of the study's test-set leak. Each grid is
# one Hydra multirun into its own MLflow experiment; tables: .venv/bin/python -m hsflow.report --experiment demo_table6
set -uo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1
for g in demo_table2 demo_table4 demo_table6; do
  echo "=== $g $(date +%T)"
  .venv/bin/python -m hsflow.train experiment=$g 2>&1 | grep -E "run_id=|error"
done
echo "=== leak $(date +%T)"   # the same model, test split of originals vs filled with generated copies
for fill in false true; do
  .venv/bin/python -m hsflow.train dataset=demo_ch08_balanced model=efficientnet_lite0 trainer.max_epochs=150 \
    dataset.test_fill_with_generated=$fill logger.experiment_name=demo_leak logger.log_model=false \
    logger.run_name=test_fill_$fill 2>&1 | grep -E "run_id=|error"
done
for e in demo_table2 demo_table4 demo_table6; do .venv/bin/python -m hsflow.report --experiment $e; done
