"""ForkMerge's branches as a Lightning Callback (Jiang et al., NeurIPS 2023, arXiv:2301.12618).

The callback holds one copy of the trainable parameters and BatchNorm statistics per branch, plus each branch's own
optimiser state, and the merged parameters that the LightningModule holds between steps (so validation, checkpoints
and the final model are always the merged model). Every training step, `step` trains each branch one step
on the same batch: `enter(b)` points the module's parameters and the optimiser's state at branch b, the module steps
with that branch's task weights (`weighting=forkmerge`), `leave(b)` keeps the result. One scheduler drives the shared
learning rate, so a branch's schedule is what a plain run's would be. Every merge interval, `merge` scores merges of
the branches by the target tasks' primary metric (or Δm%) on the validation split (never the test split), picks
the best, and starts every branch from it. Because every branch sees the same batches and keeps its own optimiser
state (as the reference code does: optimiser state is neither forked nor merged), a grid that always picks the
target-only branch reproduces target-only training parameter for parameter.

Best of round (`weighting.best_of_round`, on by default as the reference): at every epoch end inside a round each
branch is scored on validation and its best weights of the round are kept; the merge then combines each branch's
best weights of the round, not its last. Deviation from the reference, by design: MDL branches weight domain
losses (the reference changes the sampling probabilities); every shared entry is averaged, heads and BatchNorm
statistics included, since every branch has every head.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import Tensor
from torch.utils._pytree import tree_map

from .config import with_weighting, write_atomic
from .console import say
from .errors import MTLError
from .tasks import delta_m
from .validation import validation_loader


def target_score(results: dict[str, float], tasks, criterion: str, base: dict[str, float] | None) -> float:
    """How good `results` (metrics named as `Task.metric_name`) are for the target `tasks`, higher is better.

    `primary`: the mean of the targets' primary metrics, negated where lower is better (classification: the mean
    target accuracy, as the reference code on DomainNet). `delta_m`: the targets' Δm% against `base` (as the
    reference code on NYUv2).
    """
    if criterion == "delta_m":
        return delta_m(results, base, tasks)
    signed = [(1 if t.metrics[t.primary] else -1) * results[t.metric_name(t.primary)] for t in tasks]
    return sum(signed) / len(signed)


def merge_score(module, loader, targets: list[int], max_batches: int | None, criterion: str) -> float:
    """`target_score` of the module's current parameters on `loader` (its first `max_batches` batches)."""
    results = module.evaluate(loader, targets, max_batches)
    return target_score(results, [module.tasks[k] for k in targets], criterion, module.delta_base.get("val"))


def grid_search(score, num_branches: int, grid: list[float]) -> list[float]:
    """Algorithm 1: theta = L theta_1 + (1 - L) theta_0 for L in the grid; the best score wins (first on ties)."""
    assert num_branches == 2
    best, best_lam = -float("inf"), None
    for a in grid:
        s = score([1.0 - a, a])
        if s > best:
            best, best_lam = s, [1.0 - a, a]
    return best_lam


def greedy_search(score, num_branches: int, grid: list[float]) -> list[float]:
    """Algorithm 3 as the reference code runs it: rank branches by their own score; the best gets weight 1; each next
    branch is tried at alpha * (sum of weights so far) / (i + 1) for alpha in the grid and kept only if the
    normalised merge beats the best score so far."""
    own = [score([1.0 if j == b else 0.0 for j in range(num_branches)]) for b in range(num_branches)]
    order = sorted(range(num_branches), key=lambda b: -own[b])
    lam = [0.0] * num_branches
    lam[order[0]] = 1.0
    best = own[order[0]]
    for i, b in enumerate(order[1:], start=1):
        keep = None
        for a in grid:
            cand = list(lam)
            cand[b] = a * sum(lam) / (i + 1)
            total = sum(cand)
            s = score([c / total for c in cand])
            if s > best:
                best, keep = s, cand
        if keep is not None:
            lam = keep
    total = sum(lam)
    return [c / total for c in lam]


