"""`python -m hsflow.ui [--port 5000]` (`make ui`): MLflow's UI over the project's tracking store, with one link per
experiment that opens it on its runs in hsflow's accuracy view. With MLFLOW_TRACKING_URI on a team's server (`make
server`), that server is the UI: the links point at it and nothing is started.

MLflow 3.17's UI chooses between its GenAI and Model-training layouts per browser (a switch at the top left,
`workflowType` in the URL), defaulting to GenAI, and shows no metric column until one is chosen; the links carry
both choices (`workflowType=machine_learning`, `viewStateShareKey=hsflow-accuracy`, the saved view
hsflow.training.tracking writes on every experiment).
"""
from __future__ import annotations

import argparse
import os
import sys

from hsflow.core.config import default_tracking_uri


def links(tracking_uri: str, base: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    from hsflow.training.tracking import VIEW_ID

    out = []
    for exp in MlflowClient(tracking_uri=tracking_uri).search_experiments():
        if exp.name != "Default" or exp.tags:
            out.append(f"  {exp.name}: {base}/#/experiments/{exp.experiment_id}/runs"
                       f"?workflowType=machine_learning&viewStateShareKey={VIEW_ID}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hsflow.ui", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args(argv)
    uri = default_tracking_uri()
    if uri.startswith(("http://", "https://")):  # a team's server (make server) is the UI itself: nothing to start
        found = links(uri, uri.rstrip("/"))
        print(f"MLflow UI of the tracking server {uri} (sign in as MLFLOW_TRACKING_USERNAME); open an experiment on "
              "its runs:", *(found or ["  (no experiment yet: run `make train`)"]), sep="\n", flush=True)
        return
    base = f"http://{args.host}:{args.port}"
    found = links(uri, base)
    print(f"MLflow UI on {base} over {uri}; open an experiment on its runs:", *(found or ["  (no experiment yet: "
          "run `make train`)"]), sep="\n", flush=True)
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    main()
