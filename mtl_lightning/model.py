"""One LightningModule for every mixture: a timm backbone, a head per task/domain (`mtl_lightning.tasks`), a weighting.

A batch is `(x, y)`: y is a (B, K) tensor of class labels when every task is classification (-1 = unlabelled), or
a sequence of K per-task targets otherwise (a label map, a depth map, ...). Each task computes its own masked loss
and metrics; the weighting sees the K losses.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import lightning as L
import timm
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .errors import MTLError, NonFiniteLossError
from .tasks import Classification, Task, delta_m
from .weighting import Weighting

VIT_MODULES = ("vision_transformer", "deit")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "step", "constant")


def is_vit(name: str) -> bool:
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1] in VIT_MODULES


def create_backbone(cfg, in_chans: int, img_size: int, spatial: bool = False) -> nn.Module:
    """A timm model by name, without classifier (`num_classes=0`), shaped by the ViT keys when it is a ViT.

    `spatial`: the model must give a feature map for dense heads. ViTs do through `forward_intermediates`; other
    models are built with timm's `features_only=True` (their last stage).
    """
    name = cfg.backbone
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        raise MTLError(
            f"Unknown timm backbone model.backbone={name!r}. Close names: {', '.join(close) or 'none'}; "
            "all names: python -c 'import timm; print(timm.list_models())'."
        )
    kwargs = dict(cfg.kwargs or {})
    shape = {
        "depth": cfg.depth,
        "embed_dim": cfg.width,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "mlp_ratio": cfg.mlp_ratio,
    }
    shape = {k: v for k, v in shape.items() if v is not None}
    vit = is_vit(name)
    if vit:
        if cfg.width is not None and cfg.num_heads is None:
            # keep ~64 channels per head, as ViT-Ti/S/B do, with a head count that divides the width
            shape["num_heads"] = min(
                (h for h in range(1, cfg.width + 1) if cfg.width % h == 0),
                key=lambda h: (abs(h - cfg.width / 64), -h),
            )
        kwargs.update(shape, img_size=img_size)
    elif shape:
        raise MTLError(f"model.{'/'.join(shape)} shape ViT backbones only; model.backbone={name} is not a ViT.")
    if spatial and not vit:
        kwargs.update(features_only=True, out_indices=(-1,))
    else:
        kwargs["num_classes"] = 0
    try:
        return timm.create_model(name, pretrained=cfg.pretrained, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise MTLError(f"timm could not build model.backbone={name} with {kwargs}: {e}") from None
    except (OSError, RuntimeError) as e:
        if cfg.pretrained:
            raise MTLError(
                f"Could not load pretrained weights for {name} ({e}). Without internet, put them in the Hugging "
                "Face cache (HF_HOME) beforehand, or train from scratch with model.pretrained=false."
            ) from None
        raise


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms and the weighting's scales."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def cosine_with_warmup(total: int, warmup: float):
    warm = int(warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


class MultiTaskModule(L.LightningModule):
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
        grad_cos_every: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(hparams or {})
        self.tasks = list(tasks)
        self.optim_cfg, self.mixing, self.seed = optim_cfg, mixing, seed
        self.spatial = any(t.dense for t in self.tasks)  # dense heads need the backbone's feature map
        self.backbone = create_backbone(model_cfg, in_chans, img_size, self.spatial)
        self.vit = is_vit(model_cfg.backbone)
        if self.spatial and not self.vit:  # a timm features_only model: its last stage
            channels, reduction = self.backbone.feature_info.channels()[-1], self.backbone.feature_info.reduction()[-1]
        else:
            channels, reduction = self.backbone.num_features, getattr(self.backbone, "patch_embed", None)
            reduction = reduction.patch_size[0] if reduction is not None else 1
        self.heads = nn.ModuleList(t.head(channels, self.spatial, reduction) for t in self.tasks)
        self.weighting = weighting
        self.fork = None  # ForkMerge's callback when weighting=forkmerge: then the steps are manual
        self.clip_val = None  # gradient clipping done by the module itself under manual optimisation
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleList(t.make_metrics() for t in self.tasks) for stage in ("val", "test")}
        )
        self.delta_base = delta_base or {}  # stage -> base results for Δm% (val/delta_m, test/delta_m)
        # Gradient conflict (Royer et al.: it barely predicts performance): pairwise cosines of the task gradients
        # on the shared parameters every `grad_cos_every` steps, and their running sums for the run's mean.
        self.grad_cos_every = grad_cos_every
        K = len(self.tasks)
        self.cos_sum, self.cos_n = torch.zeros(K, K, dtype=torch.float64), torch.zeros(K, K, dtype=torch.long)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.heads_forward(self.features(x), x.shape[-2:])

    def heads_forward(self, z: Tensor, size) -> list[Tensor]:
        return [head(z, size) for head in self.heads]

    def features(self, x: Tensor) -> Tensor:
        """The shared representation z: pooled (B, D), or the feature map (B, C, h, w) with dense tasks. It is what
        gradient methods in `rep` mode differentiate against."""
        if x.dtype == torch.uint8:  # stored images travel as uint8 and are scaled on the device
            x = x.float().div_(127.5).sub_(1.0)
        if not self.spatial:
            return self.backbone(x)
        if self.vit:  # the last block's patch tokens, final norm applied, as a map
            return self.backbone.forward_intermediates(
                x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
            )[-1]
        return self.backbone(x)[-1]

    def targets(self, y) -> list[Tensor]:
        """Per-task targets from a batch's labels: columns of a (B, K) label tensor, or the given sequence."""
        return [y[:, k] for k in range(len(self.tasks))] if isinstance(y, Tensor) else list(y)

    def task_losses(self, preds: list[Tensor], y) -> tuple[Tensor, Tensor]:
        """Each task's mean loss over its labelled samples (or pixels), and the samples labelled for it."""
        out = [t.loss(p, target) for t, p, target in zip(self.tasks, preds, self.targets(y))]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    def setup(self, stage: str) -> None:
        # Refuse combinations a weighting cannot run correctly (fp16 or DDP for some gradient methods) up front.
        self.weighting.check(str(self.trainer.precision), self.trainer.world_size > 1)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._reseed()

    def _reseed(self) -> None:
        # Randomness (dropout, drop-path) depends only on (seed, step), so a resumed run replays it exactly.
        # Only the generators in use: torch.manual_seed also queues lazy seeding of every backend (~2 ms a call).
        seed = self.seed * 1_000_003 + self.global_step
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def _check_finite(self, losses: Tensor) -> None:
        if not torch.isfinite(losses).all():
            bad = [t.name for t, v in zip(self.tasks, losses.tolist()) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"The training loss of task(s) {bad} became NaN/inf at step {self.global_step} (epoch "
                f"{self.current_epoch}); training stopped. Try a lower optim.lr, gradient clipping "
                "(trainer.gradient_clip_val=1.0) or precision=32-true, and check that task's data. "
                "Checkpoints written before this step are intact and can be resumed."
            )

    def training_step(self, batch, batch_idx: int) -> Tensor:
        if self.fork is not None:
            return self._forkmerge_step(batch)
        x, y = batch
        z = self.features(x)
        losses, counts = self.task_losses(self.heads_forward(z, x.shape[-2:]), y)
        self._check_finite(losses)
        if self.mixing == "sample":  # weights were spent on sampling: the loss is the plain mean over samples
            w = counts / counts.sum()
            loss = shown = (w * losses).sum()
        elif getattr(self.weighting, "gradient_based", False):
            # Heads train on their own task's loss; the backbone gets the method's combined gradient.
            heads_loss = self.task_losses(self.heads_forward(z.detach(), x.shape[-2:]), y)[0].sum()
            shared = [p for p in self.backbone.parameters() if p.requires_grad]
            loss, w = self.weighting.surrogate(losses, heads_loss, z, shared)
            shown = (w * losses).sum().detach()
        else:
            loss, w = self.weighting(losses)
            shown = loss
        if self.grad_cos_every and self.global_step % self.grad_cos_every == 0:
            self._log_grad_cos(losses)
        if getattr(self.weighting, "needs_post_step_losses", False):
            self._stepped_batch = batch
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

    def _log_grad_cos(self, losses: Tensor) -> None:
        """Pairwise cosines of the task gradients on the shared (backbone) parameters: K extra backward passes."""
        shared = [p for p in self.backbone.parameters() if p.requires_grad]
        rows = []
        for k in range(len(losses)):
            if not losses[k].requires_grad:  # a task with no sample in this batch (MDL): no gradient
                rows.append(None)
                continue
            gs = torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(shared, gs)]))
        names = [t.name for t in self.tasks]
        row = {}
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                if rows[a] is None or rows[b] is None or not (rows[a].any() and rows[b].any()):
                    continue
                c = torch.nn.functional.cosine_similarity(rows[a].float(), rows[b].float(), dim=0).item()
                self.cos_sum[a, b] += c
                self.cos_n[a, b] += 1
                row[f"train/grad_cos/{names[a]}-{names[b]}"] = c
        for logger in self.loggers:
            logger.log_metrics(row, step=self.global_step)

    def grad_cos_means(self) -> dict[str, float]:
        """Each task pair's mean gradient cosine over the run (`grad_cos/<a>-<b>`), and their mean (`grad_cos/mean`)."""
        names = [t.name for t in self.tasks]
        out = {}
        for a, b in zip(*torch.triu_indices(len(names), len(names), 1).tolist()):
            if self.cos_n[a, b] > 0:
                out[f"grad_cos/{names[a]}-{names[b]}"] = float(self.cos_sum[a, b] / self.cos_n[a, b])
        if out:
            out["grad_cos/mean"] = sum(out.values()) / len(out)
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tasks"] = [t.name for t in self.tasks]  # what a resume checks its config against
        if self.grad_cos_every:
            checkpoint["grad_cos"] = {"sum": self.cos_sum, "n": self.cos_n}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "grad_cos" in checkpoint:
            self.cos_sum, self.cos_n = checkpoint["grad_cos"]["sum"], checkpoint["grad_cos"]["n"]

    def _forkmerge_step(self, batch) -> Tensor:
        """One step of every ForkMerge branch on this batch (manual optimisation; see mtl_lightning/forkmerge.py)."""
        opt = self.optimizers()
        shown = []
        nb = self.weighting.num_branches
        for b in range(nb):
            self.fork.enter(b, self, opt.optimizer)
            self._reseed()  # every branch draws the randomness a plain run would at this step
            if self.mixing == "sample":  # each branch drew its own batch (BranchBatchSampler): its slice, plain mean
                x, y = tree_map(lambda t, b=b: t.chunk(nb)[b], batch)
                losses, counts = self.task_losses(self(x), y)
                loss = (counts / counts.sum() * losses).sum()
            else:
                x, y = batch
                losses, _ = self.task_losses(self(x), y)
                loss, _ = self.weighting(losses)
            self._check_finite(losses)
            opt.zero_grad()
            self.manual_backward(loss)
            if self.clip_val:
                self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
            # the LightningOptimizer's step counts a global step: once per batch, on the last branch
            (opt if b == self.weighting.num_branches - 1 else opt.optimizer).step()
            self.fork.leave(b, self, opt.optimizer)
            shown.append(loss.detach())
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.fork.after_step(self)
        shown = torch.stack(shown)
        self.log("train/loss", shown.mean(), prog_bar=True)
        if self.loggers and self.global_step % self.trainer.log_every_n_steps == 0:
            row = {f"forkmerge/train_loss/{b}": v for b, v in enumerate(shown.tolist())}
            for logger in self.loggers:
                logger.log_metrics(row, step=self.global_step)
        return shown.mean()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        batch = getattr(self, "_stepped_batch", None)
        if batch is not None:  # FAMO: the same batch's losses after the step update its task logits
            self._stepped_batch = None
            with torch.no_grad():
                self.weighting.update(self.task_losses(self(batch[0]), batch[1])[0])

    def on_train_start(self) -> None:
        # Lightning skips on_train_epoch_start when it resumes mid-epoch: tell the weighting which epoch it is in
        self.weighting.on_train_epoch_start(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        self.weighting.on_train_epoch_start(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        self.weighting.on_train_epoch_end()

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        preds = self(x)
        losses, counts = self.task_losses(preds, y)
        for t, m, p, target in zip(self.tasks, self.metrics[stage], preds, self.targets(y)):
            t.update(m, p, target)
        for t, loss, n in zip(self.tasks, losses, counts):
            self.log(f"{stage}/loss/{t.name}", loss, batch_size=max(1, int(n)))

    def _eval_epoch_end(self, stage: str) -> None:
        results = compute_metrics(self.tasks, self.metrics[stage])
        for m in self.metrics[stage]:
            for metric in m.values():
                metric.reset()
        for k, v in results.items():
            self.log(f"{stage}/{k}", v)
        accs = [results[f"acc/{t.name}"] for t in self.tasks if isinstance(t, Classification)]
        if accs:
            self.log(f"{stage}/acc_mean", sum(accs) / len(accs), prog_bar=stage == "val")
        if stage in self.delta_base:
            dm = delta_m(results, self.delta_base[stage], self.tasks)
            self.log(f"{stage}/delta_m", dm, prog_bar=stage == "val")

    @torch.no_grad()
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
            preds, targets = self(x), self.targets(y)
            for k, m in zip(tasks, metrics):
                self.tasks[k].update(m, preds[k], targets[k])
        self.train(was)
        return compute_metrics([self.tasks[k] for k in tasks], metrics)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        c = self.optim_cfg
        groups = param_groups(self, c.weight_decay)
        if c.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=c.lr)
        elif c.name == "adam":  # L2-regularised Adam, as the NYUv2 references (weight_decay is then an L2 penalty)
            opt = torch.optim.Adam(groups, lr=c.lr)
        elif c.name == "sgd":
            opt = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)
        else:
            raise MTLError(f"Unknown optim.name={c.name!r}. Valid choices: {', '.join(OPTIMIZERS)}.")
        if c.scheduler == "constant":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        if c.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, c.warmup))
        elif c.scheduler == "step":  # x gamma every step_epochs epochs, as MTAN/LibMTL/ForkMerge on NYUv2
            every = c.step_epochs * max(1, total // max(1, self.trainer.max_epochs))
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=c.gamma)
        else:
            raise MTLError(f"Unknown optim.scheduler={c.scheduler!r}. Valid choices: {', '.join(SCHEDULERS)}.")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def compute_metrics(tasks: Sequence[Task], metrics: Sequence[nn.ModuleDict]) -> dict[str, float]:
    """{`<task>/<metric>` (classification: `acc/<task>`): value} from each task's accumulated metrics."""
    out = {}
    for t, m in zip(tasks, metrics):
        values = {}
        for name, metric in m.items():
            v = metric.compute()
            values.update(v if isinstance(v, dict) else {name: v})
        out.update({t.metric_name(k): float(v) for k, v in values.items()})
    return out


