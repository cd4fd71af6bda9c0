"""Searching scalarization weights with Ray Tune: PBT, PB2 and grid sweeps (Royer et al., arXiv:2310.08910).

Every trial is `train()` (a Lightning Trainer) reporting `search.metric` and a checkpoint to Tune after each epoch
through Ray's Lightning callback. The population is ranked on a held-out part of the training set
(`data.train_fraction`, 0.7 as in the paper), never on the test split.

PBT/PB2 search the K task weights as K raw values in [weight_low, 1], used normalised (w / sum w): perturbing or
resampling one value never leaves the simplex, and `custom_explore_fn` rescales a mutated vector so its largest
entry is 1 (the normalised weights do not change; the raw values stay inside the bounds). On exploit, Tune
restarts a trial from the donor's checkpoint with the trial's own mutated config. Its weights come from that
config (fixed weights are not saved in a checkpoint); its learning rate is restored with the donor's optimiser and
scheduler, so `ApplyLearningRate` sets it again after Lightning's restore: the donor's values never win.
The weights used at every epoch travel inside the checkpoint (`WeightSchedule`), so the best trial's checkpoint
holds its whole schedule, across the exploits of its lineage.
"""

from .config import SearchConfig, compose_search
from .driver import run_search
from .trial import ApplyLearningRate, WeightSchedule, trial

__all__ = ["ApplyLearningRate", "SearchConfig", "WeightSchedule", "compose_search", "run_search", "trial"]
