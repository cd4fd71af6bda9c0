"""Tiny datasets written in the official file formats and layouts, for tests and benchmarks (no download).

Each writer puts its dataset under `root` exactly where `data.root=root` looks for it and returns the number of
images per split. Images carry a class-dependent colour so that a model can learn them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from mtl_lightning.data.celeba import ATTRIBUTES
from mtl_lightning.data.domainnet import DOMAINS


def _images(rng, labels, shape):
    """uint8 noise plus a per-class brightness offset (so labels are learnable), shape (N, *shape)."""
    x = rng.integers(0, 128, size=(len(labels), *shape))
    return (x + 12 * (np.asarray(labels) % 10).reshape(-1, *[1] * len(shape))).astype(np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30, seed: int = 0) -> dict:
    rng, folder = np.random.default_rng(seed), Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        y = rng.integers(0, 10, n)
        batch = {"batch_label": name, "labels": y.tolist(), "data": _images(rng, y, (3072,))}
        batch["filenames"] = [f"img_{i}.png" for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return {"train": 5 * per_batch, "test": test}


def write_stl10(root: Path, train: int = 30, test: int = 20, seed: int = 1) -> dict:
    rng, folder = np.random.default_rng(seed), Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        y = rng.integers(0, 10, n)
        x = _images(rng, y, (3, 96, 96)).transpose(0, 1, 3, 2)  # the official files are column-major
        np.ascontiguousarray(x).tofile(folder / f"{split}_X.bin")
        (y + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")  # labels 1..10
    return {"train": train, "test": test}


def write_svhn(root: Path, train: int = 40, test: int = 20, seed: int = 2) -> dict:
    from scipy.io import savemat

    rng, folder = np.random.default_rng(seed), Path(root) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        y = rng.integers(0, 10, n)
        x = _images(rng, y, (3, 32, 32)).transpose(2, 3, 1, 0)  # (32, 32, 3, N)
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)})
    return {"train": train, "test": test}


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.transpose(1, 2, 0)).save(path, quality=90)


def write_celeba(root: Path, sizes=(24, 8, 8), seed: int = 3, size=(218, 178)) -> dict:
    rng, folder = np.random.default_rng(seed), Path(root) / "celeba"
    n = sum(sizes)
    attrs = rng.integers(0, 2, (n, len(ATTRIBUTES)))
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name, a in zip(names, attrs):
        _write_jpeg(folder / "img_align_celeba" / name, _images(rng, [a[:4] @ [8, 4, 2, 1]], (3, *size))[0])
    header = f"{n}\n" + " ".join(ATTRIBUTES) + " \n"
    lines = [f"{f} " + " ".join(f"{2 * v - 1:2d}" for v in a) for f, a in zip(names, attrs)]
    (folder / "list_attr_celeba.txt").write_text(header + "\n".join(lines) + "\n")
    split = np.repeat([0, 1, 2], sizes)
    (folder / "list_eval_partition.txt").write_text("".join(f"{f} {s}\n" for f, s in zip(names, split)))
    return dict(zip(("train", "val", "test"), sizes))


def write_domainnet(root: Path, domains=DOMAINS, train: int = 12, test: int = 8, seed: int = 4, size=64) -> dict:
    rng, folder = np.random.default_rng(seed), Path(root) / "domainnet"
    for k, d in enumerate(domains):
        for split, n in (("train", train), ("test", test)):
            y = rng.integers(0, 5, n) * 67  # a few of the 345 classes, spread over the range
            lines = []
            for i, label in enumerate(y):
                rel = f"{d}/class_{label:03d}/{d}_{label:03d}_{split}{i:06d}.jpg"
                _write_jpeg(folder / rel, _images(rng, [label // 67 + 4 * k], (3, size, size + 8 * k))[0])
                lines.append(f"{rel} {label}\n")
            (folder / f"{d}_{split}.txt").write_text("".join(lines))
    return {"train": train * len(domains), "test": test * len(domains)}


WRITERS = {  # data.name -> writers of the files it reads
    "cifar10": [write_cifar10],
    "svhn": [write_svhn],
    "cifar_stl": [write_cifar10, write_stl10],
    "celeba": [write_celeba],
    "domainnet": [write_domainnet],
}
