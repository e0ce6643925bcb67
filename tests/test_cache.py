"""The feature cache is an optimization, not a different model: cached and naive loops agree, and the cache key
changes whenever the cached output would."""
import mlflow
import pytest
import torch

from conftest import tiny_overrides, train_cli
from hsflow.data.builder import Sample
from hsflow.data.transforms import preprocess_spec, spec_id
from hsflow.data.features import item_key
from hsflow.core.images import open_rgb
from hsflow.models.backbones import build_backbone, split_backbone
from hsflow.models.bundle import load_model
from test_configs import compose_cfg


def _train(store, cache, tmp, features, unfreeze):
    proc = train_cli(*tiny_overrides(store, cache, tmp, f"features={features}", f"model.unfreeze={unfreeze}",
                                     "trainer.max_epochs=2", "num_workers=1", "calibration.enabled=false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1].split()[0].split("=")[1]
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    return mlflow.get_run(run_id), load_model(f"runs:/{run_id}/model")


# Partial fine-tuning is the harder case: the cache holds the frozen prefix's feature maps, the last stage trains
# (its batch norm in train mode) on top, and the prefix's own batch norms must stay frozen in the naive loop too.
# The frozen default (unfreeze=0) is the same code path with an empty suffix.
@pytest.mark.parametrize("unfreeze", [1])
def test_cached_and_naive_loops_give_the_same_model(tiny_store, session_cache, tmp_path, unfreeze):
    cached_run, cached = _train(tiny_store, session_cache, tmp_path / "cached", "cached", unfreeze)
    naive_run, naive = _train(tiny_store, tmp_path / "nocache", tmp_path / "naive", "naive", unfreeze)
    assert cached_run.data.metrics["test/top1"] == pytest.approx(naive_run.data.metrics["test/top1"], abs=1e-6)
    assert cached_run.data.metrics["curves/loss_train"] == pytest.approx(naive_run.data.metrics["curves/loss_train"],
                                                                         rel=1e-3)
    x = torch.stack([cached.preprocess()(open_rgb(p)) for p in sorted((tiny_store / "photos").glob("*.jpg"))[:12]])
    assert torch.allclose(cached.probabilities(x), naive.probabilities(x), atol=1e-4)
    assert not (tmp_path / "nocache" / "features").exists()  # the naive loop never touched a cache


def test_cache_key_changes_with_backbone_preprocessing_weights_cut_and_photo():
    lite0 = compose_cfg("model=efficientnet_lite0").model
    lite1 = compose_cfg("model=efficientnet_lite1").model
    small = compose_cfg("model=efficientnet_lite0", "model.input_size=192", "model.resize_size=192").model

    def cid(cfg, pretrained=True, unfreeze=0):
        return split_backbone(build_backbone(cfg.name, pretrained), unfreeze, spec_id(preprocess_spec(cfg))).cache_id

    base = cid(lite0)
    assert base == cid(lite0)  # stable
    others = {cid(lite1), cid(small), cid(lite0, pretrained=False), cid(lite0, unfreeze=1)}
    assert base not in others and len(others) == 4
    a = Sample("p.jpg", "a" * 64, "r", 0, "train")
    assert item_key(a, None) != item_key(Sample("p.jpg", "b" * 64, "r", 0, "train"), None)  # edited photo
    assert item_key(a, None) != item_key(Sample("p.jpg", "a" * 64, "r", 0, "train", view=1), "aug")
