"""Generated views are deterministic per (photo, view, pipeline) and differ between views."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import DEMO
from hsflow.data.transforms import Augmenter, Mirror, build_preprocess
from hsflow.core.images import open_rgb

AUG = OmegaConf.create([{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
                        {"_target_": "albumentations.Affine", "rotate": [-20, 20], "p": 1.0}])


def test_views_are_deterministic_and_distinct():
    img = open_rgb(next((DEMO / "photos").glob("*.jpg")))
    a, b = Augmenter(AUG), Augmenter(AUG)
    v1, v1_again, v2 = a(img, "sha", 1), b(img, "sha", 1), a(img, "sha", 2)
    assert np.array_equal(np.asarray(v1), np.asarray(v1_again))
    assert not np.array_equal(np.asarray(v1), np.asarray(v2))
    assert a.id != Augmenter(AUG[:1]).id


def test_generated_views_are_materialized_once_and_reused(tmp_path):
    photo = next((DEMO / "photos").glob("*.jpg"))
    aug = Augmenter(AUG, tmp_path / "generated")
    first = aug.view(str(photo), "ab" * 32, 3)
    files = list((tmp_path / "generated").rglob("*.jpg"))
    assert len(files) == 1 and files[0].name == f"{'ab' * 32}_3.jpg"
    stamp = files[0].stat().st_mtime_ns
    again = Augmenter(AUG, tmp_path / "generated").view(str(photo), "ab" * 32, 3)  # another run
    assert files[0].stat().st_mtime_ns == stamp  # read back, not regenerated
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_mirror_and_preprocess_shapes():
    img = open_rgb(next((DEMO / "photos").glob("*.jpg")))
    m = Mirror()(img, "sha", -1)
    assert np.array_equal(np.asarray(m)[:, ::-1], np.asarray(img))
    x = build_preprocess({"size": 224, "resize": 224, "mean": [0.5] * 3, "std": [0.5] * 3})(img)
    assert x.shape == (3, 224, 224) and -1.01 <= float(x.min()) and float(x.max()) <= 1.01


def test_online_augmentation_draws_afresh_each_read_and_repeats_with_the_seed():
    """Whole-network fine-tuning reads each training photo with a new augmentation every epoch; a run with the same
    seed draws the same ones (the draws come from torch's RNG, which Lightning and the DataLoader seed)."""
    import torch

    from hsflow.data.builder import Sample
    from hsflow.data.loading import PhotoDataset
    from hsflow.data.transforms import OnlineAugmenter

    photo = next((DEMO / "photos").glob("*.jpg"))
    spec = {"size": 64, "resize": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    ds = PhotoDataset([Sample(str(photo), "sha", "r", 0, "train")], build_preprocess(spec), draft_size=64,
                      online=OnlineAugmenter(AUG))
    torch.manual_seed(0)
    first, second = ds[0][0], ds[0][0]
    torch.manual_seed(0)
    assert not torch.equal(first, second) and torch.equal(first, ds[0][0])
    plain = PhotoDataset(ds.samples, ds.preprocess, draft_size=64)
    assert torch.equal(plain[0][0], plain[0][0])  # without it a photo reads the same every time


def test_online_augmentation_asks_for_photos_not_cached_features(tiny_store, session_cache, tmp_path):
    from hydra import compose, initialize_config_dir

    from hsflow.training import stages
    from hsflow.core.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.raw_store={tiny_store}", f"paths.cache_dir={session_cache}",
                                          "dataset.online_augment=true"])
    ctx = stages.RunContext(cfg)
    for stage in (stages.setup, stages.dataset, stages.network):
        stage(ctx)
    with pytest.raises(ValueError, match="online_augment=true needs features=naive"):
        stages.data(ctx)
