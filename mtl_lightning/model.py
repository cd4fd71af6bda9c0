"""What every training mode shares: a timm backbone, a head per task/domain (`mtl_lightning.tasks`), the task
losses, metrics, evaluation and optimiser. The modes are subclasses of `TaskModel`, one place each:
`multitask.MultiTaskModule` (one model: sampled mixtures, loss weightings, gradient methods, ForkMerge's branches,
whose step lives in `forkmerge.py`) and `population.PopulationModule` (N models trained as one, vectorised).

A batch is `(x, y)`: y is a (B, K) tensor of class labels when every task is classification (-1 = unlabelled), or
a sequence of K per-task targets otherwise (a label map, a depth map, ...). Each task computes its own masked loss
and metrics; the weighting sees the K losses.
"""

from __future__ import annotations

import math
from argparse import Namespace
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from .errors import MTLError, NonFiniteLossError
from .network import is_vit
from .tasks import Binary, Classification, Task, delta_m

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "step", "milestones", "plateau", "constant")


def param_groups(module: nn.Module, weight_decay: float, stacked: int = 0) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms and the weighting's scales. `stacked`: leading
    dimensions that stack copies of a parameter (a population's members), not part of its shape."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim - stacked >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim - stacked < 2], "weight_decay": 0.0},
    ]


def cosine_with_warmup(total: int, warmup: float):
    warm = int(warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


class TaskModel(L.LightningModule):
    """The tasks, their metrics and Δm% base, the optimiser and the per-step reseeding every training mode shares."""

    def __init__(
        self,
        tasks: Sequence[Task],
        model_cfg,
        optim_cfg,
        seed: int = 0,
        hparams: dict | None = None,
        delta_base: dict[str, dict[str, float]] | None = None,
        delta_convention: str = "libmtl",
    ):
        super().__init__()
        # the config (a plain dict) goes into every checkpoint; build_loggers logs it once, so not again at each fit,
        # validate and test (logger=False: a YAML dump of the whole config each). As a Namespace: Lightning compares
        # what it is given with every init argument, and a DictConfig's == converts a dict to compare (~0.1 s a run)
        self.save_hyperparameters(Namespace(**(hparams or {})), logger=False)
        self.tasks = list(tasks)
        self.optim_cfg, self.seed = optim_cfg, seed
        self.spatial = any(t.dense for t in self.tasks)  # dense heads need the backbone's feature map
        self.vit = is_vit(model_cfg.backbone)
        self.delta_base = delta_base or {}  # stage -> base results for Δm% (val/delta_m, test/delta_m)
        self.delta_convention = delta_convention
        self.monitor, self.maximise = "val/loss", False  # what best.ckpt and a plateau schedule go by (train sets them)

    def targets(self, y) -> list[Tensor]:
        """Per-task targets from a batch's labels: columns of a (B, K) label tensor, or the given sequence. A float
        label tensor's class-id columns become int64 (NaN = -1), its regression columns stay float."""
        if not isinstance(y, Tensor):
            return list(y)
        cols = [y[:, k] for k in range(len(self.tasks))]
        if y.is_floating_point():
            cols = [c if t.target_dtype == "float" else c.nan_to_num(-1).long() for t, c in zip(self.tasks, cols)]
        return cols

    def task_losses(self, preds: list[Tensor], y) -> tuple[Tensor, Tensor]:
        """Each task's mean loss over its labelled samples (or pixels), and the samples labelled for it."""
        out = [t.loss(p, target) for t, p, target in zip(self.tasks, preds, self.targets(y))]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._reseed()

    def _reseed(self) -> None:
        # Randomness (dropout, drop-path) depends only on (seed, step), so a resumed run replays it exactly.
        # Only the generators in use: torch.manual_seed also queues lazy seeding of every backend (~2 ms a call).
        seed = self.seed * 1_000_003 + self.global_step
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def loss_scale(self) -> Tensor | None:
        """fp16's current loss scale as a tensor (no host sync), or None when no GradScaler runs (fp32, bf16). What
        a backward the Trainer does not scale itself must multiply by (per-task gradients, per-member clipping)."""
        trainer = getattr(self, "_trainer", None)
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler.scale(torch.ones((), device=self.device))

    def _check_finite(self, losses: Tensor, member: str = "") -> None:
        """`losses` (K,) of one model; `member` names it in a population."""
        if not torch.isfinite(losses).all():
            bad = [t.name for t, v in zip(self.tasks, losses.tolist()) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"The training loss of task(s) {bad}{member} became NaN/inf at step {self.global_step} (epoch "
                f"{self.current_epoch}); training stopped. Try a lower optim.lr, gradient clipping "
                "(trainer.gradient_clip_val=1.0) or precision=32-true, and check that task's data. "
                "Checkpoints written before this step are intact and can be resumed."
            )

    def make_stage_metrics(self) -> nn.ModuleList:
        return nn.ModuleList(t.make_metrics() for t in self.tasks)

    def stage_results(self, stage: str, results: dict[str, float]) -> dict[str, float]:
        """The logged values of one model's metrics at `stage`: each task's, acc_mean, Δm% (named without stage)."""
        out = dict(results)
        accs = [results[f"acc/{t.name}"] for t in self.tasks if _classifies(t)]
        if accs:
            out["acc_mean"] = sum(accs) / len(accs)
        for m in ("auc", "f1"):  # the binary tasks' mean AUC (recommendation), F1 (CelebA as FAMO)
            values = [results[f"{t.name}/{m}"] for t in self.tasks if isinstance(t, Binary) and m in t.metrics]
            if values:
                out[f"{m}_mean"] = sum(values) / len(values)
        if stage in self.delta_base:
            out["delta_m"] = delta_m(results, self.delta_base[stage], self.tasks, self.delta_convention)
        return out

    # evaluation: each mode implements _eval_step(stage, batch) and _eval_epoch_end(stage)
    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_reseed(batch_idx)
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_reseed(batch_idx)
        self._eval_step("test", batch)

    def _eval_reseed(self, batch_idx: int) -> None:
        # An evaluation that draws (Exemplar's augmented views) depends only on (seed, batch), not on what trained
        # before it: `evaluate` of a checkpoint then gives the run's numbers. Training reseeds at every step anyway.
        torch.default_generator.manual_seed(self.seed * 1_000_003 + 999_983 + batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def param_groups(self) -> list[dict]:
        return param_groups(self, self.optim_cfg.weight_decay)

    def configure_optimizers(self):
        c = self.optim_cfg
        groups = self.param_groups()
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
        if c.scheduler == "plateau":  # x gamma after `patience` epochs without a better monitored value (QM9's)
            mode = "max" if self.maximise else "min"
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode, c.gamma, c.patience, min_lr=c.min_lr)
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": self.monitor, "interval": "epoch"},
            }
        total = int(self.trainer.estimated_stepping_batches)
        if c.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, c.warmup))
        elif c.scheduler == "step":  # x gamma every step_epochs epochs, as MTAN/LibMTL/ForkMerge on NYUv2
            every = c.step_epochs * max(1, total // max(1, self.trainer.max_epochs))
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=c.gamma)
        elif c.scheduler == "milestones":  # x gamma at each fraction of the steps (ARML: x 0.2 at 160k of 200k)
            marks = [max(1, int(f * total)) for f in c.milestones]
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=c.gamma)
        else:
            raise MTLError(f"Unknown optim.scheduler={c.scheduler!r}. Valid choices: {', '.join(SCHEDULERS)}.")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _classifies(task: Task) -> bool:
    """A classification task of the data (what acc_mean averages), not a self-supervised one (rotation)."""
    return isinstance(task, Classification) and not task.view


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


