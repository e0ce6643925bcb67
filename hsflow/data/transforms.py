"""Per-backbone preprocessing (torchvision) and training-time augmentation (albumentations), both from config.

Generated copies ("views") are deterministic: view k of a photo is the augmentation pipeline seeded by
(photo sha256, k, pipeline), so its cached features can be reused by every run that asks for the same copy.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torchvision import transforms as T


def preprocess_spec(model_cfg: DictConfig) -> dict:
    return {"size": int(model_cfg.input_size), "resize": int(model_cfg.resize_size),
            "mean": [float(v) for v in model_cfg.mean], "std": [float(v) for v in model_cfg.std]}


def spec_id(spec) -> str:
    def plain(o):  # configs nested anywhere (a list of DictConfig, say) hash as their plain values
        return OmegaConf.to_container(o, resolve=True) if isinstance(o, (DictConfig, ListConfig)) else str(o)

    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=plain).encode()).hexdigest()[:12]


def build_preprocess(spec: dict) -> T.Compose:
    """PIL RGB -> normalized tensor: resize the short side, centre-crop to the network's input size."""
    return T.Compose([T.Resize(spec["resize"], interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(spec["size"]), T.ToTensor(), T.Normalize(spec["mean"], spec["std"])])


class Augmenter:
    """An albumentations pipeline applied deterministically per (photo, view)."""

    def __init__(self, transforms_cfg):
        import albumentations as A
        from hydra.utils import instantiate

        self.id = spec_id(transforms_cfg)
        self.pipeline = A.Compose([instantiate(t) for t in transforms_cfg])

    def __call__(self, img: Image.Image, sha256: str, view: int) -> Image.Image:
        seed = int(hashlib.sha256(f"{sha256}:{view}:{self.id}".encode()).hexdigest()[:8], 16)
        self.pipeline.set_random_seed(seed)
        return Image.fromarray(self.pipeline(image=np.asarray(img))["image"])


class Mirror:
    """View -1 of a photo: its mirror image, for test-time augmentation (a mirrored product is the same product)."""
    id = "mirror"

    def __call__(self, img: Image.Image, sha256: str, view: int) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
