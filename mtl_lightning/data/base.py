"""Task/domain mixtures as LightningDataModules.

One batch format serves multi-task (MTL) and multi-domain (MDL) data: `(x, y)` with `y` of shape (B, K), one
column per task/domain head and -1 where a sample carries no label for that head. An MTL sample is labelled for
every task; an MDL sample only for its own domain. The model therefore needs no MTL/MDL switch, and partially
labelled data (only some tasks per sample) works the same way.

Each split dataset also exposes `domains` (N,), the domain index of every sample (all 0 for MTL), which the
`MixtureSampler` uses to draw batches from a weighted mixture of domains (`data.mixing=sample`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..console import warn
from ..errors import MTLError
from ..registry import Registry
from ..tasks import Task
from . import ssl

DATASETS: Registry = Registry("dataset", "data")


class Split:
    """What every split dataset offers besides indexing: `labels` (N, K), `domains` (N,), and `take`."""

    labels: Tensor
    domains: Tensor

    def take(self, rows: Tensor, labels: Tensor, domains: Tensor):  # the samples `rows`, relabelled
        raise NotImplementedError

    def subset(self, rows: Tensor):
        return self.take(rows, self.labels[rows], self.domains[rows])

    def select(self, keep: list[int], mdl: bool):
        """Keep the label columns `keep`, and the samples labelled for at least one of them."""
        labels = self.labels[:, keep]
        rows = (~labels.isnan() if labels.is_floating_point() else labels >= 0).any(1).nonzero().squeeze(1)
        domains = self.domains[rows]
        if mdl:  # domain d is head d: renumber the kept domains 0..len(keep)-1
            remap = torch.full((int(self.domains.max()) + 1,), -1, dtype=torch.long)
            remap[torch.as_tensor(keep)] = torch.arange(len(keep))
            domains = remap[domains]
        return self.take(rows, labels[rows], domains)


class LabelledTensors(Dataset, Split):
    """An in-memory split: images (N, C, H, W) of any dtype, labels (N, K), domains (N,).

    Labels are integers (class ids, -1 = unlabelled; int8 is kept as int8, for tens of millions of log rows) or
    floating point, one column per task: a regression task's number (NaN = none) beside class ids held as whole
    numbers (NaN or -1 = none). Batches carry int64 or float32 labels; the module casts each column to its task's
    `target_dtype`. Setup refuses a float label for a classification task and integer labels for a regression one.

    `images` may also be a dict of (N, ...) tensors (tabular data: {"cat": ids, "num": values}); a sample is then
    the dict of its rows. `rows` maps sample i to images[rows[i]]. Memory-mapped inputs (a decoded-image or parsed
    CSV cache) carry it, so that selecting tasks or holding out a split indexes the file instead of copying it.
    """

    def __init__(self, images: Tensor | dict[str, Tensor], labels: Tensor, domains: Tensor, rows: Tensor | None = None):
        n = len(next(iter(images.values()))) if isinstance(images, dict) else len(images)
        assert len(labels) == len(domains) == (n if rows is None else len(rows))
        # int8 labels and domains stay int8 (tens of millions of log rows); batches get int64 (or float32) labels
        small = lambda t: t if t.dtype == torch.int8 else t.long()  # noqa: E731
        labels = labels.float() if labels.is_floating_point() else small(labels)
        self.images, self.labels, self.domains, self.rows = images, labels, small(domains), rows

    def __len__(self) -> int:
        return len(self.labels)

    def _inputs(self, i):
        r = i if self.rows is None else self.rows[i]
        return {k: v[r] for k, v in self.images.items()} if isinstance(self.images, dict) else self.images[r]

    def _labels(self, i):
        y = self.labels[i]
        return y if y.is_floating_point() else y.long()

    def __getitem__(self, i):
        return self._inputs(i), self._labels(i)

    def __getitems__(self, idx: list[int]):  # DataLoader's batched fetch: one gather instead of B items + collate
        idx = torch.as_tensor(idx)
        return self._inputs(idx), self._labels(idx)

    def take(self, rows: Tensor, labels: Tensor, domains: Tensor) -> LabelledTensors:
        if self.rows is None and not isinstance(self.images, dict):
            return LabelledTensors(self.images[rows], labels, domains)
        base = torch.arange(len(self.labels)) if self.rows is None else self.rows
        return LabelledTensors(self.images, labels, domains, base[rows])


def holdout(ds, fraction: float, seed: int):
    """Split `ds` into (train, held-out) by a fixed permutation per domain, `fraction` of each domain to train.

    Per domain, so every domain keeps its share; seeded per domain, so a domain's split does not depend on which
    other domains are loaded.
    """
    keep, held = [], []
    for d in ds.domains.unique().tolist():
        rows = (ds.domains == d).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1_000_003 + d))]
        n = round(fraction * len(rows))
        keep.append(rows[:n])
        held.append(rows[n:])
    return ds.subset(torch.cat(keep).sort().values), ds.subset(torch.cat(held).sort().values)


def check_labels(split, tasks: list[Task], where: str) -> None:
    """A (N, K) label tensor's columns agree with their tasks' `target_dtype`: no class id with a fraction (it would
    be truncated), no regression target stored as an integer (its -1 would be read as a value)."""
    labels = getattr(split, "labels", None)
    if not isinstance(labels, Tensor) or labels.ndim != 2 or labels.shape[1] != len(tasks):
        return
    for k, t in enumerate(tasks):
        if t.target_dtype == "float" and not labels.is_floating_point():
            raise MTLError(
                f"{where}: task {t.name!r} is {type(t).__name__}, a number per sample, but its labels are "
                f"{str(labels.dtype).replace('torch.', '')}: regression targets are floats with NaN = none (in an "
                "integer column -1 would be read as a target). Give the split float labels (e.g. torch.float32, "
                "class ids as whole numbers beside them)."
            )
        classes = getattr(t, "num_classes", None)
        if classes is not None and len(labels):  # a class id out of range: IndexError deep in the first step
            top = labels[:, k].nan_to_num(-1).max() if labels.is_floating_point() else labels[:, k].max()
            if int(top) >= classes:
                i = int((labels[:, k] == top).nonzero()[0, 0])
                raise MTLError(
                    f"{where}: task {t.name!r} has {classes} classes (ids 0 to {classes - 1}, -1 = none), but row {i} "
                    f"holds class {int(top)}. Fix the labels, or the number of classes the dataset declares."
                )
        if t.target_dtype == "long" and labels.is_floating_point():
            col = labels[:, k]
            bad = (col != col.floor()) & ~col.isnan() | (col < -1)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise MTLError(
                    f"{where}: task {t.name!r} is {type(t).__name__}, whose labels are class ids, but row {i} holds "
                    f"{float(col[i]):g}: a class id is a whole number >= 0 (-1 or NaN = none). For a number per "
                    "sample, declare the task as Regression in describe()."
                )


def collate_batched(batch):
    """Collate for datasets with `__getitems__`: the batch arrives already stacked."""
    return batch


class MixtureSampler(Sampler[int]):
    """Sample indices of one training epoch, deterministic in (seed, epoch), shardable across ranks, resumable.

    With `probs=None` an epoch is a shuffle of the split (cycled if `num_samples` exceeds it). With `probs`, each
    sample is drawn from domain k with probability probs[k], then taken from that domain's own shuffled stream: the
    mixture `sum_k p_k D_k` of Royer et al. A domain with probability 0 is never drawn.
    """

    def __init__(
        self,
        domains: Tensor,
        probs: Tensor | None,
        num_samples: int | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.domains, self.probs, self.seed = domains, probs, seed
        self.num_samples = num_samples or len(domains)
        self.rank, self.world_size = rank, world_size
        self.epoch, self._resume = 0, (-1, 0)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        """Skip the first `skip` samples of `epoch` (they were trained on before the checkpoint)."""
        self._resume = (epoch, skip)

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    @staticmethod
    def _stream(pool: Tensor, n: int, g: torch.Generator) -> Tensor:
        reps = -(-n // len(pool))
        return torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(reps)])[:n]

    def indices(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.num_samples - self.num_samples % self.world_size
        if self.probs is None:
            return self._stream(torch.arange(len(self.domains)), n, g)
        draw = torch.multinomial(self.probs.double(), n, replacement=True, generator=g)
        out = torch.empty(n, dtype=torch.long)
        for d in range(len(self.probs)):
            slots = (draw == d).nonzero().squeeze(1)
            if len(slots):
                out[slots] = self._stream((self.domains == d).nonzero().squeeze(1), len(slots), g)
        return out

    def __iter__(self):
        idx = self.indices(self.epoch)[self.rank :: self.world_size]
        if self._resume[0] == self.epoch:
            idx = idx[self._resume[1] :]
        for part in idx.split(1 << 16):  # not one Python int per sample of a tens-of-millions-row epoch at once
            yield from part.tolist()


class StratifiedOrder(Sampler[int]):
    """Every sample of an evaluation split once, its domains interleaved in proportion to their sizes. A split is
    stored domain after domain, so in that order a first batch (`trainer.limit_val_batches`, ForkMerge's
    `val_batches`, a method's meta-batch) would hold one domain and score the others on nothing; in this order any
    first k samples hold each domain's share of them, to within (D + 1) / 2 samples for D domains (sample j of a
    domain of n comes at (j + 1/2) / n of the way through)."""

    def __init__(self, domains: Tensor):
        d = domains.long()
        n = torch.bincount(d)
        grouped = torch.sort(d, stable=True)
        pos = torch.empty_like(d)  # each sample's place within its domain
        pos[grouped.indices] = torch.arange(len(d)) - (n.cumsum(0) - n)[grouped.values]
        self.order = torch.sort((pos + 0.5).double() / n[d], stable=True).indices  # ties: the lower index first

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order.tolist())


class _BatchesSampler(Sampler[list[int]]):
    """Whole batches per step, one row per branch or member (`probs`), deterministic in (seed, epoch) through
    `batches(epoch)` -> (steps, rows, batch_size), resumable at a batch."""

    def __init__(self, domains: Tensor, probs: Tensor, batch_size: int, num_batches: int, seed: int):
        self.domains, self.probs, self.batch_size = domains, probs, batch_size
        self.num_batches, self.seed = num_batches, seed
        self.epoch, self._resume = 0, (-1, 0)
        self.sampler = self  # Lightning calls set_epoch on `loader.batch_sampler.sampler`, not on the batch sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        """Skip the first `skip` batches of `epoch`."""
        self._resume = (epoch, skip)

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int) -> Tensor:
        raise NotImplementedError

    def __iter__(self):
        # A generator, so the epoch is read at the first batch: on a resume Lightning makes the iterator before it
        # calls set_epoch (an eager iterator drew epoch 0's batches in a later epoch's place)
        out = self.batches(self.epoch)
        start = self._resume[1] if self._resume[0] == self.epoch else 0
        yield from out[start:].flatten(1).tolist()


class BranchBatchSampler(_BatchesSampler):
    """ForkMerge on a domain mixture, as its reference code samples: each branch draws its own batches.

    For every step and every branch b, one domain d is drawn with branch b's probabilities probs[b] and a whole
    batch is taken from d's own shuffled stream (per branch: the branches see independent data). A step's batch is
    the branches' batches concatenated, branch 0 first; the module splits it. Deterministic in (seed, epoch),
    resumable at a batch; a domain with probability 0 in a branch is never drawn for it.
    """

    def batches(self, epoch: int) -> Tensor:
        """(num_batches, branches, batch_size) sample indices of `epoch`."""
        n, B = self.num_batches, self.batch_size
        out = torch.empty(n, len(self.probs), B, dtype=torch.long)
        for b, p in enumerate(self.probs):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1009 + b)
            draw = torch.multinomial(p.double(), n, replacement=True, generator=g)
            for d in range(len(p)):
                slots = (draw == d).nonzero().squeeze(1)
                if len(slots):
                    pool = (self.domains == d).nonzero().squeeze(1)
                    out[slots, b] = MixtureSampler._stream(pool, len(slots) * B, g).view(len(slots), B)
        return out


class PopulationBatchSampler(_BatchesSampler):
    """A population's members on a domain mixture (`data.mixing=sample`): each member its own batch, drawn with its
    own domain probabilities, from pools shared across members.

    For every step, each member i draws the domain of each of its B slots with probabilities probs[i]; per domain d,
    one pool of max_i n_id samples is taken from d's shuffled stream, and member i takes the first n_id of it. So a
    member's share of each domain follows its p (the counts are multinomial), members overlap where they draw the
    same domain (common random numbers: differences between members come from their weights, not their samples),
    and the loader fetches each sample once per step. A step's batch is the members' batches concatenated, member 0
    first. Deterministic in (seed, epoch), resumable at a batch.
    """

    def batches(self, epoch: int) -> Tensor:
        """(num_batches, members, batch_size) sample indices of `epoch`."""
        S, B, (N, K) = self.num_batches, self.batch_size, self.probs.shape
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        draw = torch.stack([torch.multinomial(p.double(), S * B, replacement=True, generator=g) for p in self.probs])
        draw = draw.view(N, S, B)
        out = torch.empty(N, S, B, dtype=torch.long)
        for d in range(K):
            slot = draw == d
            need = slot.sum(2).amax(0)  # (S,): the pool of domain d each step, the largest member's share
            if need.sum() == 0:
                continue
            pool = MixtureSampler._stream((self.domains == d).nonzero().squeeze(1), int(need.sum()), g)
            rank = slot.long().cumsum(2) - 1  # a slot's place among its member's d-slots of that step
            where = (need.cumsum(0) - need)[None, :, None] + rank
            out[slot] = pool[where[slot]]
        return out.transpose(0, 1)


class MultiInputBatchSampler(_BatchesSampler):
    """Multi-input batches (LibMTL's Office trainer): each step takes `batch_size` samples of every domain, each from
    its own shuffled stream, started over when a shorter domain runs out. Deterministic in (seed, epoch)."""

    def batches(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        S, B = self.num_batches, self.batch_size
        pools = [(self.domains == d).nonzero().squeeze(1) for d in range(int(self.domains.max()) + 1)]
        rows = [MixtureSampler._stream(p, S * B, g).view(S, B) for p in pools if len(p)]
        return torch.cat(rows, 1)[:, None]


class SemiSupervisedBatchSampler(_BatchesSampler):
    """Semi-supervised batches: `labelled_share` of each from the labelled images' shuffled stream, the rest from the
    unlabelled images' (data/ssl.py). Deterministic in (seed, epoch), resumable at a batch."""

    def __init__(self, labelled: Tensor, size: int, cfg, num_batches: int, seed: int):
        super().__init__(torch.zeros(0), torch.zeros(1, 1), cfg.batch_size, max(1, num_batches), seed)
        mask = torch.ones(size, dtype=torch.bool)
        mask[labelled] = False
        self.labelled, self.unlabelled = labelled, mask.nonzero().squeeze(1)
        if not len(self.unlabelled):  # every image kept its label: all of each batch is labelled
            self.unlabelled = labelled
        self.n_l = min(cfg.batch_size - 1, max(1, round(cfg.labelled_share * cfg.batch_size)))

    def batches(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        S, n_l, n_u = self.num_batches, self.n_l, self.batch_size - self.n_l
        lab = MixtureSampler._stream(self.labelled, S * n_l, g).view(S, n_l)
        unl = MixtureSampler._stream(self.unlabelled, S * n_u, g).view(S, n_u)
        return torch.cat([lab, unl], 1)[:, None]


@dataclass
class DataConfig:
    name: str = "digits"
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    drop_last: bool = False  # drop each training epoch's last, partial batch (LibMTL's loaders; BatchNorm needs 2)
    # loss: weights scale the domain losses; sample: weights are domain sampling probs; multi_input: every batch holds
    # batch_size samples of each domain (LibMTL's multi-input trainer)
    mixing: str = "loss"
    tasks: list[str] | None = None  # train on a subset of tasks/domains; one name = single-task baseline
    epoch_size: int | None = None  # training samples per epoch; default: the training split's size
    train_fraction: float = 1.0  # < 1: hold out the rest of the training split (seeded, per domain) as `val`
    split_seed: int = 0  # fixes generated data and held-out splits, independent of the training seed
    # semi-supervised learning (ARML's protocol after Oliver et al. 2018; data/ssl.py): self-supervised tasks on every
    # image, `val_count` training images held out as validation, `labels_per_class` labels kept per class (balanced,
    # seeded), the rest of train unlabelled; each batch `labelled_share` labelled
    aux_tasks: list[str] = field(default_factory=list)  # rotation, exemplar
    val_count: int | None = None
    labels_per_class: int | None = None
    labelled_share: float = 0.5
    augment_ops: list[str] = field(default_factory=list)  # training batches, on the device: flip, translate, noise


class MixtureDataModule(L.LightningDataModule):
    """A task/domain mixture. Subclass it with a dataclass `Config(DataConfig)` (its `name` the registered name, one
    typed field per option: `data.root=...`), register it with `@DATASETS.register("name")`, and `data=name` builds it
    (examples/folder_dataset.py).

    To implement: `describe() -> [Task]` (called in `__init__`: read what it needs before `super().__init__`),
    `load() -> {"train": split, "test": split[, "val": split]}` with every task's label column, and optionally
    `check()` to fail early, before a run folder exists, when files are missing (one paragraph: where to get them,
    where to put them). Set `kind` ("mtl": every sample labelled for every task; "mdl": one domain and head per
    sample), `in_chans` and `img_size`. A split is `LabelledTensors(images (N, C, H, W) any dtype (uint8 is scaled to
    [-1, 1] on the device), labels (N, K): class ids with -1 = none, or floats with NaN = none where a task is a
    number (see LabelledTensors), domains (N,))`, or any Dataset with those attributes.

    What the framework provides: `data.tasks` subsets, `train_fraction`/`val_count` hold-outs when there is no
    official validation split, sampled mixtures (`data.mixing=sample`), semi-supervised splits and augmentations,
    resumable samplers deterministic in (seed, epoch), DDP sharding. `load` runs once, in `setup`.
    """

    Config = DataConfig
    kind: str = "mtl"  # "mtl": every sample labelled for every task; "mdl": one domain (and head) per sample
    in_chans: int = 3
    img_size: int = 32

    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        if cfg.mixing not in ("loss", "sample", "multi_input"):
            raise MTLError(f"Unknown data.mixing={cfg.mixing!r}. Valid choices: loss, sample, multi_input.")
        if cfg.mixing != "loss" and self.kind != "mdl":
            raise MTLError(
                f"data.mixing={cfg.mixing} draws batches by domain, but data={cfg.name} is multi-task "
                "(every sample has every label): use data.mixing=loss."
            )
        for key in ("batch_size", "eval_batch_size"):
            if getattr(cfg, key) < 1:
                raise MTLError(f"data.{key}={getattr(cfg, key)} must be at least 1.")
        if cfg.num_workers < 0:
            raise MTLError(f"data.num_workers={cfg.num_workers} must be >= 0 (0 loads in the training process).")
        if not 0.0 < cfg.train_fraction <= 1.0:
            raise MTLError(f"data.train_fraction={cfg.train_fraction} must be within (0, 1].")
        self.all_tasks = self.describe()
        self.all_tasks += ssl.auxiliary_tasks(cfg, self)
        names = [t.name for t in self.all_tasks]
        if cfg.tasks is not None and len(cfg.tasks) == 0:
            raise MTLError(f"data.tasks=[] selects no task/domain: name at least one of {names}.")
        chosen = cfg.tasks or names
        bad = [t for t in chosen if t not in names]
        if bad:
            raise MTLError(f"Unknown task {bad[0]!r} in data.tasks={list(chosen)}; valid: {', '.join(names)}.")
        if len(set(chosen)) != len(chosen):
            twice = sorted({t for t in chosen if list(chosen).count(t) > 1})
            raise MTLError(f"data.tasks={list(chosen)} names {', '.join(twice)} twice; each task may appear once.")
        self.keep = [names.index(t) for t in chosen]
        self.n_base = len(self.all_tasks) - len(cfg.aux_tasks)  # the dataset's own tasks, then self-supervised ones
        if all(i >= self.n_base for i in self.keep):
            raise MTLError(
                f"data.tasks={list(chosen)} holds only self-supervised task(s), which serve the dataset's own tasks "
                f"and have nothing to serve alone: add at least one of {', '.join(names[: self.n_base])} (e.g. "
                f"data.tasks=[{names[0]},{chosen[0]}])."
            )
        self.keep.sort(key=lambda i: i >= self.n_base)  # the dataset's tasks first: their columns come first
        self.tasks = [self.all_tasks[i] for i in self.keep]
        self.probs: Tensor | None = None  # set by the runner for data.mixing=sample
        self.branch_probs: Tensor | None = None  # ForkMerge with data.mixing=sample: one row per branch
        self.population_probs: Tensor | None = None  # a population with data.mixing=sample: one row per member
        self.splits: dict[str, LabelledTensors] | None = None
        self._sampler: MixtureSampler | BranchBatchSampler | PopulationBatchSampler | None = None
        self._consumed = (0, 0)  # (epoch, training batches consumed in it): what a mid-epoch resume skips

    # -- to implement -------------------------------------------------------------------------------------
    def describe(self) -> list[Task]:
        raise NotImplementedError

    def load(self) -> dict[str, Split]:
        """The official splits, with label columns for all of `describe()`'s tasks: `train` and `test`, and
        `val` where the dataset has an official validation split."""
        raise NotImplementedError

    def check(self) -> None:
        """Fail early, before a run directory is made, when the data is not there (downloading it if asked)."""

    # -- Lightning hooks ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            splits = self.load()
            if self.cfg.val_count:  # ARML: a seeded count of training images validates
                splits["train"], splits["val"] = ssl.hold_out(splits["train"], self.cfg.val_count, self.cfg.split_seed)
            if self.cfg.train_fraction < 1:  # the ranking split: part of train, never the test split
                splits["train"], splits["val"] = holdout(splits["train"], self.cfg.train_fraction, self.cfg.split_seed)
            elif "val" not in splits:
                warn(
                    f"data={self.cfg.name} has no official validation split and data.train_fraction=1: validating "
                    "on the test split. Choosing checkpoints or hyperparameters on it tunes on the test set; set "
                    "data.train_fraction < 1 to hold out part of the training split instead."
                )
                splits["val"] = splits["test"]
            for name, split in splits.items():
                check_labels(split, self.all_tasks[: self.n_base], f"data={self.cfg.name}'s {name} split")
            base = [i for i in self.keep if i < self.n_base]
            if base != list(range(self.n_base)):
                splits = {k: v.select(base, self.kind == "mdl") for k, v in splits.items()}
            if any(i >= self.n_base for i in self.keep):  # every image, for the chosen self-supervised tasks
                splits = ssl.with_auxiliary_labels(splits, len(self.tasks))
            if self.cfg.labels_per_class is not None:  # semi-supervised: most of train loses its class labels
                splits["train"], self._labelled = ssl.keep_labels(splits["train"], self.tasks, self.cfg)
            self.splits = splits

    def check_epoch(self, world_size: int = 1) -> None:
        """Refuse, before a run folder exists, a configuration whose training epoch has no step: the run would end
        at once, report untrained metrics and leave nothing to resume or evaluate. Counts as train_dataloader does."""
        self.setup("fit")
        c, n_split = self.cfg, len(self.splits["train"])
        plain = c.mixing == "loss" and c.labels_per_class is None  # a DataLoader over MixtureSampler, sharded by rank
        n = (c.epoch_size or n_split) // (world_size if plain else 1)
        steps = n // c.batch_size if c.drop_last and plain else -(-n // c.batch_size)
        if c.mixing == "multi_input" and c.drop_last and n_split:  # whole batches of each domain: the largest's
            steps = int(torch.bincount(self.splits["train"].domains.long()).max()) // c.batch_size
        if n_split and steps:
            return
        size = f"data.epoch_size={c.epoch_size} samples" if c.epoch_size else f"a train split of {n_split} samples"
        per = f" per device ({world_size} devices)" if world_size > 1 else ""
        raise MTLError(
            f"data={c.name} gives a training epoch of 0 steps: {size}{per}, data.batch_size={c.batch_size}, "
            f"data.drop_last={str(c.drop_last).lower()} (the partial batch is dropped when true). The run would train "
            f"nothing and report an untrained model. Lower data.batch_size to at most {max(1, n)}, set "
            "data.drop_last=false, or point data.root at the full dataset. Nothing was written."
        )

    def _loader(self, split: str, batch_size: int, sampler=None, batch_sampler=None) -> DataLoader:
        ds = self.splits[split]
        w = self.cfg.num_workers
        if batch_sampler is not None:
            batching = {"batch_sampler": batch_sampler}
        else:
            batching = {
                "batch_size": batch_size,
                "sampler": sampler,
                "drop_last": split == "train" and self.cfg.drop_last,
            }
        return DataLoader(
            ds,
            **batching,
            num_workers=w,
            persistent_workers=w > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_batched if hasattr(ds, "__getitems__") else None,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.splits["train"]
        probs = self.probs if self.cfg.mixing == "sample" else None
        if probs is not None:
            empty = [t.name for d, t in enumerate(self.tasks) if probs[d] > 0 and not (ds.domains == d).any()]
            if empty:
                raise MTLError(f"Domains {empty} have a positive sampling probability but no training samples.")
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        epoch, batches = self._consumed
        rows = self.branch_probs if self.branch_probs is not None else self.population_probs
        if rows is not None and self.cfg.mixing == "sample":
            what = "ForkMerge" if self.branch_probs is not None else "A population"
            if world > 1:
                raise MTLError(f"{what} with data.mixing=sample (a batch per branch or member) runs on one device.")
            empty = [t.name for d, t in enumerate(self.tasks) if rows[:, d].max() > 0 and not (ds.domains == d).any()]
            if empty:
                raise MTLError(f"Domains {empty} have a positive sampling probability but no training samples.")
            n = -(-(self.cfg.epoch_size or len(ds)) // self.cfg.batch_size)  # as many steps as the plain loader
            kind = BranchBatchSampler if self.branch_probs is not None else PopulationBatchSampler
            self._sampler = kind(ds.domains, rows, self.cfg.batch_size, n, self.seed)
            self._sampler.resume(epoch, batches)
            return self._loader("train", 0, batch_sampler=self._sampler)
        if self.cfg.mixing == "multi_input":  # every step a batch of each domain (LibMTL's multi-input trainer)
            if world > 1:
                raise MTLError("Multi-input batches (data.mixing=multi_input) are drawn on one device.")
            counts = torch.bincount(ds.domains.long()).clamp(min=1)
            B = self.cfg.batch_size
            per = counts // B if self.cfg.drop_last else -(-counts // B)
            self._sampler = MultiInputBatchSampler(ds.domains, torch.zeros(1, 1), B, max(1, int(per.max())), self.seed)
            self._sampler.resume(epoch, batches)
            return self._loader("train", 0, batch_sampler=self._sampler)
        if self.cfg.labels_per_class is not None:  # each batch: a share labelled, the rest unlabelled
            if world > 1:
                raise MTLError("Semi-supervised batches (data.labels_per_class) are drawn on one device.")
            n = (self.cfg.epoch_size or len(ds)) // self.cfg.batch_size
            self._sampler = SemiSupervisedBatchSampler(self._labelled, len(ds), self.cfg, n, self.seed)
            self._sampler.resume(epoch, batches)
            return self._loader("train", 0, batch_sampler=self._sampler)
        self._sampler = MixtureSampler(ds.domains, probs, self.cfg.epoch_size, self.seed, rank, world)
        self._sampler.resume(epoch, batches * self.cfg.batch_size)
        return self._loader("train", self.cfg.batch_size, self._sampler)

    def val_dataloader(self, batch_size: int | None = None, in_split_order: bool = False) -> DataLoader:
        """Validation batches of `data.eval_batch_size`; `batch_size` for a method's own draws (Auto-Lambda's
        meta-batches are training-sized, as its reference). A mixture's domains come interleaved (`StratifiedOrder`)
        unless `in_split_order` (a predictions file's rows follow the split)."""
        return self._eval_loader("val", batch_size or self.cfg.eval_batch_size, in_split_order)

    def test_dataloader(self, in_split_order: bool = False) -> DataLoader:
        return self._eval_loader("test", self.cfg.eval_batch_size, in_split_order)

    def _eval_loader(self, split: str, batch_size: int, in_split_order: bool) -> DataLoader:
        domains = self.splits[split].domains
        mixed = not in_split_order and len(domains) and bool((domains != domains[0]).any())
        return self._loader(split, batch_size, StratifiedOrder(domains) if mixed else None)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Count the training batches actually handed to the model (Lightning prefetches one ahead, so the
        # loader's own position would overcount), so a mid-epoch checkpoint knows where to resume.
        if self.trainer is not None and self.trainer.training and self._sampler is not None:
            epoch, n = self._consumed
            self._consumed = (self._sampler.epoch, n + 1 if epoch == self._sampler.epoch else 1)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.cfg.augment_ops and self.trainer is not None and self.trainer.training:
            epoch, n = self._consumed  # this batch's place in the run: a resumed run repeats it
            g = torch.Generator(device=batch[0].device).manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + n)
            batch = (ssl.augment(batch[0], self.cfg.augment_ops, g), batch[1])
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self._consumed[0], "batches": self._consumed[1]}

    def load_state_dict(self, state: dict) -> None:
        self._consumed = (state["epoch"], state["batches"])
