"""Screenshots of the MLflow UI with headless Chromium (Debian's `chromium`), by URL route only: the experiment's
runs table in hsflow's saved view, a run's metric charts, and the runs side by side in the chart view.

Run by bench/ui_screenshots.sh, which trains the runs into a temporary store and starts `mlflow server`.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from hsflow.tracking import VIEW_ID

ML = "workflowType=machine_learning"  # MLflow 3.17's UI picks GenAI or Model training per browser, not per experiment


def shoot(url: str, out: Path, size: str = "1800,1000", wait_ms: int = 25000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("error: no chromium on PATH; install it with `apt-get install -y chromium`")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: what a first-time visitor sees
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    print(f"{out}  <-  {url}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    client = MlflowClient(tracking_uri=args.url)
    exp = client.get_experiment_by_name(args.experiment)
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["metrics.`curves/top1_val` DESC"])
            if "test/top1" in r.data.metrics]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = f"{args.url}/#/experiments/{exp.experiment_id}"
    shoot(f"{base}/runs?{ML}&viewStateShareKey={VIEW_ID}", out / "ui_runs_table.png")
    shoot(f"{base}/runs/{runs[0].info.run_id}/model-metrics?{ML}", out / "ui_run_metrics.png")
    shoot(f"{base}/runs?{ML}&viewStateShareKey={VIEW_ID}&compareRunsMode=CHART", out / "ui_compare_runs.png")


if __name__ == "__main__":
    main()
