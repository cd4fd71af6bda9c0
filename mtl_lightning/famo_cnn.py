"""FAMO's CelebA network (Liu et al., NeurIPS 2023, arXiv:2306.03792; Cranial-XIX/FAMO `experiments/celeba`), in
timm's registry as `model.backbone=famo_cnn`: seven Conv3x3 (no bias)-BN-ReLU blocks of 64 | 128, 128 | 256, 256 |
512, 512 channels with 2x2 max-pooling after the first three groups, global average pooling, then two Linear 512 ->
512 (no bias)-BN-ReLU layers: the (B, 512) features its 40 heads read.
"""

from __future__ import annotations

from timm.models import register_model
from torch import Tensor, nn


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _linear(d: int) -> list[nn.Module]:
    return [nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]


class FAMOCNN(nn.Module):
    def __init__(self, in_chans: int = 3, num_classes: int = 0, **_):
        super().__init__()
        pool = nn.MaxPool2d(2, 2)
        convs = [*_conv(in_chans, 64), pool, *_conv(64, 128), *_conv(128, 128), pool]
        convs += [*_conv(128, 256), *_conv(256, 256), pool, *_conv(256, 512), *_conv(512, 512)]
        self.body = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), *_linear(512), *_linear(512))
        self.num_features = 512
        self.head = nn.Linear(512, num_classes) if num_classes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@register_model
def famo_cnn(pretrained: bool = False, **kwargs) -> FAMOCNN:
    if pretrained:
        raise ValueError("famo_cnn has no pretrained weights: train it from scratch (model.pretrained=false)")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return FAMOCNN(**kwargs)
