"""The refresh loop (issue 21), replayed on the demo with a real crawl, real training and a real Model Registry.

A portal stand-in on 127.0.0.1 serves a tiny cut of the demo holding rulings up to 2018; it is crawled and refreshed
(window 2018: version 1 becomes the first champion). Then the portal holds the 2019 rulings too: the second crawl
fetches only those, the second refresh trains version 2 on the rulings before 2019 and decides on 2019; a third
refresh with a weakened configuration (one epoch) must not be promoted. The doors (`hsflow.serve`, `hsflow.review`)
then answer with the champion, before and after a rollback. Bad input leaves the registry as it was.
"""
from __future__ import annotations

import base64
import collections
import csv
import datetime as dt
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import PY, ROOT, Server, free_port, make_tiny_store
from test_review import browser, needs_chromium, upload  # noqa: F401 - the real browser fixture, shared
from crawler.runner import FAST, crawl
from crawler.standin import serve
from hsflow.lifecycle import decision, periods, refresh
from hsflow.serving import registry
from hsflow.data.store import RawStore

# 4 codes of 3 chapters with 2 rulings in each of 2017 (validation of the first refresh), 2018 and 2019: ~120 photos.
CODES = {"0808100000": 10, "0401200000": 10, "2009120000": 10, "0709600000": 10}
LATE = ("2017", "2018", "2019")
# calibration.method=point: the tiny store's few validation photos can certify no bound (it needs 45 answers at 0.95
# and delta 0.1), and these tests are about the loop, not about the bound (tests/test_calibration.py).
TRAIN = ["trainer.max_epochs=10", "refit.enabled=true", "optimizer=adamw", "optimizer.lr=1e-3",
         "calibration.method=point"]


