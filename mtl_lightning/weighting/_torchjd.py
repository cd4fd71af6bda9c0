"""The one file that touches torchjd (pinned in pyproject.toml: its 0.x API changes between releases).

Our methods call torchjd's Gramian weightings (G = J J^T -> task weights c, the combined gradient is c^T J) and
its GradDrop aggregator. Weights come back as float32 on J's device.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd import aggregation as A


def _check(factory):
    try:
        return factory()
    except ImportError as e:  # optional solvers: quadprog (UPGrad), cvxpy/ecos (CAGrad, Nash-MTL)
        from ..errors import MTLError

        raise MTLError(f"{e} (needed by this weighting; `pip install -e .` installs them).") from None


def upgrad():
    return _check(A.UPGradWeighting)


def mgda(epsilon: float, max_iters: int):
    return _check(lambda: A.MGDAWeighting(epsilon=epsilon, max_iters=max_iters))


def pcgrad():
    return _check(A.PCGradWeighting)


def imtl_g():
    return _check(A.IMTLGWeighting)


def cagrad(c: float):
    return _check(lambda: A.CAGradWeighting(c=c))


def nash_mtl(n_tasks: int, max_norm: float, update_weights_every: int, optim_niter: int):
    """Nash-MTL's matrix weighting; it reads J only through J J^T, so a K x K square root of G may stand in for J."""
    return _check(
        lambda: A.NashMTL(n_tasks, max_norm, update_weights_every, optim_niter).weighting  # type: ignore[attr-defined]
    )


NASH_STATE = ("step", "prvs_alpha", "normalization_factor", "init_gtg")  # what Nash-MTL carries between steps


def nash_state(weighting) -> dict:  # tensors, not numpy arrays: checkpoints load with torch.load(weights_only=True)
    return {k: torch.as_tensor(getattr(weighting, k)).clone() for k in NASH_STATE}


def set_nash_state(weighting, state: dict) -> None:
    for k in NASH_STATE:
        setattr(weighting, k, float(state[k]) if k == "step" else state[k].numpy())
    if weighting.step > 0:  # torchjd builds its cvxpy problem on the first call only (step == 0)
        weighting._init_optim_problem()


def aligned_mtl(scale_mode: str):
    return _check(lambda: A.AlignedMTLWeighting(scale_mode=scale_mode))


def dual_proj():
    return _check(A.DualProjWeighting)


def fair_grad(alpha: float):
    return _check(lambda: A.FairGradWeighting(alpha=alpha))


def config():
    """ConFIG's aggregator: it works on J itself (unit-normalised rows), not only on the Gramian."""
    return _check(A.ConFIG)


def gradvac(beta: float):
    return _check(lambda: A.GradVacWeighting(beta=beta))


def sdmgrad(lr: float, momentum: float, n_iter: int, lambda_: float):
    return _check(lambda: A.SDMGradWeighting(lr=lr, momentum=momentum, n_iter=n_iter, lambda_=lambda_))


def excess_mtl(robust_step_size: float, n_warmup_steps: int):
    return _check(lambda: A.ExcessMTLWeighting(robust_step_size, n_warmup_steps))


# torchjd's stateful weightings keep their state in buffers that start as None, and a step counter. We hold them
# outside the module tree (a None buffer is not in a fresh model's state_dict, so strict loading would refuse
# the saved one) and carry their state through our own `get_extra_state`.
def stateful_state(weighting) -> dict:
    state = {k: v.detach().clone() for k, v in weighting._buffers.items() if v is not None}
    if hasattr(weighting, "_n_steps"):
        state["_n_steps"] = torch.tensor(weighting._n_steps)
    return state


def stateful_weights(weighting, stat: Tensor, pending: dict | None) -> Tensor:
    """`weights`, first restoring a checkpointed state: torchjd builds its state for the input's shape, dtype and
    device, and resets it when they change, so it is built for this input and then overwritten."""
    x = stat.double()
    if pending:
        if isinstance(weighting, A.GradVacWeighting):
            weighting._ensure_state(x.shape[0], x.dtype)
        else:
            weighting._ensure_state(x)
        for k, v in pending.items():
            if k == "_n_steps":
                weighting._n_steps = int(v)
            else:
                cur = getattr(weighting, k)
                setattr(weighting, k, v.to(device=x.device if cur is None else cur.device, dtype=x.dtype))
    return weighting(x).to(torch.float32)


def graddrop(leak: list[float] | None):
    return _check(lambda: A.GradDrop(leak=None if leak is None else torch.tensor(leak)))


def weights(weighting, stat: Tensor) -> Tensor:
    return weighting(stat.double()).to(torch.float32)


def modo(gamma: float, rho: float):
    """MoDo's weighting: fed G = J_1 J_2^T of two independent samples, one projected gradient step on the weights."""
    return _check(lambda: A.MoDoWeighting(gamma=gamma, rho=rho))
