"""`python -m hsflow.refresh [overrides]` (`make refresh`): new rulings arrived; train a challenger, score it and the
champion on the newest complete period, and let the Model Registry say which one answers brokers.

    python -m hsflow.refresh experiment=recommended paths.raw_store=data/crawl [refresh.window=2019-Q4 ...]
    python -m hsflow.refresh --promote VERSION --reason "..."   [--registered-model hsflow]
    python -m hsflow.refresh --rollback --reason "..."          [--registered-model hsflow]

The same Hydra config and overrides as `hsflow.train` (conf/refresh.yaml adds the `refresh:` block). The window is
the newest complete year (or quarter, or the period named); the challenger trains on the rulings before the period
preceding it, validates on that period (every choice: epochs, temperature, thresholds), is refit on both as the
config says, and never sees the window. Champion (alias `champion` of the registered model) and challenger then
answer the window's photos through `hsflow.recommend`, and the decision (hsflow.lifecycle.decision) is recorded everywhere:
the new version's tags and description, the aliases, and a refresh run holding both models' figures side by side.
Without a champion the challenger becomes the first. `--promote` and `--rollback` move the alias by hand.

Last line printed: `version=<registered version> decision=<first|promoted|kept> champion=<version> run_id=<refresh
run>`. Exit status 2 with one line for bad input (nothing changed in the registry).
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from hsflow.lifecycle import periods  # noqa: E402

from hsflow.serving import registry
from hsflow.core.config import CONF_DIR  # noqa: E402
from hsflow.data.builder import excluded_codes, selected_photos, usable_photos  # noqa: E402
from hsflow.data.store import RawStore, StoreError  # noqa: E402

log = logging.getLogger("hsflow.refresh")
ALIAS_FLAGS = ("--promote", "--rollback")


class RefreshError(ValueError):
    """Bad input found before anything was trained or registered; the message is one line."""


@dataclass
class Plan:
    """What the checks found, before any training: the window, the store's photos in it, the champion."""
    cfg: DictConfig
    client: object                  # MlflowClient on the configured tracking store
    name: str                       # the registered model
    window: periods.Window
    counts: dict                    # rulings: train / validation / window
    photos: list = field(repr=False)  # the window's decodable photos (hsflow.store.Photo)
    experiment_id: str = ""         # where the refresh run and the challenger's run go
    champion: object = None         # its ModelVersion, None before the first
    champion_model: object = field(default=None, repr=False)  # the loaded HSModel


# --- checks: everything that can be wrong is found here, before training -----------------------------------------

def trained_until(meta: dict) -> str | None:
    """The first date a model never learned from, from its saved split protocol ('date: train<A, val<B, test>=B'):
    B after a refit on train + validation, else A. None for a random split by ruling (it may have seen any date)."""
    m = re.match(r"date: train<(\S+), val<(\S+),", str(meta.get("split_protocol", "")))
    return None if not m else (m[2] if meta.get("refit") else m[1])


