"""Generated views are deterministic per (photo, view, pipeline) and differ between views."""
import numpy as np
from omegaconf import OmegaConf

from conftest import DEMO
from hsflow.data.transforms import Augmenter, Mirror, build_preprocess, spec_id
from hsflow.images import open_rgb

AUG = OmegaConf.create([{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
                        {"_target_": "albumentations.Affine", "rotate": [-20, 20], "p": 1.0}])


def test_views_are_deterministic_and_distinct():
    img = open_rgb(next((DEMO / "photos").glob("*.jpg")))
    a, b = Augmenter(AUG), Augmenter(AUG)
    v1, v1_again, v2 = a(img, "sha", 1), b(img, "sha", 1), a(img, "sha", 2)
    assert np.array_equal(np.asarray(v1), np.asarray(v1_again))
    assert not np.array_equal(np.asarray(v1), np.asarray(v2))
    assert a.id == spec_id(AUG) != spec_id(AUG[:1])


def test_mirror_and_preprocess_shapes():
    img = open_rgb(next((DEMO / "photos").glob("*.jpg")))
    m = Mirror()(img, "sha", -1)
    assert np.array_equal(np.asarray(m)[:, ::-1], np.asarray(img))
    x = build_preprocess({"size": 224, "resize": 224, "mean": [0.5] * 3, "std": [0.5] * 3})(img)
    assert x.shape == (3, 224, 224) and -1.01 <= float(x.min()) and float(x.max()) <= 1.01
