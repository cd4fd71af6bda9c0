"""Population-based training inside one vectorised population (Jaderberg et al. 2017, arXiv:1711.09846), over the
members' task weights, as `search=pbt` runs it with Ray trials (Royer et al. search scalarization weights so).

Every `perturbation_interval` epochs, after validation on the rank split, the members are ranked by `metric`; each
member of the bottom `quantile_fraction` copies a random member of the top fraction, parameters *and optimiser
state* (an index copy in the stacked tensors: no checkpoint files), then explores: each raw weight is resampled
from U(weight_low, 1) with `resample_probability`, else multiplied by 0.8 or 1.2, and the raw weights are rescaled
so the largest is 1 (Ray Tune's PBT explore and this project's `custom_explore_fn`). A member's weights are
normalised to sum to 1 when used. Each member's weight schedule follows its lineage (a copy inherits its donor's
history), saved with the checkpoint, so a resumed run continues the same population.
"""

from __future__ import annotations

import math
import random

import torch
from lightning.pytorch.callbacks import Callback


class PopulationPBT(Callback):
    def __init__(
        self, metric: str, higher: bool, interval: int, quantile: float, resample: float, low: float, seed: int
    ):
        self.metric, self.higher, self.interval = metric, higher, interval
        self.quantile, self.resample, self.low = quantile, resample, low
        self.rng = random.Random(seed)
        self.raw: list[list[float]] | None = None  # each member's raw weights (largest 1)
        self.schedules: list[list[list[float]]] = []  # per member: [epoch, w_1, ..., w_K] rows, along its lineage
        self.exploits: list[dict] = []  # one entry per copy: epoch, member, donor, new weights

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.raw is None:  # a fresh run (a resumed one restored its state)
            w = pl_module.member_weights.tolist()
            self.raw = [[x / max(row) for x in row] for row in w]
            self.schedules = [[] for _ in w]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        e = trainer.current_epoch
        for i, row in enumerate(pl_module.member_weights.tolist()):
            self.schedules[i] = [r for r in self.schedules[i] if r[0] < e] + [[e, *row]]

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.interval:
            return
        if trainer.current_epoch + 1 >= trainer.max_epochs:  # after the last epoch: nothing would train the copies
            return
        scores = [r[self.metric] for r in pl_module.member_results["val"]]
        self.step(pl_module, trainer.optimizers[0], scores, trainer.current_epoch + 1)

    def step(self, module, opt, scores: list[float], epoch: int) -> None:
        n = len(scores)
        q = min(int(math.ceil(n * self.quantile)), n // 2)
        if q == 0:
            return
        signed = [s if self.higher else -s for s in scores]
        signed = [-math.inf if math.isnan(s) else s for s in signed]
        order = sorted(range(n), key=lambda i: signed[i])
        lower, upper = order[:q], order[-q:]
        for i in lower:
            donor = self.rng.choice(upper)
            copy_member(module, opt, src=donor, dst=i)
            self.raw[i] = self._explore(self.raw[donor])
            w = torch.tensor(self.raw[i])
            module.member_weights[i] = (w / w.sum()).to(module.member_weights)
            self.schedules[i] = [list(r) for r in self.schedules[donor]]
            self.exploits.append(
                {"epoch": epoch, "member": i, "donor": donor, "weights": module.member_weights[i].tolist()}
            )

    def _explore(self, raw: list[float]) -> list[float]:
        out = []
        for x in raw:
            if self.rng.random() < self.resample:
                out.append(self.rng.uniform(self.low, 1.0))
            else:
                out.append(x * self.rng.choice((1.2, 0.8)))
        top = max(out)
        return [x / top for x in out]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "raw": self.raw, "schedules": self.schedules, "exploits": self.exploits}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.raw, self.schedules, self.exploits = state["raw"], state["schedules"], state["exploits"]


@torch.no_grad()
def copy_member(module, opt, src: int, dst: int) -> None:
    """Member dst becomes member src: every stacked parameter and buffer, and the optimiser's per-parameter state."""
    for p in module.stacked.values():
        p[dst] = p[src]
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == p.shape[0]:  # per-element state, not a step count
                v[dst] = v[src]
    for b in module.stacked_buffers.buffers():
        b[dst] = b[src]
