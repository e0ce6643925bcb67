"""The LightningModule: trainable backbone suffix + a new classification head, with metrics that stay
linear in photos and classes (hsflow.metrics).

Inputs are what the DataModule yields: cached prefix outputs (the fast path) or, when `prefix` is set, images
(the naive path the study used: every epoch pays the full backbone forward). Both give the same function.
"""
from __future__ import annotations

from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn

from hsflow.metrics import TopK


VAL_TOP1 = "curves/top1_val"  # what model choice and sweepers go by


def build_head(dim: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """The study's new head: dropout 0.5 before the classifier (with an optional hidden layer)."""
    if hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))


def _metrics(num_classes: int, prefix: str, postfix: str = "") -> TopK:
    """top1, top3, macro_top1, macro_top3, macro_f1 from each photo's top-3 (hsflow.metrics: linear in photos and
    classes; torchmetrics' stat scores need a batch x classes^2 tensor per step in deterministic mode)."""
    return TopK(num_classes, 3, prefix, postfix)


class HSClassifier(pl.LightningModule):
    def __init__(self, suffix: nn.Module, head: nn.Module, num_classes: int, optimizer: partial,
                 backbone_lr_scale: float = 0.1, label_smoothing: float = 0.0, scheduler: str = "none",
                 prefix: nn.Module | None = None, input_dim: int = 1):
        super().__init__()
        if prefix is not None:  # the naive loop runs the frozen prefix as extraction does: channels-last
            prefix = prefix.to(memory_format=torch.channels_last)
        self.prefix, self.suffix, self.head, self.num_classes = prefix, suffix, head, num_classes
        self.optimizer_factory, self.backbone_lr_scale, self.scheduler_name = optimizer, backbone_lr_scale, scheduler
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # Keys: MLflow's UI makes a chart section of each part before '/' and orders sections by name, so the
        # per-epoch curves (`curves/<measure>_<split>`) come before the test results (`test/<measure>`).
        self.train_metrics = _metrics(num_classes, "curves/", "_train")
        self.val_metrics = _metrics(num_classes, "curves/", "_val")
        self.test_metrics = _metrics(num_classes, "test/")
        self.test_logits: list[torch.Tensor] = []
        self.input_dim = input_dim  # dims of one input without batch: 1 pooled vector, 3 feature map/image
        self.val_photos: int | None = None  # validation photos the last epoch's metrics covered (all processes)

    def train(self, mode: bool = True):
        # The frozen prefix is a fixed function (as when its outputs are cached): its batch-norm layers must keep
        # their ImageNet statistics even while the head trains.
        super().train(mode)
        if self.prefix is not None:
            self.prefix.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.input_dim + 2:  # (batch, views, ...): test-time augmentation, average the logits
            b, v = x.shape[:2]
            return self(x.flatten(0, 1)).view(b, v, -1).mean(1)
        return self.head(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads: the trainable suffix over the frozen prefix's output (cached, or computed here from
        photos). The saved model's HSModel.embed gives the same values."""
        if self.prefix is not None:
            with torch.no_grad():
                x = self.prefix(x)
        return self.suffix(x)

    def _step(self, batch, metrics, stage: str):
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        metrics.update(logits, y)
        # sync_dist: under DDP the epoch's loss is the mean over processes (a no-op in one process); the TopK
        # figures below are computed from every process's photos already, so their sync only confirms them.
        self.log("test/loss" if stage == "test" else f"curves/loss_{stage}", loss, on_step=False, on_epoch=True,
                 prog_bar=stage != "test", batch_size=len(y), sync_dist=True)
        return loss, logits

    def training_step(self, batch, _):
        return self._step(batch, self.train_metrics, "train")[0]

    def on_train_epoch_end(self):
        self.log_dict(self.train_metrics.compute(), sync_dist=True)
        self.train_metrics.reset()

    def validation_step(self, batch, _):
        self._step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self):
        values = self.val_metrics.compute()  # over every process's photos under DDP (each photo once)
        self.val_photos = len(self.val_metrics.gathered()[1])
        self.log(VAL_TOP1, values.pop(VAL_TOP1), prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        self.val_metrics.reset()

    def on_test_epoch_start(self):
        self.test_metrics.reset()
        self.test_logits = []

    def test_step(self, batch, _):
        _, logits = self._step(batch, self.test_metrics, "test")
        self.test_logits.append(logits.detach().float().cpu())

    def on_test_epoch_end(self):
        # Not reset: a caller may read the test photos' top-k (test_metrics.states()) after Lightning's test loop.
        self.log_dict(self.test_metrics.compute(), sync_dist=True)

    def configure_optimizers(self):
        # A lower learning rate for unfrozen backbone stages than for the new head (fine-tuning convention).
        groups = [{"params": [p for p in self.head.parameters() if p.requires_grad]}]
        suffix_params = [p for p in self.suffix.parameters() if p.requires_grad]
        opt_kwargs = self.optimizer_factory.keywords
        if suffix_params:
            groups.append({"params": suffix_params, "lr": opt_kwargs["lr"] * self.backbone_lr_scale})
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_name == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
            return {"optimizer": optimizer, "lr_scheduler": sched}
        if self.scheduler_name != "none":
            raise ValueError(f"optimizer.scheduler={self.scheduler_name!r}: choose none or cosine")
        return optimizer
