"""Generated views are deterministic per (photo, view, pipeline) and differ between views."""
import numpy as np
from omegaconf import OmegaConf

from conftest import DEMO
from hsflow.data.transforms import Augmenter, Mirror, build_preprocess
from hsflow.images import open_rgb

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
