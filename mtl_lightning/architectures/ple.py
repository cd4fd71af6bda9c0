"""Progressive layered extraction (Tang et al., RecSys 2020, doi:10.1145/3383313.3412236): CGC levels stacked, one
per width in `model.bottom` (each level's experts one layer of that width, as MTReclib's PLE), task k's gate at
every level mixing its own and the shared experts into its next input, and, below the last level, a shared gate
over every expert of the level into the next level's shared input. MTReclib: 4 shared and 4 task experts,
`model.bottom=[512,256]`, towers [128, 64].

No shared representation: each level's experts read task-specific mixtures of the level below, so gradient-level
weightings, which combine per-task gradients at one shared representation, refuse PLE (use cgc or mmoe with them)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ARCHITECTURES, Architecture, experts_check, mlp


@ARCHITECTURES.register("ple")
class PLE(Architecture):
    splits = False

    def __init__(self, in_dim: int, num_tasks: int, cfg, spatial: bool):
        super().__init__(in_dim, num_tasks, cfg, spatial)
        experts_check(cfg, shared_experts=cfg.shared_experts, task_experts=cfg.task_experts)
        S, T, K = cfg.shared_experts, cfg.task_experts, num_tasks
        self.S, self.T, self.levels = S, T, nn.ModuleList()
        for i, width in enumerate(cfg.bottom):
            d_in = in_dim if i == 0 else cfg.bottom[i - 1]
            make = lambda d_in=d_in, width=width: mlp(d_in, [width], cfg.dropout, cfg.batchnorm)  # noqa: E731
            level = nn.ModuleDict(
                {
                    "shared": nn.ModuleList(make() for _ in range(S)),
                    "task": nn.ModuleList(nn.ModuleList(make() for _ in range(T)) for _ in range(K)),
                    "gates": nn.ModuleList(nn.Linear(d_in, S + T) for _ in range(K)),
                }
            )
            if i < len(cfg.bottom) - 1:  # a shared gate feeds the next level's shared experts
                level["shared_gate"] = nn.Linear(d_in, S + K * T)
            self.levels.append(level)
        self.task_towers = self.towers(cfg.bottom[-1])

    def shared(self, h: Tensor) -> Tensor:
        return h

    def specific(self, z: Tensor) -> list[Tensor]:
        xs, x_shared = [z] * self.num_tasks, z
        for level in self.levels:
            shared = torch.stack([e(x_shared) for e in level["shared"]], 1)
            own = [torch.stack([e(x) for e in group], 1) for group, x in zip(level["task"], xs)]
            new = []
            for k, gate in enumerate(level["gates"]):
                mine = torch.cat([own[k], shared], 1)
                new.append((gate(xs[k]).softmax(-1).unsqueeze(-1) * mine).sum(1))
            if "shared_gate" in level:
                every = torch.cat([shared, *own], 1)
                x_shared = (level["shared_gate"](x_shared).softmax(-1).unsqueeze(-1) * every).sum(1)
            xs = new
        return xs if self.task_towers is None else [t(x) for t, x in zip(self.task_towers, xs)]

    def __repr__(self) -> str:
        return f"PLE(levels={list(self.cfg.bottom)}, shared_experts={self.S}, task_experts={self.T})"