def _deleted_line(client, name: str, experiment: str) -> str | None:
    """The refresh run that last registered a version of `name`, when the registered model is gone."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`hsflow.kind` = 'refresh' and tags.`hsflow.registered_model`"
                              f" = '{name}' and tags.`hsflow.challenger_version` != ''", max_results=1) if exp else []
    if not runs:
        return None
    run = runs[0]
    return (f"registered model {name!r} is missing from {client.tracking_uri}, but refresh run {run.info.run_id} "
            f"(window {run.data.tags.get('hsflow.window')}) registered its version "
            f"{run.data.tags['hsflow.challenger_version']}: it was deleted. Nothing was changed; restore it, or start "
            f"a new line with refresh.registered_model=<new name>")


def _load_champion(client, name: str, win: periods.Window):
    """The champion's version and model, checked loadable and trained before the window; (None, None) before the
    first."""
    from hsflow.serving.recommend import load, load_error

    current = registry.by_alias(client, name, registry.CHAMPION)
    if current is None:
        line = registry.stack(client, name)
        if line:
            raise RefreshError(f"registered model {name!r} has no champion alias, but version {line[-1]} was the "
                               "champion last (its alias or the version was deleted). Nothing was changed; name the "
                               "champion by hand: python -m hsflow.refresh --promote VERSION --reason '...'")
        return None, None
    uri = f"models:/{name}/{current.version}"
    what = f"the champion, {name} version {current.version} (run {current.run_id})"
    try:
        model = load(uri)
    except Exception as exc:  # noqa: BLE001 - whatever broke, it is one line and nothing changes
        raise RefreshError(f"{what}, cannot be loaded: {load_error(uri, exc)}. Nothing was changed; roll back "
                           "(--rollback --reason '...') or promote a loadable version (--promote VERSION)") from None
    until = trained_until(model.meta)
    if until is None or until > win.start:
        learned = ("was trained on a random split by ruling: it may have learned window rulings" if until is None
                   else f"learned rulings up to {until}, after the window starts ({win.start})")
        raise RefreshError(f"{what} {learned}, so it cannot be scored fairly on the window {win.label}. Nothing was "
                           "changed; choose a later window (refresh.window=) or crawl new rulings first")
    return current, model


def prepare(cfg: DictConfig) -> Plan:
    """Store, window, registry and champion checked; nothing written but the MLflow experiment."""
    from mlflow.tracking import MlflowClient

    from hsflow.training import tracking

    # Every door below (hsflow.recommend.load, the registry) reads the store this config logs to.
    os.environ["MLFLOW_TRACKING_URI"] = str(cfg.logger.tracking_uri)
    store = RawStore(cfg.paths.raw_store)
    excluded = excluded_codes(cfg.dataset)
    photos = [p for p in selected_photos(cfg.dataset, store) if p.hs_code not in excluded]
    dates = {p.rrdc_no: p.date for p in photos if p.date}
    win = periods.window(cfg.refresh.window, sorted(dates.values()))
    counts = periods.check(win, list(dates.values()), store.root)
    client, name = MlflowClient(str(cfg.logger.tracking_uri)), str(cfg.refresh.registered_model)
    if registry.registered(client, name) is None:
        if deleted := _deleted_line(client, name, str(cfg.logger.experiment_name)):
            raise RefreshError(deleted)
        champion, model = None, None
    else:
        champion, model = _load_champion(client, name, win)
    experiment = tracking.experiment_id(cfg)
    usable, _ = usable_photos([p for p in photos if win.holds(p.date)], verbose=False)
    return Plan(cfg, client, name, win, counts, usable, experiment, champion, model)


# --- the challenger ----------------------------------------------------------------------------------------------

def challenger_config(plan: Plan, parent_run: str) -> DictConfig:
    """The training config with the dated split moved forward (train < previous period <= validation < window),
    the store as it stood at the window's end, and the run filed under the refresh run."""
    cfg, win = copy.deepcopy(plan.cfg), plan.window
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = OmegaConf.select(cfg, "logger.run_name")
    with open_dict(cfg):
        cfg.dataset.split.by = "date"
        cfg.dataset.split.cuts = [win.prev_start, win.start]
        cfg.paths.raw_store = str(periods.store_until(RawStore(plan.cfg.paths.raw_store), win.end, out))
        cfg.logger.registered_model_name = None  # registered after the decision, by the refresh itself
        cfg.logger.run_name = f"challenger {win.label}: {name}"
        cfg.logger.tags = {**(cfg.logger.get("tags") or {}), "mlflow.parentRunId": parent_run,
                           "hsflow.kind": "challenger", "hsflow.window": win.label}
    return cfg


# --- scoring and the decision ------------------------------------------------------------------------------------

def score(plan: Plan, challenger) -> tuple[dict, dict]:
    """Both models on the window's photos: figures per model (and their paired differences), and the answers."""
    from hsflow.lifecycle import decision
    from hsflow.serving.recommend import PhotoInput

    inputs = [PhotoInput(str(p.path)) for p in plan.photos]
    truth, rulings = [p.hs_code for p in plan.photos], [p.rrdc_no for p in plan.photos]
    outside = [PhotoInput(str(p)) for p in sorted(Path(plan.cfg.refresh.outside_photos).glob("*"))
               if p.suffix.lower() in (".jpg", ".jpeg", ".png")] if plan.cfg.refresh.get("outside_photos") else []
    models = {"challenger": challenger, "champion": plan.champion_model}
    answers, figs = {}, {}
    for who, model in models.items():
        if model is None:
            continue
        answers[who] = decision.answer(model, inputs, truth)[0]
        figs[who] = decision.figures(answers[who], rulings)
        rate, n = decision.catch_rate(answers[who], decision.answer(model, outside, [""] * len(outside))[0])
        figs[who] |= {"catch_rate": rate, "catch_photos": n}
    if "champion" in answers:
        figs["delta"] = decision.paired(answers["champion"], answers["challenger"], rulings)
    return figs, answers


