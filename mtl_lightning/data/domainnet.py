"""DomainNet (Peng et al. 2019): 6 domains of the same 345 classes, one head per domain (Royer et al., ForkMerge).

Reads the official layout under `<data.root>/domainnet/`: one image folder per domain (`clipart/<class>/*.jpg`, ...)
and the official split lists `<domain>_train.txt` / `<domain>_test.txt`, lines `<domain>/<class>/<file> <label>`.
Validation follows ForkMerge: a seeded half of each domain's test list validates, the other half tests (with
`data.train_fraction < 1` the held-out part of train validates instead and the whole test list tests).
`data.tasks=[real, painting]` loads only those domains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..tasks import Classification
from .base import DATASETS, holdout
from .files import FileDataConfig, FileDataModule, ImageFiles, corrupt

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NUM_CLASSES = 345


@dataclass
class DomainNetConfig(FileDataConfig):
    name: str = "domainnet"
    img_size: int = 64
    mixing: str = "sample"  # Royer et al.'s MDL: batches drawn from the weighted mixture of domains


@DATASETS.register("domainnet")
class DomainNetDataModule(FileDataModule):
    Config = DomainNetConfig
    kind = "mdl"
    subdir = "domainnet"
    source = "http://ai.bu.edu/M3SDA/ (each domain's zip, 'cleaned' version, and its <domain>_train/test.txt)"

    def describe(self) -> list[Classification]:
        return [Classification(d, NUM_CLASSES) for d in DOMAINS]

    def _domains(self) -> list[str]:  # only the chosen ones are read
        return [self.all_tasks[i].name for i in self.keep]

    def expected(self) -> list[str]:
        return [f for d in self._domains() for f in (f"{d}/", f"{d}_train.txt", f"{d}_test.txt")]

    def _read_list(self, domain: str, split: str):
        path = self.folder / f"{domain}_{split}.txt"
        try:
            rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
            files, labels = np.array([r[0] for r in rows]), np.array([int(r[1]) for r in rows], dtype=np.int64)
            if any(len(r) != 2 for r in rows) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
                raise ValueError(f"lines must be '<path> <label>' with labels in 0..{NUM_CLASSES - 1}")
        except (ValueError, IndexError) as e:
            raise corrupt(path, e) from None
        return np.array([str(self.folder / f) for f in files]), torch.from_numpy(labels)

    def load(self) -> dict[str, ImageFiles]:
        self.require()
        out = {}
        for split in ("train", "test"):
            paths, labels, domains = [], [], []
            for d in self._domains():
                p, y = self._read_list(d, split)
                k = DOMAINS.index(d)
                col = torch.full((len(y), len(DOMAINS)), -1, dtype=torch.long)
                col[:, k] = y
                paths.append(p), labels.append(col), domains.append(torch.full((len(y),), k))
            ds = ImageFiles(np.concatenate(paths), torch.cat(labels), torch.cat(domains), self.img_size, self.cfg.crop)
            tag = "domainnet-" + "-".join(self._domains()) + f"-{split}"
            out[split] = self.maybe_cache(ds, tag)
        if self.cfg.train_fraction == 1:  # ForkMerge's protocol: half of each test list validates
            out["val"], out["test"] = holdout(out["test"], 0.5, self.cfg.split_seed)
        return out
