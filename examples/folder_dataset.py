"""A dataset in your lab's own format: a folder of images and a CSV of their labels, one task per label column.

my_data/labels.csv        file,split,shape,colour       (split: train, val or test; a class id per task, -1: none)
my_data/images/<file>     any image Pillow opens

python -m experiments.run exp=digits_mtl plugins=[examples/folder_dataset.py] data=image_folder data.root=my_data
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtl_lightning import DATASETS, Classification, DataConfig, LabelledTensors, MixtureDataModule, MTLError


@dataclass
class FolderConfig(DataConfig):  # the data section's keys: DataConfig's (batch_size, tasks ...) and these
    name: str = "image_folder"
    root: str = "my_data"
    img_size: int = 16


@DATASETS.register("image_folder")
class ImageFolder(MixtureDataModule):
    Config = FolderConfig

    def __init__(self, cfg: FolderConfig, seed: int = 0):
        self.root, self.img_size = Path(cfg.root).expanduser(), cfg.img_size  # in_chans stays 3 (RGB)
        if not (self.root / "labels.csv").is_file():
            raise MTLError(f"data=image_folder reads {self.root}/labels.csv and {self.root}/images/: not there.")
        with open(self.root / "labels.csv") as f:
            self.rows = list(csv.DictReader(f))
        super().__init__(cfg, seed)  # calls describe(); load() comes later, in setup()

    def describe(self) -> list[Classification]:  # one task per label column after `file` and `split`
        return [Classification(t, 1 + max(int(r[t]) for r in self.rows)) for t in list(self.rows[0])[2:]]

    def load(self) -> dict[str, LabelledTensors]:  # uint8 images (N, 3, S, S), labels (N, K), domains (N,)
        out, size = {}, (self.img_size, self.img_size)
        for split in ("train", "val", "test"):
            rows = [r for r in self.rows if r["split"] == split]
            images = [
                np.asarray(Image.open(self.root / "images" / r["file"]).convert("RGB").resize(size)) for r in rows
            ]
            labels = torch.tensor([[int(r[t.name]) for t in self.all_tasks] for r in rows])
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            out[split] = LabelledTensors(x, labels, torch.zeros(len(rows), dtype=torch.long))
        return out
