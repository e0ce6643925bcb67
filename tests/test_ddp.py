"""Multi-process training through the command line, as a team with a GPU box first tries it: `python -m hsflow.train
trainer=ddp` on two CPU processes (gloo). The same code path runs NCCL on GPUs (bench/gpu_check.py).

What must hold: the command exits 0 with one `run_id=` line; one MLflow run and one model exist; every validation and
test photo is counted once (DistributedSampler's padding kept out); and the figures agree with a single-process run
of the same config within TOLERANCE. They cannot agree exactly: each process draws its own dropout masks and the
training shuffle comes from Lightning's DistributedSampler, not the single process's RandomSampler (the global batch
stays 32: each process takes 16 photos a step).
"""
import mlflow
import pytest

from conftest import train_cli

TOLERANCE = 0.03  # test top-1, 150 photos: under 5 photos apart (measured: see docs/benchmarks.md, DDP)
COMMON = ["dataset=demo_top5", "dataset.fill.train=null", "optimizer=adamw", "optimizer.lr=1e-3",
          "trainer.max_epochs=8"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def _runs(tmp, experiment):
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def two_runs(session_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = {}
    for name, extra in (("single", []), ("ddp", DDP)):
        proc = train_cli(*COMMON, *extra, f"paths.cache_dir={session_cache}", f"hydra.run.dir={tmp}/{name}",
                         f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", f"logger.experiment_name={name}",
                         timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = proc
    return tmp, out


def test_ddp_command_ends_with_one_run_one_model_and_one_result_line(two_runs):
    tmp, procs = two_runs
    assert [ln for ln in procs["ddp"].stdout.splitlines() if ln.startswith("run_id=")] == \
        procs["ddp"].stdout.strip().splitlines()[-1:]  # rank 1 fitted and left without a word on stdout
    client, runs = _runs(tmp, "ddp")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["trainer.strategy"] == "ddp" and runs[0].data.params["trainer.devices"] == "2"
    models = client.search_logged_models(experiment_ids=[runs[0].info.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == runs[0].info.run_id


def test_ddp_counts_every_photo_once_and_matches_one_process(two_runs):
    tmp, _ = two_runs
    (ddp,) = _runs(tmp, "ddp")[1]
    (single,) = _runs(tmp, "single")[1]
    d, s = ddp.data.metrics, single.data.metrics
    assert d["test/photos"] == s["test/photos"] == 150
    assert d["val/photos"] == s["val/photos"] == int(ddp.data.params["counts.val_photos"])
    for key in ("test/top1", "test/top3", "test/chapter_top1"):
        assert abs(d[key] - s[key]) <= TOLERANCE, (key, d[key], s[key])
    assert s["test/top1"] > 0.8  # a trained model, not two equally bad ones
