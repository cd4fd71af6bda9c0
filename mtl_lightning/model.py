"""One LightningModule for every mixture: a timm backbone, one linear head per task/domain, a weighting."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .data import Task
from .errors import MTLError, NonFiniteLossError
from .weighting import Weighting

VIT_MODULES = ("vision_transformer", "deit")


def create_backbone(cfg, in_chans: int, img_size: int) -> nn.Module:
    """A timm model by name, without classifier (`num_classes=0`), shaped by the ViT keys when it is a ViT."""
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
    if timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1] in VIT_MODULES:
        if cfg.width is not None and cfg.num_heads is None:
            # keep ~64 channels per head, as ViT-Ti/S/B do, with a head count that divides the width
            shape["num_heads"] = min(
                (h for h in range(1, cfg.width + 1) if cfg.width % h == 0),
                key=lambda h: (abs(h - cfg.width / 64), -h),
            )
        kwargs.update(shape, img_size=img_size)
    elif shape:
        raise MTLError(f"model.{'/'.join(shape)} shape ViT backbones only; model.backbone={name} is not a ViT.")
    try:
        return timm.create_model(name, pretrained=cfg.pretrained, in_chans=in_chans, num_classes=0, **kwargs)
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
    ):
        super().__init__()
        self.save_hyperparameters(hparams or {})
        self.tasks = list(tasks)
        self.optim_cfg, self.mixing, self.seed = optim_cfg, mixing, seed
        self.backbone = create_backbone(model_cfg, in_chans, img_size)
        self.heads = nn.ModuleList(nn.Linear(self.backbone.num_features, t.num_classes) for t in self.tasks)
        self.weighting = weighting
        self.fork = None  # ForkMerge's callback when weighting=forkmerge: then the steps are manual
        self.clip_val = None  # gradient clipping done by the module itself under manual optimisation
        self.acc = nn.ModuleDict(
            {
                stage: nn.ModuleList(MulticlassAccuracy(t.num_classes, average="micro") for t in self.tasks)
                for stage in ("val", "test")
            }
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        return [head(z) for z in [self.features(x)] for head in self.heads]

    def features(self, x: Tensor) -> Tensor:
        """The shared representation z (B, D): what gradient methods in `rep` mode differentiate against."""
        if x.dtype == torch.uint8:  # stored images travel as uint8 and are scaled on the device
            x = x.float().div_(127.5).sub_(1.0)
        return self.backbone(x)

    def task_losses(self, logits: list[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-task mean cross-entropy over the samples labelled for that task (-1 = unlabelled), and counts."""
        counts = (y >= 0).sum(0)
        sums = torch.stack(
            [F.cross_entropy(lg, y[:, k], ignore_index=-1, reduction="sum") for k, lg in enumerate(logits)]
        )
        return sums / counts.clamp(min=1), counts

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
        losses, counts = self.task_losses([head(z) for head in self.heads], y)
        self._check_finite(losses)
        if self.mixing == "sample":  # weights were spent on sampling: the loss is the plain mean over samples
            w = counts / counts.sum()
            loss = shown = (w * losses).sum()
        elif getattr(self.weighting, "gradient_based", False):
            # Heads train on their own task's loss; the backbone gets the method's combined gradient.
            heads_loss = self.task_losses([head(z.detach()) for head in self.heads], y)[0].sum()
            shared = [p for p in self.backbone.parameters() if p.requires_grad]
            loss, w = self.weighting.surrogate(losses, heads_loss, z, shared)
            shown = (w * losses).sum().detach()
        else:
            loss, w = self.weighting(losses)
            shown = loss
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

    def _forkmerge_step(self, batch) -> Tensor:
        """One step of every ForkMerge branch on this batch (manual optimisation; see mtl_lightning/forkmerge.py)."""
        x, y = batch
        opt = self.optimizers()
        shown = []
        for b in range(self.weighting.num_branches):
            self.fork.enter(b, self, opt.optimizer)
            self._reseed()  # every branch draws the randomness a plain run would at this step
            losses, _ = self.task_losses(self(x), y)
            self._check_finite(losses)
            loss, _ = self.weighting(losses)
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

    def on_train_epoch_end(self) -> None:
        self.weighting.on_train_epoch_end()

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        logits = self(x)
        losses, counts = self.task_losses(logits, y)
        for k, (t, lg) in enumerate(zip(self.tasks, logits)):
            mask = y[:, k] >= 0
            if mask.any():  # an MDL batch may hold no sample of this domain
                self.acc[stage][k].update(lg[mask], y[mask, k])
            self.log(f"{stage}/loss/{t.name}", losses[k], batch_size=max(1, int(counts[k])))

    def _eval_epoch_end(self, stage: str) -> None:
        accs = []
        for t, m in zip(self.tasks, self.acc[stage]):
            accs.append(m.compute())
            self.log(f"{stage}/acc/{t.name}", accs[-1])
            m.reset()
        self.log(f"{stage}/acc_mean", torch.stack(accs).mean(), prog_bar=stage == "val")

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
        elif c.name == "sgd":
            opt = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)
        else:
            raise MTLError(f"Unknown optim.name={c.name!r}. Valid choices: adamw, sgd.")
        if c.scheduler == "constant":
            return opt
        if c.scheduler != "cosine":
            raise MTLError(f"Unknown optim.scheduler={c.scheduler!r}. Valid choices: cosine, constant.")
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, c.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
