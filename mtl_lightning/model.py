"""What every training mode shares: a timm backbone, a head per task/domain (`mtl_lightning.tasks`), the task
losses, metrics, evaluation and optimiser. The modes are subclasses of `TaskModel`, one place each:
`multitask.MultiTaskModule` (one model: sampled mixtures, loss weightings, gradient methods, ForkMerge's branches,
whose step lives in `forkmerge.py`) and `population.PopulationModule` (N models trained as one, vectorised).

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

from . import wrn  # noqa: F401  (registers wrn28_2 in timm)
from .errors import MTLError, NonFiniteLossError
from .tabular import EmbeddingBackbone, Fields
from .tasks import Binary, Classification, Task, delta_m

VIT_MODULES = ("vision_transformer", "deit")
TABULAR = ("embedding",)
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "step", "milestones", "constant")


def is_vit(name: str) -> bool:
    if name in TABULAR:
        return False
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1] in VIT_MODULES


def create_backbone(cfg, in_chans, img_size: int, spatial: bool = False) -> nn.Module:
    """A timm model by name, without classifier (`num_classes=0`), shaped by the ViT keys when it is a ViT; or, for
    tabular data (`in_chans` is then its `Fields`), the `embedding` backbone (`model.width` is its embedding size).

    `spatial`: the model must give a feature map for dense heads. ViTs do through `forward_intermediates`; other
    models are built with timm's `features_only=True` (their last stage).
    """
    name = cfg.backbone
    if isinstance(in_chans, Fields) or name in TABULAR:
        if not (isinstance(in_chans, Fields) and name in TABULAR):
            raise MTLError(
                f"model.backbone={name} does not read this data: tabular data needs model.backbone=embedding, and "
                "model.backbone=embedding needs tabular data (data=synthetic_recsys, data=aliexpress)."
            )
        return EmbeddingBackbone(in_chans, cfg.width or 128)
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


def build_network(tasks: Sequence[Task], in_chans, img_size: int, model_cfg):
    """The backbone, the architecture between it and the heads (`model.architecture`), one head per task."""
    from .architectures import create_architecture

    spatial = any(t.dense for t in tasks)
    backbone = create_backbone(model_cfg, in_chans, img_size, spatial)
    if spatial and not is_vit(model_cfg.backbone):  # a timm features_only model: its last stage
        channels, reduction = backbone.feature_info.channels()[-1], backbone.feature_info.reduction()[-1]
    else:
        channels, reduction = backbone.num_features, getattr(backbone, "patch_embed", None)
        reduction = reduction.patch_size[0] if reduction is not None else 1
    arch = create_architecture(model_cfg, channels, len(tasks), spatial)
    return backbone, arch, nn.ModuleList(t.head(arch.out_dim, spatial, reduction) for t in tasks)


def label_size(x):
    """The size dense heads resize to: an image batch's (H, W); None for tabular inputs."""
    return x.shape[-2:] if isinstance(x, Tensor) else None


def features(backbone: nn.Module, x, spatial: bool, vit: bool) -> Tensor:
    """The backbone's output: pooled (B, D), or the feature map (B, C, h, w) with dense tasks."""
    if isinstance(x, dict):  # tabular fields
        return backbone(x)
    if x.dtype == torch.uint8:  # stored images travel as uint8 and are scaled on the device
        x = x.float().div_(127.5).sub_(1.0)
    if not spatial:
        return backbone(x)
    if vit:  # the last block's patch tokens, final norm applied, as a map
        return backbone.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]
    return backbone(x)[-1]


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
    ):
        super().__init__()
        self.save_hyperparameters(hparams or {})
        self.tasks = list(tasks)
        self.optim_cfg, self.seed = optim_cfg, seed
        self.spatial = any(t.dense for t in self.tasks)  # dense heads need the backbone's feature map
        self.vit = is_vit(model_cfg.backbone)
        self.delta_base = delta_base or {}  # stage -> base results for Δm% (val/delta_m, test/delta_m)

    def targets(self, y) -> list[Tensor]:
        """Per-task targets from a batch's labels: columns of a (B, K) label tensor, or the given sequence."""
        return [y[:, k] for k in range(len(self.tasks))] if isinstance(y, Tensor) else list(y)

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
        aucs = [results[f"{t.name}/auc"] for t in self.tasks if isinstance(t, Binary)]
        if aucs:
            out["auc_mean"] = sum(aucs) / len(aucs)
        if stage in self.delta_base:
            out["delta_m"] = delta_m(results, self.delta_base[stage], self.tasks)
        return out

    # evaluation: each mode implements _eval_step(stage, batch) and _eval_epoch_end(stage)
    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

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


def metric_directions(tasks: Sequence[Task], stage: str = "val", delta: bool = False) -> dict[str, bool]:
    """Every metric the module logs at `stage`, mapped to whether higher is better."""
    out = {t.key(stage, m): higher for t in tasks for m, higher in t.metrics.items()}
    out.update({f"{stage}/loss/{t.name}": False for t in tasks})
    if any(_classifies(t) for t in tasks):
        out[f"{stage}/acc_mean"] = True
    if any(isinstance(t, Binary) for t in tasks):
        out[f"{stage}/auc_mean"] = True
    if delta:
        out[f"{stage}/delta_m"] = True
    return out


def default_monitor(tasks: Sequence[Task], delta: bool) -> str:
    """`checkpoint.monitor=auto`: val/delta_m with base results, else val/acc_mean with classification tasks, else
    val/auc_mean with binary tasks, else the first task's primary metric (so a single-task baseline of any task has
    one)."""
    if delta:
        return "val/delta_m"
    if any(_classifies(t) for t in tasks):
        return "val/acc_mean"
    if any(isinstance(t, Binary) for t in tasks):
        return "val/auc_mean"
    return tasks[0].key("val", tasks[0].primary)


def higher_is_better(metric: str, tasks: Sequence[Task], delta: bool, key: str) -> bool:
    """The direction of `metric`, or a clear error naming `key` and the metrics there are."""
    stage = metric.split("/", 1)[0]
    directions = metric_directions(tasks, stage if stage in ("val", "test") else "val", delta)
    if metric not in directions:
        hint = "" if delta else " (val/delta_m needs base results: delta_m.runs or delta_m.base)"
        raise MTLError(f"{key}={metric!r} is not a logged metric{hint}. Valid choices: {', '.join(directions)}.")
    return directions[metric]
