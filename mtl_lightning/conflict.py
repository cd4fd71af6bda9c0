"""Gradient conflict (Royer et al.: it barely predicts performance): the pairwise cosines of the task gradients on
the shared parameters every `every` steps, logged as `train/grad_cos/<a>-<b>`, with running sums for the run's
mean per pair (`grad_cos/<a>-<b>`, `grad_cos/mean` in the final metrics). Costs K extra backward passes."""

from __future__ import annotations

import torch
from torch import Tensor

from .weighting.gradient import flat_grads


class GradConflict:
    def __init__(self, names: list[str], every: int):
        self.names, self.every = names, every
        K = len(names)
        self.sum, self.n = torch.zeros(K, K, dtype=torch.float64), torch.zeros(K, K, dtype=torch.long)

    def observe(self, losses: Tensor, shared: list[Tensor], step: int, loggers) -> None:
        """On every `every`-th step: the K task gradients of `losses` (graphs kept) w.r.t. `shared`, their cosines."""
        if not self.every or step % self.every:
            return
        rows = []
        for k in range(len(losses)):
            if not losses[k].requires_grad:  # a task with no sample in this batch (MDL): no gradient
                rows.append(None)
                continue
            gs = torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True)
            rows.append(flat_grads(gs, shared))
        row = {}
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                if rows[a] is None or rows[b] is None or not (rows[a].any() and rows[b].any()):
                    continue
                c = torch.nn.functional.cosine_similarity(rows[a].float(), rows[b].float(), dim=0).item()
                self.sum[a, b] += c
                self.n[a, b] += 1
                row[f"train/grad_cos/{self.names[a]}-{self.names[b]}"] = c
        for logger in loggers:
            logger.log_metrics(row, step=step)

    def means(self) -> dict[str, float]:
        """Each task pair's mean gradient cosine over the run (`grad_cos/<a>-<b>`), and their mean (`grad_cos/mean`)."""
        out = {}
        for a, b in zip(*torch.triu_indices(len(self.names), len(self.names), 1).tolist()):
            if self.n[a, b] > 0:
                out[f"grad_cos/{self.names[a]}-{self.names[b]}"] = float(self.sum[a, b] / self.n[a, b])
        if out:
            out["grad_cos/mean"] = sum(out.values()) / len(out)
        return out

    def state_dict(self) -> dict:
        return {"sum": self.sum, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.sum, self.n = state["sum"], state["n"]
