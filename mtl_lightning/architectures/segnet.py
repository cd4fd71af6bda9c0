"""SegNet (Badrinarayanan et al., TPAMI 2017, arXiv:1511.00561) and MTAN, the multi-task attention network on it
(Liu, Johns, Davison, CVPR 2019, arXiv:1803.10704), as lorenmt/mtan defines them (`model_segnet_split.py`,
`model_segnet_mtan.py`) and Nash-MTL, FAMO and the tables that reprint them run them on NYUv2 and Cityscapes.

Both read the image itself (`model.backbone=none`) and give each task a (B, widths[0], H, W) map at full resolution,
to which MTAN's heads (`model.head=conv`: Conv3x3 -> Conv1x1) are applied. SegNet: five encoder stages of
Conv3x3-BN-ReLU blocks (2, 2, 3, 3, 3 blocks; widths 64, 128, 256, 512, 512), max-pooling with indices, and the
mirrored decoder unpooling with them. MTAN adds, per task, an attention module at each encoder and decoder stage
(Conv1x1-BN-ReLU-Conv1x1-BN-Sigmoid) whose mask multiplies that stage's shared features, with shared convolutions
between the attended stages. Initialisation as the reference: Xavier-normal convolution weights, zero biases.

Shared part (gradient methods): SegNet's whole encoder-decoder, whose output is one shared representation
(`weighting.mode=rep` works). MTAN: every parameter but the heads, as the reference's `shared_parameters` (the
attention modules of one task get no gradient from another task's loss); it has no single shared representation
(each task's attention reads every stage), so `mode=rep` is refused and gradient methods run in `mode=param`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MTLError
from .base import ARCHITECTURES, Architecture

WIDTHS = [64, 128, 256, 512, 512]


def conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def attention(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 1),
        nn.BatchNorm2d(c_mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_mid, c_out, 1),
        nn.BatchNorm2d(c_out),
        nn.Sigmoid(),
    )


def xavier(module: nn.Module) -> None:
    """The reference's initialisation: Xavier-normal convolution (and linear) weights, zero biases, BN (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def widths_of(cfg) -> list[int]:
    w = list(cfg.widths) or WIDTHS
    if len(w) != 5 or min(w) < 1 or w[3] != w[4]:
        raise MTLError(
            f"model.widths={list(cfg.widths)}: SegNet and MTAN have 5 stages, their last two as wide (the reference's "
            f"{WIDTHS}); e.g. model.widths=[8,16,16,32,32] for a small one."
        )
    return w


class SegNetBody(nn.Module):
    """The shared encoder-decoder: `forward(x)` -> every stage's features, what MTAN's attention reads."""

    def __init__(self, in_chans: int, f: list[int]):
        super().__init__()
        self.encoder_block = nn.ModuleList([conv(in_chans, f[0]), *(conv(f[i], f[i + 1]) for i in range(4))])
        self.decoder_block = nn.ModuleList([conv(f[0], f[0]), *(conv(f[i + 1], f[i]) for i in range(4))])
        twice = lambda c: nn.Sequential(conv(c, c), conv(c, c))  # noqa: E731  (stages 3-5: three blocks in all)
        self.conv_block_enc = nn.ModuleList([conv(f[0], f[0]), conv(f[1], f[1]), *(twice(f[i + 1]) for i in (1, 2, 3))])
        self.conv_block_dec = nn.ModuleList([conv(f[0], f[0]), conv(f[0], f[0]), *(twice(f[i]) for i in (1, 2, 3))])

    def forward(self, x: Tensor):
        """(encoder features [stage][before, after its conv block], unpooled inputs of the decoder stages, decoder
        features [stage][before, after]); decoder stage 0 is the deepest."""
        enc, dec, up, indices = [], [], [], []
        for i in range(5):
            e0 = self.encoder_block[i](x)
            e1 = self.conv_block_enc[i](e0)
            x, idx = F.max_pool2d(e1, 2, 2, return_indices=True)
            enc.append((e0, e1))
            indices.append(idx)
        for i in range(5):
            u = F.max_unpool2d(x, indices[-i - 1], 2, 2)
            d0 = self.decoder_block[-i - 1](u)
            x = self.conv_block_dec[-i - 1](d0)
            up.append(u)
            dec.append((d0, x))
        return enc, up, dec


