"""Parity with LibMTL 1.1.5, whose implementations Royer et al. used for every optimiser they compare.

Each method LibMTL also has is run on the same Jacobian: the shared parameters are one vector theta and task k's
loss is b_k + J_k . theta, so LibMTL's own gradient code sees exactly the rows J_k, and the update it leaves in
theta.grad is compared with ours. Conventions that still differ, and why, are stated where they are tested:
- scale: LibMTL's loss weightings sum to K (EW, DWA) or weight the target 1; ours sum to 1 like `uniform`, so the
  methods compare at the same learning rate. Directions match exactly.
- uncertainty: LibMTL's L / (2 exp(s)) + s / 2 (regression form), starting at s = -0.5, vs our exp(-s) L + s
  (Kendall et al.'s classification form), starting at s = 0 (weights 0.82 vs 1): the same weights at s + log 2,
  the same optimum (exp(s) = L).
- PCGrad with K > 2 and GradVac's visiting order: LibMTL draws one random order per step (Python's `random`);
  torchjd's PCGrad is the expectation over orders and its GradVac draws from torch's generator. With two tasks the
  order does not matter, which is where they are compared.
- GradVac: LibMTL updates a pair's target cosine only when it corrected the pair; the paper (and torchjd)
  update it every step. They agree while the pair keeps conflicting (compared) and differ once it stops (shown).
- MGDA: LibMTL's Frank-Wolfe stops at 1e-5 change (250 iterations); ours solves the QP exactly: they agree to 1e-3.
- Not compared: GradNorm (LibMTL trains softmax logits of the weights through the model's optimiser after an
  epoch of EW; ours trains the weights directly from the first step, a different parametrisation), and the random
  methods RLW and GradDrop (different random streams; their distributions are tested in test_weighting and
  test_gradient).
"""

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from mtl_lightning.weighting import WEIGHTINGS

pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def libmtl():
    # LibMTL 1.1.5 imports torchvision.models.utils, removed in torchvision 0.13; only its ResNets use it.
    stub = types.ModuleType("torchvision.models.utils")
    stub.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules.setdefault("torchvision.models.utils", stub)
    return pytest.importorskip("LibMTL.weighting")


def libmtl_update(cls, J, base=None, **kwargs):
    """LibMTL's update of theta for the Jacobian J, and the weights it returns."""
    K, P = J.shape
    theta = nn.Parameter(torch.zeros(P, dtype=J.dtype))
    m = cls()
    m.task_num, m.device, m.rep_grad, m.task_name = K, torch.device("cpu"), False, [str(k) for k in range(K)]
    m.get_share_params = lambda: [theta]
    m.zero_grad_share_params = lambda: theta.grad.zero_() if theta.grad is not None else None
    for k, v in kwargs.pop("attrs", {}).items():
        setattr(m, k, v)
    m.init_param()
    b = torch.ones(K, dtype=J.dtype) if base is None else base
    weights = m.backward(b + J @ theta, **kwargs)
    return theta.grad.clone(), np.asarray(weights, dtype=float), m


def ours(name, J, tasks=None, **kw):
    cls = WEIGHTINGS.get(name)
    m = cls(tasks or [str(k) for k in range(len(J))], cls.Config(**kw))
    g, w = m.combine(J, J @ J.T)
    return (w @ J if g is None else g), w


