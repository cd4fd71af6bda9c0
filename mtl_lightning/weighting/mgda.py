from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import MTLError
from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("mgda")
class MGDA(GradientWeighting):
    """MGDA, multiple-gradient descent (Désidéri 2012; Sener & Koltun, NeurIPS 2018, arXiv:1810.04650), via torchjd.

    The min-norm point of the convex hull of the task gradients, min |w^T J| over w >= 0 summing to 1: a common
    descent direction, zero at a Pareto-stationary point. `solver=qp` (default) solves this K x K quadratic program
    exactly (quadprog); `solver=frank_wolfe` iterates as Sener & Koltun's solver does (torchjd's, at their stopping
    tolerance 1e-5 and 250 iterations by default; looser settings stop short of the min-norm point).
    """

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "mgda"
        solver: str = "qp"  # qp: exact | frank_wolfe
        epsilon: float = 1e-5  # frank_wolfe: stop when the step is below this (Sener & Koltun's MinNormSolver)
        max_iters: int = 250

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.solver not in ("qp", "frank_wolfe"):
            raise MTLError(f"Unknown weighting.solver={cfg.solver!r}. Valid choices: qp, frank_wolfe.")
        self.method = _torchjd.mgda(cfg.epsilon, cfg.max_iters) if cfg.solver == "frank_wolfe" else None

    def combine(self, J, G):
        return None, min_norm_weights(G) if self.method is None else _torchjd.weights(self.method, G)

    def extra_repr(self) -> str:
        if self.method is None:
            return f"{super().extra_repr()}, solver=qp"
        return f"{super().extra_repr()}, solver=frank_wolfe, epsilon={self.cfg.epsilon}, max_iters={self.cfg.max_iters}"


def min_norm_weights(G: Tensor) -> Tensor:
    """argmin_w w^T G w over the probability simplex, exactly (quadprog's dual active-set method) in float64.

    A ridge of 1e-12 x the largest diagonal entry makes a rank-deficient Gramian positive definite, as quadprog
    needs; it moves the optimum by about that relative amount.
    """
    import quadprog

    K = len(G)
    g = G.detach().double().cpu().numpy()
    g = (g + g.T) / 2 + np.eye(K) * 1e-12 * max(float(np.abs(np.diag(g)).max()), 1e-30)
    C = np.concatenate([np.ones((K, 1)), np.eye(K)], axis=1)  # sum w = 1 (equality), then w >= 0
    b = np.concatenate([[1.0], np.zeros(K)])
    w = quadprog.solve_qp(g, np.zeros(K), C, b, meq=1)[0]
    w = np.clip(w, 0, None)
    return torch.from_numpy(w / w.sum()).to(device=G.device, dtype=torch.float32)


@WEIGHTINGS.register("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB (Sener & Koltun, NeurIPS 2018, arXiv:1810.04650): MGDA on the gradients w.r.t. the shared
    representation, an upper bound of the parameter-gradient problem that needs one backward through the encoder."""

    @dataclass
    class Config(MGDA.Config):
        name: str = "mgda_ub"
        mode: str = "rep"
