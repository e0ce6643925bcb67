"""The Lightning DataModule over a dataset variant: cached features (fast path) or photos (naive path).

Under DDP `batch_size` stays the global batch (the study's 32): each of N processes takes batch_size / N photos a
step, so a DDP run trains the model a single process would (up to the shuffle order and dropout draws), and the
learning rate needs no scaling. Validation is sharded without the padding Lightning's DistributedSampler adds, so
every validation photo is counted once.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from hsflow.data.loading import worker_context


class HSDataModule(pl.LightningDataModule):
    """`splits` maps train/val/test to a Dataset yielding (input, label): a TensorDataset of cached features or
    a PhotoDataset of images. Shuffling is seeded so a run is repeatable."""

    def __init__(self, splits: dict[str, Dataset], batch_size: int = 32, num_workers: int = 0, seed: int = 42):
        super().__init__()
        self.splits, self.batch_size, self.num_workers, self.seed = splits, batch_size, num_workers, seed

    @staticmethod
    def from_features(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], **kw) -> "HSDataModule":
        return HSDataModule({k: TensorDataset(feats[k], labels[k]) for k in feats}, **kw)

    def _loader(self, split: str, shuffle: bool, shard: bool = False) -> DataLoader:
        ds = self.splits[split]
        # Tensors in memory need no worker processes; photos do (decoding).
        workers = 0 if isinstance(ds, TensorDataset) else self.num_workers
        # The shuffle order has its own generator: worker seeding draws from the loader's generator on every
        # fresh iterator, which would make the order depend on the number (and persistence) of workers.
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(self.seed)) if shuffle else None
        world = dist.get_world_size() if shard and dist.is_available() and dist.is_initialized() else 1
        if world > 1 and not shuffle:  # Lightning replaces the training sampler itself (padded: equal steps)
            sampler = UnrepeatedDistributedSampler(ds, num_replicas=world, rank=dist.get_rank(), shuffle=False)
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} is the global batch: it must divide among the "
                             f"{world} processes (give a multiple of {world})")
        return DataLoader(ds, batch_size=self.batch_size // world, sampler=sampler, num_workers=workers,
                          generator=torch.Generator().manual_seed(self.seed + 1),
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                          multiprocessing_context=worker_context(workers))

    def ordered_dataloader(self, split: str) -> DataLoader:
        """A split in its dataset order, unshuffled (for outputs aligned with the split's samples)."""
        return self._loader(split, False)

    def train_dataloader(self):
        return self._loader("train", True, shard=True)

    def val_dataloader(self):
        return self._loader("val", False, shard=True)

    def test_dataloader(self):
        return self._loader("test", False)
