"""NYUv2 (Silberman et al. 2012) for multi-task dense prediction: 13-class segmentation, depth, surface normals.

Reads the preprocessed release that MTAN, LibMTL and ForkMerge read, under `<data.root>/nyuv2/`:
`{train,val}/{image,label,depth,normal}/<i>.npy`, one array per sample:
- image (288, 384, 3) float in [0, 1];
- label (288, 384), 13 classes 0..12 and -1 = unlabelled (stored as float or int);
- depth (288, 384, 1) float, metres, 0 = no measurement;
- normal (288, 384, 3) float, unit vectors, zero vector = no normal.
`train` holds 795 samples and `val` the official 654-image test set, which is the test split here. Validation is
ForkMerge's: a seeded 636/159 split of the 795 (`data.train_fraction=0.8`). Training batches are augmented as
MTAN's (random scale-crop with depth divided by the scale, horizontal flips; `data.augment`).

Every file's header (shape, dtype) is checked when the data is set up; values (a class id outside [-1, 12], NaN
depth) when a sample is read. Arrays are memory-mapped per sample, so a worker never holds the whole set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MTLError
from ..tasks import Depth, Normal, Segmentation, Task
from .base import DATASETS
from .dense import DenseConfig, DenseDataModule, DenseFiles
from .files import RootedDataModule

H, W = 288, 384
ARRAYS = {  # folder -> (shape, what it holds)
    "image": ((H, W, 3), "float RGB in [0, 1]"),
    "label": ((H, W), "class ids 0..12, -1 = unlabelled"),
    "depth": ((H, W, 1), "float depth in metres, 0 = none"),
    "normal": ((H, W, 3), "float unit normals, 0 = none"),
}
TASK_FOLDERS = ("label", "depth", "normal")  # in the order of describe()


@dataclass
class NYUv2Config(DenseConfig):
    name: str = "nyuv2"
    root: str = field(default_factory=lambda: os.environ.get("MTL_DATA_ROOT", "data"))
    augment: bool = True  # MTAN's random scale-crop and flips
    train_fraction: float = 0.8  # ForkMerge's validation: a seeded 636/159 split of the 795 training samples
    batch_size: int = 8
    eval_batch_size: int = 8


class NYUv2Sample:
    """Reads sample i of one split folder: (image (3, H, W) float, [targets of the chosen tasks])."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _array(self, kind: str, i: int) -> np.ndarray:
        return np.load(self.folder / kind / f"{i}.npy", mmap_mode="r")

    def __call__(self, i: int, tasks: list[int]):
        image = torch.from_numpy(np.array(self._array("image", i), dtype=np.float32)).permute(2, 0, 1)
        out = []
        for k in tasks:
            kind = TASK_FOLDERS[k]
            a = np.array(self._array(kind, i), dtype=np.float32)
            path = self.folder / kind / f"{i}.npy"
            if kind == "label":
                if np.isnan(a).any() or a.min() < -1 or a.max() > 12 or (a != np.round(a)).any():
                    bad = a[np.isnan(a) | (a < -1) | (a > 12) | (a != np.round(a))][0]
                    raise MTLError(f"{path} holds the class id {bad}: NYUv2 labels are 0..12, or -1 for unlabelled.")
                out.append(torch.from_numpy(a).long())
            else:
                if not np.isfinite(a).all():
                    raise MTLError(f"{path} holds NaN or infinite values: mark missing {kind} with 0 instead.")
                out.append(torch.from_numpy(a).permute(2, 0, 1))
        return image, out


@DATASETS.register("nyuv2")
class NYUv2DataModule(DenseDataModule, RootedDataModule):
    Config = NYUv2Config
    subdir = "nyuv2"
    source = (
        "the preprocessed NYUv2 of MTAN (github.com/lorenmt/mtan, its README's dataset link; also used by LibMTL "
        "and ForkMerge), unzipped so that nyuv2/train/image/0.npy exists"
    )
    img_size = (H, W)
    in_chans = 3

    def describe(self) -> list[Task]:
        return [Segmentation("segmentation", 13), Depth("depth"), Normal("normal")]

    def expected(self) -> list[str]:
        return [f"{s}/{k}/" for s in ("train", "val") for k in ARRAYS]

    def _split(self, split: str) -> DenseFiles:
        folder = self.folder / split
        index = {}
        for kind in ARRAYS:
            index[kind] = sorted(int(p.stem) for p in (folder / kind).glob("*.npy") if p.stem.isdigit())
        n = len(index["image"])
        if n == 0:
            raise MTLError(f"{folder / 'image'} holds no <i>.npy files: is the NYUv2 folder complete?")
        for kind, ids in index.items():
            if ids != list(range(n)):
                gap = sorted(set(range(n)) ^ set(ids))[:5]
                raise MTLError(
                    f"{folder / kind} must hold 0.npy .. {n - 1}.npy like {folder / 'image'}; it differs at {gap} "
                    "(missing or extra files)."
                )
            shape, what = ARRAYS[kind]
            for i in ids:
                path = folder / kind / f"{i}.npy"
                try:
                    a = np.load(path, mmap_mode="r")
                except (ValueError, OSError, EOFError) as e:
                    raise MTLError(f"{path} is not a readable .npy file ({e}).") from None
                numeric = np.issubdtype(a.dtype, np.floating) or (
                    kind == "label" and np.issubdtype(a.dtype, np.integer)
                )
                if a.shape != shape or not numeric:
                    raise MTLError(
                        f"{path} is an array of shape {a.shape} and dtype {a.dtype}; NYUv2's {kind} arrays are "
                        f"{shape}, {'float or int' if kind == 'label' else 'float'} ({what})."
                    )
        return DenseFiles(range(n), NYUv2Sample(folder), list(range(len(TASK_FOLDERS))))

    def load(self) -> dict[str, DenseFiles]:
        self.require()
        return {"train": self._split("train"), "test": self._split("val")}  # the release's `val` is the test set
