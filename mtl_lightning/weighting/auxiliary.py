"""What the auxiliary-task methods share: one target task, every other task auxiliary (ForkMerge's setting)."""

from __future__ import annotations

from ..errors import MTLError


def target_index(tasks: list[str], target: str, name: str) -> int:
    if target not in tasks:
        raise MTLError(
            f"weighting={name} needs weighting.target: the one task the auxiliary tasks serve. Got {target!r}; "
            f"valid choices: {', '.join(tasks)}."
        )
    if len(tasks) < 2:
        raise MTLError(f"weighting={name} needs at least one auxiliary task besides the target; tasks: {tasks}.")
    return tasks.index(target)
