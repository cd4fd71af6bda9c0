from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MTLError
from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("ldc_mtl")
class LDCMTL(Weighting):
    """LDC-MTL, loss discrepancy control (Xiao, Dong, Zou & Ji, 2025, arXiv:2502.08585), as the authors' code
    (OptMN-Lab/LDC-MTL) runs it.

    The loss is sum_k w_k l_k / sum_k w_k + lamb sum_k |w_k l_k - w_{k+1} l_{k+1}|, with l_k = L_k / r_k the losses
    pre-normalised by the first step's ratios r = L(0) / min L(0) (`normalize`), the second term the discrepancy
    between neighbouring tasks in the tasks' order. The weights w are trained with the model by its optimiser, on
    this one loss: the first-order single-loop form of the paper's bilevel problem (upper level: the discrepancy in
    w; lower level: the weighted loss in theta). Two forms, both the reference's:
    - `router=false` (its CelebA and QM9 networks): free logits, w = sigmoid(u), u starting at 1; the sum in the
      normaliser is held constant (detached), as there.
    - `router=true` (its NYUv2 and Cityscapes networks): w = clamp(softmax(W h), low, high), a linear router on h,
      the batch mean of every task's pooled representation (the heads' inputs) concatenated; gradients reach the
      representation through the router too, as there.
    Differences: the reference's QM9 network draws its free weights' logits from U(0.2, 1) and passes them through a
    ReLU before the sigmoid; here they start at 1, as its CelebA network. Its CelebA script sets lamb 0.01 and no
    ratios (`weighting.lamb=0.01 weighting.normalize=false`, as the famo_celeba study runs it).
    The weights logged are each loss's coefficient in the step's loss, d loss / d L_k. The weighted mean's gradient in
    w favours the task whose loss falls first, which the discrepancy term (lamb) counters: the router at a large step
    size runs to its clamp and starves the slower task (digits, lr 5e-3: 0.13 and 0.71 accuracy; free logits: 0.59
    and 0.60).
    """

    stateful = True
    signed = True  # with many tasks lamb's term can outweigh 1 / sum w: a task's coefficient may be negative
    reads_features = True  # the router's input: `forward(losses, h)` per step

    @dataclass
    class Config(Weighting.Config):
        name: str = "ldc_mtl"
        lamb: float = 0.05  # the discrepancy's weight (the reference's NYUv2 value; CelebA 0.01)
        router: bool = False  # learned from the representation (NYUv2's form) instead of free logits (CelebA's)
        low: float = 0.2  # router=true: the clamp on each weight (the reference's, for 3 tasks)
        high: float = 0.8
        normalize: bool = True  # divide each loss by its first-step ratio to the smallest (the reference's NYUv2)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if not cfg.lamb >= 0 or not 0 <= cfg.low < cfg.high:
            raise MTLError(f"weighting.lamb={cfg.lamb} must be >= 0 and 0 <= weighting.low < weighting.high.")
        K = len(self.tasks)
        self.register_buffer("ratios", torch.ones(K))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.logits = None if cfg.router else nn.Parameter(torch.ones(K))
        self.router: nn.Linear | None = None

    def attach(self, module) -> None:
        self.bind(len(module.tasks) * module.arch.out_dim)

    def bind(self, width: int) -> None:
        """The router on inputs of `width` (K x a task representation's channels)."""
        if self.cfg.router:
            self.router = nn.Linear(width, len(self.tasks))

    def forward(self, losses: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.cfg.normalize and not self.started:
            self.ratios.copy_(losses.detach() / losses.detach().min().clamp(min=1e-12))
        self.started.fill_(True)
        if self.cfg.router:
            if self.router is None or h is None:
                raise MTLError(
                    "weighting=ldc_mtl with weighting.router=true reads the tasks' representations: it is trained by "
                    "a MultiTaskModule (which binds it); use weighting.router=false for the free-logit form."
                )
            w = torch.softmax(self.router(h.to(self.router.weight)), 0).clamp(self.cfg.low, self.cfg.high)
            total = w.sum()
        else:
            w = torch.sigmoid(self.logits)
            total = w.sum().detach()
        w, r = w.to(losses), self.ratios.to(losses)
        wl = w * losses / r
        loss = wl.sum() / total.to(losses) + self.cfg.lamb * (wl[:-1] - wl[1:]).abs().sum()
        with torch.no_grad():  # d loss / d L_k: the weighted mean's part and the discrepancy's signs
            s = torch.sign(wl[:-1] - wl[1:])
            d = torch.zeros_like(wl)
            d[:-1] += s
            d[1:] -= s
            coef = w / r * (1 / total.to(losses) + self.cfg.lamb * d)
        return loss, coef

    def extra_repr(self) -> str:
        c = self.cfg
        form = f"router=True, low={c.low}, high={c.high}" if c.router else "router=False"
        return f"tasks={self.tasks}, lamb={c.lamb}, {form}, normalize={c.normalize}"
