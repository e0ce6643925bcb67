"""Where the config tree lives and the one custom resolver it needs."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

# hsflow/core/config.py: the package is two folders up (the whole of it is what a logged model carries).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The checkout (editable install): conf/ and data/ sit beside the package. HSFLOW_ROOT overrides.
ROOT_DIR = Path(os.environ.get("HSFLOW_ROOT", PACKAGE_DIR.parent)).resolve()
CONF_DIR = ROOT_DIR / "conf"

if not OmegaConf.has_resolver("hsflow_root"):
    OmegaConf.register_new_resolver("hsflow_root", lambda: str(ROOT_DIR))


def default_tracking_uri() -> str:
    """The tracking store hsflow.train logs to by default (conf/logger/mlflow.yaml): $MLFLOW_TRACKING_URI or the
    SQLite file in the project directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(ROOT_DIR) / 'mlflow.db'}"
