"""Ray Tune's PBT and PB2, with no exploit that hands a trial a checkpoint it cannot continue.

Ray's asynchronous PBT copies a donor's latest checkpoint whenever the receiver reaches a perturbation point: a
donor already at its last epoch (trials finish at different times) gave a receiver at epoch 2 of 3 its final state,
and the receiver then trained nothing, printed an empty `epoch 3/3` line and reported a copy of the donor's row.
Here every trial is perturbed at the same epoch (`synch`: a donor's checkpoint is never later than the receiver's
own), and never at the last epoch, after which nothing is left to train.
"""

from __future__ import annotations

import logging

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2 as _RayPB2


class _NoFinalExploit:
    def __init__(self, *args, last_epoch: int, **kwargs):
        super().__init__(*args, synch=True, **kwargs)
        self.last_epoch = last_epoch

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self.last_epoch:  # the trial's last report: nothing follows to train
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def _exploit(self, tune_controller, trial, trial_to_clone) -> None:
        # one line per exploit, instead of Ray's multi-line [Exploit] and [Explore] blocks (its logger is quietened)
        logging.getLogger("ray.tune.schedulers.pbt").setLevel(logging.WARNING)
        epoch = self._trial_state[trial_to_clone].last_train_time
        print(f"PBT exploit at epoch {epoch}: {trial.trial_id} continues from {trial_to_clone.trial_id}", flush=True)
        super()._exploit(tune_controller, trial, trial_to_clone)


class PBT(_NoFinalExploit, PopulationBasedTraining):
    """PopulationBasedTraining, synchronous, without a perturbation at `last_epoch`."""


class PB2(_NoFinalExploit, _RayPB2):
    """PB2, synchronous, without a perturbation at `last_epoch`."""
