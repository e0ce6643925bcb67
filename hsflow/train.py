"""Entry: train a model: `python -m hsflow.train [group=option ...] [key=value ...]` (conf/train.yaml)."""
from hsflow import entry

entry(__name__, "hsflow.training.train", "cli")
