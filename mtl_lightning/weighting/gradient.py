"""Gradient-level methods: combine the per-task gradients (the Jacobian J, one row per task) into one update.

`weighting.mode` chooses the gradients:
- `param`: w.r.t. the shared (backbone) parameters, J is K x P. K backward passes through the backbone, K x P
  memory: what PCGrad, CAGrad and GradDrop cost in Royer et al. (memory linear in the number of tasks).
- `rep`: w.r.t. the shared representation z (the backbone's pooled features), J is K x (B*D). The K backward
  passes only run through the heads; one backward then carries the combined gradient through the backbone (the
  "MGDA-UB" approximation of Sener & Koltun).

The combined gradient g reaches the optimiser through an ordinary Lightning backward of a surrogate loss:
`sum_k L_k(head_k(z.detach())) + <x, g>` with x = z (rep) or the shared parameters (param). Its gradient is g for the
shared part and each head's own, unweighted task gradient for the heads (as torchjd's `mtl_backward` and LibMTL
do). So precision plugins, gradient clipping, accumulation and DDP's gradient all-reduce work unchanged.

DDP: weights that depend on J only through the Gramian G = J J^T are computed from the global G: in `param` mode J
is averaged over ranks first (then every rank computes the same g); in `rep` mode the ranks hold different samples'
features, and the global Gramian is the sum of the ranks' Gramians / world_size^2, from which every rank gets the
same weights c, then backpropagates c^T J_rank; DDP's average of those is c^T J_global. Methods that are not
Gramian-weighted (GradDrop) are exact under DDP in `param` mode only; `rep` + DDP stops at start-up.
Mixed precision: bf16 autocast works (J and the aggregation in float32). fp16 (`16-mixed`): the per-task gradients
are taken outside the Trainer's GradScaler, where fp16 activations' gradients underflow, so each task's loss is
multiplied by the scaler's current scale before its backward and J divided by it in float32 (as the scaler unscales);
a J with inf/NaN (the scale overflowed) is not aggregated: its non-finite sum goes on to the backward, and the
scaler then skips the step and lowers the scale, as it does for any overflowing step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import MTLError
from .base import Weighting


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def flat_grads(grads, params) -> Tensor:
    """Gradients w.r.t. `params` (None where a parameter got none) as one flat vector, zeros for the None."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def along(params, g: Tensor) -> Tensor:
    """A scalar whose gradient w.r.t. `params` is the flat vector g: how a combined update reaches the optimiser
    through an ordinary backward."""
    chunks = torch.split(g, [p.numel() for p in params])
    return sum((p * c.view_as(p).to(p.dtype)).sum() for p, c in zip(params, chunks))


def psd_sqrt(gramian: Tensor) -> Tensor:
    """A K x K matrix M with M M^T = G: a stand-in for J in methods that only see J through its Gramian."""
    vals, vecs = torch.linalg.eigh(gramian.double())
    return (vecs * vals.clamp(min=0).sqrt()).to(gramian.dtype)


