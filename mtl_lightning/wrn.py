"""WRN-28-2, the wide ResNet of the semi-supervised protocol of Oliver et al. 2018 (arXiv:1804.09170) that ARML and
ForkMerge train on CIFAR-10 and SVHN (Zagoruyko & Komodakis 2016, arXiv:1605.07146), registered in timm's registry,
so `model.backbone=wrn28_2` (and `wrn28_k` shapes via `model.kwargs.width`) names it like any timm model.

As ARML's `lib/wrn.py`: a 3x3 stem of 16 channels, three groups of four pre-activation residual units of 16k, 32k
and 64k channels (strides 1, 2, 2; the first unit activates before its shortcut), leaky ReLU (slope 0.1), BatchNorm,
a final BN-ReLU and global average pooling; convolutions Kaiming-initialised. 1.47 M parameters at k = 2.
"""

from __future__ import annotations

from timm.models import register_model
from torch import Tensor, nn


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1)


class _Unit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(c_in), _act()) if activate_before_residual else nn.Identity()
        self.body = nn.Sequential(
            *([] if activate_before_residual else [nn.BatchNorm2d(c_in), _act()]),
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            _act(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        )
        same = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if same else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        return self.shortcut(x) + self.body(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, width: int = 2, in_chans: int = 3, num_classes: int = 0, **kwargs):
        super().__init__()
        if kwargs.get("features_only"):
            raise ValueError("wrn28_2 gives pooled features only (features_only is not supported)")
        n = (depth - 4) // 6
        c = [16, 16 * width, 32 * width, 64 * width]
        units: list[nn.Module] = [nn.Conv2d(in_chans, c[0], 3, 1, 1, bias=False)]
        for g in range(3):
            for i in range(n):
                c_in = c[g] if i == 0 else c[g + 1]
                units.append(_Unit(c_in, c[g + 1], 2 if (g > 0 and i == 0) else 1, g == 0 and i == 0))
        units += [nn.BatchNorm2d(c[3]), _act(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*units)
        self.num_features = c[3]
        self.head = nn.Linear(c[3], num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@register_model
def wrn28_2(pretrained: bool = False, **kwargs) -> WideResNet:
    if pretrained:
        raise ValueError("wrn28_2 has no pretrained weights: train it from scratch (model.pretrained=false)")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return WideResNet(depth=kwargs.pop("depth", 28), width=kwargs.pop("width", 2), **kwargs)
