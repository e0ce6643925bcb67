"""`python -m hsflow.serve [--model URI] [--port 5001]` (`make serve`): the model behind MLflow's own REST server.

Runs `mlflow models serve -m <model> --env-manager local --host 127.0.0.1`, so the service is exactly what a team
deploys with MLflow (`mlflow models serve`, `mlflow models build-docker`). Without --model it serves what every door
serves (hsflow.serving.registry.default_model_uri): the champion of the registered model (`models:/hsflow@champion`,
resolved to its version at start: docs/refresh.md; restart after the alias moves), and without a champion the
latest finished run with a logged model in the experiment `make train` logs to (MLflow's search API; --experiment
and --filter narrow the search, e.g. --filter "params.\\`model.name\\` = 'efficientnet_lite0'", and choose it over the
champion). Every answer names the model that gave it (`model`: run, registered name, version, aliases). POST photos
to /invocations as base64 (docs/recommend.md: "The three ways to ask").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from hsflow.serving import registry
from hsflow.core.config import default_tracking_uri
from hsflow.serving.registry import EXPERIMENT, default_model_uri, latest_model_uri  # noqa: F401 - the doors' one rule
from hsflow.core.runtime import THREADS_ENV

DEFAULT_PORT = 5001    # `make ui` has 5000


def server_args(prog: str, description: str, port: int, argv: list[str] | None,
                extra=lambda ap: None) -> tuple[argparse.Namespace, str | None]:
    """The options every door onto a saved model shares (which model, host, port; `extra` adds the door's own) and the
    model's URI, or None after one error line when no model can be found."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--model", default=None,
                    help="runs:/<run id>/model, models:/<name>/<version>, models:/<name>@<alias> or a folder "
                         "(default: the registered model's champion, else the latest `make train` model)")
    ap.add_argument("--registered-model", default=registry.DEFAULT_NAME,
                    help=f"whose champion answers by default (default {registry.DEFAULT_NAME})")
    ap.add_argument("--experiment", default=EXPERIMENT, help=f"where to look for the latest (default {EXPERIMENT})")
    ap.add_argument("--filter", default="", dest="run_filter",
                    help="an MLflow run filter the latest must match, e.g. \"params.`model.name` = 'x'\" "
                         "(then the latest match answers, not the champion)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ap.add_argument("--port", type=int, default=port)
    extra(ap)
    args = ap.parse_args(argv)
    try:
        return args, args.model or default_model_uri(args.registered_model, args.experiment, args.run_filter)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return args, None


def main(argv: list[str] | None = None) -> int:
    args, uri = server_args("python -m hsflow.serve", __doc__.split("\n\n")[0], DEFAULT_PORT, argv,
                            lambda ap: ap.add_argument("--workers", type=int, default=2,
                                                       help="server processes, each holding the model and "
                                                            "cores / workers ONNX Runtime threads (default 2: "
                                                            "+22 %% requests/s at concurrency 6 on 2 cores, "
                                                            "docs/benchmarks.md)"))
    if uri is None:
        return 2
    bindir = str(Path(sys.executable).parent)  # the venv's: mlflow starts `uvicorn` by name from PATH
    mlflow_cli = shutil.which("mlflow", path=bindir) or "mlflow"
    env = {**os.environ, "MLFLOW_TRACKING_URI": default_tracking_uri(),
           "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}
    try:  # a registered version: served by number, and named in every answer (hsflow/serving/pyfunc.py)
        uri, served_as = registry.identify(uri, default_tracking_uri())
    except Exception as exc:  # noqa: BLE001 - a missing model, version or alias: one line
        print(f"error: cannot serve {uri}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}",
              file=sys.stderr)
        return 2
    if args.workers > 1:  # each worker process runs its own ONNX Runtime session: share the cores, not multiply them
        env.setdefault(THREADS_ENV, str(max(1, (os.cpu_count() or 1) // args.workers)))
    if served_as:
        config = json.loads(os.environ.get("SERVING_MODEL_CONFIG") or "{}")
        env["SERVING_MODEL_CONFIG"] = json.dumps({**config, "served_as": served_as})
    cmd = [mlflow_cli, "models", "serve", "-m", uri, "--env-manager", "local", "--host", args.host,
           "--port", str(args.port), "--workers", str(args.workers)]
    named = (f" ({served_as['registered_model']} version {served_as['version']}"
             f"{', ' + '/'.join(served_as['aliases']) if served_as['aliases'] else ''})" if served_as else "")
    print(f"serving {uri}{named} on http://{args.host}:{args.port}/invocations ({' '.join(cmd[1:])})",
          file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main())