def metric_directions(tasks: Sequence[Task], stage: str = "val", delta: bool = False) -> dict[str, bool]:
    """Every metric the module logs at `stage`, mapped to whether higher is better."""
    out = {t.key(stage, m): higher for t in tasks for m, higher in t.metrics.items()}
    out.update({f"{stage}/loss/{t.name}": False for t in tasks})
    if any(isinstance(t, Classification) for t in tasks):
        out[f"{stage}/acc_mean"] = True
    if delta:
        out[f"{stage}/delta_m"] = True
    return out


def default_monitor(tasks: Sequence[Task], delta: bool) -> str:
    """`checkpoint.monitor=auto`: val/delta_m with base results, else val/acc_mean with classification tasks, else
    the first task's primary metric (so a single-task baseline of any task has one)."""
    if delta:
        return "val/delta_m"
    if any(isinstance(t, Classification) for t in tasks):
        return "val/acc_mean"
    return tasks[0].key("val", tasks[0].primary)


def higher_is_better(metric: str, tasks: Sequence[Task], delta: bool, key: str) -> bool:
    """The direction of `metric`, or a clear error naming `key` and the metrics there are."""
    stage = metric.split("/", 1)[0]
    directions = metric_directions(tasks, stage if stage in ("val", "test") else "val", delta)
    if metric not in directions:
        hint = "" if delta else " (val/delta_m needs base results: delta_m.runs or delta_m.base)"
        raise MTLError(f"{key}={metric!r} is not a logged metric{hint}. Valid choices: {', '.join(directions)}.")
    return directions[metric]
