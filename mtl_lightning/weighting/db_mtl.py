from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from .registry import WEIGHTINGS
from .tracked import TrackedGradients


@WEIGHTINGS.register("db_mtl")
class DBMTL(TrackedGradients):
    """DB-MTL, dual-balancing multi-task learning (Lin et al., arXiv:2308.12029), as LibMTL's DB_MTL.

    Loss scale: each task contributes the gradient of log L_k (row k of J divided by L_k), which no loss's units can
    dominate. Gradient scale: a moving average of those gradients, m <- g + (beta / t^beta_sigma) (m - g) from m = 0
    (t the step, from 1), and the update sum_k a_k m_k with a_k = max_j |m_j| / |m_k|: every task's averaged gradient
    rescaled to the largest one's norm. Logged weights are the a_k. The averages (K x P) are saved with the
    checkpoint. `mode=param` only, as LibMTL. Under DDP the rows are the ranks' average, as for every method.
    """

    @dataclass
    class Config(TrackedGradients.Config):
        name: str = "db_mtl"
        beta: float = 0.9  # the moving average's memory (LibMTL's DB_beta)
        beta_sigma: float = 0.0  # its decay with the step, beta / t^beta_sigma (LibMTL's DB_beta_sigma)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if not 0 <= cfg.beta < 1 or cfg.beta_sigma < 0:
            raise MTLError(
                f"weighting.beta={cfg.beta} must be in [0, 1) and weighting.beta_sigma={cfg.beta_sigma} >= 0."
            )

    def jacobian(self, losses, z, shared, scale=None):
        # d log L_k = dL_k / L_k (LibMTL: log(L + 1e-8))
        return super().jacobian(losses, z, shared, scale) / (losses.detach().float() + 1e-8).unsqueeze(1)

    def combine(self, J, G):
        self.t += 1
        m = self.track(J, 1 - self.cfg.beta / self.t.item() ** self.cfg.beta_sigma)
        norms = m.norm(dim=1)
        a = norms.max() / (norms + 1e-8)
        return a @ m, a

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.cfg.beta}, beta_sigma={self.cfg.beta_sigma}"
