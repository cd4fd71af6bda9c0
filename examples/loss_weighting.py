"""A loss weighting of your own: weights proportional to each task's current loss to the power `alpha`, so harder
tasks get more of the update (alpha = 0 is uniform). Use it as a built-in:

    python -m experiments.run exp=digits_mtl plugins=[examples/loss_weighting.py] weighting=loss_power \
        weighting.alpha=0.5
"""

from dataclasses import dataclass

from torch import Tensor

from mtl_lightning import WEIGHTINGS, MTLError, Weighting


@WEIGHTINGS.register("loss_power")
class LossPower(Weighting):
    """w_k = L_k^alpha / sum_j L_j^alpha, from the losses of the step (detached: the weights get no gradient)."""

    @dataclass
    class Config(Weighting.Config):  # every option a typed field: a mistyped key fails, naming the valid ones
        name: str = "loss_power"
        alpha: float = 1.0

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.alpha < 0:
            raise MTLError(f"weighting.alpha={cfg.alpha} must be >= 0 (0: uniform).")
        self.alpha = cfg.alpha

    def weights(self, losses: Tensor) -> Tensor:  # (K,) losses of this step -> (K,) weights
        w = losses.detach().clamp(min=1e-8) ** self.alpha
        return w / w.sum()

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, alpha={self.alpha}"
