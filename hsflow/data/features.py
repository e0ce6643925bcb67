"""The frozen-prefix feature cache: compute a photo's backbone output once, train on it for every epoch and run.

Keyed by the split backbone's `cache_id` (backbone, weights, preprocessing, cut point) and, per item, by the
photo's sha256 and generated view. Stored as shards of tensors under `<cache_dir>/features/<cache_id>/`, each
written atomically, so concurrent sweep runs and interrupted extractions never corrupt it (an interrupted run
keeps the shards it finished). Changing the photo changes its sha256; changing the backbone, weights or
preprocessing changes the cache_id: stale features are never reused.
"""
from __future__ import annotations

import io
import uuid
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from hsflow.core import runtime as rt
from hsflow.data.builder import Sample
from hsflow.data.loading import PhotoDataset, default_workers, worker_context
from hsflow.data.store import atomic_write


def item_key(s: Sample, augment_id: str | None) -> str:
    return s.sha256 if s.view == 0 else f"{s.sha256}:{augment_id}:{s.view}"


class FeatureCache:
    def __init__(self, cache_dir: str | Path, cache_id: str):
        self.dir = Path(cache_dir) / "features" / cache_id
        self.items: dict[str, torch.Tensor] = {}
        for shard in sorted(self.dir.glob("*.pt")):
            data = torch.load(shard, map_location="cpu", weights_only=True)
            self.items.update(zip(data["keys"], data["feats"]))

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def add(self, keys: list[str], feats: torch.Tensor) -> None:
        feats = feats.detach().cpu().contiguous()
        buf = io.BytesIO()
        torch.save({"keys": keys, "feats": feats}, buf)
        atomic_write(self.dir / f"{uuid.uuid4().hex}.pt", buf.getvalue())
        self.items.update(zip(keys, feats))


def extract(samples: list[Sample], prefix: torch.nn.Module, preprocess, cache: FeatureCache, *,
            augmenter=None, batch_size: int = 32, num_workers: int | None = None, device: str = "cpu",
            draft_size: int | None = None, desc: str = "features", shard_every: int = 512,
            runtime: str = "onnx") -> torch.Tensor:
    """Features for `samples` (aligned), computing only what the cache lacks; the prefix runs on the engine
    hsflow.core.runtime chooses (`runtime`: onnx = ONNX Runtime on a CPU, torch otherwise)."""
    aug_id = augmenter.id if augmenter else None
    keys = [item_key(s, aug_id) for s in samples]
    todo, seen = [], set()
    for s, k in zip(samples, keys):
        if k not in cache and k not in seen:
            seen.add(k)
            todo.append(s)
    if todo:
        workers = default_workers(device) if num_workers is None else num_workers
        loader = DataLoader(PhotoDataset(todo, preprocess, augmenter, draft_size), batch_size=batch_size,
                            num_workers=workers, pin_memory=device.startswith("cuda"),
                            multiprocessing_context=worker_context(workers),
                            persistent_workers=False)
        network = None  # asked for at the first batch, whose shape keys the exported prefix
        pending_keys, pending = [], []
        done = 0
        with torch.inference_mode(), tqdm(total=len(todo), desc=desc, unit="photo") as bar:
            for x, _ in loader:
                network = network or rt.frozen_network(prefix, cache_dir=cache.dir.parent.parent,
                                                        cache_id=cache.dir.name, input_shape=tuple(x.shape[1:]),
                                                        device=device, runtime=runtime)
                pending.append(network(x))
                pending_keys.extend(item_key(s, aug_id) for s in todo[done: done + len(x)])
                done += len(x)
                bar.update(len(x))
                if len(pending_keys) >= shard_every:
                    cache.add(pending_keys, torch.cat(pending))
                    pending_keys, pending = [], []
        if pending_keys:
            cache.add(pending_keys, torch.cat(pending))
    if not keys:
        return torch.empty(0)
    return torch.stack([cache.items[k] for k in keys])
