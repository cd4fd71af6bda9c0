"""What the auxiliary-task methods share: one target task, every other task auxiliary (ForkMerge's setting)."""

from __future__ import annotations

from ..errors import MTLError


def target_indices(tasks: list[str], target) -> list[int]:
    """The positions of the target tasks (ForkMerge's, Auto-Lambda's primary tasks): one or more distinct tasks."""
    bad = [t for t in target if t not in tasks]
    if not target or bad or len(set(target)) != len(target):
        raise MTLError(f"weighting.target={list(target)} must name one or more distinct tasks of {tasks}.")
    return [tasks.index(t) for t in target]


def target_index(tasks: list[str], target: str, name: str) -> int:
    if target not in tasks:
        raise MTLError(
            f"weighting={name} needs weighting.target: the one task the auxiliary tasks serve. Got {target!r}; "
            f"valid choices: {', '.join(tasks)}."
        )
    if len(tasks) < 2:
        raise MTLError(f"weighting={name} needs at least one auxiliary task besides the target; tasks: {tasks}.")
    return tasks.index(target)
