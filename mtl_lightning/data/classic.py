"""CIFAR-10, STL-10 and SVHN, read from their official files, alone or mixed as domains (CIFAR-10 + STL-10).

The official files are parsed here directly, not through torchvision's dataset classes, because those verify md5
sums of the full official files and so refuse the tiny fixtures the tests write in the same formats; the parsers
instead check shapes and label ranges, which catches truncated and corrupt files. Downloads do go through
torchvision (`data.download=true`), which checks the archives' md5 sums.

None of the three has an official validation split: by default `data.train_fraction=0.9` holds out a seeded 10%
of each training set for validation; the official test split is only ever the test split.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..console import say
from ..errors import MTLError
from ..tasks import Classification
from .base import DATASETS, LabelledTensors
from .files import FileDataConfig, FileDataModule, corrupt, missing, square_resize

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 images N x 3 x H x W, int labels N)


def _read_cifar10(folder: Path) -> Arrays:
    def batch(name):
        path = folder / name
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")  # the official batches are Python 2 pickles
            d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
            x, y = np.asarray(d["data"], dtype=np.uint8), np.asarray(d["labels"])
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y) or y.min() < 0 or y.max() > 9:
                raise ValueError(f"data {x.shape} / labels {y.shape} are not CIFAR-10 batches")
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as e:
            raise corrupt(path, e) from None
        return x.reshape(-1, 3, 32, 32), y

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    return {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": batch("test_batch"),
    }


def _read_stl10(folder: Path) -> Arrays:
    def split(name):
        xp, yp = folder / f"{name}_X.bin", folder / f"{name}_y.bin"
        x, y = np.fromfile(xp, dtype=np.uint8), np.fromfile(yp, dtype=np.uint8).astype(np.int64) - 1
        if x.size % (3 * 96 * 96):
            raise corrupt(xp, ValueError(f"{x.size} bytes is not a whole number of 3x96x96 images"))
        x = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # stored column-major
        if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise corrupt(yp, ValueError(f"{len(y)} labels in 1..10 expected for {len(x)} images"))
        return np.ascontiguousarray(x), y

    return {"train": split("train"), "test": split("test")}


def _read_svhn(folder: Path) -> Arrays:
    from scipy.io import loadmat

    def split(name):
        path = folder / f"{name}_32x32.mat"
        try:
            m = loadmat(path)
            x, y = m["X"], m["y"].astype(np.int64).reshape(-1) % 10  # label 10 is the digit 0
            if x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
                raise ValueError(f"X {x.shape} / y {m['y'].shape} are not SVHN arrays")
        except (ValueError, KeyError, TypeError, OSError, NotImplementedError) as e:
            raise corrupt(path, e) from None
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y

    return {"train": split("train"), "test": split("test")}


class Source(NamedTuple):
    subdir: str
    files: list[str]
    url: str
    read: Callable[[Path], Arrays]
    fetch: Callable[[Path], None]  # download into root


def _fetch_cifar10(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    CIFAR10(str(root), train=True, download=True)


def _fetch_stl10(root: Path) -> None:
    from torchvision.datasets import STL10

    STL10(str(root), split="train", download=True)


def _fetch_svhn(root: Path) -> None:
    from torchvision.datasets import SVHN

    for split in ("train", "test"):
        SVHN(str(root / "svhn"), split=split, download=True)


SOURCES = {
    "cifar10": Source(
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it)",
        _read_cifar10,
        _fetch_cifar10,
    ),
    "stl10": Source(
        "stl10_binary",
        ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"],
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (extract it)",
        _read_stl10,
        _fetch_stl10,
    ),
    "svhn": Source(
        "svhn",
        ["train_32x32.mat", "test_32x32.mat"],
        "http://ufldl.stanford.edu/housenumbers/ (format 2: train_32x32.mat, test_32x32.mat)",
        _read_svhn,
        _fetch_svhn,
    ),
}


@dataclass
class ClassicConfig(FileDataConfig):
    train_fraction: float = 0.9  # no official validation split: hold out 10% of train (seeded)
    domains: list[str] = field(default_factory=lambda: ["cifar10", "stl10"])  # one head each; any of SOURCES
    whiten: bool = False  # global contrast normalisation + ZCA fitted on the training images, as ARML's CIFAR-10


@dataclass
class CIFAR10Config(ClassicConfig):
    name: str = "cifar10"
    domains: list[str] = field(default_factory=lambda: ["cifar10"])


@dataclass
class SVHNConfig(ClassicConfig):
    name: str = "svhn"
    domains: list[str] = field(default_factory=lambda: ["svhn"])


@dataclass
class CifarSTLConfig(ClassicConfig):
    name: str = "cifar_stl"
    mixing: str = "sample"  # Royer et al.'s MDL: each sample drawn from CIFAR-10 with probability p


@DATASETS.register("cifar_stl")
class ClassicDataModule(FileDataModule):
    """Each of `data.domains` (cifar10, stl10, svhn) is a domain with its own 10-way head; images at img_size.

    Registered as `cifar_stl` (CIFAR-10 + STL-10, Royer et al.'s two-domain MDL), `cifar10` and `svhn`.
    """

    Config = CifarSTLConfig
    kind = "mdl"
    downloadable = True

    def __init__(self, cfg: ClassicConfig, seed: int = 0):
        bad = [d for d in cfg.domains if d not in SOURCES]
        if bad:
            raise MTLError(f"Unknown domain {bad[0]!r} in data.domains; valid: {', '.join(sorted(SOURCES))}.")
        if not cfg.domains or len(set(cfg.domains)) != len(cfg.domains):
            raise MTLError(f"data.domains={list(cfg.domains)} must be distinct names from {sorted(SOURCES)}.")
        super().__init__(cfg, seed)

    def describe(self) -> list[Classification]:
        return [Classification(d, 10) for d in self.cfg.domains]

    def expected(self) -> list[str]:
        return [f"{SOURCES[d].subdir}/{f}" for d in self.cfg.domains for f in SOURCES[d].files]

    @property
    def source(self) -> str:
        return "; ".join(f"{d}: {SOURCES[d].url}" for d in self.cfg.domains)

    def _absent_in(self, d: str) -> bool:
        return any(not (self.folder / SOURCES[d].subdir / f).exists() for f in SOURCES[d].files)

    def fetch(self) -> None:
        for d in self.cfg.domains:
            if self._absent_in(d):
                SOURCES[d].fetch(self.folder)

    def require(self) -> None:
        for d in self.cfg.domains:
            if self._absent_in(d):
                s = SOURCES[d]
                raise missing(self.cfg.name, self.folder, self.folder / s.subdir, s.files, s.url, downloadable=True)

    def load(self) -> dict[str, LabelledTensors]:
        self.require()
        parts = {d: SOURCES[d].read(self.folder / SOURCES[d].subdir) for d in self.cfg.domains}
        out, K = {}, len(self.cfg.domains)
        for split in ("train", "test"):
            xs, ys, ds = [], [], []
            for k, d in enumerate(self.cfg.domains):
                x, y = parts[d][split]
                xs.append(square_resize(torch.from_numpy(x), self.img_size))
                ys.append(torch.from_numpy(y))
                ds.append(torch.full((len(y),), k))
            domains = torch.cat(ds)
            labels = torch.full((len(domains), K), -1, dtype=torch.long)
            labels[torch.arange(len(domains)), domains] = torch.cat(ys).long()
            out[split] = LabelledTensors(torch.cat(xs), labels, domains)
        if self.cfg.whiten:  # fitted on every training image (as ARML), cached, applied to both splits
            mean, W = zca_fit_cached(out["train"].images, self.cache_dir())
            for split, ds in out.items():
                out[split] = LabelledTensors(zca_apply(gcn(ds.images), mean, W), ds.labels, ds.domains)
        return out

    def cache_dir(self) -> Path:
        return Path(self.cfg.cache_dir) if self.cfg.cache_dir else Path(self.cfg.root).expanduser() / ".cache"


def gcn(images: Tensor, multiplier: float = 55.0, eps: float = 1e-10) -> Tensor:
    """Global contrast normalisation (ARML's, after Oliver et al.): each image centred and scaled to norm 55."""
    x = images.double().flatten(1)
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return (multiplier * x / torch.where(norm < eps, 1.0, norm)).view(images.shape)


def zca_fit(images: Tensor, scale: float = 0.1, eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """ZCA whitening fitted on `images` (already normalised): their mean and W = U diag(1 / sqrt(S + eps)) U^T of
    the eigendecomposition of (cov + scale I), ARML's `scale` 0.1 regularising the small eigenvalues."""
    x = images.double().flatten(1)
    mean = x.mean(0)
    n, d = x.shape
    if n > d:
        cov = torch.cov((x - mean).T)
        S, U = torch.linalg.eigh(cov + scale * torch.eye(d, dtype=cov.dtype))
        return mean, (U * (1 / torch.sqrt(S.clamp(min=0) + eps))) @ U.T
    # fewer images than pixels (a subset, the tests' files): the covariance has rank < n, so the thin SVD of the
    # images gives its eigenvectors V and the rest is the null space, eigenvalue 0 (+ scale): the same W as the
    # d x d eigendecomposition (seconds at 3072 pixels) at O(n^2 d)
    _, sv, Vt = torch.linalg.svd(x - mean, full_matrices=False)
    c = 1 / torch.sqrt(torch.tensor(scale + eps, dtype=x.dtype))
    a = 1 / torch.sqrt(sv**2 / (n - 1) + scale + eps)
    return mean, c * torch.eye(d, dtype=x.dtype) + (Vt.T * (a - c)) @ Vt


def zca_apply(images: Tensor, mean: Tensor, W: Tensor) -> Tensor:
    return ((images.double().flatten(1) - mean) @ W).float().view(images.shape)


def zca_fit_cached(train_images: Tensor, cache: Path) -> tuple[Tensor, Tensor]:
    """`zca_fit` of the GCN-normalised training images, kept under `cache` keyed by a hash of the images (a 3072 x
    3072 eigendecomposition is seconds, not worth repeating per run)."""
    key = hashlib.sha1(train_images.numpy().tobytes()).hexdigest()[:12]
    path = cache / f"zca-{key}.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
        return d["mean"], d["W"]
    say(f"fitting ZCA whitening on {len(train_images):,} training images once (cached in {cache})")
    mean, W = zca_fit(gcn(train_images))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"mean": mean, "W": W}, tmp)
    os.replace(tmp, path)
    return mean, W


@DATASETS.register("cifar10")
class CIFAR10DataModule(ClassicDataModule):
    Config = CIFAR10Config


@DATASETS.register("svhn")
class SVHNDataModule(ClassicDataModule):
    Config = SVHNConfig
