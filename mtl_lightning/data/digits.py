"""The embedded default: scikit-learn's real handwritten digits (1,797 8x8 scans), no download.

MTL (`mode=mtl`): MultiMNIST-style, two digits overlapped on one canvas, one at the top-left and one at the
bottom-right (each jittered by a pixel); task `left` reads the first, task `right` the second.
MDL (`mode=mdl`): two domains with one head each: `clean` (one centred digit) and `shifted` (the same kind of
digit off-centre with inverted intensities), a visible domain shift.

The splits are fixed: the 1,797 scans are divided 60/20/20 into train/val/test by `split_seed`, and every
composed image uses scans of its own split only, so no test digit is ever seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MTLError
from ..tasks import Classification
from .base import DATASETS, DataConfig, LabelledTensors, MixtureDataModule


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    mode: str = "mtl"  # mtl | mdl
    img_size: int = 16  # canvas side; each digit is scaled to 3/4 of it
    train_size: int = 6000  # composed images per split (per domain for mdl)
    val_size: int = 1000
    test_size: int = 1000


@DATASETS.register("digits")
class DigitsDataModule(MixtureDataModule):
    Config = DigitsConfig
    in_chans = 1

    def __init__(self, cfg: DigitsConfig, seed: int = 0):
        if cfg.mode not in ("mtl", "mdl"):
            raise MTLError(f"Unknown data.mode={cfg.mode!r} for data=digits. Valid choices: mtl, mdl.")
        self.kind, self.img_size = cfg.mode, cfg.img_size
        super().__init__(cfg, seed)

    def describe(self) -> list[Classification]:
        names = ("left", "right") if self.kind == "mtl" else ("clean", "shifted")
        return [Classification(n, 10) for n in names]

    def load(self) -> dict[str, LabelledTensors]:
        from sklearn.datasets import load_digits

        d = load_digits()
        S = self.cfg.img_size
        s = max(4, round(S * 0.75))
        scans = F.interpolate(
            torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0,
            size=(s, s),
            mode="bilinear",
            align_corners=False,
        ).clamp(0, 1)[:, 0]
        targets = torch.as_tensor(d.target)
        g = torch.Generator().manual_seed(self.cfg.split_seed)
        perm = torch.randperm(len(scans), generator=g)
        a, b = int(0.6 * len(perm)), int(0.8 * len(perm))
        pools = {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}
        sizes = {"train": self.cfg.train_size, "val": self.cfg.val_size, "test": self.cfg.test_size}
        out = {}
        for split, pool in pools.items():
            n = sizes[split]
            if self.kind == "mtl":
                out[split] = self._compose_pairs(scans, targets, pool, n, S, g)
            else:
                out[split] = self._compose_domains(scans, targets, pool, n, S, g)
        return out

    @staticmethod
    def _place(canvas, scan, top, left):
        s = scan.shape[-1]
        region = canvas[top : top + s, left : left + s]
        torch.maximum(region, scan, out=region)

    def _compose_pairs(self, scans, targets, pool, n, S, g) -> LabelledTensors:
        s = scans.shape[-1]
        pick = pool[torch.randint(len(pool), (n, 2), generator=g)]
        jitter = torch.randint(0, 2, (n, 4), generator=g)
        far = S - s
        canvas = torch.zeros(n, S, S)
        for i in range(n):
            j = jitter[i].tolist()
            self._place(canvas[i], scans[pick[i, 0]], j[0], j[1])
            self._place(canvas[i], scans[pick[i, 1]], far - j[2], far - j[3])
        labels = targets[pick]
        return LabelledTensors(_to_uint8(canvas), labels, torch.zeros(n, dtype=torch.long))

    def _compose_domains(self, scans, targets, pool, n, S, g) -> LabelledTensors:
        s = scans.shape[-1]
        pick = pool[torch.randint(len(pool), (2 * n,), generator=g)]
        jitter = torch.randint(-1, 2, (2 * n, 2), generator=g)
        mid, far = (S - s) // 2, S - s
        canvas = torch.zeros(2 * n, S, S)
        for i in range(2 * n):
            dy, dx = jitter[i].tolist()
            if i < n:  # clean: centred
                self._place(canvas[i], scans[pick[i]], mid + min(dy, far - mid), mid + min(dx, far - mid))
            else:  # shifted: pushed to the bottom-right corner, then inverted below
                self._place(canvas[i], scans[pick[i]], far - abs(dy), far - abs(dx))
        canvas[n:] = 1.0 - canvas[n:]
        domains = torch.cat([torch.zeros(n), torch.ones(n)]).long()
        labels = torch.full((2 * n, 2), -1, dtype=torch.long)
        labels[torch.arange(2 * n), domains] = targets[pick]
        return LabelledTensors(_to_uint8(canvas), labels, domains)


def _to_uint8(canvas):
    return (canvas * 255).round().to(torch.uint8)[:, None]
