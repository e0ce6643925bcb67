"""Two-process DDP (gloo, CPU) over hsflow's cached-feature path: `python tests/ddp_fit.py OUT.json`.

Lightning's `strategy=ddp` starts the second process by re-running this script; both train the same
HSClassifier on their half of an HSDataModule of feature tensors; the TopK metrics gather every photo's top-k
from both ranks before computing. Rank 0 writes what it saw to OUT.json (tests/test_scale.py checks it).
"""
from __future__ import annotations

import functools
import json
import sys
import warnings

import pytorch_lightning as pl
import torch

from hsflow.data.datamodule import HSDataModule
from hsflow.models.classifier import HSClassifier, build_head

CLASSES, DIM = 300, 64


class Probe(pl.Callback):
    """Records, on every rank, how many test photos the synced metric covered."""

    def on_test_epoch_end(self, trainer, module):
        self.synced_test_photos = len(module.test_metrics.gathered()[1])


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, DIM, generator=g) * 3

    def split(n):
        y = torch.arange(n) % CLASSES
        return centres[y] + torch.randn(n, DIM, generator=g), y

    data = {"train": split(1200), "val": split(300), "test": split(300)}
    dm = HSDataModule.from_features({k: v[0] for k, v in data.items()}, {k: v[1] for k, v in data.items()},
                                    batch_size=32)
    module = HSClassifier(torch.nn.Identity(), build_head(DIM, CLASSES, 0, 0.0), CLASSES,
                          functools.partial(torch.optim.Adam, lr=1e-2))
    probe = Probe()
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", devices=2, strategy="ddp", deterministic=True,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[probe])
    trainer.fit(module, datamodule=dm)
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    if trainer.global_rank == 0:
        with open(out, "w") as fh:
            json.dump({"world_size": trainer.world_size, "backend": torch.distributed.get_backend(),
                       "synced_test_photos": probe.synced_test_photos, "local_test_photos": len(
                           module.test_metrics.states()[1]), **{k: float(v) for k, v in test.items()}}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
