"""The MLflow Model Registry side of hsflow: which version answers brokers, and every move of that answer.

One registered model (`hsflow` by default) holds the versions `hsflow.refresh` trains. Two aliases, MLflow's own
convention since stages were deprecated (2.9): `champion` is the version `make serve`, `make review` and
`hsflow.recommend` answer with; `challenger` is the latest version a refresh trained and scored. The champion's
line of succession is the registered model's tag `hsflow.champion_stack` ("1,2,4": the current champion last), so
`--rollback` returns to the one before; every move writes its reason on the version it concerns (tags and a line
of its description), where the registry page shows it.

Every function takes a client on an explicit tracking store; nothing here trains or scores.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hsflow.core.config import default_tracking_uri

DEFAULT_NAME = "hsflow"       # conf/refresh.yaml's refresh.registered_model; `--registered-model` of the doors
CHAMPION, CHALLENGER = "champion", "challenger"
EXPERIMENT = "hsflow"  # conf/logger/mlflow.yaml's experiment_name: where `make train` logs
STACK_TAG = "hsflow.champion_stack"
DESCRIPTION = ("hsflow's HS-code recommender. Alias `champion`: the version `make serve`, `make review` and "
               "`hsflow.recommend` answer with. Alias `challenger`: the latest version a refresh trained and scored. "
               "Each version's tags and description give its window, its figures on it and the decision "
               "(docs/refresh.md); `python -m hsflow.refresh --promote N` / `--rollback` move the champion by hand.")


class RegistryError(ValueError):
    """A registry state that forbids the asked move; the message is one line saying what to do."""


def _missing(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def registered(client: MlflowClient, name: str):
    """The registered model, or None when the store has none of that name."""
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise


def by_alias(client: MlflowClient, name: str, alias: str):
    """The model version an alias points at, or None (no such model, or no such alias)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise


def version(client: MlflowClient, name: str, number: str):
    """A version of the registered model, or a RegistryError naming what exists."""
    if registered(client, name) is None:
        raise RegistryError(f"no registered model {name!r} in {client.tracking_uri}: run `make refresh` first "
                            "(or name another with --registered-model)")
    try:
        return client.get_model_version(name, str(number))
    except MlflowException as exc:
        if not _missing(exc):
            raise
    have = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    raise RegistryError(f"registered model {name!r} has no version {number} (it has {have or 'none'}); "
                        "see them with `make ui` (Models)")


def stack(client: MlflowClient, name: str) -> list[str]:
    """The champions in order of succession, the current one last ([] before the first)."""
    model = registered(client, name)
    value = (model.tags if model else {}).get(STACK_TAG, "")
    return [v for v in value.split(",") if v]


def champion_uri(name: str = DEFAULT_NAME, tracking_uri: str | None = None) -> str | None:
    """models:/<name>/<version> of the champion (resolved now, so a later move of the alias cannot change what a
    caller loads), or None when the store, the registered model or the alias is absent."""
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    found = by_alias(MlflowClient(uri), name, CHAMPION)
    return f"models:/{name}/{found.version}" if found else None


