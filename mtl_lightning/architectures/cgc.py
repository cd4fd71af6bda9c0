"""Customized gate control (Tang et al., RecSys 2020, doi:10.1145/3383313.3412236; PLE's single level):
`model.shared_experts` experts every task reads and `model.task_experts` experts of each task's own (widths
`model.bottom`); task k's softmax gate mixes its own and the shared experts, to its tower.

Shared representation (gradient methods): every expert's output and the gates' input, concatenated."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ARCHITECTURES, Architecture, experts_check, mlp


@ARCHITECTURES.register("cgc")
class CGC(Architecture):
    def __init__(self, in_dim: int, num_tasks: int, cfg, spatial: bool):
        super().__init__(in_dim, num_tasks, cfg, spatial)
        experts_check(cfg, shared_experts=cfg.shared_experts, task_experts=cfg.task_experts)
        self.S, self.T, self.d = cfg.shared_experts, cfg.task_experts, cfg.bottom[-1]
        make = lambda: mlp(in_dim, cfg.bottom, cfg.dropout, cfg.batchnorm)  # noqa: E731
        self.shared_experts = nn.ModuleList(make() for _ in range(self.S))
        self.task_experts = nn.ModuleList(nn.ModuleList(make() for _ in range(self.T)) for _ in range(num_tasks))
        self.gates = nn.ModuleList(nn.Linear(in_dim, self.S + self.T) for _ in range(num_tasks))
        self.task_towers = self.towers(self.d)

    def shared(self, h: Tensor) -> Tensor:
        outs = [e(h) for e in self.shared_experts] + [e(h) for group in self.task_experts for e in group]
        return torch.cat([torch.stack(outs, 1).flatten(1), h], 1)

    def specific(self, z: Tensor) -> list[Tensor]:
        n = self.S + self.num_tasks * self.T
        experts, h = z[:, : n * self.d].view(-1, n, self.d), z[:, n * self.d :]
        out = []
        for k, gate in enumerate(self.gates):
            own = experts[:, self.S + k * self.T : self.S + (k + 1) * self.T]
            mine = torch.cat([own, experts[:, : self.S]], 1)
            rep = (gate(h).softmax(-1).unsqueeze(-1) * mine).sum(1)
            out.append(rep if self.task_towers is None else self.task_towers[k](rep))
        return out

    def shared_parameters(self):
        return [*self.shared_experts.parameters(), *self.task_experts.parameters()]

    def __repr__(self) -> str:
        return f"CGC(shared_experts={self.S}, task_experts={self.T}, bottom={list(self.cfg.bottom)})"
