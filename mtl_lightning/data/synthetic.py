"""Tiny generated mixtures with a known structure, for tests, benchmarks and controlled experiments.

A latent z ~ N(0, I_d) is rendered to an image x = P z + noise (P a fixed random projection, reshaped to
C x S x S). Labels are linear-argmax readouts of z. `relatedness` r in [-1, 1] sets how tasks relate:
- MTL: task k reads z through W_k = r W_0 + sqrt(1 - r^2) U_k (W_0 shared, U_k task-specific). r = 1 makes all
  tasks the same task, r = 0 makes them unrelated (they compete for the backbone's capacity), r < 0 anti-aligns
  them with the shared direction.
- MDL: every domain has the same labelling W_0, but renders z through P_k = r P_0 + sqrt(1 - r^2) Q_k.
`sizes` gives each task/domain its own training-set size (imbalance), `label_noise` flips a fraction of each
task's training labels to random classes (a harmful auxiliary task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MTLError
from ..tasks import Classification
from .base import DATASETS, DataConfig, LabelledTensors, MixtureDataModule


@dataclass
class SyntheticConfig(DataConfig):
    name: str = "synthetic"
    mode: str = "mtl"  # mtl | mdl
    num_tasks: int = 2
    num_classes: int = 4
    latent_dim: int = 16
    img_size: int = 8
    channels: int = 1
    relatedness: float = 0.5
    noise: float = 0.1
    label_noise: list[float] | None = None  # per task, fraction of training labels replaced at random
    train_size: int = 2000  # per domain for mdl
    sizes: list[int] | None = None  # per task/domain training sizes (overrides train_size for mdl)
    val_size: int = 500
    test_size: int = 500


@DATASETS.register("synthetic")
class SyntheticDataModule(MixtureDataModule):
    Config = SyntheticConfig

    def __init__(self, cfg: SyntheticConfig, seed: int = 0):
        if cfg.mode not in ("mtl", "mdl"):
            raise MTLError(f"Unknown data.mode={cfg.mode!r} for data=synthetic. Valid choices: mtl, mdl.")
        if cfg.num_tasks < 1 or not -1.0 <= cfg.relatedness <= 1.0:
            raise MTLError("data.num_tasks must be >= 1 and data.relatedness within [-1, 1].")
        for key in ("sizes", "label_noise"):
            v = getattr(cfg, key)
            if v is not None and len(v) != cfg.num_tasks:
                raise MTLError(f"data.{key} has {len(v)} values for data.num_tasks={cfg.num_tasks}.")
        self.kind, self.img_size, self.in_chans = cfg.mode, cfg.img_size, cfg.channels
        super().__init__(cfg, seed)

    def describe(self) -> list[Classification]:
        prefix = "task" if self.kind == "mtl" else "domain"
        return [Classification(f"{prefix}{k}", self.cfg.num_classes) for k in range(self.cfg.num_tasks)]

    def load(self) -> dict[str, LabelledTensors]:
        c = self.cfg
        K, d, D = c.num_tasks, c.latent_dim, c.channels * c.img_size**2
        g = torch.Generator().manual_seed(c.split_seed)
        r, q = c.relatedness, math.sqrt(1 - c.relatedness**2)
        W0 = torch.randn(c.num_classes, d, generator=g)
        P0 = torch.randn(D, d, generator=g) / math.sqrt(d)
        W = [r * W0 + q * torch.randn(c.num_classes, d, generator=g) for _ in range(K)]
        P = [r * P0 + q * torch.randn(D, d, generator=g) / math.sqrt(d) for _ in range(K)]
        sizes = c.sizes or [c.train_size] * K

        def render(z, proj):
            x = z @ proj.T + c.noise * torch.randn(len(z), D, generator=g)
            return x.view(len(z), c.channels, c.img_size, c.img_size)

        out = {}
        for split in ("train", "val", "test"):
            if self.kind == "mtl":
                n = {"train": c.train_size, "val": c.val_size, "test": c.test_size}[split]
                z = torch.randn(n, d, generator=g)
                labels = torch.stack([(z @ Wk.T).argmax(1) for Wk in W], 1)
                x, domains = render(z, P0), torch.zeros(n, dtype=torch.long)
            else:
                ns = sizes if split == "train" else [c.val_size if split == "val" else c.test_size] * K
                zs = [torch.randn(n, d, generator=g) for n in ns]
                x = torch.cat([render(z, P[k]) for k, z in enumerate(zs)])
                domains = torch.cat([torch.full((n,), k) for k, n in enumerate(ns)])
                labels = torch.full((len(x), K), -1, dtype=torch.long)
                labels[torch.arange(len(x)), domains] = torch.cat([(z @ W0.T).argmax(1) for z in zs])
            if split == "train" and c.label_noise:
                for k, frac in enumerate(c.label_noise):
                    flip = (torch.rand(len(labels), generator=g) < frac) & (labels[:, k] >= 0)
                    labels[flip, k] = torch.randint(c.num_classes, (int(flip.sum()),), generator=g)
            out[split] = LabelledTensors(x, labels, domains)
        return out