def jacobian(K, seed, P=40):
    J = torch.randn(K, P, generator=torch.Generator().manual_seed(seed))
    J[1] = -0.8 * J[0] + 0.3 * J[1]  # a strong conflict, where the methods differ most from the plain sum
    return J


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_two_tasks(libmtl, seed):
    J = jacobian(2, seed)
    assert torch.allclose(libmtl_update(libmtl.PCGrad, J)[0], ours("pcgrad", J)[0], atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_imtl_g(libmtl, seed):
    J = jacobian(3, seed)  # LibMTL's IMTL is IMTL-G on losses scaled by exp(s) - s, s = 0 at the start: IMTL-G
    assert torch.allclose(libmtl_update(libmtl.IMTL, J)[0], ours("imtl_g", J)[0], atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_mgda(libmtl, seed):
    J = jacobian(5, seed)
    theirs, w_theirs, _ = libmtl_update(libmtl.MGDA, J, mgda_gn="none")
    g, w = ours("mgda", J)
    assert np.allclose(w_theirs, w.numpy(), atol=1e-3)
    assert g.norm() <= theirs.norm() + 1e-6  # the exact min-norm point: never above Frank-Wolfe's


@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_cagrad(libmtl, seed, rescale):
    J = jacobian(3, seed)  # LibMTL 1.1.5's CAGrad objective is written for exactly 3 tasks
    theirs = libmtl_update(libmtl.CAGrad, J, calpha=0.4, rescale=rescale)[0]
    assert torch.allclose(theirs, ours("cagrad", J, c=0.4, rescale=rescale)[0], rtol=1e-3, atol=1e-3)


def test_gradvac_while_conflicting_and_where_the_target_update_differs(libmtl):
    J = torch.tensor([[1.0, 0.0], [-0.6, 0.8]], dtype=torch.float64)  # cosine -0.6: corrected every step
    cls = WEIGHTINGS.get("gradvac")
    m = cls(["a", "b"], cls.Config(beta=0.5))
    state = {}
    for _ in range(4):
        g, _, theirs = libmtl_update(libmtl.GradVac, J, beta=0.5, attrs=state)
        state = {"rho_T": theirs.rho_T}
        w = m.combine(J.float(), (J @ J.T).float())[1]
        assert torch.allclose(g.float(), w @ J.float(), atol=1e-5)
    # an agreeing pair (cosine 0.6): neither corrects it; torchjd (the paper) moves the target toward 0.6, LibMTL not
    agree = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    before = theirs.rho_T.clone()
    libmtl_update(libmtl.GradVac, agree, beta=0.5, attrs={"rho_T": theirs.rho_T})
    m.combine(agree.float(), (agree @ agree.T).float())
    assert torch.equal(theirs.rho_T, before) and m.method._phi_t[0, 1] > before[0, 1] + 0.1


def test_loss_weightings_same_direction(libmtl):
    J = jacobian(3, 0)
    b = torch.tensor([0.5, 2.0, 1.0], dtype=J.dtype)

    def loss_level(name, log_var=0.0):
        cls = WEIGHTINGS.get(name)
        m = cls(["a", "b", "c"], cls.Config(name=name))
        if name == "uncertainty":
            m.log_var.data.fill_(log_var)
        losses = (b + J @ (theta := nn.Parameter(torch.zeros(J.shape[1])))).float()
        m(losses)[0].backward()
        return theta.grad

    ew = libmtl_update(libmtl.EW, J, b)[0]
    assert torch.allclose(ew / 3, loss_level("uniform"), atol=1e-6)  # EW weights 1 each, uniform 1/K
    gls = libmtl_update(libmtl.GLS, J, b)[0]
    assert torch.allclose(gls, loss_level("gls"), atol=1e-6)
    uw = libmtl_update(libmtl.UW, J, b)[0]  # LibMTL starts at s = -0.5: weights 1 / (2 exp(-0.5)) = 0.82
    assert torch.allclose(uw, loss_level("uncertainty", log_var=-0.5 + np.log(2)), atol=1e-6)


def test_dwa(libmtl):
    J = jacobian(3, 1)
    history = np.array([[2.0, 1.5], [1.0, 0.9], [3.0, 1.0]])  # epoch mean losses, epochs e-2 and e-1
    theirs = libmtl_update(libmtl.DWA, J, T=2.0, attrs={"epoch": 2, "train_loss_buffer": history})[0]
    cls = WEIGHTINGS.get("dwa")
    m = cls(["a", "b", "c"], cls.Config(temperature=2.0))
    for epoch in range(2):
        m.train()
        m(torch.tensor(history[:, epoch], dtype=torch.float32))
        m.on_train_epoch_end()
    theta = nn.Parameter(torch.zeros(J.shape[1]))
    m.eval()
    m(torch.ones(3) + J @ theta)[0].backward()
    assert torch.allclose(theirs / 3, theta.grad, atol=1e-6)  # LibMTL's weights sum to K, ours to 1
