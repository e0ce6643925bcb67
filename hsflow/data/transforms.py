"""Per-backbone preprocessing (torchvision) and training-time augmentation (albumentations), both from config.

Generated copies ("views") are deterministic: view k of a photo is the augmentation pipeline seeded by
(photo sha256, k, pipeline), materialized once as a file and reused, with its cached features, by every run that
asks for the same copy.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

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
    """An albumentations pipeline applied deterministically per (photo, view), its outputs materialized once.

    View k of a photo is generated from the photo (at most GEN_SIDE px on the short side, so the copy does not
    depend on the backbone's input size), written as a JPEG under `<store_dir>/<id>/` and read back from there
    by every later run, naive or cached, so all runs see the very same generated pixels.
    """
    GEN_SIDE = 512
    QUALITY = 92

    def __init__(self, transforms_cfg, store_dir: str | Path | None = None):
        import albumentations as A
        from hydra.utils import instantiate

        self.id = spec_id({"augment": transforms_cfg, "materialized": f"jpeg{self.QUALITY}-{self.GEN_SIDE}"})
        self.pipeline = A.Compose([instantiate(t) for t in transforms_cfg])
        self.dir = Path(store_dir) / self.id if store_dir else None

    def __call__(self, img: Image.Image, sha256: str, view: int) -> Image.Image:
        seed = int(hashlib.sha256(f"{sha256}:{view}:{self.id}".encode()).hexdigest()[:8], 16)
        self.pipeline.set_random_seed(seed)
        return Image.fromarray(self.pipeline(image=np.asarray(img))["image"])

    def view(self, path: str, sha256: str, view: int, draft_size: int | None = None) -> Image.Image:
        """Generated copy `view` of the photo at `path`: read if materialized, else made, stored and read."""
        from hsflow.core.images import open_rgb
        from hsflow.data.store import atomic_write

        target = self.dir / sha256[:2] / f"{sha256}_{view}.jpg" if self.dir else None
        if target is not None and target.is_file():
            return open_rgb(target, draft_size=draft_size)
        img = open_rgb(path, draft_size=self.GEN_SIDE)
        if min(img.size) > self.GEN_SIDE:
            scale = self.GEN_SIDE / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BILINEAR)
        out = self(img, sha256, view)
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=self.QUALITY)
        if target is not None:
            atomic_write(target, buf.getvalue())
        return open_rgb(buf.getvalue(), name=str(target or path))


class OnlineAugmenter:
    """The same albumentations pipeline drawn afresh every time a photo is read: for training that decodes photos
    each step (`features=naive`, whole-network fine-tuning), where a new crop and light every epoch is the point.
    Each draw is seeded from torch's RNG, which Lightning seeds per run and DataLoader seeds per worker and epoch, so
    a run is repeatable and workers do not repeat each other (albumentations keeps its own generator otherwise)."""

    def __init__(self, transforms_cfg):
        import albumentations as A
        from hydra.utils import instantiate

        self.pipeline = A.Compose([instantiate(t) for t in transforms_cfg])

    def __call__(self, img: Image.Image) -> Image.Image:
        import torch

        self.pipeline.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        return Image.fromarray(self.pipeline(image=np.asarray(img))["image"])


class Mirror:
    """View -1 of a photo: its mirror image, for test-time augmentation (a mirrored product is the same product)."""
    id = "mirror"

    def __call__(self, img: Image.Image, sha256: str, view: int) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def view(self, path: str, sha256: str, view: int, draft_size: int | None = None) -> Image.Image:
        from hsflow.core.images import open_rgb

        return self(open_rgb(path, draft_size=draft_size), sha256, view)
