"""Multi-task models made by merging models fine-tuned per task (issue 37): the merge functions, by name.

    from mtl_lightning.merging import create_merging, task_vectors, to_state_dict
    theta0, tau, keys = task_vectors(start_state, [state_a, state_b])
    merged = create_merging("ties").merge(theta0, tau, keep=0.2, lam=1.0)
    model.load_state_dict(to_state_dict(merged, start_state, keys))

Why not fusion-bench: its methods are what these follow, but the package requires transformers, datasets, hydra,
h5py and pytest at install time, for five functions of a few lines each.
"""

from __future__ import annotations

from . import adamerging, average, dare, task_arithmetic, ties  # noqa: F401  (registers the methods)
from .base import MERGINGS, Merging, task_vectors, to_state_dict


def create_merging(name: str, **options) -> Merging:
    """The merging method `name` with its options; an unknown name raises with the valid choices."""
    cls = MERGINGS.get(name)
    return cls(cls.Config(**options))


__all__ = ["MERGINGS", "Merging", "create_merging", "task_vectors", "to_state_dict"]
