from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MTLError
from .auxiliary import target_index
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("ol_aux")
class OLAux(GradientWeighting):
    """OL-AUX, online learning of auxiliary task weights (Lin et al., "Adaptive Auxiliary Task Weighting for
    Reinforcement Learning", NeurIPS 2019).

    The weights start at 1. The paper descends the target loss's lookahead in the weights, whose gradient is
    -g_target . g_k, accumulated over N steps; like ForkMerge's code we accumulate `beta` x cos(g_k, g_target)
    instead (scale-free) and add it to auxiliary weight k every `interval` steps (the target's stays 1). Weights
    are not clipped: a persistently conflicting auxiliary is pushed below zero, as in the reference. The weights
    and the accumulator are buffers, saved with the checkpoint. With the reference's beta = 0.5, an auxiliary whose
    gradient stays aligned with the target's (cosine ~0.1) reaches ~5x the target's weight within 300 steps on
    digits_mtl, and the target learns less; smaller beta keeps the target in charge longer.
    """

    stateful = True

    auxiliary = True  # one target task; the others serve it

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "ol_aux"
        target: str = ""
        beta: float = 0.5  # the reference's step on the accumulated cosines
        interval: int = 5  # steps between weight updates (N in the paper; 5 in the reference)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        self.t = target_index(self.tasks, cfg.target, self.name)
        if cfg.interval < 1 or not cfg.beta >= 0:
            raise MTLError(f"weighting.interval={cfg.interval} must be >= 1 and weighting.beta={cfg.beta} >= 0.")
        K = len(self.tasks)
        self.register_buffer("w", torch.ones(K))
        self.register_buffer("acc", torch.zeros(K))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def combine(self, J, G):
        d = G.diagonal().clamp(min=0).sqrt()
        cos = G[:, self.t] / (d * d[self.t]).clamp(min=1e-12)
        cos[self.t] = 0.0
        if self.training:
            self.acc += self.cfg.beta * cos.to(self.acc)
            self.steps += 1
            if self.steps % self.cfg.interval == 0:
                self.w += self.acc
                self.acc.zero_()
        return None, self.w.to(G, copy=True)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{super().extra_repr()}, target={c.target}, beta={c.beta}, interval={c.interval}"
