from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import MTLError
from .auxiliary import target_indices
from .base import Weighting, check_weights
from .registry import WEIGHTINGS


@WEIGHTINGS.register("forkmerge")
class ForkMerge(Weighting):
    """ForkMerge (Jiang et al., NeurIPS 2023, arXiv:2301.12618): the branch task weightings of one fork-merge run.

    Every branch trains a copy of the model with its own task-weight vector; every `interval_*` the copies are
    merged with coefficients chosen on the target tasks' validation score, `criterion`
    (`mtl_lightning.forkmerge.ForkMerge`, the Callback that holds the branches, added by `train()` for this
    weighting). This module only knows the weight vectors and which branch is training (`current`): the loss is
    sum_k w_{current,k} L_k.

    Branches, by default (Algorithm 1): target-only (w = 1/|T| on each target) and target + aux_weight x
    auxiliary (aux_weight/|A| on each auxiliary task). `per_auxiliary=true` (Algorithm 2): target-only plus one
    branch per auxiliary task. `topk` (the reference code's branches): branch k = the targets + the k best
    auxiliary tasks, ranked by a pruning phase (`pruning_epochs` of target + one auxiliary each, from the initial
    weights, scored on validation by `criterion`; `train()` runs it). `aux_split`: the chosen auxiliaries share
    aux_weight (aux_weight/k each, as the reference's DomainNet sampling probabilities) or each get it (false: the
    equal loss weights of its NYUv2 branches). `branches` gives the weight vectors explicitly.
    """

    forks = True

    @dataclass
    class Config(Weighting.Config):
        name: str = "forkmerge"
        target: list[str] = field(default_factory=list)  # the target task(s); every other task is auxiliary
        aux_weight: float = 1.0  # lambda in L_tgt + lambda L_aux
        per_auxiliary: bool = False  # Algorithm 2's branches: target-only + one per auxiliary task
        topk: list[int] | None = None  # the reference's nested branches: targets + the k best auxiliaries, per k
        pruning_epochs: int = 0  # epochs of target + each auxiliary alone that rank the auxiliaries for topk
        aux_split: bool = True  # chosen auxiliaries share aux_weight (true) or each get aux_weight (false)
        branches: list[list[float]] | None = None  # explicit weight vectors, one per branch
        interval_steps: int | None = None  # merge every this many steps ...
        interval_epochs: int | None = 1  # ... or epochs (used when interval_steps is not set)
        grid: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
        search: str = "auto"  # auto (grid for 2 branches, greedy for more) | grid | greedy
        val_batches: int | None = None  # validation batches per candidate merge (None: the whole split)
        criterion: str = "auto"  # primary: targets' primary metric | delta_m: targets' Δm% | auto: delta_m with a base
        offload: bool = False  # keep the branch copies and their optimiser state on the CPU
        best_of_round: bool = (
            True  # merge each branch's best-validation weights of the round (epoch ends), as the reference
        )

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        self.targets = target_indices(self.tasks, cfg.target)
        self.aux = [k for k in range(len(self.tasks)) if k not in self.targets]
        if cfg.branches is not None:
            vectors = [check_weights(b, self.tasks, f"weighting.branches[{i}]") for i, b in enumerate(cfg.branches)]
        else:
            if not self.aux:
                raise MTLError(f"weighting.target={list(cfg.target)} leaves no auxiliary task among {self.tasks}.")
            if not cfg.aux_weight >= 0:
                raise MTLError(f"weighting.aux_weight={cfg.aux_weight} must be >= 0.")
            if cfg.topk is not None:
                A = len(self.aux)
                if len(set(cfg.topk)) != len(cfg.topk) or any(not 0 <= k <= A for k in cfg.topk):
                    raise MTLError(f"weighting.topk={list(cfg.topk)} must be distinct counts of auxiliaries in 0..{A}.")
                if self.needs_ranking and cfg.pruning_epochs < 1:
                    raise MTLError(
                        f"weighting.topk={list(cfg.topk)} picks the best k of {A} auxiliary tasks, which a pruning "
                        "phase ranks: set weighting.pruning_epochs (the reference uses 10 on NYUv2)."
                    )
            vectors = self._vectors(self.aux)
        if len(vectors) < 2:
            raise MTLError("weighting.branches must give at least two branches to merge.")
        if not cfg.grid or any(not 0 <= a <= 1 for a in cfg.grid):
            raise MTLError(f"weighting.grid={list(cfg.grid)} must be merge coefficients within [0, 1].")
        if cfg.criterion not in ("auto", "primary", "delta_m"):
            raise MTLError(f"Unknown weighting.criterion={cfg.criterion!r}. Valid choices: auto, primary, delta_m.")
        if cfg.search not in ("auto", "grid", "greedy"):
            raise MTLError(f"Unknown weighting.search={cfg.search!r}. Valid choices: auto, grid, greedy.")
        if cfg.search == "grid" and len(vectors) != 2:
            raise MTLError("weighting.search=grid merges two branches; use greedy for more.")
        if (cfg.interval_steps or 0) < 1 and (cfg.interval_epochs or 0) < 1:
            raise MTLError("Set weighting.interval_steps or weighting.interval_epochs to a positive number.")
        self.register_buffer("branch_weights", torch.stack(vectors))
        self.current = 0  # the branch being trained; set by the ForkMerge callback

    @property
    def num_branches(self) -> int:
        return len(self.branch_weights)

    @property
    def needs_ranking(self) -> bool:
        """Whether the branches depend on the order of the auxiliaries (top-k for some 0 < k < all)."""
        return self.cfg.topk is not None and any(0 < k < len(self.aux) for k in self.cfg.topk)

    def _vectors(self, ranking: list[int]) -> list[Tensor]:
        cfg = self.cfg
        base = torch.zeros(len(self.tasks))
        base[self.targets] = 1.0 / len(self.targets)
        if cfg.topk is not None:
            groups = [ranking[:k] for k in cfg.topk]
        else:
            groups = [[]] + ([[k] for k in ranking] if cfg.per_auxiliary else [ranking])
        vectors = []
        for g in groups:
            v = base.clone()
            if g:
                v[g] = cfg.aux_weight / (len(g) if cfg.aux_split else 1)
            vectors.append(v)
        return vectors

    def use_ranking(self, ranking: list[int]) -> None:
        """Rebuild the top-k branches from the auxiliary tasks ranked best first (the pruning phase's result)."""
        self.branch_weights = torch.stack(self._vectors(ranking))

    def weights(self, losses: Tensor) -> Tensor:
        return self.branch_weights[self.current].to(losses)

    def branch_probs(self) -> Tensor:
        """Each branch's domain sampling probabilities (its weights, normalised) for `data.mixing=sample`."""
        return self.branch_weights / self.branch_weights.sum(1, keepdim=True)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, target={list(self.cfg.target)}, branches={self.branch_weights.tolist()}"
