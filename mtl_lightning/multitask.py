"""One model trained on a task/domain mixture: the training step of every weighting, and single-model evaluation.

Its modes, each in one place: a sampled mixture (`data.mixing=sample`: the weights were spent on sampling, the loss
is the plain mean), a loss weighting (`weighting(losses)`), a gradient method (`weighting.surrogate`, the maths in
`weighting/gradient.py`), and ForkMerge's branches (`weighting=forkmerge`: manual optimisation, the step in
`forkmerge.ForkMerge.step`). Gradient-conflict logging is `conflict.GradConflict`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .adapters import drop_frozen, each_task, is_task_adapter, per_task, restore_frozen, trunk_source
from .batches import split_batch
from .conflict import GradConflict
from .errors import MTLError
from .model import TaskModel, compute_metrics
from .network import build_network, features, label_size
from .tasks import Task
from .weighting import Weighting


class MultiTaskModule(TaskModel):
    def __init__(
        self,
        tasks: Sequence[Task],
        in_chans: int,
        img_size: int,
        model_cfg,
        optim_cfg,
        weighting: Weighting,
        mixing: str = "loss",
        seed: int = 0,
        hparams: dict | None = None,
        delta_base: dict[str, dict[str, float]] | None = None,
        delta_convention: str = "libmtl",
        grad_cos_every: int = 0,
    ):
        super().__init__(tasks, model_cfg, optim_cfg, seed, hparams, delta_base, delta_convention)
        self.model_cfg = model_cfg
        self.backbone, self.arch, self.heads = build_network(self.tasks, in_chans, img_size, model_cfg)
        # each task's own adapters, found once (the gradient methods' steps read them): none without per-task adapters
        self._task_adapters = [p for n, p in self.backbone.named_parameters() if p.requires_grad and is_task_adapter(n)]
        self.train()  # a linear probe's backbone in eval mode from the start (`train`)
        self.weighting, self.mixing = weighting, mixing
        weighting.attach(self)
        self.fork = None  # ForkMerge's callback when weighting=forkmerge: then the steps are manual
        self.clip_val = None  # gradient clipping done by the module itself under manual optimisation
        self.metrics = nn.ModuleDict({stage: self.make_stage_metrics() for stage in ("val", "test")})
        self.conflict = GradConflict([t.name for t in self.tasks], grad_cos_every)
        # what the network cannot give the weighting is refused at construction, so that --check says it too
        check_architecture(self.arch, weighting)
        rep = getattr(weighting, "gradient_based", False) and weighting.cfg.mode == "rep"
        if rep and not self.arch.rep_ok:
            raise MTLError(
                f"weighting.mode=rep differentiates every task's loss against one shared representation, which "
                f"model.architecture={self.arch.name} does not have (each task's attention reads every stage of the "
                "shared network): use weighting.mode=param, which combines the gradients of every shared parameter."
            )
        views = [t.name for t in self.tasks if t.view]
        if views and rep:
            raise MTLError(
                f"weighting.mode=rep differentiates every task's loss against one shared representation of the batch, "
                f"but task(s) {views} read their own view of the input (transformed copies): use weighting.mode=param."
            )
        # per-task adapters (model.lora.share) give no shared representation either
        if per_task(self.backbone) and hasattr(weighting, "step_loss"):
            raise MTLError(
                f"weighting={weighting.name} computes the whole step's gradient itself, from one shared "
                "representation or for shared parameters only, and per-task adapters (model.lora.share=task, both or "
                "mtlora) are neither: use model.lora.share=shared with it."
            )
        if per_task(self.backbone) and getattr(weighting, "gradient_based", False) and weighting.cfg.mode == "rep":
            raise MTLError(
                "weighting.mode=rep differentiates every task's loss against one shared representation, which a "
                "backbone with per-task adapters (model.lora.share=task, both or mtlora) does not have: each task's "
                "passes through its own adapters. Use weighting.mode=param (the shared adapters' gradients)."
            )
        for head in self.heads:  # a view task's EMA teacher: a copy of the backbone and architecture
            if hasattr(head, "attach"):
                head.attach(self.backbone, self.arch)

    def forward(self, x) -> list[Tensor]:
        return self.heads_forward(self.features(x), label_size(x))

    def predict_task(self, k: int, x, detach: bool = False) -> Tensor:
        """Task k's prediction on inputs of its own (a view task's transformed images)."""
        z = self.features(x)
        return self.heads[k](self.specific(z.detach() if detach else z)[k], label_size(x))

    def predictions(
        self, x, y, detach: bool = False, z: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Every task's prediction and target on a batch, and the shared representation z of x: from z for most
        tasks, from its own view for a view task (tasks/views.py). `detach`: the heads' own-task path (features
        detached), which gradient methods train the heads with. `z`: x's representation, when already computed."""
        z = self.features(x) if z is None else z
        preds, targets = self.heads_forward(z.detach() if detach else z, label_size(x)), self.targets(y)
        for k, t in enumerate(self.tasks):
            if t.view:
                preds[k], targets[k] = t.view_forward(self, k, x, targets[k], detach)
        return preds, targets, z

    def batch_losses(self, x, y, detach: bool = False, z: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(each task's loss, its labelled count, z) on a batch."""
        preds, targets, z = self.predictions(x, y, detach, z)
        return (*self.task_losses(preds, targets), z)

    def task_summary(self, z: Tensor) -> Tensor:
        """Every task's representation (the heads' inputs) pooled over space and the batch, concatenated: (K x D,)."""
        reps = self.specific(z)
        return torch.cat([r.flatten(2).mean(-1) if r.ndim > 2 else r for r in reps], 1).mean(0)

    def heads_forward(self, z: Tensor, size) -> list[Tensor]:
        return [head(rep, size) for head, rep in zip(self.heads, self.specific(z))]

    def features(self, x) -> Tensor:
        """The shared representation z: the architecture's shared part on the backbone's output (pooled (B, D), or
        the feature map (B, C, h, w) with dense tasks). It is what gradient methods in `rep` mode differentiate
        against."""
        if not per_task(self.backbone):
            return self.arch.shared(features(self.backbone, x, self.spatial, self.vit))
        # per-task adapters (model.lora.share): a backbone pass per task through its own adapters, the tasks'
        # representations side by side on dim 1 (as MMoE packs its experts' outputs); `specific` takes them apart
        forward = lambda: self.arch.shared(features(self.backbone, x, self.spatial, self.vit))  # noqa: E731
        return torch.cat(each_task(self.backbone, len(self.tasks), forward), 1)

    def specific(self, z: Tensor) -> list[Tensor]:
        """Each task's representation, its head's input: the architecture's task-specific part of z (of task k's own
        slice of z with per-task adapters)."""
        if not per_task(self.backbone):
            return self.arch.specific(z)
        return [self.arch.specific(part)[k] for k, part in enumerate(z.chunk(len(self.tasks), 1))]

    def param_groups(self) -> list[dict]:
        """The model's groups; with `optim.weighting_lr`, the weighting's own parameters (uncertainty's log-variances,
        GradNorm's weights ...) in a group of that rate without weight decay, as Nash-MTL's and FAMO's code."""
        lr = self.optim_cfg.weighting_lr
        own = [p for p in self.weighting.parameters() if p.requires_grad]
        if lr is None or not own:
            return super().param_groups()
        mine = {id(p) for p in own}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in mine]} for g in super().param_groups()]
        return [*groups, {"params": own, "lr": lr, "weight_decay": 0.0}]

    def shared_parameters(self) -> list[Tensor]:
        """The parameters every task shares (backbone and the architecture's shared part): what gradient methods in
        `param` mode combine per-task gradients over. Per-task adapters are each task's own, as its head is."""
        own = {id(p) for p in self.task_adapters()}
        shared = (*self.backbone.parameters(), *self.arch.shared_parameters())
        return [p for p in shared if p.requires_grad and id(p) not in own]

    def task_adapters(self) -> list[Tensor]:
        """Every task's own adapters (`model.lora.share=task|both|mtlora`; none otherwise)."""
        return self._task_adapters

    def own_adapters_loss(self, losses: Tensor) -> Tensor | float:
        """Under a gradient method, a scalar whose backward gives each task's adapters its own loss's gradient, as
        the heads get theirs (their loss on the detached representation): task k's adapters reach loss k only, so
        the gradient of the losses' sum is each one's own."""
        own = self.task_adapters()
        if not own:
            return 0.0
        grads = torch.autograd.grad(losses.sum(), own, retain_graph=True, allow_unused=True)
        return sum((p * g.detach()).sum() for p, g in zip(own, grads) if g is not None)

    def setup(self, stage: str) -> None:
        # Refuse combinations a weighting cannot run correctly (DDP for some gradient methods) up front.
        self.weighting.check(str(self.trainer.precision), self.trainer.world_size > 1)

    # -- training -----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        if self.fork is not None:
            return self.fork.step(self, batch)
        x, y = batch
        if hasattr(self.weighting, "meta_step"):  # a bilevel weighting (Auto-Lambda) first updates its weights
            self.weighting.meta_step(self, batch)
        if hasattr(self.weighting, "step_loss"):  # FORUM, BayesAgg-MTL: the whole step's gradient is the method's
            loss, losses, w = self.weighting.step_loss(self, batch)
            return self._logged(loss, (w * losses).sum(), losses, w)
        if getattr(self.weighting, "samples", 1) > 1:  # MoDo: task gradients on disjoint parts of the batch
            return self._sampled_step(x, y)
        losses, counts, z = self.batch_losses(x, y)
        self._check_finite(losses)
        if self.mixing == "sample":  # weights were spent on sampling: the loss is the plain mean over samples
            w = counts / counts.sum()
            loss = shown = (w * losses).sum()
        elif getattr(self.weighting, "gradient_based", False):
            # Heads train on their own task's loss; the backbone gets the method's combined gradient.
            heads_loss = self.batch_losses(x, y, detach=True, z=z)[0].sum()  # the batch's z again, not a new forward
            heads_loss = heads_loss + self.own_adapters_loss(losses)
            loss, w = self.weighting.surrogate(losses, heads_loss, z, self.shared_parameters(), self.loss_scale())
            shown = (w * losses).sum().detach()
        elif getattr(self.weighting, "reads_features", False):
            loss, w = self.weighting(losses, self.task_summary(z))
            shown = loss
        else:
            loss, w = self.weighting(losses)
            shown = loss
        if getattr(self.weighting, "needs_post_step_losses", False):
            self._stepped_batch = batch
        return self._logged(loss, shown, losses, w)

    def _sampled_step(self, x, y) -> Tensor:
        """A gradient method fed S independent samples of the task gradients per step (`weighting.samples`): the
        batch in S disjoint parts, each part's losses and representation, J of shape (S, K, N) in `surrogate`."""
        S, name = self.weighting.samples, self.weighting.name
        xs, ys = split_batch(x, S, name), split_batch(y, S, name)
        parts = [self.batch_losses(a, b) for a, b in zip(xs, ys)]
        losses = torch.stack([p[0] for p in parts])  # (S, K)
        self._check_finite(losses)
        # the heads train on their own task's loss, averaged over the parts (as LibMTL's MoDo)
        heads = [
            self.batch_losses(a, b, detach=True, z=p[2])[0].sum() + self.own_adapters_loss(p[0])
            for a, b, p in zip(xs, ys, parts)
        ]
        loss, w = self.weighting.surrogate(
            losses, torch.stack(heads).mean(), None, self.shared_parameters(), self.loss_scale()
        )
        losses = losses.mean(0)
        return self._logged(loss, (w * losses).sum().detach(), losses, w)

    def _logged(self, loss: Tensor, shown: Tensor, losses: Tensor, w: Tensor) -> Tensor:
        shared = self.shared_parameters() if self.conflict.every else []
        self.conflict.observe(losses, shared, self.global_step, self.loggers)
        self.log("train/loss", shown, prog_bar=True)
        if self.loggers and self.global_step % self.trainer.log_every_n_steps == 0:
            # Per-task values go straight to the loggers on logging steps: self.log costs ~0.1 ms a value every
            # step, which with 40 tasks would outweigh a small model's step.
            values = torch.stack([losses.detach(), w]).tolist()
            row = {f"train/loss/{t.name}": v for t, v in zip(self.tasks, values[0])}
            row.update({f"weights/{t.name}": v for t, v in zip(self.tasks, values[1])})
            for logger in self.loggers:
                logger.log_metrics(row, step=self.global_step)
        return loss

    def grad_cos_means(self) -> dict[str, float]:
        return self.conflict.means()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tasks"] = [t.name for t in self.tasks]  # what a resume checks its config against
        if self.conflict.every:
            checkpoint["grad_cos"] = self.conflict.state_dict()
        source = trunk_source(self.model_cfg)
        if source:  # a frozen trunk the config rebuilds: the checkpoint holds what trains (adapters, heads)
            drop_frozen(self, checkpoint, source)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_frozen(self, checkpoint)
        if "grad_cos" in checkpoint:
            self.conflict.load_state_dict(checkpoint["grad_cos"])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        batch = getattr(self, "_stepped_batch", None)
        if batch is not None:  # FAMO: the same batch's losses after the step update its task logits
            self._stepped_batch = None
            with torch.no_grad():
                self.weighting.update(self.batch_losses(*batch)[0])
        self.after_update()

    def after_update(self) -> None:
        """After the parameters changed (an optimiser step, or ForkMerge's merge): EMA teachers follow them."""
        for head in self.heads:
            if hasattr(head, "ema_update"):
                head.ema_update(self, self.global_step)

    def train(self, mode: bool = True):
        """A linear probe's backbone stays in eval mode: its BatchNorm statistics (and dropout) are the frozen
        trunk's, so the backbone does not change, buffers included, while the heads train."""
        super().train(mode)
        if mode and self.model_cfg.freeze_backbone and not self.model_cfg.adapter:
            self.backbone.eval()  # Lightning keeps each submodule's mode across validation (its _ModuleMode)
        return self

    def on_train_start(self) -> None:
        # Lightning skips on_train_epoch_start when it resumes mid-epoch: tell the weighting which epoch it is in
        self.weighting.on_train_epoch_start(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        self.weighting.on_train_epoch_start(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        self.weighting.on_train_epoch_end()

    # -- evaluation ---------------------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        preds, targets, _ = self.predictions(x, y)
        losses, counts = self.task_losses(preds, targets)
        for t, m, p, target in zip(self.tasks, self.metrics[stage], preds, targets):
            t.update(m, p, target)
        for t, loss, n in zip(self.tasks, losses, counts):
            self.log(f"{stage}/loss/{t.name}", loss, batch_size=max(1, int(n)))

    def _eval_epoch_end(self, stage: str) -> None:
        results = compute_metrics(self.tasks, self.metrics[stage])
        for m in self.metrics[stage]:
            for metric in m.values():
                metric.reset()
        for k, v in self.stage_results(stage, results).items():
            self.log(f"{stage}/{k}", v, prog_bar=stage == "val" and k in ("acc_mean", "delta_m"))

    @torch.no_grad()
    def evaluate(self, loader, tasks: list[int], max_batches: int | None = None) -> dict[str, float]:
        """The metrics of `tasks` (indices) on `loader`'s first `max_batches` batches, without logging: what
        ForkMerge scores candidate merges with."""
        was = self.training
        self.eval()
        metrics = [self.tasks[k].make_metrics().to(self.device) for k in tasks]
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = self.transfer_batch_to_device((x, y), self.device, 0)
            preds, targets, _ = self.predictions(x, y)
            for k, m in zip(tasks, metrics):
                self.tasks[k].update(m, preds[k], targets[k])
        self.train(was)
        return compute_metrics([self.tasks[k] for k in tasks], metrics)


def check_architecture(arch, weighting) -> None:
    """A gradient-level weighting combines per-task gradients at the shared representation: refuse an architecture
    without one, naming the alternatives."""
    if getattr(weighting, "gradient_based", False) and not arch.splits:
        raise MTLError(
            f"weighting={weighting.name} combines the tasks' gradients at one shared representation, which "
            f"model.architecture={arch.name} does not have (its experts read task-specific mixtures at every level). "
            "Use model.architecture=cgc or mmoe with it, or a loss weighting (uniform, fixed, uncertainty ...)."
        )
