from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MTLError
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("cr_mogm")
class CRMOGM(GradientWeighting):
    """CR-MOGM, correlation-reduced multi-objective gradient manipulation (Zhou et al., NeurIPS 2022,
    arXiv:2204.10479).

    Stochastic MGDA-type weights are noisy and correlated with the batch's gradients, which biases the update;
    CR-MOGM smooths them across steps: lambda_t = alpha lambda_{t-1} + (1 - alpha) lambda^_t, where lambda^_t are the
    weights the `base` method (any Gramian weighting here: MGDA as the paper's main case, PCGrad, CAGrad ...) gives
    this step, and lambda_1 = lambda^_1; the update is lambda_t^T J. torchjd's CRMOGMWeighting, with a fixed alpha;
    the paper's schedule of alpha (toward 1 as the learning rate decays) is not applied. lambda is saved with the
    checkpoint.
    """

    stateful = True

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "cr_mogm"
        base: str = "mgda"  # the Gramian weighting whose weights are smoothed (its options at their defaults)
        alpha: float = 0.9  # weight of the previous weights (torchjd's default; 0 = the base method alone)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        bases = sorted(
            n
            for n, c in WEIGHTINGS.items()
            if issubclass(c, GradientWeighting) and c.gramian_only and not (c.stateful or c.auxiliary or c is CRMOGM)
        )
        if cfg.base not in bases:
            raise MTLError(
                f"weighting.base={cfg.base!r} is not a Gramian weighting without state of its own, which CR-MOGM "
                f"smooths. Valid choices: {', '.join(bases)}."
            )
        if not 0 <= cfg.alpha <= 1:
            raise MTLError(f"weighting.alpha={cfg.alpha} must be in [0, 1].")
        cls = WEIGHTINGS.get(cfg.base)
        self.base = cls(tasks, cls.Config(mode=cfg.mode))
        self.register_buffer("lambd", torch.zeros(len(self.tasks)))  # all 0: no step yet

    def combine(self, J, G):
        g, w = self.base.combine(J, G)
        if g is not None:  # a Gramian weighting returns weights only; a plugin might not
            raise MTLError(f"weighting.base={self.cfg.base} returns a combined gradient, not weights to smooth.")
        w = w.to(self.lambd)
        first = not self.lambd.any()
        self.lambd.copy_(w if first else self.cfg.alpha * self.lambd + (1 - self.cfg.alpha) * w)
        return None, self.lambd.clone()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.cfg.base}, alpha={self.cfg.alpha}"
