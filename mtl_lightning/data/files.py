"""What the real datasets share: where they live, the missing-data message, lazily decoded image files, the cache.

Small datasets (CIFAR-10, STL-10, SVHN) are read straight from their official binaries into uint8 tensors. Large
ones (CelebA, DomainNet) are lists of JPEGs: `ImageFiles` decodes and resizes one image per `__getitem__` (in
DataLoader workers), and `cached` decodes every image once into a uint8 `.npy` file that later runs memory-map,
so an epoch costs a gather instead of a JPEG decode per sample (BENCHMARKS.md has the images/s of both).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..console import say
from ..errors import MTLError
from .base import DataConfig, LabelledTensors, MixtureDataModule, Split


@dataclass
class FileDataConfig(DataConfig):
    root: str = field(default_factory=lambda: os.environ.get("MTL_DATA_ROOT", "data"))  # holds every dataset
    download: bool = False  # fetch with torchvision where it has a downloader
    img_size: int = 32  # images are brought to img_size x img_size
    cache: bool = False  # decode image files once into <root>/.cache (or cache_dir) and memory-map them after
    cache_dir: str | None = None
    crop: bool = True  # centre-crop to a square before resizing; false: resize the whole image (FAMO's, LibMTL's)


def missing(
    dataset: str, root: Path, folder: Path, expected: list[str], source: str, downloadable: bool, absent=None
) -> MTLError:
    """`absent`: those of `expected` that are not there (all of them by default); named alone when some are there."""
    how = " or set data.download=true to fetch them with torchvision" if downloadable else ""
    absent = expected if absent is None else absent
    gone = "they are not there" if len(absent) == len(expected) else f"of them {', '.join(absent)} are not there"
    return MTLError(
        f"data={dataset} needs {', '.join(expected)} in {folder}, and {gone}. Get them from {source} "
        f"and put them in {folder}{how}; or point data.root (or $MTL_DATA_ROOT) at the folder that already "
        f"holds them (now data.root={root})."
    )


def corrupt(path: Path | str, err: Exception) -> MTLError:
    return MTLError(
        f"{path} is truncated or corrupt ({type(err).__name__}: {err}). Delete it and get it again (data.download=true "
        "where available); a partial download or copy leaves files like this."
    )


def download_with(fn, dataset: str, source: str) -> None:
    """Run a torchvision downloader, turning its network errors into one clear message."""
    try:
        fn()
    except Exception as e:  # torchvision raises URLError, RuntimeError, gdown errors, ...
        msg = f"data={dataset}: the download failed ({type(e).__name__}: {e}). Get the files from {source}."
        raise MTLError(msg) from None


def square_resize(img: Tensor, size: int) -> Tensor:
    """Centre-crop (C, H, W) or (N, C, H, W) uint8 images to a square and resize to size x size (antialiased)."""
    from torchvision.transforms.v2 import functional as TF

    h, w = img.shape[-2:]
    s = min(h, w)
    if (h, w) != (s, s):
        img = TF.center_crop(img, [s, s])
    return img if s == size else TF.resize(img, [size, size], antialias=True)


def decode(path: str, size: int, crop: bool = True) -> Tensor:
    """One image file as a (3, size, size) uint8 tensor: RGB, centre-cropped to a square, resized (antialiased).

    Pillow, not torchvision.io (deprecated since 0.29): its JPEG `draft` mode decodes at a reduced DCT scale that
    is still >= size, several times faster than decoding full size and then shrinking.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            if crop:
                w, h = im.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im)
    except FileNotFoundError:
        raise MTLError(f"{path} is listed in the split files but does not exist.") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated, unidentified or broken image
        raise corrupt(path, e) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ImageFiles(Dataset, Split):
    """A split of image files, decoded (RGB) and square-resized to `size` on access; labels (N, K), domains (N,)."""

    def __init__(self, paths: np.ndarray, labels: Tensor, domains: Tensor, size: int, crop: bool = True):
        assert len(paths) == len(labels) == len(domains)
        self.paths, self.labels, self.domains, self.size = np.asarray(paths), labels.long(), domains.long(), size
        self.crop = crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return decode(str(self.paths[i]), self.size, self.crop), self.labels[i]

    def take(self, rows: Tensor, labels: Tensor, domains: Tensor) -> ImageFiles:
        return ImageFiles(self.paths[rows.numpy()], labels, domains, self.size, self.crop)


