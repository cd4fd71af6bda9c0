from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Weighting, check_weights
from .registry import WEIGHTINGS


@WEIGHTINGS.register("fixed")
class Fixed(Weighting):
    """Fixed scalarization L = sum_k w_k L_k with user-given weights (Royer et al., arXiv:2310.08910).

    `weights` holds one non-negative value per task, in the order of the mixture's tasks. With `normalize=true`
    (the default) they are divided by their sum so they lie on the simplex, the papers' parameterisation (two
    tasks: p, 1-p); with `normalize=false` they are used as given, which also scales the learning signal.
    For `data.mixing=sample` they are always normalised into sampling probabilities.
    """

    @dataclass
    class Config(Weighting.Config):
        name: str = "fixed"
        weights: list[float] | None = None
        normalize: bool = True

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        w = check_weights(cfg.weights, tasks, "weighting.weights")
        self.register_buffer("w", w / w.sum() if cfg.normalize else w, persistent=False)

    def weights(self, losses: Tensor) -> Tensor:
        return self.w.to(losses)

    def mixture_probs(self) -> Tensor:
        return self.w / self.w.sum()

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, weights={self.cfg.weights}, normalize={self.cfg.normalize}"
