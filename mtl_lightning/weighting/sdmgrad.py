from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from . import _torchjd
from .registry import WEIGHTINGS
from .stateful import TorchJDStateful


@WEIGHTINGS.register("sdmgrad")
class SDMGrad(TorchJDStateful):
    """SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao et al., NeurIPS 2023,
    arXiv:2305.18409), via torchjd.

    Weights on the simplex that minimise |J^T (w + lambda w~)|^2 (w~ uniform: the direction is pulled toward the
    average gradient), by `n_iter` steps of projected SGD with momentum, warm-started from the previous step's w
    (state, saved with the checkpoint); the update is J^T (w + lambda w~) / (1 + lambda). Difference: the paper
    and torchjd feed the solver J_1 J_2^T from two independent mini-batches (an unbiased estimate of the Gramian);
    here it gets the one batch's Gramian J J^T, which fits the one-batch training step of every other method and
    is biased by the batch's gradient noise.
    """

    @dataclass
    class Config(TorchJDStateful.Config):
        name: str = "sdmgrad"
        lambda_: float = 0.3  # the pull toward the average gradient (the authors' experiments and LibMTL)
        lr: float = 10.0  # inner solver's learning rate
        momentum: float = 0.5
        n_iter: int = 20

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.lambda_ < 0 or cfg.lr <= 0 or not 0 <= cfg.momentum < 1 or cfg.n_iter < 1:
            raise MTLError(
                f"weighting: lambda_={cfg.lambda_} must be >= 0, lr={cfg.lr} > 0, momentum={cfg.momentum} in [0, 1)"
                f" and n_iter={cfg.n_iter} >= 1."
            )
        self.method = _torchjd.sdmgrad(cfg.lr, cfg.momentum, cfg.n_iter, cfg.lambda_)

    def combine(self, J, G):
        return None, self.step_weights(G)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_={self.cfg.lambda_}"