class GradientWeighting(Weighting):
    """A gradient aggregator: one update from the K task gradients. Subclass it, register it with
    `@WEIGHTINGS.register("my_method")` (examples/gradient_aggregator.py).

    To implement: `combine(J, G) -> (g, w)`. J is (K, N) float32, row k task k's gradient w.r.t. the shared parameters
    (`weighting.mode=param`, N their size) or the shared representation (`mode=rep`, N = batch x features); G = J J^T
    (K, K), the global one under DDP. Return the combined gradient g (N,) and the weights w (K,) it corresponds to
    (logged as `weights/<task>`), or `(None, w)` for g = w^T J. Set `gramian_only = False` when w depends on J beyond
    G (then `mode=rep` is refused under DDP), `param_only = True` when it keeps state per coordinate of J across steps
    (then `mode=rep` is refused). Optional: `extra_loss(losses, J)` for the method's own parameters.

    What the framework guarantees: `combine` is called once per training step with every task's gradient (a task
    without labelled samples in the batch has a zero row); heads get their own task's unweighted gradient; g reaches
    the optimiser through an ordinary backward, so clipping, bf16, fp16 (J unscaled, overflowing steps skipped)
    and DDP work as usual. State kept in parameters or persistent buffers is checkpointed, as for any `Weighting`.
    """

    gradient_based: ClassVar[bool] = True
    gramian_only: ClassVar[bool] = True  # the weights depend on J only through G = J J^T (exact under DDP)
    # keeps per-coordinate state of J across steps (moving averages of the task gradients): the same coordinates every
    # step, which `mode=rep` (the batch's samples' features) does not have
    param_only: ClassVar[bool] = False
    # independent samples of the task gradients per step (MoDo): the module splits the batch into this many disjoint
    # parts, and `combine` gets J of shape (samples, K, N) (param mode) and must return g
    samples: ClassVar[int] = 1

    @dataclass
    class Config(Weighting.Config):
        mode: str = "param"  # param: gradients w.r.t. the shared parameters | rep: w.r.t. the shared representation

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.mode not in ("rep", "param"):
            raise MTLError(f"Unknown weighting.mode={cfg.mode!r} for weighting={self.name}. Valid choices: rep, param.")
        if self.param_only and cfg.mode != "param":
            raise MTLError(
                f"weighting={self.name} keeps state per coordinate of the task gradients across steps, which needs the "
                "same coordinates every step (the shared parameters): use weighting.mode=param."
            )
        self.mode = cfg.mode

    def check(self, precision: str, distributed: bool) -> None:
        """Refuse, at start-up, the combinations this method cannot run correctly."""
        if distributed and self.mode == "rep" and not self.gramian_only:
            raise MTLError(
                f"weighting={self.name} combines the ranks' representation gradients coordinate by coordinate, "
                "which DDP cannot reproduce exactly: with several devices use weighting.mode=param."
            )

    def combine(self, J: Tensor, G: Tensor) -> tuple[Tensor | None, Tensor]:
        """J (K, N) float32, G = J J^T (global under DDP) -> (combined gradient (N,), or None for c^T J; weights c)."""
        raise NotImplementedError

    def extra_loss(self, losses: Tensor, J: Tensor) -> Tensor | None:
        """A term added to the surrogate for the method's own parameters (GradNorm's weights)."""
        return None

    def jacobian(self, losses: Tensor, z: Tensor, shared: list[Tensor], scale: Tensor | None = None) -> Tensor:
        """J (K, N) float32; with fp16's loss `scale`, each backward is taken on the scaled loss and J unscaled.
        Losses (S, K) of S parts of the batch (`samples`) give J (S, K, N)."""
        if losses.ndim == 2:
            return torch.stack([self.jacobian(part, z, shared, scale) for part in losses])
        if scale is not None:
            losses = losses * scale.to(losses.dtype)
        rows = []
        for k in range(len(losses)):
            if self.mode == "rep":
                (gz,) = torch.autograd.grad(losses[k], z, retain_graph=True, allow_unused=True)
                rows.append(torch.zeros_like(z).flatten() if gz is None else gz.flatten())
            else:
                gs = torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True)
                rows.append(flat_grads(gs, shared))
        J = torch.stack(rows).float()
        return J if scale is None else J / scale.float()

    def surrogate(
        self, losses: Tensor, heads_loss: Tensor, z: Tensor, shared: list[Tensor], scale: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The scalar whose backward leaves the combined gradient in the shared part, and the weights used. `scale`:
        fp16's loss scale (`TaskModel.loss_scale`), None otherwise."""
        J = self.jacobian(losses, z, shared, scale)
        world = _world()
        if world > 1 and self.mode == "param":
            dist.all_reduce(J)
            J /= world
        G = J @ J.transpose(-1, -2)  # (K, K), or (S, K, K) for S samples
        if world > 1 and self.mode == "rep":
            dist.all_reduce(G)
            G /= world**2
        if scale is not None and not torch.isfinite(G).all():  # fp16 overflow: a host sync, in fp16 runs only
            # The solvers are not fed inf/NaN: the non-finite sum reaches the shared gradient, the scaler skips the step
            K = J.shape[-2]
            g, w = J.reshape(-1, J.shape[-1]).sum(0), torch.full((K,), 1.0 / K, device=J.device)
        else:
            g, w = self.combine(J, G)
        if g is None:
            g = w.to(J) @ J
        if self.mode == "rep":
            lin = (z * g.view_as(z).to(z.dtype)).sum()
        else:
            lin = along(shared, g)
        out = heads_loss + lin
        extra = self.extra_loss(losses, J)
        return (out if extra is None else out + extra), w.detach().to(losses)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, mode={self.mode}"


def least_squares_weights(J: Tensor, G: Tensor, g: Tensor) -> Tensor:
    """The weights c with c^T J closest to g: what a non-weighted method (GradDrop) effectively gave each task."""
    return torch.linalg.lstsq(G.double(), (J @ g).double().unsqueeze(1)).solution.squeeze(1).float()
