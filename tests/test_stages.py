"""The training run's stages, in process, on the tiny store: each one adds its part to the RunContext; a failing stage
ends the MLflow run as FAILED; the review rule is one function that fitting, test figures and answers share."""
import mlflow
import pytest
import torch

from hydra import compose, initialize_config_dir

from hsflow.models import calibration

from hsflow.training import evaluation, stages
from hsflow.core.config import CONF_DIR


def compose_cfg(*overrides):
    """The config as `hsflow.train`'s main receives it (no `hydra` node)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(autouse=True)
def own_tracking_uri():
    """The stages set MLflow's process-wide tracking URI (as a run does); later tests must not inherit it."""
    saved = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(saved)


@pytest.fixture
def cfg(tiny_store, session_cache, tmp_path):
    return compose_cfg(f"paths.raw_store={tiny_store}", f"paths.cache_dir={session_cache}",
                       f"paths.output_dir={tmp_path}/out", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                       "trainer.max_epochs=2", "+trainer.enable_progress_bar=false", "logger.log_model=false")


def prepared(cfg) -> stages.RunContext:
    ctx = stages.RunContext(cfg)
    for stage in (stages.setup, stages.dataset, stages.network, stages.data, stages.module):
        stage(ctx)
    return ctx


def test_the_stages_before_the_fit_build_the_context(cfg):
    ctx = prepared(cfg)
    assert ctx.spec.classes == ["0401200000", "0808100000", "2009120000"] and ctx.rank_zero and ctx.device == "cpu"
    assert {sp: len(ds) for sp, ds in ctx.dm.splits.items()} == {sp: len(ctx.spec.split(sp)) for sp in
                                                                 ("train", "val", "test")}
    x, _ = ctx.dm.splits["train"][0]
    assert x.shape == (ctx.net.dim,)  # the cached pooled vector of the frozen prefix
    assert len(ctx.refit_train) == len(ctx.dm.splits["train"]) + len(ctx.dm.splits["val"])
    assert ctx.run_id is None  # no MLflow run before open_run


@pytest.mark.slow
def test_fit_trains_the_head_and_test_counts_every_test_photo(cfg):
    ctx = prepared(cfg)
    before = [p.detach().clone() for p in ctx.module.head.parameters()]
    for stage in (stages.open_run, stages.fit, stages.calibrate, stages.test):
        stage(ctx)
    assert any(not torch.equal(a, b) for a, b in zip(before, ctx.module.head.parameters()))
    assert ctx.figures["test/photos"] == len(ctx.spec.split("test")) == len(ctx.test_labels)
    assert 0 <= ctx.figures["test/top1"] <= ctx.figures["test/top3"] <= 1
    assert ctx.module.val_photos == len(ctx.spec.split("val"))
    run = mlflow.get_run(ctx.run_id)
    assert run.data.metrics["test/top1"] == pytest.approx(ctx.figures["test/top1"])
    stages.close(ctx)
    assert mlflow.get_run(ctx.run_id).info.status == "FINISHED"


def test_a_failing_stage_ends_the_run_as_failed(cfg):
    def broken(ctx):
        raise RuntimeError("a stage broke")

    with pytest.raises(RuntimeError, match="a stage broke"):
        stages.execute(cfg, [stages.setup, stages.dataset, stages.open_run, broken])
    (run,) = mlflow.search_runs(experiment_names=[cfg.logger.experiment_name], output_format="list")
    assert run.info.status == "FAILED" and mlflow.active_run() is None


def test_the_other_ranks_run_only_the_stages_marked_for_every_rank():
    assert all(getattr(s, "every_rank", False) for s in (stages.setup, stages.dataset, stages.network, stages.data,
                                                         stages.module, stages.fit))
    assert not any(getattr(s, "every_rank", False) for s in (stages.open_run, stages.calibrate, stages.refit,
                                                             stages.test, stages.unknown_score, stages.package,
                                                             stages.plots, stages.close))


def test_one_review_rule_for_fitting_test_figures_and_answers():
    """The threshold fitted on validation accepts exactly the photos whose top probability reaches it (ties
    included), so the precision it promises on validation is what the test figures measure on the same photos."""
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 0, 1, 0])
    t = calibration.review_threshold(probs, labels, target_precision=1.0)
    assert t == pytest.approx(0.8)
    assert calibration.unflagged(probs.max(1).values, t).tolist() == [True, True, True, False, False]
    top = float(probs[1].max())  # recommend compares one photo's top probability as a float
    assert calibration.unflagged(top, t) and not calibration.unflagged(float(probs[3].max()), t)
    figures = evaluation.period_figures(probs.log(), labels, ["a", "b", "c", "d", "e"], ["x", "y"], 1.0, t)
    assert figures["test/unflagged_coverage"] == pytest.approx(0.6)
    assert figures["test/unflagged_precision"] == pytest.approx(1.0)
