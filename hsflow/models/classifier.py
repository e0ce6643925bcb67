"""The LightningModule: trainable backbone suffix + a new classification head, with metrics that stay
linear in photos and classes (hsflow.models.metrics).

Inputs are what the DataModule yields: cached prefix outputs (the fast path) or, when `prefix` is set, images
(the naive path the study used: every epoch pays the full backbone forward). Both give the same function.
"""
from __future__ import annotations

import math
import warnings
from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn

from hsflow.models.metrics import TopK


VAL_TOP1 = "curves/top1_val"  # what model choice and sweepers go by
# Lightning advises sync_dist=True for every epoch-level value under DDP; the TopK values are global already, and
# syncing the loss deadlocks against the rank-zero progress bar (see _step).
warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")


HEAD_KINDS = ("softmax", "cosface", "arcface", "normsoftmax")


class MarginHead(nn.Module):
    """Class proxies on the unit sphere: logits = scale * cos(embedding, proxy of the class). Training adds a margin
    to the true class's angle (CosFace: cos - m; ArcFace: cos(theta + m)) through pytorch-metric-learning's loss,
    which owns the proxies (`loss.W`); inference reads the same proxies without the margin (`get_logits`), so
    calibration, the review threshold and recommend see ordinary logits. `normsoftmax`: no margin, temperature
    1/scale (Zhai & Wu, 2019)."""

    def __init__(self, dim: int, num_classes: int, kind: str, scale: float, margin: float):
        super().__init__()
        from pytorch_metric_learning import losses

        if kind == "cosface":
            self.loss = losses.CosFaceLoss(num_classes, dim, margin=margin, scale=scale)
        elif kind == "arcface":  # pytorch-metric-learning takes ArcFace's margin in degrees
            self.loss = losses.ArcFaceLoss(num_classes, dim, margin=margin, scale=scale)
        elif kind == "normsoftmax":
            self.loss = losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=1.0 / scale)
        else:
            raise ValueError(f"model.head.kind={kind!r}: choose one of {', '.join(HEAD_KINDS)}")

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.loss.get_logits(emb)


def build_head(dim: int, num_classes: int, hidden: int, dropout: float, kind: str = "softmax",
               scale: float = 16.0, margin: float = 0.2) -> nn.Module:
    """The study's new head: dropout 0.5 before the classifier (with an optional hidden layer). `kind` other than
    softmax replaces the last linear layer by a cosine classifier trained with a margin loss (MarginHead)."""
    body: list[nn.Module] = [nn.Dropout(dropout)]
    if hidden:
        body += [nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout)]
    width = hidden or dim
    last = nn.Linear(width, num_classes) if kind == "softmax" else MarginHead(width, num_classes, kind, scale, margin)
    return nn.Sequential(*body, last)


def head_spec(head_cfg) -> dict:
    """The head's shape as saved in meta.json (older models have no kind: a softmax head)."""
    return {"hidden": int(head_cfg["hidden"]), "dropout": float(head_cfg["dropout"]),
            "kind": str(head_cfg.get("kind", "softmax")), "scale": float(head_cfg.get("scale", 16.0)),
            "margin": float(head_cfg.get("margin", 0.2))}


def head_from_spec(dim: int, num_classes: int, spec: dict) -> nn.Module:
    spec = head_spec(spec)
    return build_head(dim, num_classes, spec["hidden"], spec["dropout"], spec["kind"], spec["scale"], spec["margin"])


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then a cosine decay to 0 at `total_steps`, stepped per batch:
    a new head's first large gradients must not wreck pretrained stages before it has learned anything."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_batchnorm(module: nn.Module) -> None:
    """Batch-norm layers of trainable stages keep their ImageNet running statistics (eval mode; their scale and
    shift still train). With a batch of 32 photos of a few classes, batch statistics are noisy and differ from the
    single-photo statistics at inference; frozen statistics make training and inference the same function."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def random_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    """One random side x side window of a batch of cached feature maps (N, C, H, W): training-time cropping in
    feature space, and (side/H)^2 of the cost of the trainable stages."""
    h, w = x.shape[-2:]
    if side >= min(h, w):
        return x
    i, j = (int(torch.randint(0, n - side + 1, (1,))) for n in (h, w))
    return x[..., i:i + side, j:j + side]


def _metrics(num_classes: int, prefix: str, postfix: str = "") -> TopK:
    """top1, top3, macro_top1, macro_top3, macro_f1 from each photo's top-3 (hsflow.models.metrics: linear in photos and
    classes; torchmetrics' stat scores need a batch x classes^2 tensor per step in deterministic mode)."""
    return TopK(num_classes, 3, prefix, postfix)


