"""CelebA (Liu et al. 2015): aligned face images, 40 binary attributes as 40 tasks (Royer et al.'s MTL benchmark).

Reads the official files under `<data.root>/celeba/`, in the layout torchvision's downloader produces
(`img_align_celeba/*.jpg`, `list_attr_celeba.txt`, `list_eval_partition.txt`) or the official download's (`Img/
img_align_celeba/`, `Anno/list_attr_celeba.txt`, `Eval/list_eval_partition.txt`, as FAMO reads it): the attribute
file holds the image count, the 40 attribute names, then one line per image with -1/1 values; the partition file 0 =
train, 1 = val, 2 = test. Images (178x218) are centre-cropped to a square and resized to `data.img_size` (default
64), or resized whole (`data.crop=false`, FAMO's). `data.task_kind`: `classification` (Royer et al.'s: a 2-way
softmax per attribute, accuracy) or `binary` (FAMO's: one logit per attribute, binary cross-entropy, F1). 200k JPEGs
per epoch is a lot of decoding: set `data.cache=true` (on in `exp=celeba_mtl`) to decode once into a memory-mapped
uint8 file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MTLError
from ..tasks import Binary, Classification
from .base import DATASETS
from .files import FileDataConfig, FileDataModule, ImageFiles, corrupt

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()


LAYOUTS = {  # torchvision's, the official download's: (images, attributes, partition)
    "torchvision": ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"),
    "official": ("Img/img_align_celeba", "Anno/list_attr_celeba.txt", "Eval/list_eval_partition.txt"),
}


@dataclass
class CelebAConfig(FileDataConfig):
    name: str = "celeba"
    img_size: int = 64
    task_kind: str = "classification"  # classification (2-way softmax, accuracy) | binary (a logit, BCE, F1: FAMO's)


@DATASETS.register("celeba")
class CelebADataModule(FileDataModule):
    Config = CelebAConfig
    kind = "mtl"
    subdir = "celeba"
    source = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images, Anno/, Eval/)"
    downloadable = True

    def describe(self) -> list[Classification | Binary]:
        if self.cfg.task_kind not in ("classification", "binary"):
            raise MTLError(f"Unknown data.task_kind={self.cfg.task_kind!r}. Valid choices: classification, binary.")
        if self.cfg.task_kind == "binary":
            return [Binary(a, metrics=("f1",)) for a in ATTRIBUTES]
        return [Classification(a, 2) for a in ATTRIBUTES]

    def _layout(self) -> tuple[str, str, str]:
        official = LAYOUTS["official"]
        return official if (self.folder / official[1]).is_file() else LAYOUTS["torchvision"]

    def expected(self) -> list[str]:
        images, attr, part = self._layout()
        return [f"{images}/", attr, part]

    def fetch(self) -> None:
        from torchvision.datasets import CelebA

        CelebA(str(self.folder.parent), split="all", target_type="attr", download=True)

    def load(self) -> dict[str, ImageFiles]:
        self.require()
        images, attr, part = self._layout()
        attr_file, part_file = self.folder / attr, self.folder / part
        try:
            lines = attr_file.read_text().splitlines()
            n, header = int(lines[0]), lines[1].split()
            if header != list(ATTRIBUTES):
                raise ValueError("the second line is not the 40 CelebA attribute names")
            rows = [ln.split() for ln in lines[2:] if ln.strip()]
            if len(rows) != n or any(len(r) != 41 for r in rows):
                raise ValueError(f"expected {n} lines of a file name and 40 values")
            files = np.array([r[0] for r in rows])
            values = torch.tensor(np.array([r[1:] for r in rows], dtype=np.int64))
            if not ((values == 1) | (values == -1)).all():
                raise ValueError("attribute values must be -1 or 1")
        except (ValueError, IndexError) as e:
            raise corrupt(attr_file, e) from None
        try:
            part = dict(ln.split() for ln in part_file.read_text().splitlines() if ln.strip())
            split_of = np.array([int(part[f]) for f in files])
        except (ValueError, KeyError) as e:
            raise corrupt(part_file, e) from None
        labels, paths = (values + 1) // 2, np.array([str(self.folder / images / f) for f in files])
        out = {}
        for name, code in (("train", 0), ("val", 1), ("test", 2)):
            rows_ = torch.from_numpy(np.flatnonzero(split_of == code))
            if len(rows_) == 0:
                raise MTLError(f"{part_file} lists no images for the {name} split (code {code}).")
            ds = ImageFiles(
                paths[rows_.numpy()],
                labels[rows_],
                torch.zeros(len(rows_), dtype=torch.long),
                self.img_size,
                self.cfg.crop,
            )
            out[name] = self.maybe_cache(ds, f"celeba-{name}")
        return out
