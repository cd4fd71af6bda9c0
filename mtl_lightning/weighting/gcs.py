from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from .auxiliary import target_index
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("gcs")
class GCS(GradientWeighting):
    """Gradient cosine similarity (Du et al., 2018, arXiv:1812.02224): use an auxiliary task's gradient only while
    it points the target's way.

    The target's gradient has weight 1; auxiliary task k's has weight 1[cos(g_k, g_target) > 0] (`unweighted`, the
    default of ForkMerge's code) or max(0, cos) (`weighted`). The cosines come from the Gramian, so it is exact
    under DDP. The weights are not normalised (target 1), as the reference.
    """

    auxiliary = True  # one target task; the others serve it

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "gcs"
        target: str = ""
        variant: str = "unweighted"  # unweighted | weighted

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        self.t = target_index(self.tasks, cfg.target, self.name)
        if cfg.variant not in ("unweighted", "weighted"):
            raise MTLError(f"Unknown weighting.variant={cfg.variant!r}. Valid choices: unweighted, weighted.")

    def combine(self, J, G):
        d = G.diagonal().clamp(min=0).sqrt()
        cos = G[:, self.t] / (d * d[self.t]).clamp(min=1e-12)
        w = (cos > 0).to(G) if self.cfg.variant == "unweighted" else cos.clamp(min=0)
        w[self.t] = 1.0
        return None, w

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.cfg.target}, variant={self.cfg.variant}"
