from __future__ import annotations

from dataclasses import dataclass

import torch
from torchjd.scalarization import PBI as TorchJDPBI

from ..errors import MTLError
from .preference import PreferenceScalarization
from .registry import WEIGHTINGS


@WEIGHTINGS.register("pbi")
class PBI(PreferenceScalarization):
    """Penalty-based boundary intersection (Zhang & Li, MOEA/D, IEEE TEVC 2007, doi:10.1109/TEVC.2007.892759), via
    torchjd's PBI scalariser.

    With r^ = r / |r| and the loss vector L measured from the reference point z: d1 = (L - z)^T r^, its length along
    the preference ray, and d2 = |L - z - d1 r^|, its distance from the ray; the loss is d1 + theta d2. For theta > 0
    the minimiser of the loss over a Pareto front moves toward the ray (onto it as theta grows), so the method balances
    the losses in the ratio r; with theta > 1 the task below the ray gets a negative weight (its loss may rise toward
    the ray), hence `signed`. z defaults to 0, a lower bound on every loss here (the paper's ideal point).
    Difference: theta defaults to 0.5, not MOEA/D's 5 (see the option).
    """

    signed = True

    @dataclass
    class Config(PreferenceScalarization.Config):
        name: str = "pbi"
        # the penalty on the distance from the ray. MOEA/D's 5 is for evolutionary search: with gradient steps,
        # theta > 1 gives the task below the ray a negative weight, up to theta - 1 times the ray's, and the digits
        # learning test (tests/test_train.py) ends at accuracy 0.53, 0.32, 0.16 and 0.10 (chance) at 0.5, 1, 2, 5
        theta: float = 0.5
        reference: list[float] | None = None  # the reference point z, one value per task; None: 0

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.theta < 0:
            raise MTLError(f"weighting.theta={cfg.theta} must be >= 0 (0: the loss along the ray only).")
        z = None
        if cfg.reference is not None:
            z = torch.tensor(cfg.reference, dtype=torch.float32)
            if z.shape != (len(self.tasks),) or not torch.isfinite(z).all():
                raise MTLError(
                    f"weighting.reference={cfg.reference} must give one finite value per task {list(self.tasks)}."
                )
            self.register_buffer("z", z, persistent=False)
        self.scalarizer = TorchJDPBI(cfg.theta, self.r, z)

    def forward(self, losses):
        if self.scalarizer.reference is not None:  # follows the module to the losses' device
            self.scalarizer.reference = self.z.to(losses)
        return super().forward(losses)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, theta={self.cfg.theta}, reference={self.cfg.reference}"
