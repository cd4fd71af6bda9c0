from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("gradnorm")
class GradNorm(GradientWeighting):
    """GradNorm, gradient normalisation (Chen et al., ICML 2018, arXiv:1711.02257).

    Learns task weights w_k so that the weighted gradient norms w_k |grad L_k| approach their mean times
    r_k^alpha, where r_k is task k's loss relative to its first-step loss, over its mean: tasks that train slower
    get larger gradients. The model follows sum_k w_k grad L_k; the weights follow the gradient of
    sum_k |w_k |grad L_k| - target_k| (target detached) and are renormalised to sum to 1 after every step (the
    paper: to K; here like `uniform`, so the two compare at the same learning rate). The norms are taken in
    `weighting.mode`: `rep` (default) uses the shared representation, which keeps memory flat in the number of
    tasks (the paper uses the last shared layer). The weights and first losses live in the checkpoint.
    """

    stateful = True

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "gradnorm"
        mode: str = "rep"
        alpha: float = 1.5  # the paper's asymmetry; 0 equalises the weighted gradient norms

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        K = len(self.tasks)
        self.w = nn.Parameter(torch.full((K,), 1.0 / K))
        self.register_buffer("initial", torch.zeros(K))  # L_k at the first step; 0 = not seen yet

    def combine(self, J, G):
        with torch.no_grad():  # the renormalisation of the paper, applied before the weights are used
            self.w.clamp_(min=1e-6)
            self.w.div_(self.w.sum())
        return None, self.w.detach().float()

    def extra_loss(self, losses, J):
        if (self.initial == 0).all():
            self.initial.copy_(losses.detach().clamp(min=1e-12))
        norms = J.norm(dim=1).detach().to(self.w)
        gw = self.w * norms
        ratio = (losses.detach() / self.initial).to(self.w)
        target = (gw.mean() * (ratio / ratio.mean()) ** self.cfg.alpha).detach()
        return (gw - target).abs().sum()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.cfg.alpha}"