def decide(plan: Plan, figs: dict) -> tuple[str, str]:
    """('first' | 'promoted' | 'kept', the reason in one line)."""
    from hsflow.lifecycle import decision

    target = float(plan.cfg.refresh.target_precision)
    if plan.champion is None:
        return "first", (f"there was no champion; window top-1 {figs['challenger']['top1']:.3f}, "
                         f"unflagged precision {decision.figure_text(figs['challenger']['unflagged_precision'])} "
                         f"(target {target:g})")
    promote, reason = decision.decide(figs["delta"], figs["challenger"], float(plan.cfg.refresh.margin), target,
                                      figs["champion"])
    return ("promoted" if promote else "kept"), reason


# --- what is recorded ----------------------------------------------------------------------------------------------

def _ci(f: dict, key: str, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if f.get(key) is None or f[key] != f[key]:
        return "n/a"
    return f"{fmt.format(f[key])} [{fmt.format(f[key + '_ci_low'])}, {fmt.format(f[key + '_ci_high'])}]"


ROWS = (("top1", "top-1 (decided code)"), ("unflagged_coverage", "share of photos not flagged needs_review"),
        ("unflagged_precision", "precision of the unflagged answers"), ("unknown_rate", "share called unknown"))


def side_by_side(plan: Plan, figs: dict, versions: dict, decision: str, reason: str) -> str:
    """The refresh run's (and the new version's) description: the decision first (what the UI shows folded), then
    both models' figures on the window and their difference."""
    win, ch = plan.window, figs["challenger"]
    champ = f"champion v{versions['champion']}" if plan.champion else "champion (none)"
    vs = f" vs {champ} {figs['champion']['top1']:.3f}" if plan.champion else ""
    head = (f"**Decision: {decision}** (refresh {win.label} of `{plan.name}`): challenger v{versions['challenger']} "
            f"top-1 {ch['top1']:.3f}{vs} on the window's {len(plan.photos)} photos: {reason}."
            f"\n\nThe window: {len({p.rrdc_no for p in plan.photos})} rulings dated {win.start} .. {win.last}, "
            "which neither model trained or chose on; 95 % intervals from a bootstrap over rulings (paired for the "
            f"difference).\n\n| on the window | {champ} | challenger v{versions['challenger']} | "
            "challenger − champion |\n|---|---|---|---|\n")
    catch = "".join(f"{figs[w]['catch_rate']:.3f} | " if w in figs else "n/a | " for w in ("champion", "challenger"))
    return head + "".join(f"| {label} | {_ci(figs.get('champion', {}), key)} | {_ci(ch, key)} | "
                          f"{_ci(figs.get('delta', {}), key, True)} |\n" for key, label in ROWS) + (
        f"| goods it never learned, flagged ({ch.get('catch_photos', 0)} photos: out-of-scope, untrained codes) "
        f"| {catch} |\n")


def predictions_csv(plan: Plan, answers: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    who = list(answers)
    w.writerow(["photo", "rrdc_no", "date", "decided", *[f"{m}_{c}" for m in who
                                                          for c in ("top1", "correct", "unflagged", "unknown")]])
    for i, p in enumerate(plan.photos):
        w.writerow([p.file, p.rrdc_no, p.date, p.hs_code, *[v for m in who for v in (
            answers[m].predicted[i], int(answers[m].correct[i]), int(answers[m].unflagged[i]),
            int(answers[m].unknown[i]))]])
    return buf.getvalue()


def log_refresh(plan: Plan, figs: dict, answers: dict, result: dict, decision: str, reason: str) -> None:
    """Figures, params, the decision and its reason on the (active) refresh run."""
    import mlflow

    win = plan.window
    mlflow.log_params({"refresh.window": win.label, "refresh.window_start": win.start, "refresh.window_end": win.end,
                       "refresh.validated_on": win.prev_label, "refresh.margin": plan.cfg.refresh.margin,
                       "refresh.target_precision": plan.cfg.refresh.target_precision,
                       "refresh.registered_model": plan.name, **{f"counts.{k}_rulings": v
                                                                for k, v in plan.counts.items()}})
    mlflow.log_metrics({f"{who}/{k}": v for who, f in figs.items() for k, v in f.items() if v == v}
                       | {"window/photos": len(plan.photos), "window/rulings": len({p.rrdc_no for p in plan.photos}),
                          "challenger/run_test_top1": result["test_top1"]})
    mlflow.set_tags({"hsflow.decision": decision, "hsflow.reason": reason[:5000],
                     "hsflow.challenger_run": result["run_id"]})
    mlflow.log_dict({"window": vars(win), "counts": plan.counts, "figures": figs, "decision": decision,
                     "reason": reason}, "refresh/decision.json")
    mlflow.log_text(predictions_csv(plan, answers), "refresh/window_predictions.csv")


def version_tags(plan: Plan, figs: dict, refresh_run: str, decision: str, reason: str) -> dict[str, str]:
    """What a registered version carries: its window, what it learned, its figures there, the decision."""
    win, ch = plan.window, figs["challenger"]
    tags = {"hsflow.window": win.label, "hsflow.window_start": win.start, "hsflow.window_end": win.end,
            "hsflow.validated_on": win.prev_label, "hsflow.trained_until": win.start if plan.cfg.refit.enabled
            else win.prev_start, "hsflow.refresh_run": refresh_run, "hsflow.decision": decision,
            "hsflow.reason": reason, "hsflow.compared_with": str(plan.champion.version) if plan.champion
            else "none",
            "window.photos": str(len(plan.photos)), "window.rulings": str(len({p.rrdc_no for p in plan.photos}))}
    tags |= {f"window.{key}": _ci(ch, key) for key, _ in ROWS}
    if "delta" in figs:
        tags |= {"window.champion_top1": _ci(figs["champion"], "top1"),
                 "window.delta_top1": _ci(figs["delta"], "top1", True)}
    return tags


def register(plan: Plan, run_id: str, figs: dict, refresh_run: str, decision: str, reason: str) -> str:
    """The challenger as a new version of the registered model (tags, description), alias `challenger`; `champion`
    too when promoted."""
    import mlflow

    registry.ensure(plan.client, plan.name)
    logged = mlflow.search_logged_models(experiment_ids=[plan.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    mv = mlflow.register_model(f"models:/{logged[0].model_id}", plan.name,
                               tags=version_tags(plan, figs, refresh_run, decision, reason))
    versions = {"champion": str(plan.champion.version) if plan.champion else None, "challenger": mv.version}
    plan.client.update_model_version(plan.name, mv.version,
                                     description=side_by_side(plan, figs, versions, decision, reason)[:5000])
    plan.client.set_registered_model_alias(plan.name, registry.CHALLENGER, mv.version)
    if decision in ("first", "promoted"):
        registry.crown(plan.client, plan.name, mv.version, f"refresh {plan.window.label}", reason)
    return str(mv.version)


def run(cfg: DictConfig, plan: Plan | None = None, clock=None) -> dict:
    """The whole refresh; returns version, decision, champion, run_id (the refresh run), the reason and figures.
    `clock` (hsflow.core.timing.StageClock) times its stages into the refresh run's refresh/timings.json."""
    import mlflow

    from hsflow.training import train
    from hsflow.serving.recommend import load
    from hsflow.core.timing import StageClock

    clock = clock or StageClock()
    plan = plan or prepare(cfg)
    parent = plan.client.create_run(plan.experiment_id, run_name=f"refresh {plan.window.label}", tags={
        "hsflow.kind": "refresh", "hsflow.window": plan.window.label, "hsflow.registered_model": plan.name,
        "hsflow.champion_before": str(plan.champion.version) if plan.champion else "none"}).info.run_id
    try:
        result = train.run(challenger_config(plan, parent))
        clock.mark("challenger", run_id=result["run_id"])
        figs, answers = score(plan, load(f"runs:/{result['run_id']}/model"))
        decision, reason = decide(plan, figs)
        clock.mark("score", photos=len(plan.photos), models=len(answers))
        with mlflow.start_run(run_id=parent):
            log_refresh(plan, figs, answers, result, decision, reason)
            out = record(plan, figs, result["run_id"], parent, decision, reason)
            clock.mark("record")
            mlflow.log_dict(clock.as_dict(), "refresh/timings.json")
            mlflow.log_metric("refresh_minutes", clock.as_dict()["total_seconds"] / 60)
    except BaseException:
        if plan.client.get_run(parent).info.status == "RUNNING":
            plan.client.set_terminated(parent, "FAILED")
        raise
    return {**out, "decision": decision, "run_id": parent, "reason": reason, "challenger_run": result["run_id"],
            "figures": figs}


def record(plan: Plan, figs: dict, run_id: str, parent: str, decision: str, reason: str) -> dict:
    """The registry moves (new version, aliases) and the refresh run's closing tags and description."""
    import mlflow

    before = str(plan.champion.version) if plan.champion else None
    number = register(plan, run_id, figs, parent, decision, reason)
    champion = number if decision != "kept" else before
    mlflow.set_tags({"hsflow.challenger_version": number, "hsflow.champion_after": champion,
                     "mlflow.note.content": side_by_side(plan, figs, {"champion": before, "challenger": number},
                                                         decision, reason)})
    return {"version": number, "champion": champion}


# --- the entry points ----------------------------------------------------------------------------------------------

def move_alias(argv: list[str]) -> int:
    """--promote VERSION / --rollback, each with --reason: the champion moved by hand, the reason recorded."""
    from mlflow.tracking import MlflowClient

    from hsflow.core.config import default_tracking_uri
    from hsflow.serving.recommend import load, load_error

    ap = argparse.ArgumentParser(prog="python -m hsflow.refresh", description="Move the champion alias by hand "
                                 "(the tracking store: MLFLOW_TRACKING_URI, else the project's mlflow.db).")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--promote", metavar="VERSION", help="make this version of the registered model the champion")
    how.add_argument("--rollback", action="store_true", help="give the champion back to the one before it")
    ap.add_argument("--reason", required=True, help="why (recorded on the versions, shown in the registry)")
    ap.add_argument("--registered-model", default=registry.DEFAULT_NAME)
    args = ap.parse_args(argv)
    client, name = MlflowClient(default_tracking_uri()), args.registered_model
    try:
        if not args.reason.strip():
            raise RefreshError("--reason is empty: say why the champion moves (it is recorded on the versions)")
        if args.rollback:
            current, target = registry.rollback_target(client, name)
        else:
            target = str(registry.version(client, name, args.promote).version)
            current = getattr(registry.by_alias(client, name, registry.CHAMPION), "version", None)
            current = None if current is None else str(current)
            if current == target:
                raise RefreshError(f"version {target} of {name!r} is the champion already; nothing to move")
        uri = f"models:/{name}/{target}"
        try:  # brokers would get an error from every door: refuse before moving anything
            load(uri)
        except Exception as exc:  # noqa: BLE001 - whatever broke, it is one line and nothing changes
            raise RefreshError(f"{name} version {target} cannot be loaded ({load_error(uri, exc)}); the champion "
                               f"stays {current}") from None
        how = "rollback" if args.rollback else "promoted by hand"
        registry.crown(client, name, target, how, args.reason.strip(), push=not args.rollback)
        if args.rollback:
            registry.pop(client, name)
    except (registry.RegistryError, RefreshError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"champion of {name!r}: version {target} (was {current}; {how}: {args.reason.strip()})")
    return 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="refresh")
def hydra_main(cfg: DictConfig) -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    from hsflow.models.backbones import WeightsMissing

    from hsflow.core.timing import StageClock

    try:
        clock = StageClock()  # from the start: the checks (and the champion's loading) are a stage too
        plan = prepare(cfg)
        clock.mark("prepare")
        if plan.champion is None:
            print(f"no champion yet in registered model {plan.name!r}: the challenger becomes the first",
                  file=sys.stderr, flush=True)
        result = run(cfg, plan, clock)
    except (RefreshError, registry.RegistryError, StoreError, WeightsMissing, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"refresh {plan.window.label}: {result['decision']}: {result['reason']}", flush=True)
    print(f"version={result['version']} decision={result['decision']} champion={result['champion']} "
          f"run_id={result['run_id']}", flush=True)


def main() -> int | None:
    if any(a.split("=")[0] in ALIAS_FLAGS for a in sys.argv[1:]):  # not Hydra overrides: handled before Hydra
        return move_alias(sys.argv[1:])
    hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