def latest_model_uri(experiment: str = EXPERIMENT, run_filter: str = "", tracking_uri: str | None = None) -> str:
    """runs:/<id>/model of the most recently started finished run in `experiment` that logged a model; LookupError
    with one line saying what to do when there is none."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise LookupError(f"no tracking store at {uri}: run `make train` first (or set MLFLOW_TRACKING_URI)")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} in {uri}: run `make train` first")
    where = "attributes.status = 'FINISHED'" + (f" AND {run_filter}" if run_filter else "")
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        for run in client.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"],
                                      max_results=100):
            if mlflow.search_logged_models(experiment_ids=[exp.experiment_id], max_results=1, output_format="list",
                                           filter_string=f"source_run_id = '{run.info.run_id}'"):
                return f"runs:/{run.info.run_id}/model"
    finally:
        mlflow.set_tracking_uri(saved)
    raise LookupError(f"no finished run with a logged model in experiment {experiment!r} of {uri}"
                      + (f" matching {run_filter!r}" if run_filter else "") + ": run `make train` first")


def default_model_uri(name: str | None = None, experiment: str = EXPERIMENT, run_filter: str = "",
                      tracking_uri: str | None = None) -> str:
    """The model every door answers with when none is named (CLI, `make serve`, `make review`): the registered
    model's champion, else the latest finished `make train` run's model; with `run_filter`, the latest match. A
    LookupError with one line saying what to do when there is neither."""
    return (None if run_filter else champion_uri(name or DEFAULT_NAME, tracking_uri)) or \
        latest_model_uri(experiment, run_filter, tracking_uri)


def ensure(client: MlflowClient, name: str) -> None:
    """Create the registered model with its description on first use."""
    if registered(client, name) is None:
        client.create_registered_model(name, description=DESCRIPTION)


def note(client: MlflowClient, name: str, number: str, line: str, tags: dict[str, str]) -> None:
    """Tags on a version plus one dated line appended to its description (the registry page shows both)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, str(number), key, str(value)[:5000])
    old = client.get_model_version(name, str(number)).description or ""
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    client.update_model_version(name, str(number), description=(old + f"\n\n{stamp}: {line}").strip()[:5000])


def crown(client: MlflowClient, name: str, number: str, how: str, reason: str, *, push: bool = True) -> str | None:
    """Point `champion` at a version, recording how and why on it and on the one it replaces; returns the
    replaced version (None when there was none). `push=False` (a rollback) leaves the succession as it is."""
    before = by_alias(client, name, CHAMPION)
    old, number = (str(before.version) if before else None), str(number)
    client.set_registered_model_alias(name, CHAMPION, number)
    if push:
        client.set_registered_model_tag(name, STACK_TAG, ",".join(stack(client, name) + [number]))
    note(client, name, number, f"became champion ({how}{f', replacing version {old}' if old else ''}): {reason}",
         {"hsflow.champion_since": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
          "hsflow.champion_how": how, "hsflow.champion_reason": reason})
    if old and old != number:
        note(client, name, old, f"left champion ({how}, for version {number}): {reason}",
             {"hsflow.left_champion": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "hsflow.left_reason": reason})
    return old


def rollback_target(client: MlflowClient, name: str) -> tuple[str, str]:
    """(current champion, the one before it) from the succession, or a RegistryError saying why none."""
    if registered(client, name) is None:
        version(client, name, "0")  # raises the missing-model line
    line = stack(client, name)
    current = by_alias(client, name, CHAMPION)
    if current is None or not line or line[-1] != str(current.version):
        raise RegistryError(f"registered model {name!r}: the champion alias is "
                            f"{'absent' if current is None else f'on version {current.version}'} but the succession "
                            f"({STACK_TAG}) ends with {line[-1] if line else 'nothing'}; move it by hand with "
                            "--promote VERSION")
    if len(line) < 2:
        raise RegistryError(f"registered model {name!r}: version {line[-1]} is the first champion; there is none "
                            "to roll back to")
    return line[-1], line[-2]


def pop(client: MlflowClient, name: str) -> None:
    """Drop the current champion from the succession (after a rollback moved the alias to the one before)."""
    client.set_registered_model_tag(name, STACK_TAG, ",".join(stack(client, name)[:-1]))


def identify(uri: str, tracking_uri: str) -> tuple[str, dict]:
    """For a models:/ URI: models:/<name>/<version> (an alias resolved now, so the files and the identity are the
    same version) and {registered_model, version, aliases}; any other URI comes back as it is, with {}."""
    import re

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
    if not m:
        return uri, {}
    client = MlflowClient(tracking_uri)
    mv = (client.get_model_version_by_alias(m[1], m[2]) if m[2] else client.get_model_version(m[1], m[3]))
    return f"models:/{m[1]}/{mv.version}", {"registered_model": m[1], "version": str(mv.version),
                                             "aliases": sorted(mv.aliases)}
