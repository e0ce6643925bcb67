"""The GPU path on an accelerator: `python bench/gpu_check.py OUT.json` (bench/gpu_results.json holds a run).

Measures, on synthetic inputs (no photos, no weights to download: `pretrained=False` EfficientNet-Lite0, whose
speed does not depend on its weights): the frozen prefix's throughput fp32 vs fp32 channels-last vs bf16
channels-last (224 and 64 px); the head's fit on cached-size features through hsflow's own HSClassifier and
HSDataModule with Lightning, fp32 vs precision='bf16-mixed' with strategy='ddp' (one GPU), at 42 and 3,000
classes, deterministic as trainer=default is; a fine-tuning step (unfreeze=1) in bf16 channels-last; peak GPU memory.
Needs torch, pytorch-lightning, torchmetrics and efficientnet_lite_pytorch; hsflow's config modules (omegaconf) are
not imported.
"""
from __future__ import annotations

import functools
import json
import sys
import time
import types
import warnings

import torch


def _no_omegaconf():
    """hsflow.data.features imports hsflow.data.builder, which names omegaconf types in annotations only. Lightning is
    imported first, so it sees no omegaconf rather than the stub."""
    import pytorch_lightning  # noqa: F401

    try:
        import omegaconf  # noqa: F401
    except ImportError:
        stub = types.ModuleType("omegaconf")
        stub.DictConfig = stub.ListConfig = dict
        stub.OmegaConf = object
        sys.modules["omegaconf"] = stub


def throughput(net, size: int, batch: int, dtype, channels_last: bool, seconds: float = 4.0) -> float:
    x = torch.randn(batch, 3, size, size, device="cuda")
    net = net.cuda().eval()
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    else:
        net = net.to(memory_format=torch.contiguous_format)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        for _ in range(3):
            net(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            net(x)
            n += batch
        torch.cuda.synchronize()
    return round(n / (time.perf_counter() - t0), 1)


def head_fit(classes: int, n_train: int, precision: str, strategy: str, epochs: int = 3, batch: int = 32,
             accelerator: str = "gpu") -> dict:
    import pytorch_lightning as pl

    from hsflow.data.datamodule import HSDataModule
    from hsflow.models.classifier import HSClassifier, build_head
    from hsflow.core.timing import EpochTimer

    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randn(n, 1280, generator=g) + 3 * torch.nn.functional.one_hot(y % 1280, 1280).float()
        return x, y

    data = {"train": split(n_train), "val": split(n_train // 10), "test": split(n_train // 10)}
    dm = HSDataModule.from_features({k: v[0] for k, v in data.items()}, {k: v[1] for k, v in data.items()},
                                    batch_size=batch)
    module = HSClassifier(torch.nn.Identity(), build_head(1280, classes, 0, 0.5), classes,
                          functools.partial(torch.optim.RMSprop, lr=1e-4))
    timer = EpochTimer()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, strategy=strategy, precision=precision,
                         deterministic=True, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {"classes": classes, "train_photos": n_train, "precision": precision, "strategy": strategy,
            "epoch_seconds": timer.seconds, "fit_seconds": round(fit_s, 2),
            "us_per_photo_last_epoch": round(timer.seconds[-1] / n_train * 1e6, 2),
            "test_top1": round(float(test["test/top1"]), 4), "test_macro_top1": round(float(test["test/macro_top1"]), 4),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None}


def finetune_step(batch: int = 64, size: int = 224) -> dict:
    """One stage unfrozen (model.unfreeze=1): bf16 autocast, channels-last, backward through the last stage."""
    from hsflow.models.backbones import build_backbone, split_backbone

    net = split_backbone(build_backbone("efficientnet_lite0", pretrained=False), 1, "gpu-check")
    prefix = net.prefix.cuda().eval().to(memory_format=torch.channels_last)
    suffix = net.suffix.cuda().train().to(memory_format=torch.channels_last)
    head = torch.nn.Linear(net.dim, 3000).cuda()
    opt = torch.optim.AdamW([*suffix.parameters(), *head.parameters()], lr=1e-4)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 3000, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                f = prefix(x)
            loss = torch.nn.functional.cross_entropy(head(suffix(f)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "size": size, "photos_per_s": round(batch / (sum(times[4:]) / len(times[4:])), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    _no_omegaconf()
    from hsflow.models.backbones import build_backbone, split_backbone

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "capability": list(torch.cuda.get_device_capability(0))}
    import pytorch_lightning as pl

    result["lightning"] = pl.__version__
    prefix = split_backbone(build_backbone("efficientnet_lite0", pretrained=False), 0, "gpu-check").prefix
    ext = {}
    for size, batch in ((224, 256), (64, 1024)):
        for name, dtype, cl in (("fp32", "fp32", False), ("fp32_channels_last", "fp32", True),
                                ("bf16_channels_last", "bf16", True)):
            ext[f"{size}px_{name}"] = throughput(prefix, size, batch, dtype, cl)
            print(size, name, ext[f"{size}px_{name}"], flush=True)
    result["extraction_photos_per_s"] = ext
    fits = []
    for classes in (42, 3000):
        for precision, strategy in (("32-true", "auto"), ("bf16-mixed", "ddp")):
            fits.append(head_fit(classes, 20000, precision, strategy))
            print(fits[-1], flush=True)
            with open(out, "w") as fh:  # partial results survive a time-out
                json.dump({**result, "head_fit": fits}, fh, indent=1)
    result["head_fit"] = fits
    result["finetune_unfreeze1_bf16_channels_last"] = finetune_step()
    print(result["finetune_unfreeze1_bf16_channels_last"], flush=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
