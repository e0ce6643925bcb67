"""The network of a saved model: frozen prefix + trained suffix + head, rebuilt from meta.json's facts."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from hsflow.data.transforms import spec_id
from hsflow.models.backbones import build_backbone, instantiate_backbone, split_backbone
from hsflow.models.classifier import head_from_spec


def assemble(prefix: nn.Module, suffix: nn.Module, head: nn.Module) -> nn.Sequential:
    return nn.Sequential(prefix, suffix, head)


def build_network(meta: dict, code_dir: Path | None = None) -> nn.Sequential:
    """The network's shape, random weights (the caller loads weights.pt over it): from meta's `net` (the backbone
    class and its arguments; `code_dir`: the model's copy of a module outside hsflow), or, in models saved before
    `net` was recorded, the shipped backbone called meta's `backbone`."""
    spec = meta.get("net")
    bb = instantiate_backbone(spec, code_dir, pretrained=False) if spec else build_backbone(meta["backbone"], False)
    joined = [build_backbone(name, pretrained=False) for name in meta.get("concat", [])]
    net = split_backbone(bb, meta["unfreeze"], spec_id(meta["preprocess"]), joined)
    head = head_from_spec(net.dim, len(meta["classes"]), meta["head"])  # older models: no kind, a softmax head
    return assemble(net.prefix, net.suffix, head)


class LogitsAndEmbedding(nn.Module):
    """The saved network with both outputs every door reads (what hsflow.models.bundle exports to network.onnx)."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, x):
        emb = self.net[1](self.net[0](x))
        return self.net[2](emb), emb
