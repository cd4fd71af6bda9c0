from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .auxiliary import target_index
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("arml")
class ARML(GradientWeighting):
    """ARML, auxiliary task reweighting for minimum-data learning (Shi et al., NeurIPS 2020, arXiv:2010.08244).

    Learns auxiliary weights lambda so that the weighted auxiliary gradient approximates the target's:
    lambda minimises |g_target - sum_k lambda_k g_k|^2 (gradients detached), trained by the model's own optimiser
    as ForkMerge's code does (the paper samples lambda by Langevin dynamics on the same objective). The target's
    weight is 1; the lambda start at 1 and are not clipped, as the reference. They are parameters of this module,
    so the checkpoint keeps them.
    """

    stateful = True

    auxiliary = True  # one target task; the others serve it

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "arml"
        target: str = ""

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        self.t = target_index(self.tasks, cfg.target, self.name)
        self.scale = nn.Parameter(torch.ones(len(self.tasks)))

    def _weights(self):
        mask = torch.ones_like(self.scale)
        mask[self.t] = 0.0
        return self.scale * mask + (1 - mask)  # the target's weight is 1, and gets no gradient

    def combine(self, J, G):
        return None, self._weights().detach().float()

    def extra_loss(self, losses, J):
        aux = self._weights().to(J) @ J - J[self.t]  # sum over the auxiliaries of lambda_k g_k (J has no graph)
        return ((J[self.t] - aux) ** 2).sum()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.cfg.target}"
