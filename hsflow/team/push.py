"""`python -m hsflow.push --to URI [--from URI]`: bring what the embedded store holds to a team's tracking server.

Copies every experiment (with its tags: the accuracy view), every run (params, full metric histories with their
steps and timestamps, tags, artifacts, status and times; sweep trials stay children of their sweep's run), every
logged model (artifacts, params, tags) and every registered model with its versions (tags, descriptions), aliases
and tags. Each copied run and model carries `hsflow.pushed_from` (the source's id) and each version
`hsflow.pushed_from_version`, so a second push copies nothing twice (it only moves aliases that moved since). A
run that fails to copy is named, its partial copy deleted, and the rest go on; the exit status is then 1.

Written on MLflow's client API: mlflow-export-import (PyPI, last release 1.2.0 of 2023) reads registered models
through its own HTTP client, so not from an SQLite store, and predates MLflow 3's logged models (docs/decisions.md).
The server's credentials come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hsflow.core.config import ROOT_DIR

PUSHED = "hsflow.pushed_from"
PUSHED_VERSION = "hsflow.pushed_from_version"
SKIP_TAGS = {"mlflow.parentRunId", "mlflow.log-model.history", "mlflow.modelVersions"}


@dataclass
class Report:
    runs: int = 0           # copied now
    skipped: int = 0        # there already
    models: int = 0         # logged models copied
    versions: int = 0       # registered model versions copied
    failed: list[str] = field(default_factory=list)
    run_map: dict[str, str] = field(default_factory=dict)     # source run id -> destination run id
    model_map: dict[str, str] = field(default_factory=dict)   # source logged model id -> destination


def _all(fetch):
    """Every page of a paged MLflow search."""
    token, out = None, []
    while True:
        page = fetch(token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def experiment_on(dst, exp) -> str:
    """The destination's experiment of the same name (created with the source's tags), its id."""
    found = dst.get_experiment_by_name(exp.name)
    if found is None:
        return dst.create_experiment(exp.name, tags=dict(exp.tags))
    for key, value in exp.tags.items():
        if found.tags.get(key) != value:
            dst.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def already_pushed(dst, exp_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """{source run id: destination run id} and {source model id: destination model id} already on the destination."""
    runs = _all(lambda t: dst.search_runs([exp_id], f"tags.`{PUSHED}` != ''", max_results=1000, page_token=t))
    models = _all(lambda t: dst.search_logged_models([exp_id], page_token=t))
    return ({r.data.tags[PUSHED]: r.info.run_id for r in runs},
            {m.tags[PUSHED]: m.model_id for m in models if PUSHED in m.tags})


def copy_run(src, dst, run, exp_id: str, report: Report) -> str:
    """One run, whole: tags, params, metric histories, artifacts, logged models, status. Returns its new id."""
    from mlflow.entities import Metric, Param, RunTag

    tags = {k: v for k, v in run.data.tags.items() if k not in SKIP_TAGS}
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent in report.run_map:
        tags["mlflow.parentRunId"] = report.run_map[parent]
    new = dst.create_run(exp_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
    new_id = new.info.run_id
    try:
        params = [Param(k, v) for k, v in run.data.params.items()]
        for i in range(0, len(params), 100):
            dst.log_batch(new_id, params=params[i:i + 100])
        history = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.data.metrics
                   for m in src.get_metric_history(run.info.run_id, key)]
        for i in range(0, len(history), 1000):
            dst.log_batch(new_id, metrics=history[i:i + 1000])
        with tempfile.TemporaryDirectory() as tmp:
            if src.list_artifacts(run.info.run_id):
                dst.log_artifacts(new_id, src.download_artifacts(run.info.run_id, "", tmp))
        copy_models(src, dst, run, new_id, exp_id, report)
        dst.log_batch(new_id, tags=[RunTag(PUSHED, run.info.run_id)])  # last: marks the copy whole
        dst.set_terminated(new_id, run.info.status, end_time=run.info.end_time)
    except BaseException:
        dst.delete_run(new_id)  # no half copy left to be mistaken for the run
        raise
    return new_id


def copy_models(src, dst, run, new_run: str, exp_id: str, report: Report) -> None:
    """The run's logged models (MLflow 3 keeps their files apart from the run's artifacts)."""
    from mlflow.entities import LoggedModelOutput

    for model in src.search_logged_models([run.info.experiment_id],
                                          filter_string=f"source_run_id = '{run.info.run_id}'"):
        tags = {k: v for k, v in model.tags.items() if k not in SKIP_TAGS} | {PUSHED: model.model_id}
        new = dst.create_logged_model(exp_id, name=model.name, source_run_id=new_run, tags=tags,
                                      params=dict(model.params), model_type=model.model_type)
        with tempfile.TemporaryDirectory() as tmp:
            import mlflow

            local = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp,
                                                        tracking_uri=src.tracking_uri)
            dst.log_model_artifacts(new.model_id, local)
        dst.finalize_logged_model(new.model_id, model.status)
        dst.log_outputs(new_run, [LoggedModelOutput(new.model_id, 0)])
        report.model_map[model.model_id] = new.model_id
        report.models += 1


def push_runs(src, dst, report: Report, experiments: list[str] | None = None) -> None:
    """Every experiment and run not on the destination yet (parents before their children), with a progress bar."""
    from tqdm import tqdm

    work = []
    for exp in src.search_experiments():
        if experiments and exp.name not in experiments:
            continue
        runs = _all(lambda t, e=exp: src.search_runs([e.experiment_id], max_results=1000, page_token=t,
                                                     order_by=["attributes.start_time ASC"]))
        if not runs and exp.name == "Default":
            continue
        exp_id = experiment_on(dst, exp)
        done, models = already_pushed(dst, exp_id)
        report.run_map.update(done)
        report.model_map.update(models)
        work += [(r, exp_id) for r in sorted(runs, key=lambda r: "mlflow.parentRunId" in r.data.tags)]
    for run, exp_id in tqdm(work, desc="push runs", unit="run", disable=None):
        if run.info.run_id in report.run_map:
            report.skipped += 1
            continue
        try:
            report.run_map[run.info.run_id] = copy_run(src, dst, run, exp_id, report)
            report.runs += 1
        except Exception as exc:  # noqa: BLE001 - named, and the rest go on
            report.failed.append(f"run {run.info.run_id} ({run.info.run_name}): {_line(exc)}")


def push_registry(src, dst, report: Report) -> None:
    """Registered models: versions (by their copied logged model), tags, descriptions, then aliases."""
    from hsflow.serving.registry import STACK_TAG

    for rm in _all(lambda t: src.search_registered_models(max_results=1000, page_token=t)):
        if _registered(dst, rm.name) is None:
            dst.create_registered_model(rm.name, description=rm.description)
        have = {v.tags.get(PUSHED_VERSION): v.version for v in dst.search_model_versions(f"name='{rm.name}'")}
        numbers = {}
        for v in sorted(src.search_model_versions(f"name='{rm.name}'"), key=lambda v: int(v.version)):
            if str(v.version) in have:
                numbers[str(v.version)] = str(have[str(v.version)])
                continue
            model_id = report.model_map.get(v.source.removeprefix("models:/"))
            if model_id is None or v.run_id not in report.run_map:
                report.failed.append(f"{rm.name} version {v.version}: its run {v.run_id} was not copied")
                continue
            mv = dst.create_model_version(rm.name, f"models:/{model_id}", run_id=report.run_map[v.run_id],
                                          tags=dict(v.tags) | {PUSHED_VERSION: str(v.version)},
                                          description=v.description, model_id=model_id)
            numbers[str(v.version)] = str(mv.version)
            report.versions += 1
        for key, value in rm.tags.items():  # the champion's succession names versions: renumbered
            if key == STACK_TAG:
                value = ",".join(numbers.get(n, n) for n in value.split(",") if n)
            dst.set_registered_model_tag(rm.name, key, value)
        for alias, number in rm.aliases.items():
            if str(number) in numbers:
                dst.set_registered_model_alias(rm.name, alias, numbers[str(number)])


def push(source: str, target: str, experiments: list[str] | None = None) -> Report:
    from mlflow.tracking import MlflowClient

    src, dst = MlflowClient(source), MlflowClient(target)
    report = Report()
    push_runs(src, dst, report, experiments)
    push_registry(src, dst, report)
    return report


def _registered(client, name: str):
    from hsflow.serving.registry import registered

    return registered(client, name)


def _line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text or [''])[0][:300]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hsflow.push", description=__doc__.split("\n\n")[0])
    ap.add_argument("--to", required=True, help="the server, e.g. http://127.0.0.1:5000 (credentials: "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials)")
    ap.add_argument("--from", dest="source", default=f"sqlite:///{ROOT_DIR / 'mlflow.db'}",
                    help="the store to copy (default: the project's embedded mlflow.db)")
    ap.add_argument("--experiment", action="append", help="only this experiment (repeatable)")
    args = ap.parse_args(argv)
    if args.source.startswith("sqlite:///") and not Path(args.source.removeprefix("sqlite:///")).is_file():
        print(f"error: no store at {args.source}: nothing to push (train first, or name it with --from)",
              file=sys.stderr)
        return 2
    if not args.to.startswith(("http://", "https://")) and not args.to.startswith(("sqlite:", "postgresql")):
        print(f"error: --to {args.to!r}: give the server's URL (http://host:port)", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not a "View run" line per copied run
    try:
        report = push(args.source, args.to, args.experiment)
    except Exception as exc:  # noqa: BLE001 - the server unreachable or refusing: one line
        print(f"error: push to {args.to} stopped: {_line(exc)}", file=sys.stderr)
        return 2
    for line in report.failed:
        print(f"failed: {line}", file=sys.stderr)
    print(f"pushed {report.runs} runs ({report.skipped} already there), {report.models} logged models, "
          f"{report.versions} model versions to {args.to}; {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
