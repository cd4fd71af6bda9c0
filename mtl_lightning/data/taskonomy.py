"""Taskonomy (Zamir et al., CVPR 2018) with the five tasks of Standley et al. (ICML 2020, arXiv:1905.07553).

Reads the per-building PNG layout of the official release under `<data.root>/taskonomy/`, in either of its two
arrangements, detected from what is on disk:
    <task>/<building>/point_<p>_view_<v>_domain_<task>.png             Standley et al.'s loader
    <task>/taskonomy/<building>/point_<p>_view_<v>_domain_<task>.png   `omnitools.download --components taskonomy`
for task in rgb and the chosen tasks (omnitools puts other components, such as `replica`, beside `taskonomy/`), and
the official split list `train_val_test_<data.split>.csv` (id,train,val,test as 1/0) at the folder's top or in
`splits_taskonomy/`: the Taskonomy repository publishes the lists (`data/assets/splits_taskonomy.zip`), the
downloader does not fetch them. A sample is an `rgb` image; its labels are the files of the same point and view in
the task folders. Labels stored at a lower resolution than the image (omnitools' `segment_semantic` is 256 px
against 512) are resized with nearest neighbours like every label.

Encodings, from the dataset's documentation and its authors' loaders (Standley et al.'s `taskonomy_loader.py`):
- `rgb`: 8-bit RGB, 512x512; resized to `data.img_size` (bilinear, antialiased), labels with nearest neighbours.
- `segment_semantic`: 8-bit, one class id per pixel, 0..17, where 0 is unlabelled (Standley's loss ignores it):
  here 0 -> -1 and c -> c - 1, so 17 classes.
- `depth_zbuffer`: 16-bit, z-buffer depth in units of 1/512 m (so at most 128 m); 65535 marks pixels without
  geometry (windows, holes). Decoded to metres, with 0 for invalid pixels (NYUv2's convention). Standley et al.
  further mask depth beyond 8192/512 = 16 m and standardise it as (raw - 1500) / 1000 for the loss; here the L1 loss
  is on metres.
- `normal`: 8-bit RGB, 127-centred: n = x / 255 * 2 - 1 in camera coordinates. Pixels without depth get the zero
  vector (no normal), as Standley's loss masks normals with the depth mask; so `normal` reads `depth_zbuffer` too.
- `keypoints2d`: 16-bit heat map; standardised as Standley's loader does: (raw - 50) / 100.
- `edge_texture`: 16-bit 2D texture edge strength; standardised as Standley's loader does: (raw - 718) / 1070.
Segmentation is scored by mIoU and pixel accuracy, depth by absolute and relative error, normals by angle errors,
keypoints and edges by mean absolute error (of the standardised values), each with its loss as in `tasks/dense.py`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MTLError
from ..tasks import Depth, Normal, PixelRegression, Segmentation, Task
from .base import DATASETS
from .dense import DenseConfig, DenseDataModule, DenseFiles
from .files import RootedDataModule, corrupt

TASKS = ("segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture")
SIXTEEN_BIT = ("depth_zbuffer", "keypoints2d", "edge_texture")
STANDARDISE = {"keypoints2d": (50.0, 100.0), "edge_texture": (718.0, 1070.0)}  # Standley's (raw - a) / b
SPLITS = ("debug", "tiny", "medium", "full", "fullplus")
SPLIT_LISTS = "github.com/StanfordVL/taskonomy, data/assets/splits_taskonomy.zip; omnitools.download does not fetch it"


@dataclass
class TaskonomyConfig(DenseConfig):
    name: str = "taskonomy"
    root: str = field(default_factory=lambda: os.environ.get("MTL_DATA_ROOT", "data"))
    split: str = "tiny"  # which official split list: debug | tiny | medium | full | fullplus
    img_size: int = 256  # Standley et al. train at 256x256
    augment: bool = False  # Standley et al.'s loader flips horizontally; the scale-crop is MTAN's
    batch_size: int = 32
    eval_batch_size: int = 64


def read_png(path: Path, task: str) -> np.ndarray:
    """One PNG as an array, refusing the wrong bit depth or channel count for `task`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            a = np.array(im)
    except FileNotFoundError:
        raise MTLError(
            f"{path} does not exist, but its rgb image does: every chosen task needs a label file."
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise corrupt(path, e) from None
    want = "16-bit" if task in SIXTEEN_BIT else ("8-bit RGB" if task in ("rgb", "normal") else "8-bit")
    ok = {
        "16-bit": mode in ("I;16", "I;16B", "I") and a.ndim == 2,
        "8-bit RGB": mode == "RGB",
        "8-bit": mode in ("L", "P"),
    }[want]
    if not ok:
        raise MTLError(f"{path} is a PNG of mode {mode!r} (shape {a.shape}); Taskonomy's {task} is a {want} PNG.")
    return a


class TaskonomySample:
    """Reads one (building, point-view) sample: (image (3, S, S) uint8, [targets of the chosen tasks]). `dirs`: each
    task's folder of buildings."""

    def __init__(self, dirs: dict[str, Path], size: int):
        self.dirs, self.size = dirs, size

    def _path(self, task: str, item) -> Path:
        building, stem = item
        return self.dirs[task] / building / f"{stem}_domain_{task}.png"

    def _resize(self, a: np.ndarray, mode: str) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        t = torch.from_numpy(np.ascontiguousarray(a))
        t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
        if tuple(t.shape[-2:]) == (self.size, self.size):
            return t
        if mode == "nearest":
            return TF.resize(t, [self.size, self.size], interpolation=InterpolationMode.NEAREST_EXACT)
        return TF.resize(t, [self.size, self.size], antialias=True)

    def __call__(self, item, tasks: list[int]):
        image = self._resize(read_png(self._path("rgb", item), "rgb"), "bilinear")
        out, depth_raw = [], None
        names = [TASKS[k] for k in tasks]
        if "normal" in names or "depth_zbuffer" in names:
            raw = read_png(self._path("depth_zbuffer", item), "depth_zbuffer").astype(np.int64)
            depth_raw = self._resize(raw, "nearest")
        for name in names:
            if name == "segment_semantic":
                a = self._resize(read_png(self._path(name, item), name).astype(np.int64), "nearest")[0]
                out.append(a - 1)  # 0 (unlabelled) -> -1, classes 1..17 -> 0..16
            elif name == "depth_zbuffer":
                valid = depth_raw < 65535
                out.append(torch.where(valid, depth_raw.float() / 512.0, 0.0))
            elif name == "normal":
                n = self._resize(read_png(self._path(name, item), name), "nearest").float() / 255 * 2 - 1
                out.append(torch.where(depth_raw < 65535, n, 0.0))
            else:
                a, b = STANDARDISE[name]
                out.append((self._resize(read_png(self._path(name, item), name).astype(np.float32), "nearest") - a) / b)
        return image, out


@DATASETS.register("taskonomy")
class TaskonomyDataModule(DenseDataModule, RootedDataModule):
    Config = TaskonomyConfig
    subdir = "taskonomy"
    source = (
        "the Taskonomy release (taskonomy.vision; `pip install omnidata-tools` then `omnitools.download rgb "
        "segment_semantic depth_zbuffer normal keypoints2d edge_texture --components taskonomy --subset tiny`), "
        "laid out as that tool writes it (<task>/taskonomy/<building>/*.png) or as Standley et al.'s loader reads it "
        f"(<task>/<building>/*.png), and the official split list train_val_test_<split>.csv ({SPLIT_LISTS}) at the "
        "folder's top or in splits_taskonomy/"
    )
    in_chans = 3

    def __init__(self, cfg: TaskonomyConfig, seed: int = 0):
        if cfg.split not in SPLITS:
            raise MTLError(f"Unknown data.split={cfg.split!r} for data=taskonomy. Valid choices: {', '.join(SPLITS)}.")
        if cfg.img_size < 1:
            raise MTLError(f"data.img_size={cfg.img_size} must be positive.")
        self.img_size = cfg.img_size
        super().__init__(cfg, seed)

    def describe(self) -> list[Task]:
        return [
            Segmentation("segment_semantic", 17, self.cfg.metric_average),
            Depth("depth_zbuffer", self.cfg.metric_average),
            Normal("normal", self.cfg.metric_average),
            PixelRegression("keypoints2d"),
            PixelRegression("edge_texture"),
        ]

    def _reads(self) -> list[str]:  # the folders the chosen tasks read
        names = {self.all_tasks[i].name for i in self.keep}
        if "normal" in names:
            names.add("depth_zbuffer")
        return ["rgb", *[t for t in TASKS if t in names]]

    def expected(self) -> list[str]:
        return [f"train_val_test_{self.cfg.split}.csv", *[f"{t}/" for t in self._reads()]]

    def _absent(self) -> list[str]:
        absent = [f"{t}/" for t in self._reads() if not (self.folder / t).is_dir()]
        return absent if self._split_list() else [f"train_val_test_{self.cfg.split}.csv", *absent]

    def require(self) -> None:
        if self._absent() == [f"train_val_test_{self.cfg.split}.csv"]:  # the images are there, the list is not
            raise MTLError(
                f"data=taskonomy needs the official split list train_val_test_{self.cfg.split}.csv in {self.folder} "
                f"or {self.folder / 'splits_taskonomy'}, and it is in neither. The lists are published in the "
                "Taskonomy repository: github.com/StanfordVL/taskonomy, data/assets/splits_taskonomy.zip (unzip it "
                f"into {self.folder}); omnitools.download does not fetch them."
            )
        super().require()

    def _split_list(self) -> Path | None:
        name = f"train_val_test_{self.cfg.split}.csv"
        return next((p for p in (self.folder / name, self.folder / "splits_taskonomy" / name) if p.is_file()), None)

    def _dir(self, task: str) -> Path:
        """A task's folder of buildings: <task>/taskonomy/ as omnitools.download writes it, else <task>/."""
        omni = self.folder / task / "taskonomy"
        return omni if omni.is_dir() else self.folder / task

    def _buildings(self) -> dict[str, list[str]]:
        path = self._split_list()
        out = {"train": [], "val": [], "test": []}
        try:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    for split in out:
                        if row[split].strip() == "1":
                            out[split].append(row["id"].strip())
        except (KeyError, AttributeError, csv.Error) as e:
            raise MTLError(f"{path} is not an id,train,val,test split list ({type(e).__name__}: {e}).") from None
        return out

    def _samples(self, buildings: list[str]) -> list[tuple[str, str]]:
        items = []
        for b in buildings:
            folder = self._dir("rgb") / b
            stems = sorted(p.name[: -len("_domain_rgb.png")] for p in folder.glob("*_domain_rgb.png"))
            if not stems:
                raise MTLError(
                    f"Building {b!r} is in {self._split_list()} but {folder} holds no *_domain_rgb.png files: "
                    "download that building, or use the split list of the buildings you have."
                )
            for task in self._reads()[1:]:
                have = {p.name for p in (self._dir(task) / b).glob("*.png")}
                lost = [s for s in stems if f"{s}_domain_{task}.png" not in have]
                if lost:
                    raise MTLError(
                        f"{self._dir(task) / b} lacks {len(lost)} of the {len(stems)} label files of building {b!r} "
                        f"(e.g. {lost[0]}_domain_{task}.png): download {task} for it, or drop {task} from data.tasks."
                    )
            items += [(b, s) for s in stems]
        return items

    def load(self) -> dict[str, DenseFiles]:
        self.require()
        reader = TaskonomySample({t: self._dir(t) for t in self._reads()}, self.img_size)
        out = {}
        for split, buildings in self._buildings().items():
            if not buildings:
                raise MTLError(f"{self._split_list()} lists no {split} building.")
            out[split] = DenseFiles(self._samples(buildings), reader, list(range(len(TASKS))))
        return out