class ForkMerge(Callback):
    """Holds the branches of `weighting=forkmerge` (a `weighting.forkmerge.ForkMerge`); see the module docstring."""

    def __init__(self, weighting):
        self.weighting, self.cfg = weighting, weighting.cfg
        self.B = weighting.num_branches
        self.branches: list[list[Tensor]] | None = None
        self.merged: list[Tensor] | None = None
        self.states: list[dict | None] = [None] * self.B  # each branch's optimiser state (param -> dict)
        self.saved_states: list[dict | None] = [None] * self.B  # from a checkpoint, bound on first use
        self.history: list[dict] = []  # one entry per merge: step, lambdas, scores
        self.best: list[tuple[float, list[Tensor]] | None] = [None] * self.B  # each branch's best of this round
        self.interval = 0
        self.criterion = "primary"  # or delta_m: set by train() from weighting.criterion and the base results

    def _params(self, module) -> list[Tensor]:
        """What a branch owns and a merge averages: the trainable parameters, then the floating-point buffers of the
        backbone and heads (BatchNorm's running statistics, as the reference merges the whole state dict; integer
        counters such as num_batches_tracked stay the module's)."""
        params = [p for p in module.parameters() if p.requires_grad]
        parts = (module.backbone, module.arch, module.heads)
        buffers = [b for part in parts for b in part.buffers() if b.is_floating_point()]
        return params + buffers

    def _store(self, t: Tensor) -> Tensor:
        return t.detach().to("cpu", copy=True) if self.cfg.offload else t.detach().clone()

    # -- Lightning hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        c = self.cfg
        self.interval = c.interval_steps or c.interval_epochs * int(trainer.num_training_batches)
        params = self._params(pl_module)
        self.merged = [p.data for p in params]  # the module's (possibly restored) parameters: the merged model
        if self.branches is None:
            self.branches = [[self._store(p) for p in params] for _ in range(self.B)]
        elif any(len(br) != len(params) for br in self.branches):
            raise MTLError(
                f"The ForkMerge branches in this checkpoint hold {len(self.branches[0])} tensors, the model "
                f"{len(params)}: it was written by a version that merged parameters only (BatchNorm statistics are "
                "now merged too). Start a new run; it cannot be resumed."
            )
        else:  # restored from a checkpoint
            where = ["cpu" if c.offload else p.device for p in params]
            self.branches = [[t.to(d) for t, d in zip(br, where)] for br in self.branches]
            self.best = [None if b is None else (b[0], [t.to(d) for t, d in zip(b[1], where)]) for b in self.best]

    def state_dict(self) -> dict:
        return {
            "branches": self.branches,
            "states": [self._state_to_save(b) for b in range(self.B)],
            "history": self.history,
            "best": self.best,
        }

    def load_state_dict(self, state: dict) -> None:
        self.branches, self.saved_states, self.history = state["branches"], state["states"], state["history"]
        self.best = state.get("best", [None] * self.B)
        self.states = [None] * self.B

    # -- called by MultiTaskModule ------------------------------------------------------------------------
    def step(self, module, batch) -> Tensor:
        """One step of every branch on this batch (manual optimisation): `enter(b)`, b's loss and optimiser step,
        `leave(b)`; then the scheduler once, and the merged parameters back (merging when an interval ends)."""
        opt = module.optimizers()
        shown = []
        for b in range(self.B):
            self.enter(b, module, opt.optimizer)
            module._reseed()  # every branch draws the randomness a plain run would at this step
            if module.mixing == "sample":  # each branch drew its own batch (BranchBatchSampler): its slice, plain mean
                x, y = tree_map(lambda t, b=b: t.chunk(self.B)[b], batch)
                losses, counts, _ = module.batch_losses(x, y)
                loss = (counts / counts.sum() * losses).sum()
            else:
                losses, _, _ = module.batch_losses(*batch)
                loss, _ = self.weighting(losses)
            module._check_finite(losses)
            opt.zero_grad()
            module.manual_backward(loss)
            scale = module.loss_scale()  # fp16: the gradients stay scaled until the scaler's step unscales them
            if module.clip_val and scale is None:
                module.clip_gradients(opt, gradient_clip_val=module.clip_val, gradient_clip_algorithm="norm")
            elif module.clip_val:  # clipping the scaled gradients at scale x max_norm is clipping the true ones
                params = [p for p in module.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, module.clip_val * scale)
            if b == self.B - 1:  # the LightningOptimizer's step counts a global step: once per batch, the last branch
                opt.step()  # (and under fp16 the precision plugin's scaler steps, skips on inf/NaN, and updates)
            elif scale is not None:  # the other branches step the same optimiser: the scaler once per branch
                scaler = module.trainer.precision_plugin.scaler
                scaler.step(opt.optimizer)
                scaler.update()
            else:
                opt.optimizer.step()
            self.leave(b, module, opt.optimizer)
            shown.append(loss.detach())
        sched = module.lr_schedulers()
        if sched is not None:
            sched.step()
        self.after_step(module)
        module.after_update()  # EMA teachers follow the merged parameters
        shown = torch.stack(shown)
        module.log("train/loss", shown.mean(), prog_bar=True)
        if module.loggers and module.global_step % module.trainer.log_every_n_steps == 0:
            row = {f"forkmerge/train_loss/{b}": v for b, v in enumerate(shown.tolist())}
            for logger in module.loggers:
                logger.log_metrics(row, step=module.global_step)
        return shown.mean()

    def enter(self, b: int, module, opt) -> None:
        """Point the module's parameters and the optimiser's state at branch b."""
        self.weighting.current = b
        dev = module.device
        for p, t in zip(self._params(module), self.branches[b]):
            p.data = t.to(dev, non_blocking=True) if self.cfg.offload else t
        if self.states[b] is None:
            saved = self.saved_states[b]
            if saved is not None:  # resumed: rebuild this branch's state against the live parameters
                opt.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})
                self.states[b] = opt.state
            else:
                self.states[b] = defaultdict(dict)
        opt.state = self.states[b]
        if self.cfg.offload:
            _move_state(opt.state, dev)

    def leave(self, b: int, module, opt) -> None:
        if self.cfg.offload:  # copy the stepped branch back to the CPU
            for p, t in zip(self._params(module), self.branches[b]):
                t.copy_(p.data)
            _move_state(opt.state, "cpu")

    def after_step(self, module) -> None:
        """Give the module the merged parameters back; merge when an interval ends."""
        if module.global_step % self.interval == 0:
            self.merge(module)
        for p, m in zip(self._params(module), self.merged):
            p.data = m

    def _branch_score(self, module, b: int) -> float:
        """Branch b's current weights scored on validation (the module is left pointing at them)."""
        for p, t in zip(self._params(module), self.branches[b]):
            p.data = t.to(p.device)
        loader = validation_loader(module.trainer)
        return merge_score(module, loader, self.weighting.targets, self.cfg.val_batches, self.criterion)

    def track(self, module) -> None:
        """Inside a round: keep each branch's weights when they score better than its best of the round so far."""
        for b in range(self.B):
            s = self._branch_score(module, b)
            if self.best[b] is None or s > self.best[b][0]:
                self.best[b] = (s, [t.clone() for t in self.branches[b]])
        for p, m in zip(self._params(module), self.merged):
            p.data = m

    def merge(self, module) -> None:
        params = self._params(module)
        loader = validation_loader(module.trainer)
        targets = self.weighting.targets
        cache: dict[tuple, float] = {}
        for b in range(self.B):  # each branch's own score; with best_of_round, its best weights of the round
            s = self._branch_score(module, b)
            if self.cfg.best_of_round and self.best[b] is not None and self.best[b][0] > s:
                s = self.best[b][0]
                for t, kept in zip(self.branches[b], self.best[b][1]):
                    t.copy_(kept)
            cache[tuple(1.0 if j == b else 0.0 for j in range(self.B))] = s
        self.best = [None] * self.B

        def combine(lam):
            out = []
            for i, p in enumerate(params):
                parts = [(a, br[i]) for a, br in zip(lam, self.branches) if a != 0]
                acc = parts[0][1].to(p.device) * parts[0][0]
                for a, t in parts[1:]:
                    acc = acc + t.to(p.device) * a
                out.append(acc)
            return out

        def score(lam):
            key = tuple(round(a, 9) for a in lam)
            if key not in cache:
                for p, t in zip(params, combine(lam)):
                    p.data = t
                cache[key] = merge_score(module, loader, targets, self.cfg.val_batches, self.criterion)
            return cache[key]

        search = self.cfg.search
        if search == "auto":
            search = "grid" if self.B == 2 else "greedy"
        lam = (grid_search if search == "grid" else greedy_search)(score, self.B, list(self.cfg.grid))
        own = [score([1.0 if j == b else 0.0 for j in range(self.B)]) for b in range(self.B)]
        merged_score = score(lam)
        new = combine(lam)
        for m, t in zip(self.merged, new):
            m.copy_(t)
        for br in self.branches:  # every branch starts the next round from the merge
            for t, m in zip(br, self.merged):
                t.copy_(m)
        row = {f"forkmerge/lambda/{b}": a for b, a in enumerate(lam)}
        row.update({f"forkmerge/val/{b}": s for b, s in enumerate(own)})
        row["forkmerge/val/merged"] = merged_score
        self.history.append({"step": module.global_step, **row})
        for logger in module.loggers:
            logger.log_metrics(row, step=module.global_step)

    def _state_to_save(self, b: int):
        if self.states[b] is None:
            return self.saved_states[b]
        # optimizer.state_dict() packs the state by parameter index: borrow an optimiser view of branch b's state
        opt = self._opt
        live = opt.state
        opt.state = self.states[b]
        try:
            return opt.state_dict()["state"]
        finally:
            opt.state = live

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._opt = pl_module.optimizers().optimizer

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.cfg.best_of_round and pl_module.global_step % self.interval:  # inside a round (not at a merge)
            self.track(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.interval and pl_module.global_step % self.interval:  # the budget ended mid-round: merge it too
            self.merge(pl_module)
            for p, m in zip(self._params(pl_module), self.merged):
                p.data = m


def _move_state(state: dict, device) -> None:
    for s in state.values():
        for k, v in s.items():
            if isinstance(v, Tensor) and k != "step":
                s[k] = v.to(device, non_blocking=True)


def rank_auxiliaries(cfg: DictConfig, weighting, tasks, run_dir: Path, bases, fit) -> list[int]:
    """ForkMerge's pruning phase, as the reference code runs it: train the targets with each auxiliary task alone
    for `weighting.pruning_epochs`, from the same initial weights (same seed), and rank the auxiliaries by the
    targets' validation score. The runs live in `<run_dir>/pruning/`; `pruning.json` keeps the scores, so a resumed
    run does not prune again. `fit(cfg, save_checkpoints=False)` trains one run (`train.train`)."""
    path = run_dir / "pruning.json"
    names = [t.name for t in tasks]
    if path.exists():
        return [names.index(n) for n in json.loads(path.read_text())["ranking"]]
    c = cfg.weighting
    criterion = forkmerge_criterion(c.criterion, bool(bases))
    targets = [tasks[k] for k in weighting.targets]
    scores = {}
    for i, k in enumerate(weighting.aux):
        say(
            f"ForkMerge's pruning phase ({i + 1}/{len(weighting.aux)}): the targets with {names[k]} alone, "
            f"{c.pruning_epochs} epoch(s)"
        )
        w = [0.0] * len(tasks)
        for t in weighting.targets:
            w[t] = 1.0 / len(weighting.targets)
        w[k] = c.aux_weight
        sub = with_weighting(
            cfg,
            {"name": "fixed", "weights": w, "normalize": False},
            out_dir=str(run_dir / "pruning"),
            run_name=names[k],
            resume=None,
            test=False,
            logger="csv",
        )
        sub.trainer.max_epochs, sub.trainer.max_steps = c.pruning_epochs, -1
        m = fit(sub, save_checkpoints=False)
        results = {key[4:]: v for key, v in m.items() if key.startswith("val/")}
        scores[names[k]] = target_score(results, targets, criterion, bases.get("val"))
    ranking = sorted(weighting.aux, key=lambda k: -scores[names[k]])
    write_atomic(path, json.dumps({"scores": scores, "ranking": [names[k] for k in ranking]}, indent=1))
    return ranking


def forkmerge_criterion(criterion: str, has_base: bool) -> str:
    if criterion == "delta_m" and not has_base:
        raise MTLError(
            "weighting.criterion=delta_m merges by Δm% against base results, and none are given: set delta_m.runs "
            "(single-task run directories) or delta_m.base (numbers by metric), or use weighting.criterion=primary."
        )
    return criterion if criterion != "auto" else ("delta_m" if has_base else "primary")
