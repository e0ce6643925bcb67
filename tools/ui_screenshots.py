"""Screenshots of the MLflow UI with headless Chromium (Debian's `chromium`), by URL route only (nothing clicked): the experiment's
runs table in hsflow's saved view, a run's metric charts, and the runs side by side in the chart view.

Run by tools/ui_screenshots.sh, which trains the runs into a temporary store and starts `mlflow server`.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from hsflow.training.tracking import VIEW_ID, experiment_tags

ML = "workflowType=machine_learning"  # MLflow 3.17's UI picks GenAI or Model training per browser, not per experiment


def shoot(url: str, out: Path, size: str = "2200,1000", wait_s: float = 30, headers: dict | None = None) -> None:
    """Open `url` in a fresh headless Chromium profile (what a first-time visitor sees), let the page work for
    `wait_s` real seconds (the UI fetches runs and draws charts lazily), then capture it over the DevTools protocol.
    (`chromium --screenshot` with a virtual-time budget left a run page's charts as spinners.)"""
    import base64
    import json
    import time
    import urllib.parse
    import urllib.request

    import websocket  # websocket-client (pyproject's test extras)

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("error: no chromium on PATH; install it with `apt-get install -y chromium`")
    port = 9300 + abs(hash(out.name)) % 500
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                 f"--user-data-dir={profile}", f"--window-size={size}",
                                 f"--remote-debugging-port={port}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    first = "about:blank" if headers else url  # headers (a sign-in) are set before navigating
                    target = json.load(urllib.request.urlopen(urllib.request.Request(
                        f"http://127.0.0.1:{port}/json/new?{urllib.parse.quote(first, safe='')}", method="PUT"),
                        timeout=5))
                    break
                except OSError:
                    time.sleep(0.3)
            ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=120)
            if headers:
                for i, (method, params) in enumerate([("Network.enable", {}),
                                                      ("Network.setExtraHTTPHeaders", {"headers": headers}),
                                                      ("Page.navigate", {"url": url})], start=10):
                    ws.send(json.dumps({"id": i, "method": method, "params": params}))
            time.sleep(wait_s)
            ws.send(json.dumps({"id": 1, "method": "Page.captureScreenshot", "params": {"format": "png"}}))
            while True:
                answer = json.loads(ws.recv())
                if answer.get("id") == 1:
                    break
            out.write_bytes(base64.b64decode(answer["result"]["data"]))
            ws.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{out}  <-  {url}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--prefix", default="ui_", help="file names: <prefix>runs_table.png, ... (team_ui_: docs/team.md)")
    ap.add_argument("--only", choices=["runs_table", "run_metrics", "compare_runs"], action="append")
    args = ap.parse_args()
    # A team's server (make server) asks for a sign-in: MLflow's own variables, sent as the browser's header.
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    auth = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user else None
    wanted = set(args.only or ["runs_table", "run_metrics", "compare_runs"])
    client = MlflowClient(tracking_uri=args.url)
    exp = client.get_experiment_by_name(args.experiment)
    for key, value in experiment_tags().items():  # the current code's view, even on a store trained earlier
        client.set_experiment_tag(exp.experiment_id, key, value)
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["metrics.`curves/top1_val` DESC"])
            if "test/top1" in r.data.metrics]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = f"{args.url}/#/experiments/{exp.experiment_id}"
    ids = json.dumps([r.info.run_id for r in runs])
    for name, url in [("runs_table", f"{base}/runs?{ML}&viewStateShareKey={VIEW_ID}"),
                      ("run_metrics", f"{base}/runs/{runs[0].info.run_id}/model-metrics?{ML}"),
                      # The runs side by side (what "Compare" on selected rows opens): the sweep's trials and the run.
                      ("compare_runs", f"{args.url}/#/compare-runs?runs={ids}&experiments="
                                       f"{json.dumps([exp.experiment_id])}&{ML}")]:
        if name in wanted:
            shoot(url, out / f"{args.prefix}{name}.png", headers=auth)

if __name__ == "__main__":
    main()
