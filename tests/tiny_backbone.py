"""A backbone defined outside hsflow, as a user writes one (docs/backbones.md's worked example): three conv stages,
random init. tests/test_backbones.py names it in a YAML of its own and trains, logs and serves it."""
from torch import nn

from hsflow.models.backbones import Backbone, random_weights_id


def _stage(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TinyConvNet(Backbone):
    """`pretrained`: it has no trained weights to load, so only `false` is accepted (hsflow rebuilds saved models
    with pretrained=False and loads their weights file over the result)."""

    def __init__(self, name: str = "tiny_convnet", width: int = 8, pretrained: bool = False):
        if pretrained:
            raise ValueError("TinyConvNet has no pretrained weights: set model.pretrained=false")
        stages = [_stage(3, width), _stage(width, 2 * width), _stage(2 * width, 4 * width)]
        super().__init__(name, stages, dim=4 * width, weights_id=random_weights_id())


class NoStages(Backbone):
    """Breaks the protocol: no stages."""

    def __init__(self, pretrained: bool = False):
        super().__init__("no_stages", [], 8, "none")
