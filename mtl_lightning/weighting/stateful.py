"""The state handling shared by the wrappers of torchjd's stateful weightings (GradVac, SDMGrad, Excess-MTL)."""

from __future__ import annotations

from . import _torchjd
from .gradient import GradientWeighting


class TorchJDStateful(GradientWeighting):
    """A gradient method whose torchjd weighting carries state between steps; it is saved in the checkpoint, so
    a resumed run continues from the same state. Subclasses set `self.method` and implement `combine`."""

    stateful = True

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self._pending: dict | None = None  # a loaded state, applied at the next step (on J's device)

    def __setattr__(self, name, value):
        if name == "method":  # outside the module tree: see `_torchjd.stateful_state`
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def step_weights(self, stat):
        w = _torchjd.stateful_weights(self.method, stat, self._pending)
        self._pending = None
        return w

    def get_extra_state(self):
        return self._pending if self._pending is not None else _torchjd.stateful_state(self.method)

    def set_extra_state(self, state) -> None:
        self.method.reset()
        self._pending = dict(state)
