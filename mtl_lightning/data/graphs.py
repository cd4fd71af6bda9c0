"""Graph mixtures: QM9 as the optimisation papers train it, and generated molecules-like graphs with known targets.

**QM9** (Ramakrishnan et al. 2014, via PyTorch Geometric's `QM9`, as Nash-MTL and FAMO read it): `<data.root>/qm9/`
holds PyG's `raw/` (gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt: processed once with RDKit) and/or `processed/`
(data_v3.pt). The 11 targets of Nash-MTL/FAMO (PyG indices 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11: μ, α, HOMO, LUMO,
⟨R²⟩, ZPVE, the atomisation energies U0, U, H, G, and c_v; tasks named so), each molecule a complete graph with
the bond's features on bonded pairs and the distance on every pair (their transform). Split: a permutation seeded
by `data.split_seed` (42), the first 10,000 test, the next 10,000 validation, the rest (110,831) training. Targets
standardised with the mean and deviation of the whole dataset, as the reference computes them (`data.standardize`:
all, train, none); the MAE is reported in the original units, the energies (HOMO, LUMO, ZPVE, U0, U, H, G) in meV.
The reference's permutation also depends on its generator's state after its model's initialisation, so the same
seed picks other molecules here; the sizes and the protocol are its own.

**synthetic_graphs**: generated graphs of 4-12 atoms in 3D (five atom types, bonds between atoms closer than 1.6,
of four types), the same features as QM9's (11 per node, 4 bond types + distance per edge), with targets that are
known functions of them: the number of atoms of type 0, of bonds, the mean bond length and the sum of a node
feature, each standardised over the generated set and multiplied by its `data.scales` entry, so that their losses
can differ by orders of magnitude (as QM9's do in the optimisation papers' tables) while every head starts at the
right mean. The MAE is reported in these scaled units.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import MTLError
from ..graph import INSTALL, GraphFeatures, GraphSplit, complete, require_pyg
from ..tasks import Regression
from .base import DATASETS, DataConfig, MixtureDataModule
from .files import RootedDataModule

NAMES = ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0_mol", "U_mol", "H_mol", "G_mol", "cv"]
NAMES += ["U0", "U", "H", "G", "A", "B", "C"]  # 12-15: the atomisation energies the tables report as U0, U, H, G
MEV = {"homo", "lumo", "zpve", "U0", "U", "H", "G"}  # eV in PyG, meV in the tables
STANDARDIZE = ("all", "train", "none")


class GraphDataModule(MixtureDataModule):
    """Graphs, multi-task, every target a `Regression` task; `split_graphs` standardises and splits."""

    kind = "mtl"
    img_size = 0
    in_chans = GraphFeatures(node=11, edge=5)

    def __init__(self, cfg, seed: int = 0):
        if cfg.standardize not in STANDARDIZE:
            raise MTLError(f"Unknown data.standardize={cfg.standardize!r}. Valid choices: {', '.join(STANDARDIZE)}.")
        super().__init__(cfg, seed)

    def split_graphs(self, graphs, y: Tensor, units: list[float]) -> dict[str, GraphSplit]:
        """test, val, train by a permutation seeded by data.split_seed; targets standardised as configured, each
        task's `scale` set to bring its MAE back to the reported units."""
        c, n = self.cfg, len(y)
        if c.test_size + c.val_size >= n:
            raise MTLError(
                f"data.test_size={c.test_size} + data.val_size={c.val_size} leave no training graph of {n}: lower them."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(c.split_seed))
        rows = {"test": perm[: c.test_size], "val": perm[c.test_size : c.test_size + c.val_size]}
        rows["train"] = perm[c.test_size + c.val_size :]
        basis = {"all": y, "train": y[rows["train"]], "none": None}[c.standardize]
        mean = torch.zeros(y.shape[1]) if basis is None else basis.mean(0)
        std = torch.ones(y.shape[1]) if basis is None else basis.std(0)
        labels = (y - mean) / std
        self.target_mean, self.target_std = mean, std  # labels * std + mean: the targets in the data's units
        for t, s, u in zip(self.all_tasks, std.tolist(), units):
            t.scale = s * u
        zeros = torch.zeros(n, dtype=torch.long)
        full = GraphSplit(graphs, labels, zeros, transform=complete)
        return {k: full.subset(r.sort().values) for k, r in rows.items()}


