"""A training batch as disjoint parts of its samples: MoDo's independent samples of the task gradients, FORUM's two
levels. Inputs and targets alike: tensors, PyG batches of graphs, and lists, tuples and dicts of them."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import MTLError


def split_batch(v, n: int, method: str):
    """`v` (a batch's inputs or targets: a tensor, a PyG batch of graphs, or lists/tuples/dicts of them) as n parts
    of disjoint samples, in order."""
    if isinstance(v, Tensor):
        if len(v) < n:
            raise MTLError(
                f"weighting={method} splits every training batch into {n} disjoint parts, but a batch holds {len(v)} "
                f"samples: use data.batch_size >= {n} and data.drop_last=true (a short last batch)."
            )
        return torch.tensor_split(v, n)
    if isinstance(v, (list, tuple)):
        return [type(v)(p) for p in zip(*(split_batch(e, n, method) for e in v))]
    if isinstance(v, dict):
        cols = {k: split_batch(e, n, method) for k, e in v.items()}
        return [{k: c[i] for k, c in cols.items()} for i in range(n)]
    if hasattr(v, "to_data_list") and hasattr(type(v), "from_data_list"):  # PyG's Batch
        graphs = v.to_data_list()
        idx = torch.tensor_split(torch.arange(len(graphs)), n)
        return [type(v).from_data_list([graphs[i] for i in part.tolist()]) for part in idx]
    raise MTLError(
        f"weighting={method} splits every training batch into disjoint parts, which a batch of "
        f"{type(v).__name__} does not allow: use another weighting with this data."
    )
