from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MTLError
from .base import Weighting
from .registry import WEIGHTINGS

KINDS = ("classification", "binary", "regression")


@WEIGHTINGS.register("bayesagg_mtl")
class BayesAggMTL(Weighting):
    """BayesAgg-MTL, Bayesian uncertainty-based gradient aggregation (Achituve et al., ICML 2024, arXiv:2402.04005),
    as the authors' code (ssi-research/BayesAgg_MTL) runs it.

    Each task's last layer (its linear head on the shared representation h) gets a Gaussian posterior; the gradient of
    each sample's loss w.r.t. h is then a random variable with mean E_k and (diagonal) variance V_k, and the shared
    part receives sum_k V_k^-p E_k / sum_k V_k^-p / B (per sample and feature: tasks whose gradient is uncertain
    count less), the heads their own task's gradient. Posteriors: every epoch starts from the full-data posterior of
    the last epoch's training features (the prior N(0, `gamma` I)), updated by the batch: exactly for regression
    (squared error, a Gaussian likelihood; moments in closed form, `power`), by a second-order expansion around the
    head's weights for classification (softmax) and binary tasks (sigmoid) (moments from `mc_samples` posterior
    draws, `power_cls`). The first `warmup_epochs` epochs minimise the sum of the losses, as the reference (with none,
    the first epoch's posteriors start from the prior itself). The
    weights logged are each task's share of the precisions, averaged over the batch and the features.

    Needs a model whose heads are linear layers on one shared vector representation (model.architecture=hps without
    towers, image-level tasks) and tasks of the kinds above; one device (the full-data posterior is one process's).
    The epoch's features, kept for the next posterior, are checkpointed, so a resumed run continues exactly.

    Differences: the reference groups all binary tasks in one posterior with a block-diagonal Hessian; here each has
    its own, which is the same posterior. Its training scripts clip the heads' gradients at norm 50; here the run's
    `trainer.gradient_clip_val` applies as to any method. With `warmup_epochs=0` the first epoch starts from the
    prior itself (the reference needs a warm-up epoch's features).
    """

    stateful = True
    linear_heads = True  # refuses other networks and tasks (`attach`): the registry's tests expect the refusal

    @dataclass
    class Config(Weighting.Config):
        name: str = "bayesagg_mtl"
        warmup_epochs: int = 10  # epochs of the summed losses first (ls_epochs)
        gamma: float = 0.005  # the prior variance of each last-layer weight
        mc_samples: int = 1024  # posterior draws for a classification task's moments (num_mc_samples)
        power: float = 0.3  # regression's variance exponent (sqrt_power)
        power_cls: float = 0.1  # classification's (sqrt_power_cls)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.warmup_epochs < 0 or not cfg.gamma > 0 or cfg.mc_samples < 2 or cfg.power < 0 or cfg.power_cls < 0:
            raise MTLError(
                f"weighting.warmup_epochs={cfg.warmup_epochs} must be >= 0, gamma={cfg.gamma} > 0, "
                f"mc_samples={cfg.mc_samples} >= 2, power={cfg.power} and power_cls={cfg.power_cls} >= 0."
            )
        self.kinds: list[str] = []
        self.epoch = -1  # the epoch whose features `feats` collects
        self.feats: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.prior: dict[str, Tensor] = {}  # the full-data posterior of each task: mean/k, precision/k

    def attach(self, module) -> None:
        from ..architectures.hps import HPS

        bad = [f"{t.name} ({t.kind})" for t in module.tasks if t.kind not in KINDS or t.view]
        if bad:
            raise MTLError(
                f"weighting=bayesagg_mtl needs classification, binary or regression tasks (squared error), whose "
                f"linear heads it puts posteriors on; task(s) {', '.join(bad)} are not of these kinds."
            )
        heads_ok = all(type(h) is not nn.Linear and isinstance(h, nn.Linear) and not h.spatial for h in module.heads)
        if not (isinstance(module.arch, HPS) and module.arch.task_towers is None and heads_ok):
            raise MTLError(
                "weighting=bayesagg_mtl needs every head to be a linear layer on one shared vector representation: "
                f"model.architecture=hps without model.tower (got {module.arch!r}) and image-level tasks."
            )
        self.kinds = [t.kind for t in module.tasks]

    def check(self, precision: str, distributed: bool) -> None:
        if distributed:
            raise MTLError(
                "weighting=bayesagg_mtl builds its posteriors from one process's features: use trainer.devices=1."
            )

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:  # the warm-up's loss (and outside a Trainer)
        return losses.sum(), torch.ones_like(losses).detach()

    def step_loss(self, module, batch) -> tuple[Tensor, Tensor, Tensor]:
        """The training step: (a loss whose gradient is the aggregated one, the task losses, the weights logged)."""
        x, y = batch
        preds, targets, z = module.predictions(x, y)
        losses = module.task_losses(preds, targets)[0]
        module._check_finite(losses)
        epoch = module.current_epoch
        if epoch != self.epoch:  # a new epoch: last epoch's features become the posterior's data
            if epoch >= self.cfg.warmup_epochs and self.feats:
                self._full_posterior(module, torch.cat(self.feats), torch.cat(self.labels))
            self.epoch, self.feats, self.labels = epoch, [], []
        self.feats.append(z.detach().float())
        self.labels.append(torch.stack([t.float() for t in targets], 1))
        if epoch < self.cfg.warmup_epochs:
            return self(losses)[0], losses.detach(), torch.ones_like(losses)
        if not self.prior:  # no epoch of features yet (warmup_epochs=0): the prior N(0, gamma I) itself
            for k, kind in enumerate(self.kinds):
                prior = plain_prior(kind, self._head(module, k), self.cfg.gamma)
                self.prior[f"mean/{k}"], self.prior[f"precision/{k}"] = prior
        with torch.autocast(z.device.type, enabled=False):
            g, share = self._aggregate(module, z.detach().float(), targets)
        heads = module.batch_losses(x, y, detach=True, z=z)[0].sum()  # each head: its own task's gradient
        return heads + (z * g.to(z.dtype)).sum(), losses.detach(), share.to(losses)

    # -- posteriors ------------------------------------------------------------------------------------------------
    def _head(self, module, k: int) -> Tensor:
        """Task k's head as one (C, D + 1) matrix, its bias last."""
        head = module.heads[k]
        return torch.cat([head.weight, head.bias[:, None]], 1).detach().float()

    def _full_posterior(self, module, h: Tensor, labels: Tensor) -> None:
        """The last epoch's features and labels, from the plain prior: the prior of every batch of this epoch."""
        for k, kind in enumerate(self.kinds):
            W, mask = self._head(module, k), labelled(labels[:, k], kind)
            post = posterior(kind, W, h[mask], labels[mask, k], *plain_prior(kind, W, self.cfg.gamma))
            self.prior[f"mean/{k}"], self.prior[f"precision/{k}"] = post

    def _aggregate(self, module, h: Tensor, targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Each task's moments of d loss_b / d h_b under its batch posterior, aggregated (`inverse_variance`)."""
        Es, Vs, masks = [], [], []
        for k, kind in enumerate(self.kinds):
            W, y = self._head(module, k), targets[k].float()
            mask = labelled(y, kind)
            mean, prec = posterior(kind, W, h[mask], y[mask], self.prior[f"mean/{k}"], self.prior[f"precision/{k}"])
            if kind == "regression":
                E, V = regression_moments(h, y.nan_to_num() - W[0, -1], mean, torch.linalg.inv(prec))
                V = V**self.cfg.power
            else:
                E, V = sampled_moments(h, y.clamp(min=0), mean, prec, W.shape, kind, self.cfg.mc_samples)
                V = V**self.cfg.power_cls
            Es.append(E), Vs.append(V), masks.append(mask)
        return inverse_variance(torch.stack(Es), torch.stack(Vs), torch.stack(masks))

    # -- checkpointed state ----------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        cat = torch.cat if self.feats else (lambda _: torch.zeros(0))
        return {"epoch": self.epoch, "feats": cat(self.feats), "labels": cat(self.labels), **self.prior}

    def set_extra_state(self, state: dict) -> None:
        state = dict(state)
        self.epoch = int(state.pop("epoch"))
        feats, labels = state.pop("feats"), state.pop("labels")
        self.feats, self.labels = ([feats], [labels]) if len(feats) else ([], [])
        self.prior = state

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"tasks={self.tasks}, warmup_epochs={c.warmup_epochs}, gamma={c.gamma}, mc_samples={c.mc_samples}, "
            f"power={c.power}, power_cls={c.power_cls}"
        )


