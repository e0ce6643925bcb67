"""Screenshots of the refresh loop in MLflow's UI (headless Chromium, by URL route only, as tools/ui_screenshots.py):
the registered model's page (versions, aliases, tags), the newest version's page (its description: window, figures
side by side, decision; its tags) and the last promoting refresh run (its description and figures).

Run by studies/refresh_replay.sh, which replays the loop into a tracking store and starts `mlflow server`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ui_screenshots import ML, shoot  # noqa: E402 - the same Chromium driver


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--name", default="hsflow", help="the registered model")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    client = MlflowClient(tracking_uri=args.url)
    model = client.get_registered_model(args.name)
    champion = client.get_model_version(args.name, str(model.aliases["champion"]))
    refresh_run = client.get_run(champion.tags["hsflow.refresh_run"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Tall enough for every version's row (the registry lists each version's tags one per line).
    shoot(f"{args.url}/#/models/{args.name}?{ML}", out / "refresh_registry.png", size="2200,1900")
    shoot(f"{args.url}/#/models/{args.name}/versions/{champion.version}?{ML}", out / "refresh_version.png",
          size="2200,1300")
    shoot(f"{args.url}/#/experiments/{refresh_run.info.experiment_id}/runs/{refresh_run.info.run_id}?{ML}",
          out / "refresh_run.png", size="2200,1300")


if __name__ == "__main__":
    main()