class HSClassifier(pl.LightningModule):
    def __init__(self, suffix: nn.Module, head: nn.Module, num_classes: int, optimizer: partial,
                 backbone_lr_scale: float = 0.1, label_smoothing: float = 0.0, scheduler: str = "none",
                 prefix: nn.Module | None = None, input_dim: int = 1, bn: str = "train", warmup_epochs: float = 0,
                 train_crop: int | None = None, supcon_weight: float = 0.0):
        super().__init__()
        if bn not in ("train", "frozen"):
            raise ValueError(f"finetune.bn={bn!r}: choose train or frozen")
        # How trainable backbone stages are fitted (hsflow.models.classifier: freeze_batchnorm, warmup_cosine,
        # random_crop); none of them changes a frozen-backbone model.
        self.bn, self.warmup_epochs, self.train_crop = bn, float(warmup_epochs), train_crop
        self.supcon_weight = float(supcon_weight)
        if self.supcon_weight:
            from pytorch_metric_learning.losses import SupConLoss

            self.supcon = SupConLoss(temperature=0.1)
        if prefix is not None:  # the naive loop runs the frozen prefix as extraction does: channels-last, and the
            prefix = prefix.to(memory_format=torch.channels_last)  # trainable stages too (what tensor cores want)
            suffix = suffix.to(memory_format=torch.channels_last)
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
        if self.bn == "frozen":
            freeze_batchnorm(self.suffix)
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

    def _train_outputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and loss of a training batch: the margin loss for a MarginHead, cross-entropy otherwise, plus the
        supervised contrastive term on the head's embedding when asked."""
        if self.prefix is not None:
            with torch.no_grad():
                x = self.prefix(x)
        if self.train_crop and x.dim() == 4:
            x = random_crop(x, int(self.train_crop))
        emb = self.head[:-1](self.suffix(x))
        logits = self.head[-1](emb)
        loss = self.head[-1].loss(emb, y) if isinstance(self.head[-1], MarginHead) else self.loss(logits, y)
        if self.supcon_weight:
            loss = loss + self.supcon_weight * self.supcon(emb, y)
        return logits, loss

    def _step(self, batch, metrics, stage: str):
        x, y = batch
        if stage == "train":
            logits, loss = self._train_outputs(x, y)
        else:
            logits = self(x)
            loss = self.loss(logits, y)
        metrics.update(logits, y)
        # Not sync_dist: under DDP the progress bar (rank zero alone) would reduce it while the other ranks gather
        # the TopK states, a deadlock; the epoch loss curve is rank zero's share of the photos. The TopK figures
        # below are computed from every process's photos already.
        self.log("test/loss" if stage == "test" else f"curves/loss_{stage}", loss, on_step=False, on_epoch=True,
                 prog_bar=stage != "test", batch_size=len(y))
        return loss, logits

    def on_train_epoch_start(self):
        # Lightning never calls train() itself (it keeps, and after validation restores, each submodule's mode):
        # this puts the frozen prefix and, when asked, the trainable stages' batch-norm layers in eval mode.
        self.train()

    def training_step(self, batch, _):
        return self._step(batch, self.train_metrics, "train")[0]

    def on_train_epoch_end(self):
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch, _):
        self._step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self):
        values = self.val_metrics.compute()  # over every process's photos under DDP (each photo once)
        self.val_photos = len(self.val_metrics.gathered()[1])
        self.log(VAL_TOP1, values.pop(VAL_TOP1), prog_bar=True)
        self.log_dict(values)
        self.val_metrics.reset()

    def on_test_epoch_start(self):
        self.test_metrics.reset()
        self.test_logits = []

    def test_step(self, batch, _):
        _, logits = self._step(batch, self.test_metrics, "test")
        self.test_logits.append(logits.detach().float().cpu())

    def on_test_epoch_end(self):
        # Not reset: a caller may read the test photos' top-k (test_metrics.states()) after Lightning's test loop.
        self.log_dict(self.test_metrics.compute())

    def configure_optimizers(self):
        # A lower learning rate for unfrozen backbone stages than for the new head (fine-tuning convention).
        groups = [{"params": [p for p in self.head.parameters() if p.requires_grad]}]
        suffix_params = [p for p in self.suffix.parameters() if p.requires_grad]
        opt_kwargs = self.optimizer_factory.keywords
        if suffix_params:
            groups.append({"params": suffix_params, "lr": opt_kwargs["lr"] * self.backbone_lr_scale})
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_name == "cosine" and self.warmup_epochs > 0:
            steps = int(self.trainer.estimated_stepping_batches)
            warm = int(round(self.warmup_epochs * steps / max(1, self.trainer.max_epochs)))
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": warmup_cosine(optimizer, warm, steps), "interval": "step"}}
        if self.scheduler_name == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
            return {"optimizer": optimizer, "lr_scheduler": sched}
        if self.scheduler_name != "none":
            raise ValueError(f"optimizer.scheduler={self.scheduler_name!r}: choose none or cosine")
        return optimizer