@ARCHITECTURES.register("segnet")
class SegNet(Architecture):
    """SegNet shared by every task ("split, standard" in MTAN's code: the HPS row of the published tables)."""

    needs_image = True

    @staticmethod
    def maps_ok(cfg) -> bool:
        return True

    def __init__(self, in_dim: int, num_tasks: int, cfg, spatial: bool):
        super().__init__(in_dim, num_tasks, cfg, spatial)
        f = widths_of(cfg)
        self.body = SegNetBody(in_dim, f)
        self.out_dim = f[0]
        xavier(self)

    def shared(self, h: Tensor) -> Tensor:
        return self.body(h)[2][-1][1]

    def specific(self, z: Tensor) -> list[Tensor]:
        return [z] * self.num_tasks

    def shared_parameters(self):
        return list(self.parameters())


@ARCHITECTURES.register("mtan")
class MTAN(Architecture):
    """SegNet with one attention network per task; see the module docstring."""

    needs_image = True
    rep_ok = False

    @staticmethod
    def maps_ok(cfg) -> bool:
        return True

    def __init__(self, in_dim: int, num_tasks: int, cfg, spatial: bool):
        super().__init__(in_dim, num_tasks, cfg, spatial)
        f = widths_of(cfg)
        self.body = SegNetBody(in_dim, f)
        self.encoder_att = nn.ModuleList(
            nn.ModuleList([attention(f[0], f[0], f[0]), *(attention(2 * f[i], f[i], f[i]) for i in range(1, 5))])
            for _ in range(num_tasks)
        )
        self.decoder_att = nn.ModuleList(
            nn.ModuleList(
                [attention(2 * f[0], f[0], f[0]), *(attention(f[i + 1] + f[i], f[i], f[i]) for i in range(4))]
            )
            for _ in range(num_tasks)
        )
        self.encoder_block_att = nn.ModuleList([conv(f[0], f[1]), conv(f[1], f[2]), conv(f[2], f[3]), conv(f[3], f[4])])
        self.encoder_block_att.append(conv(f[4], f[4]))
        self.decoder_block_att = nn.ModuleList([conv(f[0], f[0]), conv(f[1], f[0]), conv(f[2], f[1]), conv(f[3], f[2])])
        self.decoder_block_att.append(conv(f[4], f[4]))
        self.out_dim = f[0]
        xavier(self)

    def shared(self, h: Tensor) -> Tensor:
        """Every task's attended map, stacked: (B, tasks, widths[0], H, W)."""
        enc, up, dec = self.body(h)
        return torch.stack([self._task(t, enc, up, dec) for t in range(self.num_tasks)], 1)

    def _task(self, t: int, enc, up, dec) -> Tensor:
        a = None
        for j in range(5):  # encoder: mask stage j's output by attention over its input (and the attended stage)
            inp = enc[j][0] if j == 0 else torch.cat([enc[j][0], a], 1)
            a = F.max_pool2d(self.encoder_block_att[j](self.encoder_att[t][j](inp) * enc[j][1]), 2, 2)
        for j in range(5):  # decoder, deepest stage first
            a = self.decoder_block_att[-j - 1](F.interpolate(a, scale_factor=2, mode="bilinear", align_corners=True))
            a = self.decoder_att[t][-j - 1](torch.cat([up[j], a], 1)) * dec[j][1]
        return a

    def specific(self, z: Tensor) -> list[Tensor]:
        return list(z.unbind(1))

    def shared_parameters(self):
        return list(self.parameters())