def cached(ds: ImageFiles, cache_dir: Path, tag: str, num_workers: int = 0) -> LabelledTensors:
    """`ds` decoded once into `cache_dir/<tag>-<size>px-<hash>.npy` and memory-mapped.

    The hash covers the file list and size, so a changed split or resolution gets its own file. The file is
    written beside its final name and renamed when complete, so an interrupted build never leaves a bad cache.
    """
    shape = f"{ds.size}" if ds.crop else f"{ds.size}-resized"  # a cache per way of squaring the images
    key = hashlib.sha1("\n".join(map(str, ds.paths)).encode() + shape.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{tag}-{ds.size}px-{key}.npy"
    if not path.exists():
        say(f"decoding {len(ds):,} images of {tag} once into {path} (later runs memory-map it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ds), 3, ds.size, ds.size))
            i = 0
            for x, _ in DataLoader(ds, batch_size=256, num_workers=num_workers):
                out[i : i + len(x)] = x.numpy()
                i += len(x)
            out.flush()
            del out
            os.replace(tmp, path)
        except BaseException:  # a bad image, Ctrl-C, a full disk: no half-written cache left (gigabytes at scale)
            tmp.unlink(missing_ok=True)
            raise
    images = torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: writable, so torch does not warn
    return LabelledTensors(images, ds.labels, ds.domains, rows=torch.arange(len(ds)))


class RootedDataModule(MixtureDataModule):
    """A mixture read from files under `data.root/<subdir>`, with the missing-data check."""

    subdir: str = ""
    source: str = ""  # where to get the files, for the missing-data message
    downloadable: bool = False

    @property
    def folder(self) -> Path:
        return Path(self.cfg.root).expanduser() / self.subdir

    def expected(self) -> list[str]:
        """The files and folders, relative to `folder`, that `load` reads."""
        raise NotImplementedError

    def _absent(self) -> list[str]:
        return [f for f in self.expected() if not (self.folder / f).exists()]

    def check(self) -> None:
        self.require()

    def require(self) -> None:
        absent = self._absent()
        if absent:
            root = Path(self.cfg.root).expanduser()
            raise missing(self.cfg.name, root, self.folder, self.expected(), self.source, self.downloadable, absent)


class FileDataModule(RootedDataModule):
    """A mixture of image files: square images of `data.img_size`, torchvision's downloaders, the decoded cache."""

    def __init__(self, cfg: FileDataConfig, seed: int = 0):
        if cfg.img_size < 1:
            raise MTLError(f"data.img_size={cfg.img_size} must be positive.")
        self.img_size = cfg.img_size
        super().__init__(cfg, seed)

    def fetch(self) -> None:
        raise NotImplementedError

    def prepare_data(self) -> None:  # Lightning runs this on one process before setup
        if self.cfg.download and self._absent():
            if not self.downloadable:
                raise MTLError(f"data={self.cfg.name} has no downloader. Get the files from {self.source}.")
            download_with(self.fetch, self.cfg.name, self.source)

    def check(self) -> None:
        self.prepare_data()
        self.require()

    def maybe_cache(self, ds: ImageFiles, tag: str):
        if not self.cfg.cache:
            return ds
        where = Path(self.cfg.cache_dir) if self.cfg.cache_dir else Path(self.cfg.root).expanduser() / ".cache"
        return cached(ds, where, tag, self.cfg.num_workers)
