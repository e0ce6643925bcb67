"""Sweeps through Hydra's own launchers and sweepers: each trial one MLflow run, grouped by its sweep id;
hsflow.report turns a grid experiment into the study's table."""
import subprocess

import mlflow
import pytest
import yaml

from conftest import PY, ROOT, train_cli
from hsflow.team import report
from test_configs import compose_cfg


def sweep_overrides(store, cache, tmp, experiment):
    return ["-m", f"paths.raw_store={store}", f"paths.cache_dir={cache}",
            f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.sweep.dir={tmp}/multirun",
            f"logger.experiment_name={experiment}", "logger.log_model=false", "calibration.enabled=false"]


def runs_of(tmp, experiment, kind=None):
    """The experiment's runs of one kind: trials (None), the sweep's parent run ("sweep"), reports ("report")."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return [r for r in runs if r.data.tags.get("hsflow.kind") == kind]


def test_joblib_grid_then_report(tiny_store, session_cache, tmp_path, capsys):
    proc = train_cli(*sweep_overrides(tiny_store, session_cache, tmp_path, "grid"), "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2", "trainer.max_epochs=1,2", "model.head.dropout=0.3,0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_of(tmp_path, "grid")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["hsflow.sweep_id"] for r in runs}) == 1
    assert {r.data.tags["hsflow.launcher"] for r in runs} == {"joblib"}
    assert sorted(r.data.params["trainer.max_epochs"] for r in runs) == ["1", "1", "2", "2"]
    # One parent run per sweep, made once although two jobs ran at a time: the UI folds the trials under it.
    (parent,) = runs_of(tmp_path, "grid", "sweep")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.data.tags["hsflow.sweep_id"] == runs[0].data.tags["hsflow.sweep_id"]

    assert report.main(["--experiment", "grid", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                        "--cols", "model.head.dropout"]) == 0
    out = capsys.readouterr().out
    assert "| trainer.max_epochs \\ model.head.dropout | 0.3 | 0.5 |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(line.count("0.") >= 2 for line in rows)
    assert "Confusion matrix of the best run" in out and "0808100000" in out  # code labels
    report_runs = runs_of(tmp_path, "grid", "report")
    assert len(report_runs) == 1  # the table is logged as an artifact of a report run


def test_optuna_sweeper_one_run_per_trial(tiny_store, session_cache, tmp_path):
    proc = train_cli(*sweep_overrides(tiny_store, session_cache, tmp_path, "search"), "hydra/sweeper=optuna",
                     "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=1",
                     "optimizer.lr=tag(log, interval(1e-4, 1e-2))", "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_of(tmp_path, "search")
    assert len(runs) == 2 and {r.data.tags["hsflow.sweeper"] for r in runs} == {"optuna"}
    lrs = {float(r.data.params["optimizer.lr"]) for r in runs}
    assert len(lrs) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    best = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    # optuna's best trial is the best validation top-1 of the logged runs (never test)
    assert best["best_value"] == pytest.approx(max(r.data.metrics["curves/top1_val"] for r in runs))


def test_submitit_local_runs_one_job(tiny_store, session_cache, tmp_path):
    proc = train_cli(*sweep_overrides(tiny_store, session_cache, tmp_path, "cluster"),
                     "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_of(tmp_path, "cluster")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["hsflow.launcher"] == "submitit_local"


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm", "joblib", "submitit_local"])
def test_launcher_configs_compose(launcher):
    cfg = compose_cfg(f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


@pytest.mark.parametrize("experiment", ["demo_table2", "demo_table4", "demo_table6", "paper_table2",
                                        "paper_table4", "paper_table6", "optuna_search"])
def test_grid_experiments_are_multiruns(experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.params
    assert cfg.logger.experiment_name in (experiment, "optuna-search")


def test_report_on_a_missing_experiment_is_one_line(tmp_path):
    proc = subprocess.run([PY, "-m", "hsflow.report", "--experiment", "nope", "--tracking-uri",
                           f"sqlite:///{tmp_path}/m.db"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "no MLflow experiment 'nope'" in proc.stderr and "Traceback" not in proc.stderr
