"""Photos into tensors for every loader: decode (reduced-size JPEG decoding when the network needs fewer pixels),
augment view k, preprocess; and how many decoding processes to use. Training's feature extraction, the naive loop
and the DataModule read photos through here."""
from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from hsflow.data.builder import Sample
from hsflow.core.images import open_rgb


class PhotoDataset(Dataset):
    """Decode (reduced-size JPEG decoding when the network needs fewer pixels), augment view k, preprocess; with
    `online` (an OnlineAugmenter), every original photo is augmented afresh each time it is read."""

    def __init__(self, samples: list[Sample], preprocess, augmenter=None, draft_size: int | None = None,
                 tta: bool = False, online=None):
        self.samples, self.preprocess, self.augmenter, self.draft = samples, preprocess, augmenter, draft_size
        self.tta = tta  # also yield the mirror image: (2, C, H, W) per sample
        self.online = online

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        if s.view:
            img = self.augmenter.view(s.path, s.sha256, s.view, self.draft)
        else:
            img = open_rgb(s.path, draft_size=self.draft)
            if self.online is not None:
                img = self.online(img)
        x = self.preprocess(img)
        return (torch.stack([x, torch.flip(x, dims=[-1])]) if self.tta else x), s.label


def default_workers(device: str = "cpu") -> int:
    """DataLoader decoding processes when the user sets none. Feeding a GPU: all cores but one. On the CPU the
    forward pass already keeps every core busy (torch threads = cores) and a decoding process preempts its threads:
    on 2 cores recommend ran 78 photos/s decoding in-process vs 50 with one worker, and a cold training run 32 s vs
    35 s. Machines with many cores get a few workers (not measured here; `num_workers=` overrides)."""
    cores = os.cpu_count() or 2
    if device.startswith("cuda"):
        return max(1, min(8, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)


def worker_context(num_workers: int):
    """The multiprocessing context for DataLoader workers. Inside a sweep launcher's worker (joblib's loky,
    submitit) the inherited default may be one torch cannot start workers with; fall back to a standard one."""
    import multiprocessing as mp

    if num_workers == 0 or mp.get_start_method(allow_none=True) in (None, "fork", "spawn", "forkserver"):
        return None
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
