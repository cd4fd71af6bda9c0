from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..batches import split_batch
from ..errors import MTLError
from ._adam import adam_step
from .bilevel import Bilevel
from .gradient import along, flat_grads
from .registry import WEIGHTINGS


@WEIGHTINGS.register("forum")
class FORUM(Bilevel):
    """FORUM, a first-order multi-gradient method for multi-objective bilevel optimisation (Ye et al., ECAI 2024,
    arXiv:2401.09257), as LibMTL's bilevel trainer runs it (`bacth_forward_FORUM`, LibMTL main branch).

    Each meta-step splits the training batch in two, as LibMTL does (two loaders of half the batch size). Lower level:
    f(a, theta) = sum_k softmax(a)_k L_k on the first half. Upper level: each `target` task's loss F_k(theta) on the
    second half (every task when unset). The lower level becomes the constraint q(a, theta) = f(a, theta)
    - f(a, theta_T) <= 0, theta_T being `inner_steps` SGD steps (`inner_lr`) on f from theta. Each step: the task
    gradients of F, normalised, and grad q; pi_k = phi - <grad q, grad F_k> / |grad q|^2; the weights w of the
    quadratic program min |A^T w|^2 - w_q phi |grad q|^2 subject to sum_k w_k = 1, w_q >= sum_k w_k pi_k, w >= 0
    (A: the rows grad F_k and grad q); lambda <- lambda + (w - lambda) / (epoch + 1)^(3/4); and the update direction
    sum_k lambda_k grad F_k + nu grad q with nu = max(sum_k lambda_k pi_k, 0). The model's optimiser steps along it
    (the step's loss is its linear surrogate), Adam (`lr`, LibMTL's outer_lr) steps a along its a-part. The weights
    logged are softmax(a), the lower level's task weights.

    Not validation batches (Auto-Lambda's): FORUM's direction moves the parameters along the upper level's gradients
    themselves, so it would train the model on the validation split (measured: +6.5% over single-task on
    forkmerge_negative_transfer's target, from the extra data). The quadratic program is solved exactly by quadprog
    (LibMTL: cvxpy on a square root of A A^T; the same problem). Off the meta-steps (`every`), the weighted loss on the
    whole batch. One device, fp32 or bf16.
    """

    @dataclass
    class Config(Bilevel.Config):
        name: str = "forum"
        phi: float = 0.1  # FORUM_phi: the rate the constraint q must fall at
        inner_steps: int = 5  # SGD steps to theta_T (LibMTL's inner_step)
        inner_lr: float = 0.1  # their learning rate (LibMTL's inner_lr)
        lr: float = 1e-3  # Adam's step on the logits a (LibMTL's outer_lr)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        bad = {k: v for k, v in (("phi", cfg.phi), ("inner_lr", cfg.inner_lr), ("lr", cfg.lr)) if not v > 0}
        if bad or cfg.inner_steps < 1:
            raise MTLError(f"weighting.phi, inner_lr and lr must be > 0 and inner_steps >= 1; got {cfg}.")
        K = len(self.tasks)
        self.register_buffer("logits", torch.full((K,), 1.0 / K))  # LibMTL's TW: constant 1/K
        self.register_buffer("lam", torch.zeros(K))  # the moving average of the program's task weights

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        w = torch.softmax(self.logits, 0).to(losses)
        return (w * losses).sum(), w.clone()

    def step_loss(self, module, batch) -> tuple[Tensor, Tensor, Tensor]:
        """The training step: (a loss whose gradient is FORUM's direction, the batch's task losses, the weights
        logged). Off the meta-steps (`every`) and outside a Trainer, the lower level's weighted loss."""
        x, y = batch
        if not self.due(module):
            losses = module.batch_losses(x, y)[0]
            module._check_finite(losses)
            loss, w = self(losses)
            return loss, losses.detach(), w
        (x, x_up), (y, y_up) = split_batch(x, 2, "forum"), split_batch(y, 2, "forum")
        losses = module.batch_losses(x, y)[0]
        module._check_finite(losses)
        params = [p for p in module.parameters() if p.requires_grad]
        a = self.logits.detach().clone().requires_grad_()
        g_f = torch.autograd.grad((torch.softmax(a, 0).to(losses) * losses).sum(), [a, *params], allow_unused=True)
        g_fa, g_fw = g_f[0], flat_grads(g_f[1:], params)
        g_q = torch.cat([g_fa - self._inner_grad(module, x, y, params), g_fw])  # grad q over (a, theta)
        val = module.batch_losses(x_up, y_up)[0]
        module._check_finite(val)
        K = len(self.tasks)
        F = torch.zeros(K, len(g_fw), device=g_fw.device, dtype=g_fw.dtype)
        for k in self.primary.nonzero().flatten().tolist():
            F[k] = flat_grads(torch.autograd.grad(val[k], params, retain_graph=True, allow_unused=True), params)
            F[k] /= F[k].norm().clamp(min=1e-12)
        qq = g_q.pow(2).sum() + 1e-8
        pi = self.cfg.phi - F @ g_q[K:] / qq  # zero rows (auxiliary tasks) are not in the program
        rows = self.primary.bool().to(F.device)
        w = torch.zeros(K, device=F.device, dtype=F.dtype)
        w[rows] = forum_weights(F[rows], g_q[K:], g_q[:K], pi[rows], self.cfg.phi)
        step = (module.current_epoch + 1) ** -0.75
        self.lam += step * (w.to(self.lam) - self.lam)
        lam = self.lam.to(F)
        nu = (lam * pi * rows).sum().clamp(min=0)
        direction = lam @ F + nu * g_q[K:]
        adam_step(self.logits, (nu * g_q[:K]).to(self.logits), self.exp_avg, self.exp_avg_sq, self.t, self.cfg.lr)
        shown = (losses.detach() + val.detach()) / 2  # the whole batch's losses, by halves
        return along(params, direction), shown, self(shown)[1]

    def _inner_grad(self, module, x, y, params) -> Tensor:
        """d/da f(a, theta_T): theta_T from `inner_steps` SGD steps on f at fixed a, taken on the parameters in place
        (and the normalisation layers' statistics) and undone."""
        saved = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in module.buffers()]
        w = torch.softmax(self.logits, 0)
        for _ in range(self.cfg.inner_steps):
            losses = module.batch_losses(x, y)[0]
            f = (w.to(losses) * losses).sum()
            if f.item() > 1e5:  # a diverging inner loop (too large inner_lr), as LibMTL stops it
                break
            grads = torch.autograd.grad(f, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p -= self.cfg.inner_lr * g
        with torch.no_grad():
            losses = module.batch_losses(x, y)[0].to(w)
            for p, s in zip(params, saved):
                p.copy_(s)
            for b, s in zip(module.buffers(), buffers):
                b.copy_(s)
        return w * (losses - (w * losses).sum())  # the softmax's Jacobian times L(theta_T)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{super().extra_repr()}, phi={c.phi}, inner_steps={c.inner_steps}, inner_lr={c.inner_lr}, lr={c.lr}"


def forum_weights(F: Tensor, q_theta: Tensor, q_a: Tensor, pi: Tensor, phi: float) -> Tensor:
    """FORUM's program over the K upper-level gradients F (K, N; zero in the logits' coordinates) and grad q =
    (q_a, q_theta): argmin over w (K + 1) of |A^T w|^2 - w_q phi |grad q|^2, sum_k w_k = 1, w_q >= sum_k w_k pi_k,
    w >= 0. Exactly, by quadprog in float64 (a ridge of 1e-10 x the largest diagonal entry makes A A^T definite)."""
    import quadprog

    K = len(F)
    if K == 0:
        raise MTLError("weighting=forum needs at least one upper-level task (weighting.target).")
    q = torch.cat([q_a, q_theta])
    G = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    G[:K, :K] = (F @ F.T).double().cpu()
    G[:K, K] = G[K, :K] = (F @ q_theta).double().cpu()
    G[K, K] = float(q.double().pow(2).sum())
    g = 2 * G.numpy()
    g = (g + g.T) / 2 + np.eye(K + 1) * 1e-10 * max(float(np.abs(np.diag(g)).max()), 1e-30)
    a = np.zeros(K + 1)
    a[K] = phi * (G[K, K].item() + 1e-8)
    C = np.zeros((K + 1, K + 3))
    C[:K, 0] = 1.0  # sum_k w_k = 1 (the equality)
    C[:K, 1], C[K, 1] = -pi.double().cpu().numpy(), 1.0  # w_q - sum_k pi_k w_k >= 0
    C[:, 2:] = np.eye(K + 1)  # w >= 0
    b = np.concatenate([[1.0, 0.0], np.zeros(K + 1)])
    w = quadprog.solve_qp(g, a, C, b, meq=1)[0]
    return torch.as_tensor(np.clip(w[:K], 0, None), dtype=F.dtype, device=F.device)
