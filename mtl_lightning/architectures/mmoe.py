"""Multi-gate mixture-of-experts (Ma et al., KDD 2018, doi:10.1145/3219819.3220007): `model.experts` expert MLPs
(widths `model.bottom`) on the backbone's features, one softmax gate per task over them (a linear map of the same
features), each task's gated mixture to its tower (`model.tower`). As MTReclib's MMoE: 8 experts of [512, 256],
towers [128, 64].

Shared representation (gradient methods): the experts' outputs and the gates' input, concatenated; the gates and
towers are each task's own."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ARCHITECTURES, Architecture, experts_check, mlp


@ARCHITECTURES.register("mmoe")
class MMoE(Architecture):
    def __init__(self, in_dim: int, num_tasks: int, cfg, spatial: bool):
        super().__init__(in_dim, num_tasks, cfg, spatial)
        experts_check(cfg, experts=cfg.experts)
        self.in_dim, self.n, self.d = in_dim, cfg.experts, cfg.bottom[-1]
        self.experts = nn.ModuleList(mlp(in_dim, cfg.bottom, cfg.dropout, cfg.batchnorm) for _ in range(self.n))
        self.gates = nn.ModuleList(nn.Linear(in_dim, self.n) for _ in range(num_tasks))
        self.task_towers = self.towers(self.d)

    def shared(self, h: Tensor) -> Tensor:
        return torch.cat([torch.stack([e(h) for e in self.experts], 1).flatten(1), h], 1)

    def specific(self, z: Tensor) -> list[Tensor]:
        experts, h = z[:, : self.n * self.d].view(-1, self.n, self.d), z[:, self.n * self.d :]
        out = []
        for k, gate in enumerate(self.gates):
            rep = (gate(h).softmax(-1).unsqueeze(-1) * experts).sum(1)
            out.append(rep if self.task_towers is None else self.task_towers[k](rep))
        return out

    def shared_parameters(self):
        return list(self.experts.parameters())

    def __repr__(self) -> str:
        return f"MMoE(experts={self.n}, bottom={list(self.cfg.bottom)}, tower={list(self.cfg.tower)})"
