"""What the dense (per-pixel) mixtures share: splits whose samples are an image and one target per task, and the
MTAN-style augmentation (random scale-crop, horizontal flip) applied to whole training batches.

A dense batch is `(x, [t_1, ..., t_K])`: one target tensor per task, shaped as that task expects (a (B, H, W)
label map, a (B, 1, H, W) depth map, ...). Every sample is labelled for every task (missing pixels are masked by
the task's own convention), so `domains` is all zeros and the mixtures are multi-task.

Augmentation runs on the device after the batch is transferred, drawing its randomness from a generator seeded by
(seed, epoch, batch): a run resumed mid-epoch sees exactly the crops and flips an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import MTLError
from ..tasks import Task
from .base import DataConfig, MixtureDataModule, Split


class DenseTensors(Dataset, Split):
    """An in-memory dense split: images (N, C, H, W) and one target tensor (N, ...) per task."""

    def __init__(self, images: Tensor, targets: Sequence[Tensor]):
        assert all(len(t) == len(images) for t in targets)
        self.images, self.targets = images, list(targets)
        self.domains = torch.zeros(len(images), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], [t[i] for t in self.targets]

    def __getitems__(self, idx: list[int]):  # one gather per tensor instead of B items and a collate
        idx = torch.as_tensor(idx)
        return self.images[idx], [t[idx] for t in self.targets]

    def subset(self, rows: Tensor) -> DenseTensors:
        return DenseTensors(self.images[rows], [t[rows] for t in self.targets])

    def select(self, keep: list[int], mdl: bool) -> DenseTensors:
        return DenseTensors(self.images, [self.targets[k] for k in keep])


class DenseFiles(Dataset, Split):
    """A dense split read from files on access: `load(item, tasks)` -> (image, [target per task index in tasks])."""

    def __init__(self, items: Sequence, load: Callable, tasks: list[int]):
        self.items = np.empty(len(items), dtype=object)  # one entry per sample, whatever an item is (int, tuple)
        for i, item in enumerate(items):
            self.items[i] = item
        self.load, self.tasks = load, tasks
        self.domains = torch.zeros(len(self.items), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.load(self.items[i], self.tasks)

    def subset(self, rows: Tensor) -> DenseFiles:
        return DenseFiles(self.items[rows.numpy()], self.load, self.tasks)

    def select(self, keep: list[int], mdl: bool) -> DenseFiles:
        return DenseFiles(self.items, self.load, [self.tasks[k] for k in keep])


@dataclass
class DenseConfig(DataConfig):
    augment: bool = False  # random scale-crop and horizontal flip of training batches (MTAN's augmentation)
    scales: list[float] = field(default_factory=lambda: [1.0, 1.2, 1.5])  # zoom factors of the scale-crop
    # pixels: depth and normal metrics over the split's pixels (ours); batches: per-batch values averaged, as
    # Nash-MTL and FAMO publish them (they then depend on data.eval_batch_size)
    metric_average: str = "pixels"


def scale_crop_flip(batch, tasks: Sequence[Task], scales: Sequence[float], g: torch.Generator):
    """MTAN's augmentation, per sample: zoom in by a random scale s (crop 1/s of the image at a random place, resize
    back; depth divided by s), then flip horizontally with probability 1/2 (normals' x negated)."""
    x, targets = batch
    x, targets = x.clone(), [t.clone() for t in targets]
    H, W = x.shape[-2:]
    for i in range(len(x)):
        s = float(scales[int(torch.randint(len(scales), (1,), generator=g))])
        h, w = int(H / s), int(W / s)
        top, left = int(torch.randint(H - h + 1, (1,), generator=g)), int(torch.randint(W - w + 1, (1,), generator=g))
        flip = bool(torch.rand(1, generator=g) < 0.5)
        if s != 1.0:
            crop = x[i : i + 1, :, top : top + h, left : left + w].float()
            x[i] = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=True)[0].to(x.dtype)
            for t, y in zip(tasks, targets):
                y[i] = t.crop_resize(y[i], (top, left, h, w), (H, W), s)
        if flip:
            x[i] = x[i].flip(-1)
            for t, y in zip(tasks, targets):
                y[i] = t.hflip(y[i])
    return x, targets


class DenseDataModule(MixtureDataModule):
    """Base of the dense mixtures: multi-task, and the augmentation of training batches (`data.augment`)."""

    Config = DenseConfig
    kind = "mtl"

    def __init__(self, cfg: DenseConfig, seed: int = 0):
        if cfg.mixing != "loss":
            raise MTLError(f"data.mixing={cfg.mixing!r}: data={cfg.name} is multi-task; use data.mixing=loss.")
        if not cfg.scales or any(s < 1 for s in cfg.scales):
            raise MTLError(f"data.scales={list(cfg.scales)} must be zoom factors >= 1 (1 = no crop).")
        super().__init__(cfg, seed)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.cfg.augment and self.trainer is not None and self.trainer.training:
            epoch, n = self._consumed  # counted in on_before_batch_transfer: this batch's place in the run
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + n)
            batch = scale_crop_flip(batch, self.tasks, self.cfg.scales, g)
        return batch