@dataclass
class QM9Config(DataConfig):
    name: str = "qm9"
    root: str = field(default_factory=lambda: os.environ.get("MTL_DATA_ROOT", "data"))
    targets: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11])  # PyG's indices
    split_seed: int = 42
    test_size: int = 10_000
    val_size: int = 10_000
    standardize: str = "all"  # the references': the whole dataset's mean and deviation
    batch_size: int = 120
    eval_batch_size: int = 120


@DATASETS.register("qm9")
class QM9DataModule(GraphDataModule, RootedDataModule):
    Config = QM9Config
    subdir = "qm9"
    source = (
        "PyTorch Geometric's QM9: run `torch_geometric.datasets.QM9('<data.root>/qm9')` once on a machine with "
        "internet (it downloads the raw files from figshare and, with RDKit installed, processes them), then copy the "
        "folder"
    )

    def describe(self) -> list[Regression]:
        bad = [t for t in self.cfg.targets if not 0 <= t < len(NAMES)]
        if bad:
            raise MTLError(f"data.targets={list(self.cfg.targets)}: QM9's targets are PyG indices 0..{len(NAMES) - 1}.")
        return [Regression(NAMES[t]) for t in self.cfg.targets]

    def expected(self) -> list[str]:
        if (self.folder / "processed" / "data_v3.pt").is_file():
            return ["processed/data_v3.pt"]
        return ["raw/gdb9.sdf", "raw/gdb9.sdf.csv", "raw/uncharacterized.txt"]

    def check(self) -> None:
        require_pyg("data=qm9")
        self.require()
        if not (self.folder / "processed" / "data_v3.pt").is_file():
            try:
                import rdkit  # noqa: F401
            except ImportError:
                raise MTLError(
                    f"data=qm9 finds QM9's raw files in {self.folder / 'raw'} and no processed/data_v3.pt: processing "
                    f"them once needs RDKit, which is not installed: {INSTALL}."
                ) from None
            self._check_raw()

    def _check_raw(self) -> None:
        """What PyG's QM9.process reads, checked first: its IndexError or ValueError names neither file nor line."""
        raw = self.folder / "raw"
        with open(raw / "gdb9.sdf", errors="replace") as f:
            molecules = sum(1 for line in f if line.startswith("$$$$"))
        with open(raw / "gdb9.sdf.csv", errors="replace") as f:
            rows = sum(1 for line in f if line.strip()) - 1  # after its header
        if rows < molecules:
            raise MTLError(
                f"{raw / 'gdb9.sdf.csv'} holds {rows} rows of targets for the {molecules} molecules of "
                f"{raw / 'gdb9.sdf'}: PyG's QM9 reads one CSV row (after the header) per SDF molecule, in order. The "
                "CSV is truncated or from another release: get both files again."
            )
        lines = (raw / "uncharacterized.txt").read_text(errors="replace").split("\n")
        for n, line in enumerate(lines[9:-2], 10):  # PyG skips the 9 header lines and the 2 last ones
            first = (line.split() or [""])[0]
            if not first.isdigit() or not 1 <= int(first) <= molecules:
                raise MTLError(
                    f"{raw / 'uncharacterized.txt'}, line {n}: {line.strip()!r} does not start with a molecule index "
                    f"1..{molecules}. PyG's QM9 reads the lines after a 9-line header (and before 2 closing lines) as "
                    "'<index> ...', the molecules it leaves out: get the file again from QM9's figshare release."
                )

    def load(self) -> dict[str, GraphSplit]:
        self.check()
        from torch_geometric.datasets import QM9

        class Local(QM9):  # no `download` of its own: PyG then never downloads, it reads or processes what is there
            pass

        try:
            dataset = Local(str(self.folder))
        except Exception as e:  # a truncated SDF or CSV, a processed file of another PyG version
            raise MTLError(f"PyG could not read QM9 in {self.folder} ({type(e).__name__}: {e}).") from None
        y = dataset._data.y[:, list(self.cfg.targets)].float()
        units = [1000.0 if NAMES[t] in MEV else 1.0 for t in self.cfg.targets]
        return self.split_graphs(dataset, y, units)


