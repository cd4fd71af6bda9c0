"""The dense heads of the references, beside our light decoder (`tasks.base.DenseHead`), chosen by `model.head`:

- `light` (default): DenseHead, a 3x3 conv, GELU, a 1x1 conv to sub-pixels, pixel shuffle (ours, any backbone);
- `conv`: MTAN's prediction layer (lorenmt/mtan): Conv3x3(c, c) then Conv1x1(c, out), nothing between, Xavier-normal
  weights and zero biases, on full-resolution maps (SegNet, MTAN);
- `deeplab`: LibMTL's `DeepLabHead` (Chen et al. 2017, arXiv:1706.05587), what ForkMerge's NYUv2 numbers were made
  with: ASPP (256 channels: a 1x1 conv, 3x3 atrous convs at rates 12, 24, 36, image pooling; each Conv-BN-ReLU),
  their concatenation projected by a 1x1 conv to 256 -BN-ReLU-Dropout(0.5), a Conv3x3 256->256 -BN-ReLU, a 1x1 conv
  to the output, bilinear upsampling (aligned corners) to the label size.

Normals' heads (`Task.unit`) give unit vectors whatever the kind, as the references'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import MTLError

KINDS = ("light", "conv", "deeplab")


class ConvHead(nn.Module):
    def __init__(self, channels: int, out_channels: int, unit: bool):
        super().__init__()
        self.conv, self.out, self.unit = (
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.Conv2d(channels, out_channels, 1),
            unit,
        )
        for m in (self.conv, self.out):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z: Tensor, size) -> Tensor:
        y = self.out(self.conv(z))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
        return F.normalize(y, dim=1) if self.unit else y


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation if kernel == 3 else 0
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class ASPP(nn.Module):
    def __init__(self, channels: int, rates=(12, 24, 36), width: int = 256):
        super().__init__()
        branches = [nn.Sequential(*conv_bn_relu(channels, width))]
        branches += [nn.Sequential(*conv_bn_relu(channels, width, 3, r)) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(channels, width))
        self.project = nn.Sequential(*conv_bn_relu(5 * width, width), nn.Dropout(0.5))

    def forward(self, z: Tensor) -> Tensor:
        pooled = F.interpolate(self.pool(z), size=z.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(z) for b in self.branches] + [pooled], 1))


class DeepLabHead(nn.Module):
    def __init__(self, channels: int, out_channels: int, unit: bool):
        super().__init__()
        self.aspp = ASPP(channels)
        self.refine = nn.Sequential(*conv_bn_relu(256, 256, 3))
        self.out, self.unit = nn.Conv2d(256, out_channels, 1), unit

    def forward(self, z: Tensor, size) -> Tensor:
        y = F.interpolate(self.out(self.refine(self.aspp(z))), size=size, mode="bilinear", align_corners=True)
        return F.normalize(y, dim=1) if self.unit else y


def make_head(kind: str, task, channels: int, spatial: bool, reduction: int) -> nn.Module:
    """Task `task`'s head of `kind` (model.head) on `channels`-channel features; image-level tasks keep their own."""
    if kind not in KINDS:
        raise MTLError(f"Unknown model.head={kind!r}. Valid choices: {', '.join(KINDS)}.")
    if kind == "light" or not task.dense:
        return task.head(channels, spatial, reduction)
    return (ConvHead if kind == "conv" else DeepLabHead)(channels, task.out_channels, task.unit)
