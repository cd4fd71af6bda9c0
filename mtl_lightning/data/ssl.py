"""Semi-supervised learning as auxiliary-task learning (ARML, Shi et al. NeurIPS 2020, bfshi/ARML_Auxiliary_Task_
Reweighting `SSL/`, on the protocol of Oliver et al. 2018): few labels for the classification task, the rest of the
training set unlabelled, and self-supervised tasks on every image (`data.aux_tasks`: rotation, exemplar).

As ARML's `build_dataset.py`: the training split is permuted with `data.split_seed`; its first `data.val_count`
images validate (5,000 for CIFAR-10, 7,326 for SVHN); of the rest, the first `data.labels_per_class` of each class
keep their label, every other image is unlabelled (-1) for the classification task. Each training batch is
`data.labelled_share` labelled (ARML: 128 of 256) and the rest unlabelled, from two shuffled streams. The
self-supervised tasks label every image themselves (their column is 0: "applies"). `data.augment_ops` transforms
training batches on the device, seeded by (seed, epoch, batch): `flip` (horizontal, per image), `translate` (by up
to 2 pixels, reflection padding, per image) and `noise` (Gaussian, std 0.15), Oliver et al.'s augmentations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MTLError
from ..tabular import Fields
from ..tasks import AUXILIARY, Classification

AUGMENTATIONS = ("flip", "translate", "noise")


def auxiliary_tasks(cfg, dm) -> list:
    """The self-supervised tasks of `data.aux_tasks`, checked against the dataset."""
    bad = [a for a in cfg.aux_tasks if a not in AUXILIARY]
    if bad:
        raise MTLError(f"Unknown task {bad[0]!r} in data.aux_tasks; valid: {', '.join(AUXILIARY)}.")
    odd = [a for a in cfg.augment_ops if a not in AUGMENTATIONS]
    if odd:
        raise MTLError(f"Unknown augmentation {odd[0]!r} in data.augment_ops; valid: {', '.join(AUGMENTATIONS)}.")
    images = not isinstance(dm.in_chans, Fields) and dm.in_chans is not None
    if (cfg.aux_tasks or cfg.augment_ops) and not images:
        raise MTLError(f"data.aux_tasks and data.augment_ops transform images; data={cfg.name} is not images.")
    if cfg.labels_per_class is not None and cfg.labels_per_class < 1:
        raise MTLError(
            f"data.labels_per_class={cfg.labels_per_class}: keep at least one label per class (or drop the key for "
            "fully supervised training)."
        )
    if not 0 < cfg.labelled_share < 1:
        raise MTLError(f"data.labelled_share={cfg.labelled_share} must lie in (0, 1): the labelled part of a batch.")
    return [AUXILIARY[a](a) for a in cfg.aux_tasks]


def with_auxiliary_labels(splits: dict, num_tasks: int) -> dict:
    """Every split with one 0 column ("applies to every image") per self-supervised task after the dataset's own."""
    out = {}
    for name, ds in splits.items():
        extra = num_tasks - ds.labels.shape[1]
        if extra <= 0:
            out[name] = ds
            continue
        labels = torch.cat([ds.labels, torch.zeros(len(ds.labels), extra, dtype=ds.labels.dtype)], 1)
        out[name] = ds.take(torch.arange(len(labels)), labels, ds.domains)
    return out


def hold_out(ds, count: int, seed: int):
    """(train, validation): the first `count` images of a permutation seeded by `seed` validate (ARML)."""
    if not 0 < count < len(ds.labels):
        raise MTLError(f"data.val_count={count} must lie between 1 and the training images - 1 ({len(ds.labels) - 1}).")
    perm = torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(seed))
    return ds.subset(perm[count:].sort().values), ds.subset(perm[:count].sort().values)


def keep_labels(ds, tasks, cfg):
    """`ds` with only `labels_per_class` labels per class of the classification task (balanced, the first of a
    permutation seeded by `data.split_seed` per class), and the rows of the labelled images."""
    cls = [k for k, t in enumerate(tasks) if isinstance(t, Classification) and not t.view]
    if len(cls) != 1:
        raise MTLError(
            f"data.labels_per_class makes one classification task semi-supervised; the chosen tasks have {len(cls)} "
            f"({[tasks[k].name for k in cls]}): choose one with data.tasks."
        )
    k, n = cls[0], cfg.labels_per_class
    y = ds.labels[:, k].long()
    g = torch.Generator().manual_seed(cfg.split_seed + 1)
    keep = []
    for c in range(tasks[k].num_classes):
        rows = (y == c).nonzero().squeeze(1)
        if len(rows) < n:
            raise MTLError(
                f"data.labels_per_class={n}, but class {c} of {tasks[k].name} has {len(rows)} training images (after "
                f"the validation hold-out): ask for at most {len(rows)} labels per class."
            )
        keep.append(rows[torch.randperm(len(rows), generator=g)[:n]])
    keep = torch.cat(keep).sort().values
    labels = ds.labels.clone()
    labelled = torch.zeros(len(labels), dtype=torch.bool)
    labelled[keep] = True
    labels[~labelled, k] = -1
    return ds.take(torch.arange(len(labels)), labels, ds.domains), keep


def augment(x: Tensor, ops, g: torch.Generator) -> Tensor:
    """Oliver et al.'s training augmentations on a batch (B, C, H, W), per image, drawn from `g`."""
    if x.dtype == torch.uint8:  # what the model would do: scale stored images to [-1, 1]
        x = x.float().div(127.5).sub(1.0)
    x = x.float().clone()
    B = len(x)
    if "flip" in ops:
        flip = torch.rand(B, generator=g, device=g.device) < 0.5
        x[flip] = x[flip].flip(-1)
    if "translate" in ops:
        H, W = x.shape[-2:]
        padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
        dy = torch.randint(0, 5, (B,), generator=g, device=g.device)
        dx = torch.randint(0, 5, (B,), generator=g, device=g.device)
        # one gather of every image's window (a slice per image would sync the device on each offset)
        ar = lambda n: torch.arange(n, device=x.device)  # noqa: E731
        rows, cols = (dy[:, None] + ar(H))[:, None, :, None], (dx[:, None] + ar(W))[:, None, None, :]
        x = padded[ar(B)[:, None, None, None], ar(x.shape[1])[:, None, None], rows, cols]
    if "noise" in ops:
        x = x + 0.15 * torch.randn(x.shape, generator=g, device=g.device)
    return x
