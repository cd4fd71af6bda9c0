"""Task vectors and the base of every merging method.

A merge works on flat vectors: theta_0 (N,), the shared start, and the task vectors tau (T, N), tau_t = theta_t -
theta_0, of T models fine-tuned from it. `task_vectors` builds them from state dicts (the floating-point entries; a
BatchNorm's step counter is not merged) and refuses what cannot be merged; `to_state_dict` puts a merged vector back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MTLError
from ..registry import Registry

MERGINGS: Registry = Registry("merging method", "merging")


def floating_keys(state: dict[str, Tensor]) -> list[str]:
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def task_vectors(start: dict[str, Tensor], models: Sequence[dict[str, Tensor]], names: Sequence[str] | None = None):
    """(theta_0 (N,), tau (T, N), keys): the floating-point entries of `start` flattened, and each model's difference
    from it. Models with other entries or shapes (another architecture) cannot be merged: one paragraph, naming them."""
    names = list(names or [f"model {i}" for i in range(len(models))])
    keys = floating_keys(start)
    for name, state in zip(names, models):
        missing, extra = sorted(set(keys) - set(state)), sorted(set(floating_keys(state)) - set(keys))
        shapes = [k for k in keys if k in state and state[k].shape != start[k].shape]
        if missing or extra or shapes:
            said = "; ".join(
                f"{what}: {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}"
                for what, ks in (("missing", missing), ("not in the start", extra), ("of another shape", shapes))
                if ks
            )
            raise MTLError(
                f"Cannot merge {name}: its parameters are not those of the start model ({said}). Merging adds up "
                "parameter differences entry by entry, so every model must have the start model's architecture "
                "(the same backbone and model.* settings) and start from the same weights."
            )
    theta0 = torch.cat([start[k].detach().flatten().float() for k in keys])
    tau = torch.stack([torch.cat([m[k].detach().flatten().float() for k in keys]) - theta0 for m in models])
    return theta0, tau, keys


def to_state_dict(vector: Tensor, start: dict[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    """The start's state dict with its floating-point entries `keys` replaced by the slices of `vector`."""
    out, i = dict(start), 0
    for k in keys:
        n = start[k].numel()
        out[k] = vector[i : i + n].view_as(start[k]).to(start[k].dtype)
        i += n
    return out


class Merging:
    """A merging method: `merge(theta0, tau) -> theta`, the merged flat parameters. Options in a dataclass
    `Config`, checked in `__init__` (MTLError naming the key); `grid()` lists the coefficient settings to choose
    among on validation data (the papers choose λ, and TIES its k, that way)."""

    name: str

    @dataclass
    class Config:
        name: str = ""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def merge(self, theta0: Tensor, tau: Tensor) -> Tensor:
        raise NotImplementedError

    def grid(self) -> list[dict]:
        return [{}]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in vars(self.cfg).items() if k != "name")
        return f"{type(self).__name__}({opts})"


def check_fraction(value: float, key: str, closed: bool = False) -> None:
    ok = 0 <= value <= 1 if closed else 0 <= value < 1
    if not ok:
        raise MTLError(f"merging.{key}={value} must be in [0, 1{']' if closed else ')'}.")
