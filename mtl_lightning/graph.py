"""Graph inputs (molecules): batches of PyTorch Geometric graphs, and the message-passing network of the QM9
literature as a backbone by name (`model.backbone=mpnn`).

A graph datamodule describes its inputs as `GraphFeatures` (node and edge feature sizes) and yields batches whose x
is a PyG `Batch`. `mpnn` is PyG's `qm9_nn_conv` example, the network Nash-MTL and FAMO train on QM9: Linear(nodes ->
dim), `steps` rounds of NNConv (edge network Linear(edges -> 128)-ReLU-Linear(128 -> dim x dim), mean aggregation)
each followed by a GRU, a Set2Set readout (3 steps), Linear(2 dim -> dim)-ReLU: the (B, dim) features every task's
head reads (and what gradient methods in `weighting.mode=rep` differentiate against). torch_geometric is an optional
dependency (`pip install -e ".[graph]"`, included in `.[dev]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .errors import MTLError

INSTALL = 'pip install -e ".[graph]" (torch_geometric, and rdkit to process QM9\'s raw files)'


def require_pyg(what: str):
    try:
        import torch_geometric
    except ImportError:
        raise MTLError(f"{what} needs PyTorch Geometric, which is not installed: {INSTALL}.") from None
    return torch_geometric


@dataclass(frozen=True)
class GraphFeatures:
    node: int  # features per node (QM9: 11)
    edge: int  # features per edge (QM9's complete graph with distances: 5)


class MPNN(nn.Module):
    def __init__(self, features: GraphFeatures, dim: int = 64, steps: int = 3, readout_steps: int = 3):
        super().__init__()
        pyg = require_pyg("model.backbone=mpnn")
        self.steps, self.num_features = steps, dim
        self.lin0 = nn.Linear(features.node, dim)
        edge_net = nn.Sequential(nn.Linear(features.edge, 128), nn.ReLU(), nn.Linear(128, dim * dim))
        self.conv = pyg.nn.NNConv(dim, dim, edge_net, aggr="mean")
        self.gru = nn.GRU(dim, dim)
        self.set2set = pyg.nn.Set2Set(dim, processing_steps=readout_steps)
        self.lin1 = nn.Linear(2 * dim, dim)

    def forward(self, batch) -> Tensor:
        out = F.relu(self.lin0(batch.x))
        h = out.unsqueeze(0)
        for _ in range(self.steps):
            m = F.relu(self.conv(out, batch.edge_index, batch.edge_attr))
            out, h = self.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        return F.relu(self.lin1(self.set2set(out, batch.batch)))


def complete(data):
    """The references' transform (Nash-MTL's `Complete`, then PyG's `Distance(norm=False)`): every ordered pair of
    distinct atoms is an edge, a bond's features on bonded pairs and zeros elsewhere, then the pair's distance
    appended (4 bond types + 1 = 5 edge features)."""
    from torch_geometric.transforms import Distance
    from torch_geometric.utils import remove_self_loops

    data = data.clone()
    n = data.num_nodes
    idx = torch.arange(n)
    edge_index = torch.stack([idx.repeat_interleave(n), idx.repeat(n)])
    attr = data.edge_attr.new_zeros(n * n, data.edge_attr.size(1))
    attr[data.edge_index[0] * n + data.edge_index[1]] = data.edge_attr
    data.edge_index, data.edge_attr = remove_self_loops(edge_index, attr)
    return Distance(norm=False)(data)


class GraphSplit(Dataset):
    """A split of graphs: `graphs` (a sequence of PyG `Data`, transformed on access), `labels` (N, K) float targets,
    NaN = none, `domains` (N,). A batch is (PyG `Batch`, labels (B, K))."""

    def __init__(self, graphs, labels: Tensor, domains: Tensor, rows: Tensor | None = None, transform=None):
        self.graphs, self.labels, self.domains, self.transform = graphs, labels, domains, transform
        self.rows = torch.arange(len(labels)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.labels)

    def _graph(self, i: int):
        g = self.graphs[int(self.rows[i])]
        return self.transform(g) if self.transform else g

    def __getitem__(self, i):
        return self._graph(i), self.labels[i]

    def __getitems__(self, idx: list[int]):  # one Batch of the graphs: what collate_batched passes on
        from torch_geometric.data import Batch

        return Batch.from_data_list([self._graph(i) for i in idx]), self.labels[torch.as_tensor(idx)]

    def take(self, rows: Tensor, labels: Tensor, domains: Tensor) -> GraphSplit:
        return GraphSplit(self.graphs, labels, domains, self.rows[rows], self.transform)

    def subset(self, rows: Tensor) -> GraphSplit:
        return self.take(rows, self.labels[rows], self.domains[rows])

    def select(self, keep: list[int], mdl: bool) -> GraphSplit:
        return GraphSplit(self.graphs, self.labels[:, keep], self.domains, self.rows, self.transform)
