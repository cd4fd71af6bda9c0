"""NYUv2 (Silberman et al. 2012) and Cityscapes (Cordts et al. 2016) as MTAN preprocessed them, the copies MTAN,
Nash-MTL, FAMO, LibMTL and ForkMerge read: `<data.root>/<name>/{train,val}/<kind>/<i>.npy`, one array per sample,
an image (H, W, 3) float in [0, 1] and one array per task. The release's `val` is the official test set, which is
the test split here; validation is a seeded part of train (`data.train_fraction`), or, with train_fraction 1, the
test split itself, as the references evaluate (with a warning).

NYUv2: 288 x 384, `label` (13 classes, -1 = unlabelled), `depth` (H, W, 1) metres with 0 = none, `normal` (H, W, 3)
unit vectors with 0 = none; 795 train / 654 test. Cityscapes: 128 x 256, `label_7` (7 classes, -1 = unlabelled;
`label_19` and `label_2` where the release has them, `data.classes`; LibMTL's copy names the 7-class folder
`label`), `depth` (H, W, 1) inverse depth with 0 = invalid; 2975 train / 500 test.

Every file's header (shape, dtype) is checked when the data is set up; values (a class id outside [-1, classes),
NaN depth) when a sample is read. Arrays are memory-mapped per sample, so a worker never holds the whole set.
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


@dataclass
class NYUv2Config(DenseConfig):
    name: str = "nyuv2"
    root: str = field(default_factory=lambda: os.environ.get("MTL_DATA_ROOT", "data"))
    train_fraction: float = 0.8  # ForkMerge's validation: a seeded 636/159 split of the 795 training samples
    batch_size: int = 8
    eval_batch_size: int = 8


class NpySample:
    """Reads sample i of one split folder: (image (3, H, W) float, [targets of the chosen task folders])."""

    def __init__(self, folder: Path, task_folders: list[str], classes: int):
        self.folder, self.task_folders, self.classes = folder, task_folders, classes

    def __call__(self, i: int, tasks: list[int]):
        image = torch.from_numpy(np.array(self._array("image", i), dtype=np.float32)).permute(2, 0, 1)
        out = []
        for k in tasks:
            kind = self.task_folders[k]
            a = np.array(self._array(kind, i), dtype=np.float32)
            path = self.folder / kind / f"{i}.npy"
            if kind.startswith("label"):
                bad = np.isnan(a) | (a < -1) | (a > self.classes - 1) | (a != np.round(a))
                if bad.any():
                    raise MTLError(
                        f"{path} holds the class id {a[bad][0]}: these labels are 0..{self.classes - 1}, or -1 for "
                        "unlabelled."
                    )
                out.append(torch.from_numpy(a).long())
            else:
                if not np.isfinite(a).all():
                    raise MTLError(f"{path} holds NaN or infinite values: mark missing {kind} with 0 instead.")
                out.append(torch.from_numpy(a).permute(2, 0, 1))
        return image, out

    def _array(self, kind: str, i: int) -> np.ndarray:
        return np.load(self.folder / kind / f"{i}.npy", mmap_mode="r")


class NpyFolders(DenseDataModule, RootedDataModule):
    """A dense mixture in MTAN's layout. Subclasses give `size`, the label folder and its class count, `describe()`,
    and `arrays` (folder -> (shape, what it holds)) with the task folders in the order of describe()."""

    in_chans = 3
    size: tuple[int, int]
    classes: int

    def arrays(self) -> dict[str, tuple[tuple, str]]:
        raise NotImplementedError

    def task_folders(self) -> list[str]:
        return [k for k in self.arrays() if k != "image"]

    def expected(self) -> list[str]:
        return [f"{s}/{k}/" for s in ("train", "val") for k in self.arrays()]

    def _split(self, split: str) -> DenseFiles:
        folder = self.folder / split
        index = {}
        for kind in self.arrays():
            index[kind] = sorted(int(p.stem) for p in (folder / kind).glob("*.npy") if p.stem.isdigit())
        n = len(index["image"])
        if n == 0:
            raise MTLError(f"{folder / 'image'} holds no <i>.npy files: is the {self.cfg.name} folder complete?")
        for kind, ids in index.items():
            if ids != list(range(n)):
                gap = sorted(set(range(n)) ^ set(ids))[:5]
                raise MTLError(
                    f"{folder / kind} must hold 0.npy .. {n - 1}.npy like {folder / 'image'}; it differs at {gap} "
                    "(missing or extra files)."
                )
            shape, what = self.arrays()[kind]
            for i in ids:
                path = folder / kind / f"{i}.npy"
                try:
                    a = np.load(path, mmap_mode="r")
                except (ValueError, OSError, EOFError) as e:
                    raise MTLError(f"{path} is not a readable .npy file ({e}).") from None
                label = kind.startswith("label")
                numeric = np.issubdtype(a.dtype, np.floating) or (label and np.issubdtype(a.dtype, np.integer))
                if a.shape != shape or not numeric:
                    raise MTLError(
                        f"{path} is an array of shape {a.shape} and dtype {a.dtype}; {self.cfg.name}'s {kind} arrays "
                        f"are {shape}, {'float or int' if label else 'float'} ({what})."
                    )
        tasks = self.task_folders()
        return DenseFiles(range(n), NpySample(folder, tasks, self.classes), list(range(len(tasks))))

    def load(self) -> dict[str, DenseFiles]:
        self.require()
        return {"train": self._split("train"), "test": self._split("val")}  # the release's `val` is the test set


@DATASETS.register("nyuv2")
class NYUv2DataModule(NpyFolders):
    Config = NYUv2Config
    subdir = "nyuv2"
    source = (
        "the preprocessed NYUv2 of MTAN (github.com/lorenmt/mtan, its README's dataset link; also used by LibMTL "
        "and ForkMerge), unzipped so that nyuv2/train/image/0.npy exists"
    )
    size = img_size = (288, 384)
    classes = 13

    def arrays(self):
        H, W = self.size
        return {
            "image": ((H, W, 3), "float RGB in [0, 1]"),
            "label": ((H, W), "class ids 0..12, -1 = unlabelled"),
            "depth": ((H, W, 1), "float depth in metres, 0 = none"),
            "normal": ((H, W, 3), "float unit normals, 0 = none"),
        }

    def describe(self) -> list[Task]:
        avg = self.cfg.metric_average
        return [Segmentation("segmentation", 13, avg), Depth("depth", avg), Normal("normal", avg)]


@dataclass
class CityscapesConfig(NYUv2Config):
    name: str = "cityscapes"
    classes: int = 7  # 7 (label_7), 19 (label_19) or 2 (label_2), as the release has them
    train_fraction: float = 1.0  # the references validate on the test set (MTAN, Nash-MTL, FAMO): say so, or hold out
    batch_size: int = 8
    eval_batch_size: int = 8


@DATASETS.register("cityscapes")
class CityscapesDataModule(NpyFolders):
    Config = CityscapesConfig
    subdir = "cityscapes"
    source = (
        "the preprocessed Cityscapes of MTAN (github.com/lorenmt/mtan, its README's dataset link, 128x256; LibMTL's "
        "copy works too), unzipped so that cityscapes/train/image/0.npy exists"
    )
    size = img_size = (128, 256)

    def __init__(self, cfg: CityscapesConfig, seed: int = 0):
        if cfg.classes not in (7, 19, 2):
            raise MTLError(f"data.classes={cfg.classes}: the Cityscapes release has 7, 19 and 2-class labels.")
        self.classes = cfg.classes
        super().__init__(cfg, seed)

    def _label(self) -> str:
        """label_<classes>, or LibMTL's `label/` (its 7-class labels) where that is what the folder has."""
        own = f"label_{self.classes}"
        if (
            self.classes == 7
            and not (self.folder / "train" / own).exists()
            and (self.folder / "train" / "label").exists()
        ):
            return "label"
        return own

    def arrays(self):
        H, W = self.size
        return {
            "image": ((H, W, 3), "float RGB in [0, 1]"),
            self._label(): ((H, W), f"class ids 0..{self.classes - 1}, -1 = unlabelled"),
            "depth": ((H, W, 1), "float inverse depth, 0 = invalid"),
        }

    def describe(self) -> list[Task]:
        avg = self.cfg.metric_average
        return [Segmentation("segmentation", self.cfg.classes, avg), Depth("depth", avg)]
