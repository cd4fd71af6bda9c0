"""Tabular inputs: categorical fields and numerical features, as multi-task recommendation logs have them.

A tabular datamodule describes its inputs as `Fields` (each categorical field's cardinality, the number of
numerical features) and yields batches whose x is {"cat": (B, F) integer ids, "num": (B, D) floats}. The
`embedding` backbone (`model.backbone=embedding`) is MTReclib's input layer (easezyc/Multitask-Recommendation-
Library, `EmbeddingLayer` and the numerical `Linear`): one embedding table over every field's ids (offset per
field, Xavier-uniform initialised), the numerical features mapped linearly to one more embedding, all flattened to
(B, (F + 1) * embed_dim). What sits above it (a shared bottom MLP, experts, towers) is the architecture's
(`mtl_lightning.architectures`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Fields:
    cardinalities: tuple[int, ...]  # per categorical field: max id + 1
    numerical: int  # numerical features


class EmbeddingBackbone(nn.Module):
    def __init__(self, fields: Fields, embed_dim: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(sum(fields.cardinalities), embed_dim)
        nn.init.xavier_uniform_(self.embedding.weight)
        offsets = torch.tensor([0, *fields.cardinalities[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.numerical = nn.Linear(fields.numerical, embed_dim) if fields.numerical else None
        self.num_features = (len(fields.cardinalities) + (1 if fields.numerical else 0)) * embed_dim

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        parts = [self.embedding(x["cat"].long() + self.offsets)]
        if self.numerical is not None:
            parts.append(self.numerical(x["num"].float()).unsqueeze(1))
        return torch.cat(parts, 1).flatten(1)
