"""Office-31 (Saenko et al. 2010) and Office-Home (Venkateswara et al. 2017) as LibMTL runs them: multi-input,
each domain its own images and its own head (31 and 65 classes).

Reads LibMTL's split lists, `data_txt/<office-31|office-home>/<domain>_{train,val,test}.txt` (in the dataset's
folder or the folder above it), lines `relative/path.jpg <label>` relative to the dataset's folder,
`<data.root>/office-31/` or `<data.root>/office-home/` (LibMTL's 60/20/20 split: Office-31 amazon 1680/552/585,
dslr 287/89/122, webcam 466/149/180). Images are resized whole to 224x224 (`data.crop=false`, LibMTL's
`Resize((224, 224))`) and standardised by ImageNet's statistics (`model.input_norm=imagenet`, set by the
experiments). `data.mixing=multi_input` (the experiments' default) gives every training step `data.batch_size`
images of each domain, an epoch being the longest domain's whole batches, the shorter domains starting over, as
LibMTL's multi-input trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MTLError
from ..tasks import Classification
from .base import DATASETS
from .files import FileDataConfig, FileDataModule, ImageFiles, corrupt

OFFICE = {  # name -> (folder, list folder, domains, classes)
    "office31": ("office-31", "office-31", ("amazon", "dslr", "webcam"), 31),
    "officehome": ("office-home", "office-home", ("Art", "Clipart", "Product", "Real_World"), 65),
}


@dataclass
class OfficeConfig(FileDataConfig):
    name: str = "office31"
    root: str = field(default_factory=lambda: os.environ.get("MTL_DATA_ROOT", "data"))
    img_size: int = 224
    crop: bool = False  # LibMTL resizes the whole image
    mixing: str = "multi_input"
    batch_size: int = 64
    drop_last: bool = True  # LibMTL's loaders drop the last partial batch


class OfficeDataModule(FileDataModule):
    Config = OfficeConfig
    kind = "mdl"
    source = (
        "LibMTL (https://github.com/median-research-group/LibMTL, examples/office/data_txt: the split lists, kept in "
        "the dataset's folder or the folder above it) with the images of Office-31 "
        "(https://faculty.cc.gatech.edu/~judy/domainadapt/) or Office-Home (https://www.hemanthdv.org/officeHomeDataset.html)"
    )

    @property
    def spec(self):
        return OFFICE[self.cfg.name]

    @property
    def subdir(self) -> str:
        return self.spec[0]

    def describe(self) -> list[Classification]:
        return [Classification(d, self.spec[3]) for d in self.spec[2]]

    def _lists(self) -> Path:
        """data_txt/<name>/ in the dataset's folder, or in the folder above it (LibMTL's repository keeps it apart)."""
        here = self.folder / "data_txt" / self.spec[1]
        return here if here.is_dir() else self.folder.parent / "data_txt" / self.spec[1]

    def _domains(self) -> list[str]:
        return [self.all_tasks[i].name for i in self.keep]

    def expected(self) -> list[str]:
        lists = self._lists()
        prefix = "" if lists.parent.parent == self.folder else "../"
        names = [f"{d}_{s}.txt" for d in self._domains() for s in ("train", "val", "test")]
        if not lists.is_dir():  # neither place: name the lists compactly
            return [f"data_txt/{self.spec[1]}/" + "{" + ",".join(self._domains()) + "}_{train,val,test}.txt"]
        return [f"{prefix}data_txt/{self.spec[1]}/{n}" for n in names]

    def _read(self, domain: str, split: str):
        path = self._lists() / f"{domain}_{split}.txt"
        try:
            lines = [(n, ln.split()) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
        except (ValueError, OSError) as e:  # not text
            raise corrupt(path, e) from None
        classes = self.spec[3]
        for n, r in lines:  # a line's own fault, named with its number and the bound (not "truncated or corrupt")
            if len(r) != 2 or not r[1].lstrip("-").isdigit() or not 0 <= int(r[1]) < classes:
                raise MTLError(
                    f"{path}, line {n}: {' '.join(r)!r} is not '<relative path> <label>' with a label in "
                    f"0..{classes - 1} (data={self.cfg.name} has {classes} classes)."
                )
        rows = [r for _, r in lines]
        labels = np.array([int(r[1]) for r in rows], dtype=np.int64)
        return np.array([str(self.folder / r[0]) for r in rows]), torch.from_numpy(labels)

    def load(self) -> dict[str, ImageFiles]:
        self.require()
        out, domains = {}, list(self.spec[2])
        for split in ("train", "val", "test"):
            paths, labels, which = [], [], []
            for d in self._domains():
                p, y = self._read(d, split)
                k = domains.index(d)
                col = torch.full((len(y), len(domains)), -1, dtype=torch.long)
                col[:, k] = y
                paths.append(p), labels.append(col), which.append(torch.full((len(y),), k))
            if not sum(len(p) for p in paths):
                raise MTLError(f"The {split} lists of {self._lists()} name no image.")
            ds = ImageFiles(np.concatenate(paths), torch.cat(labels), torch.cat(which), self.img_size, self.cfg.crop)
            out[split] = self.maybe_cache(ds, f"{self.cfg.name}-" + "-".join(self._domains()) + f"-{split}")
        return out


@DATASETS.register("office31")
class Office31DataModule(OfficeDataModule):
    pass


@dataclass
class OfficeHomeConfig(OfficeConfig):
    name: str = "officehome"


@DATASETS.register("officehome")
class OfficeHomeDataModule(OfficeDataModule):
    Config = OfficeHomeConfig