def inverse_variance(E: Tensor, V: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient for h: sum_k E_k / V_k over sum_k 1 / V_k, over the tasks labelled for each sample (E, V of shape
    (K, B, D), masks (K, B)), divided by the batch size as the reference; and each task's mean share of 1 / V."""
    lam = masks[:, :, None].float() / V  # no label, no say
    den = lam.sum(0).clamp(min=1e-30)
    return (lam * E).sum(0) / den / E.shape[1], (lam / den).mean((1, 2))


def plain_prior(kind: str, W: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """N(0, gamma I) over a head's weights W (C, D + 1): a regression head's D feature weights (its bias is held as it
    is), a classification head's weights and biases."""
    n = W.shape[1] - 1 if kind == "regression" else W.numel()
    return torch.zeros(n, device=W.device), torch.eye(n, device=W.device) / gamma


def posterior(kind: str, W: Tensor, h: Tensor, y: Tensor, mean0: Tensor, prec0: Tensor) -> tuple[Tensor, Tensor]:
    """A head's posterior (mean, precision) from the prior N(mean0, prec0^-1) and the labelled samples (h, y): exact
    for regression (a Gaussian likelihood, the bias held), by `laplace` for the other kinds. The full-data posterior
    and each batch's are this, from the plain prior and from the full-data posterior."""
    if kind != "regression":
        return laplace(h, y, W, mean0, prec0, kind)
    prec = prec0 + h.T @ h
    return torch.linalg.solve(prec, prec0 @ mean0 + h.T @ (y - W[0, -1])), prec


def labelled(y: Tensor, kind: str) -> Tensor:
    """The samples labelled for a task: a number (NaN = none) for regression, a class id (-1 = none) otherwise."""
    return ~torch.isnan(y) if kind == "regression" else y >= 0


def laplace(h: Tensor, y: Tensor, W: Tensor, prior_mean: Tensor, prior_prec: Tensor, kind: str):
    """The Gaussian posterior of a softmax (C classes) or sigmoid (C = 1) layer W (C, D + 1) by a second-order
    expansion of the summed loss around W (the generalised Gauss-Newton Hessian): (mean, precision) over W flattened."""
    ht = torch.cat([h, torch.ones(len(h), 1, device=h.device)], 1)
    logits = ht @ W.T
    if kind == "binary":
        p = torch.sigmoid(logits)
        dout, hout = p - y[:, None], torch.diag_embed(p * (1 - p))
    else:
        p = torch.softmax(logits, 1)
        dout = p - nn.functional.one_hot(y.long(), W.shape[0]).float()
        hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    n = W.numel()
    ggn = torch.einsum("nck,np,nq->cpkq", hout, ht, ht).reshape(n, n)  # sum_n J_n^T H_n J_n, J_n = I (x) h_n
    prec = ggn + prior_prec
    step = torch.linalg.solve(prec, (dout.T @ ht).flatten() + prior_prec @ (W.flatten() - prior_mean))
    return W.flatten() - step, prec


def sampled_moments(h, y, mean, prec, shape, kind: str, samples: int) -> tuple[Tensor, Tensor]:
    """Mean and variance over posterior draws of d loss_b / d h_b for every sample b: (B, D) each."""
    L = torch.linalg.cholesky(prec + torch.eye(len(prec), device=prec.device) * 1e-6 * prec.diagonal().mean())
    eps = torch.randn(len(prec), samples, device=prec.device)
    draws = (mean[:, None] + torch.linalg.solve_triangular(L.T, eps, upper=True)).T.reshape(samples, *shape)
    w, b = draws[..., :-1], draws[..., -1]  # (S, C, D), (S, C)
    logits = torch.einsum("bd,scd->sbc", h, w) + b[:, None, :]
    if kind == "binary":
        dout = torch.sigmoid(logits) - y[None, :, None]
    else:
        dout = torch.softmax(logits, -1) - nn.functional.one_hot(y.long(), shape[0]).float()
    g = torch.einsum("scd,sbc->sbd", w, dout)
    return g.mean(0), g.var(0, unbiased=False).clamp(min=1e-8)


def regression_moments(h: Tensor, r: Tensor, mu: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of g = d (w.h - r)^2 / dh = 2 w (w.h - r) under w ~ N(mu, cov), per sample: with
    a = mu.h - r, c = cov h, t = h cov h: E g = 2 (mu a + c), Var g_d = 4 (mu_d^2 t + 2 mu_d a c_d + a^2 cov_dd +
    cov_dd t + c_d^2) (Isserlis' theorem for the Gaussian pair (w_d, w.h))."""
    a = h @ mu - r
    c = h @ cov  # (B, D): row b is cov h_b (cov symmetric)
    t = (c * h).sum(1)
    d = cov.diagonal()
    E = 2 * (mu * a[:, None] + c)
    V = 4 * (mu**2 * t[:, None] + 2 * mu * a[:, None] * c + a[:, None] ** 2 * d + d * t[:, None] + c**2)
    return E, V.clamp(min=1e-8)
