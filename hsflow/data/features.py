"""The frozen-prefix feature cache: compute a photo's backbone output once, train on it for every epoch and run.

Keyed by the split backbone's `cache_id` (backbone, weights, preprocessing, cut point) and, per item, by the
photo's sha256 and generated view. Stored as shards of tensors under `<cache_dir>/features/<cache_id>/`, each
written atomically, so concurrent sweep runs and interrupted extractions never corrupt it (an interrupted run
keeps the shards it finished). Changing the photo changes its sha256; changing the backbone, weights or
preprocessing changes the cache_id: stale features are never reused.

In a run whose processes all start at once (torchrun, Slurm's srun: `extract(rank=, world=)`), each process computes
every world-th of the photos and then waits until the shared cache holds every photo's features (see `wait_for`);
a photo's entry depends on the photo alone (generated views are seeded by photo and view), so the cache is the
same whatever the split.
"""
from __future__ import annotations

import io
import logging
import time
import uuid
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from hsflow.core import runtime as rt
from hsflow.data.builder import Sample
from hsflow.data.loading import PhotoDataset, default_workers, worker_context
from hsflow.data.store import atomic_write

log = logging.getLogger("hsflow.features")
STALL_S = 1800.0  # waiting for the other processes' shares fails after this long without a new shard (torch's own
# collective timeout is 30 minutes too); a shard lands every `shard_every` photos


def item_key(s: Sample, augment_id: str | None) -> str:
    return s.sha256 if s.view == 0 else f"{s.sha256}:{augment_id}:{s.view}"


class FeatureCache:
    def __init__(self, cache_dir: str | Path, cache_id: str):
        self.dir = Path(cache_dir) / "features" / cache_id
        self.items: dict[str, torch.Tensor] = {}
        self.shards: set[str] = set()     # the shard files read so far
        self.added = 0                    # features this process computed
        self.wanted: set[str] = set()     # keys this process asked for
        self.load_new()

    def load_new(self) -> int:
        """Read the shards not read yet (another process's, written since); returns how many."""
        new = sorted(p for p in self.dir.glob("*.pt") if p.name not in self.shards)
        for shard in new:
            data = torch.load(shard, map_location="cpu", weights_only=True)
            self.items.update(zip(data["keys"], data["feats"]))
            self.shards.add(shard.name)
        return len(new)

    def wait_for(self, keys: list[str], *, stall_s: float = STALL_S, poll_s: float = 0.5) -> None:
        """Block until every key is in the cache, reading the other processes' shards as they land. A barrier on the
        cache itself rather than on torch.distributed: no process group exists before Lightning's fit forms its own
        (with the backend, device and timeout it chooses), it works the same under torchrun and srun, and what it
        waits for is what the next step needs. Fails after `stall_s` without a new shard."""
        last = time.monotonic()
        while missing := sum(k not in self.items for k in set(keys)):
            if self.load_new():
                last = time.monotonic()
            elif time.monotonic() - last > stall_s:
                raise TimeoutError(f"feature cache {self.dir}: {missing} photos' features still missing after "
                                   f"{stall_s:.0f} s without a new shard (did another process of the run fail?)")
            else:
                time.sleep(poll_s)

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def add(self, keys: list[str], feats: torch.Tensor) -> None:
        feats = feats.detach().cpu().contiguous()
        buf = io.BytesIO()
        torch.save({"keys": keys, "feats": feats}, buf)
        name = f"{uuid.uuid4().hex}.pt"
        atomic_write(self.dir / name, buf.getvalue())
        self.items.update(zip(keys, feats))
        self.shards.add(name)
        self.added += len(keys)


def extract(samples: list[Sample], prefix: torch.nn.Module, preprocess, cache: FeatureCache, *,
            augmenter=None, batch_size: int = 32, num_workers: int | None = None, device: str = "cpu",
            draft_size: int | None = None, desc: str = "features", shard_every: int = 512,
            runtime: str = "onnx", rank: int = 0, world: int = 1) -> torch.Tensor:
    """Features for `samples` (aligned), computing only what the cache lacks; the prefix runs on the engine
    hsflow.core.runtime chooses (`runtime`: onnx = ONNX Runtime on a CPU, torch otherwise). With `world` > 1 this
    process computes the `rank`-th of every `world` distinct photos (a share fixed by the list, not by what each
    process found cached), then waits for the others' shares in the shared cache."""
    aug_id = augmenter.id if augmenter else None
    keys = [item_key(s, aug_id) for s in samples]
    cache.wanted.update(keys)
    mine = set(list(dict.fromkeys(keys))[rank::world]) if world > 1 else None
    todo, seen = [], set()
    for s, k in zip(samples, keys):
        if k not in cache and k not in seen and (mine is None or k in mine):
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
    if world > 1:
        log.info("rank %d/%d: %s: extracted %d of %d photos", rank, world, desc, len(todo), len(set(keys)))
        cache.wait_for(keys)
    if not keys:
        return torch.empty(0)
    return torch.stack([cache.items[k] for k in keys])
