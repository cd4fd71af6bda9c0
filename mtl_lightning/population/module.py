"""N models trained as one: a population whose members share an architecture and differ in their scalarization
weights (and optionally their seed), stacked and vectorised with `torch.func` (`stack_module_state`, `vmap`,
`functional_call`). One process, one Trainer, one data pipeline and one validation pass train a whole weight grid
or PBT population; each member's computation is that of a standalone `weighting=fixed` run.

What a member is: the same `build_network` as `MultiTaskModule`, initialised under `torch.manual_seed(seed_i)` as a
standalone run of seed i is, its own optimiser state (AdamW, Adam and SGD are elementwise, so one optimiser over the
stacked tensors steps every member as its own would), its own gradient-norm clip, its own metrics. Members see the
same batch (`data.mixing=loss`), or each its own batch drawn with its own domain probabilities
(`data.mixing=sample`, `population.sampler.PopulationBatchSampler`). What cannot be vectorised stops at start-up
(`check_population`): BatchNorm running statistics, learned or gradient-level weightings, ForkMerge.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_map

from ..adapters import each_task, per_task
from ..console import warn
from ..errors import MTLError
from ..graph import MPNN
from ..model import TaskModel, compute_metrics, metric_directions, param_groups
from ..network import build_network, features, label_size
from ..tasks import Task


class Member(nn.Module):
    """One member's network: backbone, architecture and heads. `forward(x)` gives the task predictions;
    `forward(x, targets)` the task losses and labelled counts (one `functional_call` under `vmap` computes either)."""

    def __init__(self, backbone, arch, heads: nn.ModuleList, tasks: Sequence[Task], spatial: bool, vit: bool):
        super().__init__()
        self.backbone, self.arch, self.heads = backbone, arch, heads
        self._tasks, self._spatial, self._vit = list(tasks), spatial, vit

    def forward(self, x, targets: list[Tensor] | None = None):
        if per_task(self.backbone):  # per-task adapters: a pass per task through its own (MultiTaskModule.features)
            forward = lambda: self.arch(features(self.backbone, x, self._spatial, self._vit))  # noqa: E731
            reps = [r[k] for k, r in enumerate(each_task(self.backbone, len(self._tasks), forward))]
        else:
            reps = self.arch(features(self.backbone, x, self._spatial, self._vit))
        preds = [h(r, label_size(x)) for h, r in zip(self.heads, reps)]
        if targets is None:
            return tuple(preds)
        out = [t.loss(p, y) for t, p, y in zip(self._tasks, preds, targets)]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def _key(name: str) -> str:  # ParameterDict keys cannot hold dots
    return name.replace(".", "__")


class PopulationModule(TaskModel):
    def __init__(
        self,
        tasks: Sequence[Task],
        in_chans: int,
        img_size: int,
        model_cfg,
        optim_cfg,
        weights: Tensor,
        seeds: Sequence[int],
        mixing: str = "loss",
        seed: int = 0,
        hparams: dict | None = None,
        delta_base: dict[str, dict[str, float]] | None = None,
        delta_convention: str = "libmtl",
        chunk_size: int = 0,  # members per vectorised pass (0: all); halved on out-of-memory
        fused_attn: str = "auto",
        clip_val: float | None = None,
    ):
        super().__init__(tasks, model_cfg, optim_cfg, seed, hparams, delta_base, delta_convention)
        self.N, self.mixing, self.member_seeds = len(seeds), mixing, list(seeds)
        members = []
        for s in self.member_seeds:
            torch.manual_seed(s)  # what L.seed_everything(s) leaves for a standalone run's model
            members.append(
                Member(*build_network(self.tasks, in_chans, img_size, model_cfg), self.tasks, self.spatial, self.vit)
            )
            if len(members) == 1:  # before building the others
                check_vectorisable(members[0], model_cfg.backbone)
        params, buffers = stack_module_state(members)
        # A frozen tensor every member holds alike (a pretrained trunk from one file: model.checkpoint) is kept once,
        # each member reading it through a stride-0 view: N adapter sets beside one trunk, not N trunks. It is not
        # in the checkpoint: the config's source rebuilds it, as it built it here.
        self.trunk_names = [
            n for n, p in params.items() if not p.requires_grad and all(torch.equal(p[0], q) for q in p[1:])
        ]
        self.trunk = nn.Module()
        for n in self.trunk_names:
            self.trunk.register_buffer(_key(n), params.pop(n)[0].clone(), persistent=False)
        self.names = list(params)
        # frozen tensors that differ by member (a random trunk per seed) stay stacked, untrained as in a standalone run
        self.stacked = nn.ParameterDict(
            {_key(n): nn.Parameter(p, requires_grad=p.requires_grad) for n, p in params.items()}
        )
        self.stacked_buffers = nn.Module()
        for n, b in buffers.items():
            self.stacked_buffers.register_buffer(_key(n), b)
        self.buffer_names = list(buffers)
        # the structure without storage: functional_call runs it on each member's slice of the stacked tensors
        object.__setattr__(self, "_template", copy.deepcopy(members[0]).to("meta"))
        self.register_buffer("member_weights", weights.float().clone())  # (N, K), rows rewritten by PBT
        self.chunk = chunk_size if chunk_size > 0 else self.N
        self.fused_attn, self.clip_val = fused_attn, clip_val
        self.automatic_optimization = False  # a chunk's backward at a time, then one per-member-clipped step
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleList(self.make_stage_metrics() for _ in range(self.N)) for stage in ("val", "test")}
        )
        K = len(self.tasks)
        self._loss_sums = {stage: torch.zeros(self.N, K, dtype=torch.float64) for stage in ("val", "test")}
        self._loss_counts = {stage: torch.zeros(self.N, K, dtype=torch.float64) for stage in ("val", "test")}
        self.member_results: dict[str, list[dict[str, float]]] = {}  # stage -> each member's logged values

    # -- the vectorised network ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        fused = {"on": True, "off": False}.get(self.fused_attn, self.device.type == "cuda")
        if self.fused_attn == "auto" and self.device.type != "cuda":
            fused = False  # on CPU scaled_dot_product_attention has no vmap rule: a per-member loop, warning per step
        for m in self._template.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
        if fused:  # a device without the batching rule warns on every call: once is enough
            warnings.filterwarnings("once", message=".*There is a performance drop because we have not yet implemented")

    def _trunk_views(self, n: int) -> dict[str, Tensor]:
        """The shared frozen trunk as n members' (n, ...) tensors: stride-0 views of its one copy."""
        return {
            k: getattr(self.trunk, _key(k)).expand(n, *getattr(self.trunk, _key(k)).shape) for k in self.trunk_names
        }

    def _slices(self, sl: slice) -> tuple[dict, dict]:
        p = {n: self.stacked[_key(n)][sl] for n in self.names}
        p.update(self._trunk_views(len(range(*sl.indices(self.N)))))
        b = {n: getattr(self.stacked_buffers, _key(n))[sl] for n in self.buffer_names}
        return p, b

    def _vmap(self, sl: slice, x: Tensor, targets: list[Tensor] | None = None, per_member: bool = False):
        """The members in `sl` on a shared batch, or (per_member) each on its own slice of (n, B, ...) inputs."""
        p, b = self._slices(sl)
        dims = 0 if per_member else None

        def fn(p, b, x, targets):
            return functional_call(self._template, (p, b), (x, targets))

        return vmap(fn, in_dims=(0, 0, dims, dims), randomness="different")(p, b, x, targets)

    def member_forward(self, x: Tensor, sl: slice | None = None) -> list[Tensor]:
        """Every member's predictions on one shared batch: a list over tasks of (n, B, ...)."""
        return list(self._vmap(sl or slice(None), x))

    def _chunks(self):
        for i in range(0, self.N, self.chunk):
            yield slice(i, min(self.N, i + self.chunk))

    # -- training -----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        while True:
            try:
                return self._step(opt, batch)
            except torch.OutOfMemoryError:
                if self.chunk == 1:
                    raise MTLError(
                        "One population member alone does not fit in the device's memory: lower data.batch_size or "
                        "the model's size."
                    ) from None
                self.chunk = max(1, self.chunk // 2)  # fewer members per vectorised pass, then the same step again
                opt.zero_grad()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                warn(f"Out of memory: the population now steps {self.chunk} member(s) at a time.")
                self._reseed()

    def _step(self, opt, batch) -> Tensor:
        opt.zero_grad()
        x, y = batch
        per_member = self.mixing == "sample"  # the loader stacked each member's own batch: (N * B, ...)
        if per_member:
            x = tree_map(lambda t: t.view(self.N, -1, *t.shape[1:]), x)
        targets = self.targets(y)
        if per_member:
            targets = [t.view(self.N, -1, *t.shape[1:]) for t in targets]
        shown, rows = [], []
        for sl in self._chunks():
            xs = tree_map(lambda t, sl=sl: t[sl], x) if per_member else x
            ts = [t[sl] for t in targets] if per_member else targets
            losses, counts = self._vmap(sl, xs, ts, per_member)
            for i, row in zip(range(sl.start, sl.stop), losses.detach()):
                self._check_finite(row, f" of population member {i}")
            if per_member:  # the weights were spent on sampling: each member's plain mean over its samples
                w = counts / counts.sum(1, keepdim=True).clamp(min=1)
            else:
                w = self.member_weights[sl].to(losses)
            member_loss = (w * losses).sum(1)
            self.manual_backward(member_loss.sum())  # members' parameters are disjoint: each gets its own gradient
            shown.append(member_loss.detach())
            rows.append(losses.detach())
        if self.clip_val:  # fp16: the gradients are still scaled here (the scaler unscales in opt.step)
            scale = self.loss_scale()
            self._clip_per_member(self.clip_val if scale is None else self.clip_val * scale)
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        shown, losses = torch.cat(shown), torch.cat(rows)
        self.log("train/loss", shown.mean(), prog_bar=True)
        if self.loggers and self.global_step % self.trainer.log_every_n_steps == 0:
            row = {f"train/loss/m{i}": v for i, v in enumerate(shown.tolist())}
            for i, values in enumerate(losses.tolist()):
                row.update({f"train/loss/{t.name}/m{i}": v for t, v in zip(self.tasks, values)})
            for logger in self.loggers:
                logger.log_metrics(row, step=self.global_step)
        return shown.mean()

    def _clip_per_member(self, max_norm: float | Tensor) -> None:
        """Each member's gradient rescaled to norm <= max_norm (its own norm, as a standalone run clips)."""
        grads = [p.grad for p in self.stacked.values() if p.grad is not None]
        sq = sum(g.flatten(1).float().pow(2).sum(1) for g in grads)
        scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.ndim - 1)).to(g.dtype))

    def param_groups(self) -> list[dict]:
        return param_groups(self, self.optim_cfg.weight_decay, stacked=1)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._reseed()

    # -- evaluation ---------------------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        targets = self.targets(y)
        for sl in self._chunks():
            preds = self.member_forward(x, sl)
            for i in range(sl.start, sl.stop):
                mine = [p[i - sl.start] for p in preds]
                for k, (t, p, target) in enumerate(zip(self.tasks, mine, targets)):
                    t.update(self.metrics[stage][i][k], p, target)
                    loss, n = t.loss(p, target)
                    self._loss_sums[stage][i, k] += float(loss) * int(n)
                    self._loss_counts[stage][i, k] += int(n)

    def _eval_epoch_end(self, stage: str) -> None:
        results = []
        for i in range(self.N):
            r = self.stage_results(stage, compute_metrics(self.tasks, self.metrics[stage][i]))
            for k, t in enumerate(self.tasks):
                n = self._loss_counts[stage][i, k]
                r[f"loss/{t.name}"] = float(self._loss_sums[stage][i, k] / n) if n > 0 else float("nan")
            results.append(r)
            for m in self.metrics[stage][i]:
                for metric in m.values():
                    metric.reset()
        self._loss_sums[stage].zero_()
        self._loss_counts[stage].zero_()
        self.member_results[stage] = results
        directions = metric_directions(self.tasks, stage, stage in self.delta_base and self.delta_convention)
        for key in results[0]:
            for i, r in enumerate(results):
                self.log(f"{stage}/{key}/m{i}", r[key])
            # the plain name: the best member's value, by the metric's direction (what checkpoint.monitor reads)
            values = [r[key] for r in results]
            higher = directions.get(f"{stage}/{key}", True)
            self.log(
                f"{stage}/{key}", max(values) if higher else min(values), prog_bar=stage == "val" and key == "acc_mean"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tasks"] = [t.name for t in self.tasks]
        checkpoint["population"] = {"seeds": self.member_seeds, "names": self.names}

    # -- members as ordinary models -----------------------------------------------------------------------
    def stacked_state(self) -> dict[str, Tensor]:
        """The stacked (N, ...) parameters and buffers, under the names a `MultiTaskModule` gives them."""
        out = {n: self.stacked[_key(n)].detach() for n in self.names}
        out.update(self._trunk_views(self.N))
        out.update({n: getattr(self.stacked_buffers, _key(n)) for n in self.buffer_names})
        return out


def check_vectorisable(member: Member, backbone: str) -> None:
    """Refuse what a vmapped population cannot train as standalone runs would, naming it and the alternative."""
    if isinstance(member.backbone, MPNN):
        raise MTLError(
            "A population vectorises one batch tensor over its members; graph batches (PyG, a different size per "
            "molecule) are not. Train these runs separately (search.backend=ray or study.backend=ray)."
        )
    views = [t.name for t in member._tasks if t.view]
    if views:  # a view task runs its own forwards (and an EMA teacher): not one vmapped pass over a shared batch
        raise MTLError(
            f"Task(s) {views} read their own view of the input, which a vectorised population does not run. "
            "Train these runs separately (search.backend=ray or study.backend=ray)."
        )
    norms = [type(m).__name__ for m in member.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if norms:
        raise MTLError(
            f"model.backbone={backbone} has {norms[0]} layers, whose running statistics a vectorised population "
            "cannot update per member (in-place buffer updates under vmap). Train this grid as separate runs "
            "(search.backend=ray), or choose a backbone without BatchNorm (a ViT)."
        )
