"""Self-supervised tasks that own their view of the input (ARML's S4L setting, Shi et al. NeurIPS 2020, after Zhai
et al. ICCV 2019 "S4L"): the shared backbone runs on the task's own transformed copies of the images.

A view task sets `view = True` and implements `view_forward(module, k, x, target, detach) -> (prediction, target)`: it
builds its view of the samples it applies to (target >= 0), asks the module for task k's prediction on it
(`module.predict_task(k, view)`, the shared backbone, the architecture and its head), and returns what its `loss`
and `update` take. Every weighting sees one loss per task as usual; gradient methods in `mode=param` differentiate
it through the task's own forward pass (`mode=rep`, one shared representation, refuses view tasks).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from .base import Task
from .classification import Classification


def rotate(x: Tensor, k: int) -> Tensor:
    """Images (..., H, W) rotated by k x 90 degrees anticlockwise."""
    return torch.rot90(x, k, dims=(-2, -1))


class Rotation(Classification):
    """Rotation prediction (Gidaris et al., ICLR 2018, arXiv:1803.07728): every image rotated by 0, 90, 180 and 270
    degrees, each copy labelled with its rotation index, 4-way cross-entropy, as ARML's S4L code (square images)."""

    kind = "rotation"
    view = True

    def __init__(self, name: str = "rotation"):
        super().__init__(name, 4)

    def views(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        x = x[target >= 0]
        labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
        return torch.cat([rotate(x, k) for k in range(4)]), labels

    def view_forward(self, module, k: int, x: Tensor, target: Tensor, detach: bool = False) -> tuple[Tensor, Tensor]:
        xv, tv = self.views(x, target)
        return module.predict_task(k, xv, detach), tv

    def __repr__(self) -> str:
        return f"Rotation({self.name!r})"


def exemplar_augment(x: Tensor, noise: float = 0.03, cut: float = 0.5) -> Tensor:
    """ARML's augmentation of the student's view: a random horizontal flip (one for the batch), Gaussian noise scaled
    to the batch's range, and a cutout of half the side at a random centre (one for the batch)."""
    x = x.float()
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    lo, hi, mean = x.min(), x.max(), x.mean()
    x = x + (torch.randn_like(x) * noise + mean) * (hi - lo) / 2
    h, w = x.shape[-2:]
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    x[..., max(cy - ch // 2, 0) : min(cy + ch // 2, h), max(cx - cw // 2, 0) : min(cx + cw // 2, w)] = 0
    return x


class ExemplarHead(nn.Module):
    """The exemplar task's head: the representation itself (the student's features), and the EMA teacher, a copy of
    the backbone and architecture that receives no gradient (`attach` makes it)."""

    def __init__(self, ema: float):
        super().__init__()
        self.ema, self.teacher = ema, None

    def attach(self, backbone: nn.Module, arch: nn.Module) -> None:
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "arch": copy.deepcopy(arch)})
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def forward(self, rep: Tensor, size=None) -> Tensor:
        return rep

    @torch.no_grad()
    def teacher_rep(self, module, k: int, x: Tensor) -> Tensor:
        from ..network import features

        t = self.teacher
        return t["arch"].specific(t["arch"].shared(features(t["backbone"], x, module.spatial, module.vit)))[k]

    @torch.no_grad()
    def ema_update(self, module, step: int) -> None:
        """teacher <- a teacher + (1 - a) student, a = min(1 - 1 / (step + 1), ema): ARML's ramp, then its 0.95."""
        a = min(1 - 1 / (step + 1), self.ema)
        student = [*module.backbone.parameters(), *module.arch.parameters()]
        for t, s in zip(self.teacher.parameters(), student):
            t.mul_(a).add_(s.detach(), alpha=1 - a)


class Exemplar(Task):
    """Exemplar-MT (ARML's S4L setting): the student's features of an augmented view (flip, noise, cutout) pulled
    toward an EMA teacher's features of the plain image by their negative cosine; the teacher, an exponential moving
    average (`ema`, 0.95) of the backbone and architecture, gets no gradient. Logged metric: the mean cosine."""

    kind = "exemplar"
    view = True
    metrics = {"cos": True}
    primary = "cos"

    def __init__(self, name: str = "exemplar", ema: float = 0.95):
        super().__init__(name)
        self.ema = ema

    def head(self, channels: int, spatial: bool, reduction: int = 1) -> nn.Module:
        return ExemplarHead(self.ema)

    def view_forward(self, module, k: int, x: Tensor, target: Tensor, detach: bool = False) -> tuple[Tensor, Tensor]:
        x = x[target >= 0]
        teacher = module.heads[k].teacher_rep(module, k, x)
        return module.predict_task(k, exemplar_augment(x), detach), teacher

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        n = torch.tensor(len(pred), device=pred.device)
        if not len(pred):
            return pred.sum() * 0, n
        return -F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1).mean(), n

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"cos": MeanMetric()})

    def update(self, metrics: nn.ModuleDict, pred: Tensor, target: Tensor) -> None:
        if len(pred):
            metrics["cos"].update(F.cosine_similarity(pred.flatten(1).float(), target.flatten(1).float(), dim=1))

    def __repr__(self) -> str:
        return f"Exemplar({self.name!r}, ema={self.ema})"


AUXILIARY = {"rotation": Rotation, "exemplar": Exemplar}  # data.aux_tasks
