"""The network of a saved model: frozen prefix + trained suffix + head, rebuilt from meta.json's facts."""
from __future__ import annotations

from torch import nn

from hsflow.data.transforms import spec_id
from hsflow.models.backbones import build_backbone, split_backbone
from hsflow.models.classifier import head_from_spec


def assemble(prefix: nn.Module, suffix: nn.Module, head: nn.Module) -> nn.Sequential:
    return nn.Sequential(prefix, suffix, head)


def build_network(meta: dict) -> nn.Sequential:
    bb, *joined = (build_backbone(name, pretrained=False) for name in (meta["backbone"], *meta.get("concat", [])))
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