@dataclass
class SyntheticGraphsConfig(DataConfig):
    name: str = "synthetic_graphs"
    size: int = 2000  # graphs in all, split as below
    test_size: int = 400
    val_size: int = 400
    scales: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # each standardised target's factor
    standardize: str = "none"  # the targets are standardised before data.scales: `all` would undo the scales
    atoms: list[int] = field(default_factory=lambda: [4, 12])  # fewest, most atoms (QM9: 3-29, 18 on average)
    batch_size: int = 64
    eval_batch_size: int = 256


SYNTHETIC = ["type0_atoms", "bonds", "bond_length", "feature_sum"]


@DATASETS.register("synthetic_graphs")
class SyntheticGraphsDataModule(GraphDataModule):
    Config = SyntheticGraphsConfig

    def describe(self) -> list[Regression]:
        if len(self.cfg.scales) != len(SYNTHETIC) or min(self.cfg.scales) <= 0:
            raise MTLError(
                f"data.scales={list(self.cfg.scales)} needs {len(SYNTHETIC)} positive factors ({SYNTHETIC})."
            )
        return [Regression(n) for n in SYNTHETIC]

    def load(self) -> dict[str, GraphSplit]:
        require_pyg("data=synthetic_graphs")
        lo, hi = self.cfg.atoms
        if not 2 <= lo <= hi:
            raise MTLError(f"data.atoms={list(self.cfg.atoms)} must be [fewest, most] atoms, 2 <= fewest <= most.")
        graphs, y = molecules(self.cfg.size, self.cfg.split_seed, (lo, hi))
        y = (y - y.mean(0)) / y.std(0)  # zero mean, so a target's scale is its spread, not an offset to learn
        return self.split_graphs(graphs, y * torch.tensor(self.cfg.scales), [1.0] * len(SYNTHETIC))


def molecules(n: int, seed: int, atoms: tuple[int, int] = (4, 12)) -> tuple[list, Tensor]:
    """n molecule-like PyG graphs with QM9's features (`atoms`: the fewest and most atoms), and their known targets
    (n, 4)."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    graphs, targets = [], []
    for _ in range(n):
        count = int(torch.randint(atoms[0], atoms[1] + 1, (), generator=g))
        pos = torch.randn(count, 3, generator=g) * 1.2
        kind = torch.randint(0, 5, (count,), generator=g)
        extra = torch.rand(count, 6, generator=g)
        x = torch.cat([torch.nn.functional.one_hot(kind, 5).float(), extra], 1)
        dist = torch.cdist(pos, pos)
        bonded = (dist < 1.6) & ~torch.eye(count, dtype=torch.bool)
        src, dst = bonded.nonzero(as_tuple=True)
        bond = (kind[src] + kind[dst]) % 4  # a bond's type from its atoms' (the same both ways)
        edge_attr = torch.nn.functional.one_hot(bond, 4).float()
        graphs.append(Data(x=x, pos=pos, edge_index=torch.stack([src, dst]), edge_attr=edge_attr))
        length = dist[bonded].mean().item() if len(src) else 0.0
        targets.append([float((kind == 0).sum()), len(src) / 2, length, float(extra[:, 0].sum())])
    y = torch.tensor(targets)
    assert not math.isnan(float(y.sum()))
    return graphs, y