def metric_directions(tasks: Sequence[Task], stage: str = "val", delta: bool | str = False) -> dict[str, bool]:
    """Every metric the module logs at `stage`, mapped to whether higher is better. `delta`: Δm is logged, in the
    convention it names (True: libmtl's, higher is better)."""
    out = {t.key(stage, m): higher for t in tasks for m, higher in t.metrics.items()}
    out.update({f"{stage}/loss/{t.name}": False for t in tasks})
    if any(_classifies(t) for t in tasks):
        out[f"{stage}/acc_mean"] = True
    for m in ("auc", "f1"):
        if any(isinstance(t, Binary) and m in t.metrics for t in tasks):
            out[f"{stage}/{m}_mean"] = True
    if delta:
        out[f"{stage}/delta_m"] = delta != "nashmtl"
    return out


def default_monitor(tasks: Sequence[Task], delta: bool) -> str:
    """`checkpoint.monitor=auto`: val/delta_m with base results, else val/acc_mean with classification tasks, else
    val/auc_mean with binary tasks, else the first task's primary metric (so a single-task baseline of any task has
    one)."""
    if delta:
        return "val/delta_m"
    if any(_classifies(t) for t in tasks):
        return "val/acc_mean"
    if any(isinstance(t, Binary) and "f1" in t.metrics for t in tasks):
        return "val/f1_mean"
    if any(isinstance(t, Binary) for t in tasks):
        return "val/auc_mean"
    return tasks[0].key("val", tasks[0].primary)


def higher_is_better(metric: str, tasks: Sequence[Task], delta: bool | str, key: str) -> bool:
    """The direction of `metric`, or a clear error naming `key` and the metrics there are."""
    stage = metric.split("/", 1)[0]
    directions = metric_directions(tasks, stage if stage in ("val", "test") else "val", delta)
    if metric not in directions:
        hint = "" if delta else " (val/delta_m needs base results: delta_m.runs or delta_m.base)"
        raise MTLError(f"{key}={metric!r} is not a logged metric{hint}. Valid choices: {', '.join(directions)}.")
    return directions[metric]