def refresh_cli(world: dict, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m hsflow.refresh` as a user runs it, on the crawled store and the test's tracking store."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"NO_ALBUMENTATIONS_UPDATE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})})
    world["runs"] += 1
    args = [f"paths.raw_store={world['crawled']}", f"paths.cache_dir={world['cache']}",
            f"logger.tracking_uri={world['uri']}", f"hydra.run.dir={world['root']}/out{world['runs']}", *overrides]
    return subprocess.run([PY, "-m", "hsflow.refresh", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=900)


def last_fields(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(kv.split("=", 1) for kv in proc.stdout.strip().splitlines()[-1].split())


def crawl_portal(archive: Path, store: Path) -> dict:
    with serve(archive) as portal:
        rc, stats = crawl(portal.url, store, settings=FAST, args={"start": "2007-01-01"})
    assert rc == 0
    return stats


@pytest.fixture(autouse=True)
def global_tracking_uri():
    """The in-process refresh points MLflow's process-wide tracking URI at its store: give it back after each test."""
    from mlflow.tracking._tracking_service import utils

    saved = getattr(utils, "_tracking_uri", None)  # None: never set (as hsflow.recommend restores it)
    yield
    mlflow.set_tracking_uri(saved)


@pytest.fixture(scope="module")
def world(tmp_path_factory, session_cache) -> dict:
    root = tmp_path_factory.mktemp("refresh")
    return {"root": root, "cache": session_cache, "crawled": root / "crawled", "runs": 0,
            "uri": f"sqlite:///{root}/mlflow.db",
            "portal_2018": make_tiny_store(root / "portal-2018", CODES, late_years=LATE, late_per_year=2,
                                           before="2019"),
            "portal_2019": make_tiny_store(root / "portal-2019", CODES, late_years=LATE, late_per_year=2)}


@pytest.fixture(scope="module")
def first(world) -> dict:
    stats = crawl_portal(world["portal_2018"], world["crawled"])
    proc = refresh_cli(world, *TRAIN)
    return {"stats": stats, "proc": proc, "last": last_fields(proc)}


@pytest.fixture(scope="module")
def second(world, first) -> dict:
    stats = crawl_portal(world["portal_2019"], world["crawled"])  # the portal published the 2019 rulings
    proc = refresh_cli(world, *TRAIN)
    return {"stats": stats, "proc": proc, "last": last_fields(proc)}


@pytest.fixture(scope="module")
def third(world, second) -> dict:
    proc = refresh_cli(world, *TRAIN, "trainer.max_epochs=1")  # deliberately weakened
    return {"proc": proc, "last": last_fields(proc)}


@pytest.fixture(scope="module")
def unsafe(world, third) -> dict:
    """A challenger as accurate as the champion that flags nothing: no unknown score, no review threshold."""
    proc = refresh_cli(world, *TRAIN, "unknown.enabled=false", "calibration.enabled=false")
    return {"proc": proc, "last": last_fields(proc)}


def client(world) -> MlflowClient:
    return MlflowClient(world["uri"])


def aliases(c: MlflowClient) -> dict[str, str]:
    return {k: str(v) for k, v in c.get_registered_model("hsflow").aliases.items()}


def rulings_of(store: Path, year: str | None = None) -> dict[str, dict]:
    return {r["rrdc_no"]: r for r in RawStore(store).rulings() if year is None or r["fields"]["ENFR_DT"][:4] == year}


def snapshot(c: MlflowClient, name: str = registry.DEFAULT_NAME):
    """Everything the registry says about a registered model: aliases, tags, and each version's tags and text."""
    model = registry.registered(c, name)
    if model is None:
        return None
    return (model.aliases, model.tags, sorted((v.version, sorted(v.tags.items()), v.description)
                                              for v in c.search_model_versions(f"name='{name}'")))


def split_rows(c: MlflowClient, run_id: str, tmp: Path) -> list[dict]:
    return list(csv.DictReader(open(c.download_artifacts(run_id, "dataset/split.csv", str(tmp)))))


# --- the replay -------------------------------------------------------------------------------------------------

def test_first_crawl_then_refresh_crowns_version_1_on_2018(world, first, tmp_path):
    assert first["stats"]["hsflow/rulings_stored"] == len(rulings_of(world["portal_2018"]))
    assert first["last"]["version"] == "1" and first["last"]["decision"] == "first" and first["last"]["champion"] == "1"
    assert "no champion yet in registered model 'hsflow': the challenger becomes the first" in first["proc"].stderr
    c = client(world)
    assert aliases(c) == {"champion": "1", "challenger": "1"}
    assert c.get_registered_model("hsflow").tags[registry.STACK_TAG] == "1"
    v1 = c.get_model_version("hsflow", "1")
    assert {k: v1.tags[k] for k in ("hsflow.window", "hsflow.window_start", "hsflow.window_end",
                                    "hsflow.validated_on", "hsflow.trained_until", "hsflow.decision")} == {
        "hsflow.window": "2018", "hsflow.window_start": "2018-01-01", "hsflow.window_end": "2019-01-01",
        "hsflow.validated_on": "2017", "hsflow.trained_until": "2018-01-01", "hsflow.decision": "first"}
    photos_2018 = sum(len(r["photos"]) for r in rulings_of(world["crawled"], "2018").values())
    assert v1.tags["window.photos"] == str(photos_2018) and "Decision: first" in v1.description
    # The challenger trained before 2017, chose on 2017 and never saw a 2018 ruling; its run is the refresh's child.
    run = c.get_run(v1.run_id)
    assert run.data.tags["mlflow.parentRunId"] == first["last"]["run_id"]
    assert json.loads(run.data.params["dataset.split.cuts"]) == ["2017-01-01", "2018-01-01"]
    dates = {r: rec["fields"]["ENFR_DT"] for r, rec in rulings_of(world["crawled"]).items()}
    for row in split_rows(c, v1.run_id, tmp_path):
        if row["split"] != "test":
            assert dates[row["rrdc_no"]] < "2018-01-01", row


def test_second_crawl_fetches_only_the_2019_rulings(world, second):
    new = len(rulings_of(world["portal_2019"], "2019"))
    assert new > 0 and second["stats"]["hsflow/rulings_stored"] == new
    assert second["stats"]["hsflow/rulings_skipped_stored"] == len(rulings_of(world["portal_2018"]))
    assert rulings_of(world["crawled"]).keys() == rulings_of(world["portal_2019"]).keys()


def window_top1(version: str, world: dict, year: str, monkeypatch) -> tuple[float, int]:
    """A model's top-1 on the window's photos, recomputed here through hsflow.recommend, apart from the refresh."""
    from hsflow.serving.recommend import load, recommend

    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    model = load(f"models:/hsflow/{version}")
    photos = [(RawStore(world["crawled"]).root / "photos" / p["file"], r["hs_code"])
              for r in rulings_of(world["crawled"], year).values() for p in r["photos"]]
    recs = recommend(model, [p for p, _ in photos], top_k=1, precedents=0)
    return float(np.mean([rec.candidates[0]["hs_code"] == code for rec, (_, code) in zip(recs, photos)])), len(photos)


def test_second_refresh_trains_before_2019_decides_on_2019_and_promotes(world, second, monkeypatch):
    assert second["last"] == {**second["last"], "version": "2", "decision": "promoted", "champion": "2"}
    c = client(world)
    v2 = c.get_model_version("hsflow", "2")
    assert v2.tags["hsflow.window"] == "2019" and v2.tags["hsflow.trained_until"] == "2019-01-01"
    assert v2.tags["hsflow.compared_with"] == "1" and v2.tags["hsflow.refresh_run"] == second["last"]["run_id"]
    params = c.get_run(v2.run_id).data.params
    assert json.loads(params["dataset.split.cuts"]) == ["2018-01-01", "2019-01-01"]
    assert params["refit.enabled"] == "True"
    m = c.get_run(second["last"]["run_id"]).data.metrics
    # Both models on the same 2019 photos: the refresh's figures are what each door answers, recomputed here.
    for who, version in (("champion", "1"), ("challenger", "2")):
        top1, n = window_top1(version, world, "2019", monkeypatch)
        assert m[f"{who}/top1"] == pytest.approx(top1, abs=1e-9) and m["window/photos"] == n
    assert m["delta/top1"] == pytest.approx(m["challenger/top1"] - m["champion/top1"], abs=1e-9)
    assert m["delta/top1_ci_low"] <= m["delta/top1"] <= m["delta/top1_ci_high"]
    # The rule, as the config sets it: the low end of the paired interval within the margin, the flag's promise kept.
    assert m["delta/top1_ci_low"] >= -0.05 and m["challenger/unflagged_precision"] >= 0.95
    assert aliases(c) == {"champion": "2", "challenger": "2"}
    assert c.get_registered_model("hsflow").tags[registry.STACK_TAG] == "1,2"
    assert "left champion (refresh 2019, for version 2)" in c.get_model_version("hsflow", "1").description
    note = c.get_run(second["last"]["run_id"]).data.tags["mlflow.note.content"]
    assert "| on the window | champion v1 | challenger v2 | challenger − champion |" in note


def test_weakened_challenger_is_not_promoted_and_the_champion_stays(world, third, tmp_path):
    assert third["last"]["version"] == "3" and third["last"]["decision"] == "kept" and third["last"]["champion"] == "2"
    c = client(world)
    assert aliases(c) == {"champion": "2", "challenger": "3"}
    run = c.get_run(third["last"]["run_id"])
    m = run.data.metrics
    assert m["delta/top1_ci_low"] < -0.05 or m["challenger/unflagged_precision"] < 0.95
    assert run.data.tags["hsflow.decision"] == "kept" and "is below -0.05" in run.data.tags["hsflow.reason"]
    assert c.get_model_version("hsflow", "3").tags["hsflow.decision"] == "kept"
    rows = list(csv.DictReader(open(c.download_artifacts(run.info.run_id, "refresh/window_predictions.csv",
                                                         str(tmp_path)))))
    assert {r["rrdc_no"] for r in rows} == set(rulings_of(world["crawled"], "2019"))
    assert np.mean([r["champion_correct"] == "1" for r in rows]) == pytest.approx(m["champion/top1"])


def test_a_challenger_less_safe_than_the_champion_is_not_promoted(world, unsafe):
    assert unsafe["last"]["decision"] == "kept" and unsafe["last"]["champion"] == "2"
    run = client(world).get_run(unsafe["last"]["run_id"])
    m = run.data.metrics
    assert m["challenger/catch_rate"] == 0.0 < m["champion/catch_rate"]  # it flags no photo of goods it never learned
    assert m["challenger/catch_photos"] == m["champion/catch_photos"] >= 35  # data/ood at least
    assert "less safe: it flags 0 % of photos of goods it never learned" in run.data.tags["hsflow.reason"]
    assert "goods it never learned, flagged" in run.data.tags["mlflow.note.content"]


# --- the doors serve the champion -------------------------------------------------------------------------------

def rest_version(world) -> dict:
    port = free_port()
    server = Server([PY, "-m", "hsflow.serve", "--port", str(port)], f"http://127.0.0.1:{port}", "/ping",
                    env={"MLFLOW_TRACKING_URI": world["uri"]})
    try:
        photo = next((world["crawled"] / "photos").glob("0808100000_*"))
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(
            photo.read_bytes()).decode()]]}, "params": {"top_k": 1}}).encode()
        req = urllib.request.Request(server.url + "/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())["predictions"][0]["model"]
    finally:
        server.stop()


def alias_cli(world, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["uri"], "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([PY, "-m", "hsflow.refresh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_serve_answers_with_the_champion_after_promotion_and_after_rollback(world, third, monkeypatch):
    c = client(world)
    answered = rest_version(world)
    assert answered == {"run_id": c.get_model_version("hsflow", "2").run_id, "registered_model": "hsflow",
                        "version": "2", "aliases": ["champion"]}
    proc = alias_cli(world, "--rollback", "--reason", "brokers report wrong apple codes")
    assert proc.returncode == 0 and "version 1 (was 2" in proc.stdout, proc.stderr
    assert aliases(c)["champion"] == "1"
    assert c.get_model_version("hsflow", "1").tags["hsflow.champion_reason"] == "brokers report wrong apple codes"
    assert c.get_model_version("hsflow", "2").tags["hsflow.left_reason"] == "brokers report wrong apple codes"
    assert rest_version(world)["version"] == "1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])  # in process this time (the same code, no start-up)
    assert refresh.move_alias(["--promote", "2", "--reason", "checked: the codes were right"]) == 0
    assert aliases(c)["champion"] == "2" and c.get_registered_model("hsflow").tags[registry.STACK_TAG] == "1,2"


@pytest.fixture(scope="module")
def review(world, third):
    """`make review` with no --model: the champion's page."""
    port = free_port()
    server = Server([PY, "-m", "hsflow.review", "--port", str(port)], f"http://127.0.0.1:{port}", "/api/model",
                    env={"MLFLOW_TRACKING_URI": world["uri"]})
    yield server
    server.stop()


def test_review_serves_the_champion_and_says_which_version(world, review):
    about = json.load(urllib.request.urlopen(review.url + "/api/model", timeout=30))
    live = aliases(client(world))["champion"]
    assert about["model"]["registered_model"] == "hsflow" and about["model"]["version"] == live
    assert "champion" in about["model"]["aliases"] and about["run_id"] == about["model"]["run_id"]


@needs_chromium
def test_review_page_shows_the_live_version(world, review, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    live = aliases(client(world))["champion"]
    browser.get(review.url + "/")
    WebDriverWait(browser, 60).until(lambda d: "loading" not in d.find_element(By.ID, "model").text)
    assert browser.find_element(By.ID, "model").text.startswith(f"hsflow version {live} (champion)")
    upload(browser, review.url, [next((world["crawled"] / "photos").glob("0808100000_*"))])
    assert browser.find_element(By.CSS_SELECTOR, ".answer .answered-by").text == (
        f"answered by hsflow version {live} (champion)")


# --- bad input: one line, nothing changed in the registry --------------------------------------------------------

def test_a_window_without_rulings_is_one_line_and_changes_nothing(world, third):
    before = snapshot(client(world))
    proc = refresh_cli(world, "refresh.window=2030")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "refresh window 2030 (2030-01-01 .. 2030-12-31) holds no ruling" in line
    assert snapshot(client(world)) == before


def copied_registry(world, tmp_path) -> str:
    """The replay's tracking store copied (artifacts stay where they are), to be broken without harm."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(Path(world["uri"].removeprefix("sqlite:///")).read_bytes())
    return f"sqlite:///{db}"


def prepare_with(world, uri: str, monkeypatch, *overrides: str):
    from hydra import compose, initialize_config_dir

    from hsflow.core.config import CONF_DIR

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("refresh", overrides=[f"paths.raw_store={world['crawled']}", f"logger.tracking_uri={uri}",
                                            *overrides])
    return refresh.prepare(cfg)


def test_a_deleted_registered_model_is_one_line_and_changes_nothing(world, third, tmp_path, monkeypatch):
    uri = copied_registry(world, tmp_path)
    MlflowClient(uri).delete_registered_model("hsflow")
    with pytest.raises(refresh.RefreshError) as err:
        prepare_with(world, uri, monkeypatch)
    assert "registered model 'hsflow' is missing" in str(err.value) and "it was deleted" in str(err.value)
    assert "\n" not in str(err.value) and snapshot(MlflowClient(uri)) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert refresh.move_alias(["--rollback", "--reason", "x"]) == 2  # and the hand moves say so too
    assert refresh.move_alias(["--promote", "1", "--reason", "x"]) == 2


def test_a_champion_that_cannot_be_loaded_is_one_line_and_changes_nothing(world, third, tmp_path, monkeypatch):
    uri = copied_registry(world, tmp_path)
    c = MlflowClient(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through the process-wide URI (restored after the test)
    files = Path(mlflow.artifacts.download_artifacts("models:/hsflow/2", dst_path=str(tmp_path / "v2")))
    weights = next(files.rglob("weights.pt"))
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as a failed copy would leave it
    broken = c.create_model_version("hsflow", source=str(files), run_id=c.get_model_version("hsflow", "2").run_id)
    c.set_registered_model_alias("hsflow", "champion", broken.version)
    c.set_registered_model_tag("hsflow", registry.STACK_TAG, f"1,2,{broken.version}")
    before = snapshot(c)
    with pytest.raises(refresh.RefreshError) as err:
        prepare_with(world, uri, monkeypatch)
    text = str(err.value)
    assert f"the champion, hsflow version {broken.version}" in text and "cannot be loaded" in text
    assert "--rollback" in text and "\n" not in text and snapshot(c) == before
    # Promoting it by hand is refused the same way; the alias stays where it was.
    c.set_registered_model_alias("hsflow", "champion", "2")
    assert refresh.move_alias(["--promote", str(broken.version), "--reason", "x"]) == 2
    assert aliases(c)["champion"] == "2"


def test_hand_moves_refuse_what_cannot_be(world, third, tmp_path, monkeypatch, capsys):
    uri = copied_registry(world, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = snapshot(MlflowClient(uri))
    assert refresh.move_alias(["--promote", "99", "--reason", "x"]) == 2
    assert "has no version 99 (it has [1, 2, 3" in capsys.readouterr().err  # 4: the less safe challenger, if run
    assert refresh.move_alias(["--promote", "2", "--reason", "x"]) == 2
    assert "is the champion already" in capsys.readouterr().err
    assert refresh.move_alias(["--promote", "3", "--reason", "  "]) == 2
    assert "--reason is empty" in capsys.readouterr().err and snapshot(MlflowClient(uri)) == before
    MlflowClient(uri).set_registered_model_tag("hsflow", registry.STACK_TAG, "2")
    before = snapshot(MlflowClient(uri))
    assert refresh.move_alias(["--rollback", "--reason", "x"]) == 2
    assert "is the first champion; there is none to roll back to" in capsys.readouterr().err
    assert snapshot(MlflowClient(uri)) == before


# --- the parts, on their own ------------------------------------------------------------------------------------

def test_windows_newest_complete_period_named_or_from_a_date():
    dates = ["2017-03-01", "2018-05-02", "2019-11-30"]
    assert periods.window("year", dates, dt.date(2026, 1, 1)) == periods.Window(
        "2019", "2019-01-01", "2020-01-01", "2018-01-01", "2018")
    assert periods.window("year", dates, dt.date(2019, 12, 31)).label == "2018"  # 2019 not over yet
    assert periods.window("quarter", dates, dt.date(2026, 1, 1)) == periods.Window(
        "2019-Q4", "2019-10-01", "2020-01-01", "2019-07-01", "2019-Q3")
    assert periods.window("quarter", dates, dt.date(2019, 12, 1)).label == "2019-Q3"
    assert periods.window("2018-Q1", dates).prev_label == "2017-Q4"
    since = periods.window("2019-07-01", dates)
    assert (since.start, since.end, since.prev_start) == ("2019-07-01", "2019-12-01", "2019-01-29")
    with pytest.raises(ValueError, match="refresh.window='monthly': choose year or quarter"):
        periods.window("monthly", dates)
    with pytest.raises(ValueError, match="the period before the window \\(2016\\) holds no ruling"):
        periods.check(periods.window("2017", dates), dates, Path("s"))


def test_store_until_leaves_out_the_later_rulings(tmp_path):
    full = make_tiny_store(tmp_path / "full")
    view = periods.store_until(RawStore(full), "2019-01-01", tmp_path / "out")
    kept = rulings_of(view)
    assert kept and all(r["fields"]["ENFR_DT"] < "2019-01-01" for r in kept.values())
    assert set(kept) == {r for r, rec in rulings_of(full).items() if rec["fields"]["ENFR_DT"] < "2019-01-01"}
    assert all(p.path.is_file() for p in RawStore(view).photos())
    assert periods.store_until(RawStore(full), "2030-01-01", tmp_path / "out") == full  # nothing later: itself


def answers(correct, unflagged=None, unknown=None) -> decision.Answers:
    correct = np.array(correct, bool)
    return decision.Answers(correct, np.array(unflagged if unflagged is not None else [True] * len(correct), bool),
                            np.array(unknown if unknown is not None else [False] * len(correct), bool))


def test_paired_differences_resample_rulings_and_the_rule_reads_the_low_end():
    rulings = [r for r in "abcdefghij" for _ in range(3)]
    champ = answers([1] * 24 + [0] * 6)
    same = decision.paired(champ, champ, rulings)
    assert (same["top1"], same["top1_ci_low"], same["top1_ci_high"]) == (0.0, 0.0, 0.0)
    better = decision.paired(champ, answers([1] * 30), rulings)  # right on the two rulings the champion missed
    assert better["top1"] == pytest.approx(0.2) and 0 <= better["top1_ci_low"] < 0.2 < better["top1_ci_high"]
    worse = decision.paired(champ, answers([1] * 15 + [0] * 15), rulings)
    promote, reason = decision.decide(worse, decision.figures(answers([1] * 15 + [0] * 15), rulings), 0.05, 0.95)
    assert not promote and "its low end is below -0.05" in reason and "unflagged precision 0.500" in reason
    promote, reason = decision.decide(same, decision.figures(champ, rulings), 0.05, 0.8)
    assert promote and "not worse beyond the margin 0.05" in reason
    # As accurate, but less safe than the champion: its unflagged answers right less often, or it catches less.
    safe = {**decision.figures(champ, rulings), "catch_rate": 0.9}
    for worse_by in ({"unflagged_precision": 0.79}, {"catch_rate": 0.5}):
        promote, reason = decision.decide(same, {**safe, **worse_by}, 0.05, 0.5, champion=safe)
        assert not promote and reason.startswith("less safe: ")
    assert decision.decide(same, safe, 0.05, 0.5, champion=safe)[0]  # as safe: promoted
    # Unflagged answers all wrong: the review flag breaks its promise; no unflagged answer at all fails it too.
    flagged_all = answers([1] * 30, unflagged=[False] * 30)
    assert not decision.decide(same, decision.figures(flagged_all, rulings), 0.05, 0.95)[0]
    counts = collections.Counter(rulings)
    assert decision.figures(champ, rulings)["top1"] == pytest.approx(24 / sum(counts.values()))
