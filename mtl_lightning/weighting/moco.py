from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MTLError
from .registry import WEIGHTINGS
from .tracked import TrackedGradients


@WEIGHTINGS.register("moco")
class MoCo(TrackedGradients):
    """MoCo, multi-objective gradient correction (Fernando et al., ICLR 2023, arXiv:2210.12624), as LibMTL's MoCo
    (from the authors' code).

    The stochastic gradients are biased estimates of MGDA's direction; MoCo tracks each task's gradient instead. Each
    step, with task gradients normalised and scaled by their loss, h_k = L_k g_k / |g_k|: the tracked gradients
    y <- y - (beta / t^beta_sigma) (y - h), then the weights lambda <- softmax(lambda - (gamma / t^gamma_sigma)
    (Y Y^T + rho I) lambda) (from 1/K), and the update is Y^T lambda. lambda is logged; y (K x P), lambda and t are
    saved with the checkpoint. `mode=param` only, as LibMTL. Under DDP each rank scales its rows by its own losses
    before the ranks' average.
    """

    @dataclass
    class Config(TrackedGradients.Config):
        name: str = "moco"
        beta: float = 0.5  # step size of the tracked gradients (LibMTL's MoCo_beta)
        beta_sigma: float = 0.5  # its decay, beta / t^beta_sigma
        gamma: float = 0.1  # step size of the weights (MoCo_gamma)
        gamma_sigma: float = 0.5  # its decay
        rho: float = 0.0  # l2 regularisation of the weights' update (MoCo_rho)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if min(cfg.beta, cfg.beta_sigma, cfg.gamma, cfg.gamma_sigma, cfg.rho) < 0 or cfg.beta > 1:
            raise MTLError(
                f"weighting: beta={cfg.beta} must be in [0, 1], and beta_sigma={cfg.beta_sigma}, gamma={cfg.gamma}, "
                f"gamma_sigma={cfg.gamma_sigma} and rho={cfg.rho} >= 0."
            )
        self.register_buffer("lambd", torch.full((len(self.tasks),), 1.0 / len(self.tasks)))

    def jacobian(self, losses, z, shared, scale=None):
        J = super().jacobian(losses, z, shared, scale)
        return J / (J.norm(dim=1, keepdim=True) + 1e-8) * losses.detach().float().unsqueeze(1)

    def combine(self, J, G):
        self.t += 1
        t, c = self.t.item(), self.cfg
        Y = self.track(J, c.beta / t**c.beta_sigma)
        A = Y @ Y.T + c.rho * torch.eye(len(Y), device=Y.device)
        lambd = self.lambd.to(Y)
        self.lambd.copy_(torch.softmax(lambd - c.gamma / t**c.gamma_sigma * (A @ lambd), 0))
        return self.lambd.to(Y) @ Y, self.lambd.clone()

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{super().extra_repr()}, beta={c.beta}, gamma={c.gamma}, rho={c.rho}"
