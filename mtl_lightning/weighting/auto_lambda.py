from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MTLError
from ..validation import CycledBatches
from ._adam import adam_step
from .bilevel import Bilevel
from .registry import WEIGHTINGS


@WEIGHTINGS.register("auto_lambda")
class AutoLambda(Bilevel):
    """Auto-Lambda (Liu et al., TMLR 2022, arXiv:2202.03091), as the authors' code (lorenmt/auto-lambda) runs it.

    The loss is sum_k w_k L_k with weights w learned by a meta-step before every `every`-th training step: a virtual
    SGD step theta' = theta - a (grad sum_k w_k L_k + wd theta (+ SGD's momentum)) on the training batch, at the
    optimiser's current learning rate a and weight decay wd; the loss of the `target` tasks (every task when unset:
    the multi-task mode; some: auxiliary learning, the others serve them) at theta' on a validation batch; its
    gradient in w, -a d/dw [sum_k w_k L_k(theta + e d) - sum_k w_k L_k(theta - e d)] / 2e with d the validation
    gradient at theta' and e = 0.01 / |d| (the reference's finite difference); and an Adam step (`lr`) on w.
    Weights start at `weight_init`, unconstrained, as the reference. w, its Adam moments and the count of validation
    batches drawn are buffers, saved with the checkpoint.

    Differences: the reference draws its meta batches from a second shuffled pass over the training set; here they
    are validation batches (`data.train_fraction`'s hold-out, the batches ForkMerge merges on), cycled in order, as
    the paper's formulation; a test split standing in for validation is refused. The virtual step ignores Adam's
    moments, as the reference. One device, fp32 or bf16 (the meta-gradient is not loss-scaled).
    """

    @dataclass
    class Config(Bilevel.Config):
        name: str = "auto_lambda"
        weight_init: float = 0.1  # the reference's autol_init
        lr: float = 1e-4  # Adam's step on the weights (autol_lr)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if not cfg.lr > 0:
            raise MTLError(f"weighting.lr={cfg.lr} must be > 0.")
        self.register_buffer("w", torch.full((len(self.tasks),), float(cfg.weight_init)))
        self.register_buffer("drawn", torch.zeros((), dtype=torch.long))  # validation batches used so far
        self.batches: CycledBatches | None = None

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        w = self.w.to(losses)
        return (w * losses).sum(), w.clone()

    def validation_batch(self, module):
        """The next validation batch on the module's device; where it is in the cycle is checkpointed (`drawn`)."""
        if self.batches is None:
            self.batches = CycledBatches(module.trainer, "weighting=auto_lambda")
        batch = module.transfer_batch_to_device(self.batches.next(int(self.drawn)), module.device, 0)
        self.drawn += 1
        return batch

    def meta_step(self, module, batch) -> None:
        """Move w by the validation loss's hypergradient; called by the module before the training step's loss."""
        if not self.due(module):
            return
        vx, vy = self.validation_batch(module)
        x, y = batch
        opt = module.trainer.optimizers[0]
        group = opt.param_groups[0]
        lr, wd, momentum = group["lr"], group.get("weight_decay", 0.0), group.get("momentum", 0.0)
        params = [p for p in module.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]

        losses = module.batch_losses(x, y)[0]
        grads = torch.autograd.grad((self.w.to(losses) * losses).sum(), params, allow_unused=True)
        with torch.no_grad():  # theta' = theta - a (g + wd theta + SGD's momentum term), as the reference
            for p, g in zip(params, grads):
                m = opt.state.get(p, {}).get("momentum_buffer") if momentum else None
                p -= lr * ((0 if g is None else g) + wd * p + (0 if m is None else momentum * m))
        val = module.batch_losses(vx, vy)[0]
        d = torch.autograd.grad((self.primary.to(val) * val).sum(), params, allow_unused=True)
        d = [torch.zeros_like(p) if g is None else g for p, g in zip(params, d)]
        with torch.no_grad():
            eps = 0.01 / torch.cat([g.flatten() for g in d]).norm().clamp(min=1e-12)
            ends = []
            for sign in (1, -1):  # L_k at theta +- e d: the w-gradient of sum_k w_k L_k there is L_k
                for p, s, g in zip(params, saved, d):
                    p.copy_(s + sign * eps * g)
                ends.append(module.batch_losses(x, y)[0].float())
            for p, s in zip(params, saved):
                p.copy_(s)
        hessian = (ends[0] - ends[1]) / (2 * eps)
        adam_step(self.w, -lr * hessian.to(self.w), self.exp_avg, self.exp_avg_sq, self.t, self.cfg.lr)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_init={self.cfg.weight_init}, lr={self.cfg.lr}"
