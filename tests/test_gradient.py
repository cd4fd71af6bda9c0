"""Gradient-level methods: properties over the registry, hand-computed answers, the plumbing into the backward,
mixed precision, DDP, training and resuming."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments.run import run
from mtl_lightning.config import compose
from mtl_lightning.errors import MTLError
from mtl_lightning.weighting import WEIGHTINGS

GRADIENT = [n for n in WEIGHTINGS.names() if getattr(WEIGHTINGS.get(n), "gradient_based", False)]


def make(name, tasks=("a", "b", "c"), **kw):
    cls = WEIGHTINGS.get(name)
    if cls.auxiliary:
        kw.setdefault("target", "a")
    return cls(list(tasks), cls.Config(**kw))


def combine(method, J):
    torch.manual_seed(0)  # GradDrop draws its signs from the default generator, reseeded each step in training
    Js = J.expand(method.samples, *J.shape) if method.samples > 1 else J  # MoDo: every sample's J (the same here)
    g, w = method.combine(Js, Js @ Js.transpose(-1, -2))
    return (w @ J if g is None else g), w


@pytest.mark.parametrize("name", GRADIENT)
def test_properties(name):
    J = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    g, w = combine(make(name), J)
    assert g.shape == (50,) and w.shape == (3,) and torch.isfinite(g).all() and torch.isfinite(w).all()
    perm = torch.tensor([2, 0, 1])  # permuting the tasks permutes the weights and leaves the update alone
    g2, w2 = combine(make(name, tasks=["c", "a", "b"]), J[perm])
    assert torch.allclose(g2, g, atol=1e-4) and torch.allclose(w2, w[perm], atol=1e-4)
    # interchangeable tasks (orthogonal gradients of equal norm, G = 4 I) are treated alike (the auxiliaries, for
    # methods that serve a target)
    # (disjoint copies of one vector: also alike coordinate by coordinate, for Excess-MTL's per-coordinate scaling)
    x = torch.randn(16, generator=torch.Generator().manual_seed(2))
    q = torch.zeros(3, 50)
    for k in range(3):
        q[k, 16 * k : 16 * (k + 1)] = x / x.norm()
    g3, w3 = combine(make(name), 2 * q[:3])
    if make(name).auxiliary:
        w3 = w3[1:]
        assert torch.allclose(w3, w3[0].expand(2), atol=1e-3)
        return
    if make(name).stochastic:  # random per step (GradDrop's signs): alike in expectation
        torch.manual_seed(0)
        w3 = torch.stack([make(name).combine(2 * q[:3], 4 * torch.eye(3))[1] for _ in range(300)]).mean(0)
        assert torch.allclose(w3, w3.mean().expand(3), atol=0.05)
        return
    assert torch.allclose(w3, w3[0].expand(3), atol=1e-3)
    assert torch.allclose((2 * q[:3]) @ g3, ((2 * q[:3]) @ g3)[0].expand(3), atol=1e-3)
    assert f"mode={make(name).mode}" in repr(make(name))


def test_non_conflicting_gradients_left_alone():
    J = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]])  # no conflict: g1 . g2 > 0, no coordinate of opposite sign
    assert torch.allclose(combine(make("pcgrad", "ab"), J)[0], J.sum(0))  # nothing to project: the sum
    assert torch.allclose(combine(make("upgrad", "ab"), J)[0], J.mean(0), atol=1e-4)  # inside the dual cone
    assert torch.allclose(combine(make("graddrop", "ab"), J)[0], J.sum(0))  # signs agree: nothing dropped
    assert torch.allclose(combine(make("cagrad", "ab", c=0.0), J)[0], J.mean(0), atol=1e-4)  # c = 0: average
    assert torch.allclose(combine(make("dualproj", "ab"), J)[0], J.mean(0), atol=1e-4)  # the mean conflicts with none


def test_pcgrad_projects_conflicting_pair():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2  # (1, 0) + 0.5 (-1, 1) = (0.5, 0.5)
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1  # (-1, 1) + (1, 0) = (0, 1)
    assert torch.allclose(combine(make("pcgrad", "ab"), torch.stack([g1, g2]))[0], p1 + p2, atol=1e-5)


def test_mgda_min_norm_point_of_two_vectors():
    # min over t of |t (2, 0) + (1 - t)(0, 1)|^2 = 4t^2 + (1 - t)^2: t = 1/5, the point (0.4, 0.8)
    g, w = combine(make("mgda", "ab"), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(g, torch.tensor([0.4, 0.8]), atol=1e-3) and torch.allclose(
        w, torch.tensor([0.2, 0.8]), atol=1e-3
    )


@pytest.mark.parametrize("seed", range(20))
def test_mgda_is_the_exact_min_norm_point(seed):
    """KKT conditions of min w^T G w on the simplex, which certify the optimum without another solver: with
    v = w^T G w, every (G w)_k >= v, with equality where w_k > 0. Gramians of 5 tasks, two strongly conflicting."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    J[1] = -0.9 * J[0] + 0.3 * torch.randn(40, generator=gen, dtype=torch.float64)
    G = J @ J.T
    w = make("mgda", "abcde").combine(J.float(), G.float())[1].double()
    assert torch.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-6)
    Gw, v = G @ w, w @ G @ w
    scale = G.diagonal().max()
    assert torch.all(Gw >= v - 1e-5 * scale)
    assert torch.all((Gw - v)[w > 1e-6].abs() <= 1e-5 * scale)
    loose = make("mgda", "abcde", solver="frank_wolfe", epsilon=1e-3, max_iters=100).combine(J.float(), G.float())[1]
    assert (loose.double() @ G @ loose.double()) >= v - 1e-9  # Frank-Wolfe can only stop at or above the minimum


def test_cagrad_rescale_as_libmtl():
    J = torch.tensor([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3], [0.1, -0.4, 1.0]])
    c = 0.4
    g0 = combine(make("cagrad", c=c, rescale=0), J)[0]
    assert torch.allclose(combine(make("cagrad", c=c), J)[0], g0 / (1 + c**2), atol=1e-6)  # LibMTL's default
    assert torch.allclose(combine(make("cagrad", c=c, rescale=2), J)[0], g0 / (1 + c), atol=1e-6)
    with pytest.raises(MTLError, match="weighting.rescale=3"):
        make("cagrad", rescale=3)


def test_config_aligned_mtl_fairgrad_known_answers():
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # orthogonal, norms 1 and 2
    # ConFIG: the direction at equal angles to both, (1, 1)/sqrt2, times the sum of the projections on it (3/sqrt2)
    assert torch.allclose(combine(make("config", "ab"), J)[0], torch.tensor([1.5, 1.5]), atol=1e-5)
    # Aligned-MTL: both rows rescaled to sqrt of the smallest eigenvalue of G (1), then averaged
    assert torch.allclose(combine(make("aligned_mtl", "ab"), J)[0], torch.tensor([0.5, 0.5]), atol=1e-5)
    # FairGrad with alpha = 1 is the Nash bargaining solution: G w = 1/w, w_k = 1/|g_k|, so g = (1, 1)
    g, w = combine(make("fairgrad", "ab", alpha=1.0), J)
    assert torch.allclose(w, torch.tensor([1.0, 0.5]), atol=1e-3) and torch.allclose(g, torch.ones(2), atol=1e-3)


def test_gradvac_raises_cosines_to_their_running_target():
    J = torch.tensor([[1.0, 0.0], [-0.6, 0.8]])  # cos = -0.6
    m = make("gradvac", "ab", beta=0.5)
    # first step: the targets start at 0, so each gradient is moved to be orthogonal to the other: PCGrad
    assert torch.allclose(combine(m, J)[0], combine(make("pcgrad", "ab"), J)[0], atol=1e-5)
    # the targets moved to 0.5 x (-0.6) = -0.3; the next step corrects each gradient to cosine -0.3 exactly
    w = combine(m, J)[1]
    g1 = J[0] + (w[1] - 1) * J[1]  # w = column sums of the corrections: the corrected g1 is g1 + (w_2 - 1) g2
    assert torch.nn.functional.cosine_similarity(g1, J[1], dim=0) == pytest.approx(-0.3, abs=1e-4)


def test_sdmgrad_without_preference_reaches_the_min_norm_point():
    J = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    mgda = combine(make("mgda"), J)[1]
    m = make("sdmgrad", lambda_=0.0, n_iter=2000, lr=1.0)
    assert torch.allclose(combine(m, J)[1], mgda, atol=1e-3)
    # lambda pulls the weights toward uniform: (w + lambda / K) / (1 + lambda)
    far = combine(make("sdmgrad", lambda_=100.0), J)[1]
    assert torch.allclose(far, torch.full((3,), 1 / 3), atol=0.01)


def test_excess_mtl_moves_weight_to_the_task_whose_excess_risk_stays():
    J = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    m = make("excess_mtl", "ab", robust_step_size=1.0)
    assert torch.allclose(combine(m, J)[1], torch.full((2,), 0.5), atol=1e-6)  # the first step is the baseline
    shrunk = J * torch.tensor([[1.0], [0.1]])  # task b's gradient (its excess risk) shrinks, task a's does not
    w = [combine(m, shrunk)[1] for _ in range(3)][-1]
    assert w[0] > 0.6 and w.sum() == pytest.approx(1.0, abs=1e-6)


def one_shared_layer_losses(scales):
    """Task k's loss scales[k] * |W x - t_k|^2 through one shared linear layer W: (losses, z, shared)."""
    g = torch.Generator().manual_seed(6)
    W = torch.nn.Parameter(torch.randn(4, 5, generator=g))
    x, t = torch.randn(8, 5, generator=g), torch.randn(len(scales), 8, 4, generator=g)
    z = x @ W.T
    return torch.stack([s * ((z - t[k]) ** 2).mean() for k, s in enumerate(scales)]), z, [W]


def test_db_mtl_is_blind_to_loss_scales_and_gives_every_task_the_largest_gradient_norm():
    J = torch.randn(3, 40, generator=torch.Generator().manual_seed(7)) * torch.tensor([[1.0], [10.0], [0.1]])
    m = make("db_mtl", beta=0.5)
    for _ in range(3):
        g, a = m.combine(J, J @ J.T)
    rows = a[:, None] * m.tracked  # each task's averaged gradient, rescaled
    assert torch.allclose(rows.norm(dim=1), rows.norm(dim=1).max().expand(3), rtol=1e-5)
    assert torch.allclose(g, rows.sum(0)) and torch.allclose(m.tracked, J * (1 - 0.5**3), rtol=1e-5)  # m -> J
    # the gradients are those of log L_k: multiplying a task's loss by 100 changes nothing
    first = make("db_mtl").jacobian(*one_shared_layer_losses([1.0, 1.0, 1.0]))
    scaled = make("db_mtl").jacobian(*one_shared_layer_losses([1.0, 100.0, 1.0]))
    assert torch.allclose(first, scaled, rtol=1e-4)
    with pytest.raises(MTLError, match="use weighting.mode=param"):
        make("db_mtl", mode="rep")


def test_moco_tracks_the_scaled_gradients_and_updates_its_weights_as_the_reference():
    gen = torch.Generator().manual_seed(8)
    m = make("moco", beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.1)
    y, lambd = torch.zeros(3, 20), torch.full((3,), 1 / 3)
    for t in range(1, 5):  # LibMTL's MoCo.backward, step by step (on rows already normalised and scaled)
        h = torch.randn(3, 20, generator=gen)
        y = y - 0.5 / t**0.5 * (y - h)
        lambd = torch.softmax(lambd - 0.1 / t**0.5 * (y @ y.T + 0.1 * torch.eye(3)) @ lambd, -1)
        g, w = m.combine(h, h @ h.T)
        assert torch.allclose(w, lambd, atol=1e-6) and torch.allclose(g, y.T @ lambd, atol=1e-5)
    # the rows MoCo tracks: each task's gradient at unit norm, times its loss
    losses, z, shared = one_shared_layer_losses([1.0, 3.0, 0.5])
    h = make("moco").jacobian(losses, z, shared)
    assert torch.allclose(h.norm(dim=1), losses.detach(), rtol=1e-5)
    # tracking averages the noise out: a fixed step beta = 0.05 against zero-mean noise of norm ~4.5 a step
    m, J = make("moco", beta=0.05, beta_sigma=0.0), torch.randn(3, 20, generator=gen)
    for _ in range(300):
        m.combine(J + torch.randn(3, 20, generator=gen), J @ J.T)
    assert (m.tracked - J).norm(dim=1).max() < 1.5


def test_cr_mogm_smooths_its_base_weights_as_torchjd():
    from torchjd.aggregation import CRMOGMWeighting, UPGradWeighting

    theirs = CRMOGMWeighting(UPGradWeighting(), alpha=0.8)
    ours, plain = make("cr_mogm", base="upgrad", alpha=0.8), make("upgrad")
    gen = torch.Generator().manual_seed(9)
    for step in range(4):
        J = torch.randn(3, 10, generator=gen)
        G = J @ J.T
        w = ours.combine(J, G)[1]
        assert torch.allclose(w, theirs(G.double()).float(), atol=1e-5)
        assert step > 0 or torch.allclose(w, plain.combine(J, G)[1])  # the first step is the base's own
    assert torch.allclose(make("cr_mogm", alpha=0.0).combine(J, G)[1], make("mgda").combine(J, G)[1])
    with pytest.raises(MTLError, match="weighting.base='gradnorm'.*Valid choices: aligned_mtl, cagrad"):
        make("cr_mogm", base="gradnorm")


def _simplex(v):
    """Euclidean projection onto the simplex (sorting, as the authors' _projection2simplex)."""
    u = torch.sort(v, descending=True)[0]
    css = torch.cumsum(u, 0) - 1
    rho = torch.nonzero(u - css / torch.arange(1, len(v) + 1) > 0).max()
    return (v - css[rho] / (rho + 1)).clamp(min=0)


@pytest.mark.parametrize("samples", [3, 2])
def test_modo_steps_its_weights_on_two_samples_and_updates_along_the_third_as_the_reference(samples):
    gen = torch.Generator().manual_seed(10)
    m, lambd = make("modo", gamma=0.05, rho=0.1, samples=samples), torch.full((3,), 1 / 3)
    for _ in range(5):  # LibMTL's MoDo.backward: lambda <- proj(lambda - gamma (J1 (J2^T lambda) + rho lambda))
        J = torch.randn(samples, 3, 20, generator=gen)
        lambd = _simplex(lambd - 0.05 * (J[0] @ (J[1].T @ lambd) + 0.1 * lambd))
        g, w = m.combine(J, J @ J.transpose(-1, -2))
        want = lambd @ J[2] if samples == 3 else lambd @ (J[0] + J[1]) / 2  # the third draw, or the paper's mean
        assert torch.allclose(w, lambd, atol=1e-5) and torch.allclose(g, want, atol=1e-5)
    with pytest.raises(MTLError, match="samples=4"):
        make("modo", samples=4)
    with pytest.raises(MTLError, match="weighting.mode=param"):
        make("modo", mode="rep")


def test_modo_samples_are_disjoint_parts_of_the_batch(make_cfg):
    """The J_s MoDo is fed are each computed on their own third of the step's batch (independent draws of the task
    gradients), not on the whole batch nor on overlapping samples."""
    from lightning.pytorch.callbacks import Callback

    from mtl_lightning.batches import split_batch
    from mtl_lightning.train import train
    from mtl_lightning.weighting.modo import MoDo

    seen = {}

    class Batch(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.update(module=module, batch=batch)

    def combine(self, J, G):
        if "J" not in seen:
            module, (x, y) = seen["module"], seen["batch"]
            seen["J"], seen["want"] = J.clone(), []
            for xs, ys in zip(split_batch(x, 3, "modo"), split_batch(y, 3, "modo")):
                seen["want"].append(self.jacobian(module.batch_losses(xs, ys)[0], None, module.shared_parameters()))
                seen.setdefault("sizes", []).append(len(xs))
        return original(self, J, G)

    original, MoDo.combine = MoDo.combine, combine
    try:
        args = [
            "weighting=modo",
            "weighting.samples=3",
            "data.train_size=64",
            "data.batch_size=30",
            "trainer.max_steps=1",
            "test=false",
        ]
        train(make_cfg("digits_mtl", *args, "model.width=16", "model.depth=1"), [Batch()], save_checkpoints=False)
    finally:
        MoDo.combine = original
    assert seen["sizes"] == [10, 10, 10] and seen["J"].shape[0] == 3
    for s in range(3):
        assert torch.allclose(seen["J"][s], seen["want"][s], atol=1e-6)
    assert not torch.allclose(seen["J"][0], seen["J"][1], atol=1e-3)  # different samples, different gradients
    with pytest.raises(MTLError, match="splits every training batch into 3 disjoint parts, but a batch holds 2"):
        split_batch(torch.zeros(2, 4), 3, "modo")
    parts = split_batch(({"a": torch.arange(6)}, [torch.arange(6) * 2]), 2, "modo")
    assert parts[1][0]["a"].tolist() == [3, 4, 5] and parts[1][1][0].tolist() == [6, 8, 10]
    pyg = pytest.importorskip("torch_geometric.data")  # a batch of graphs splits into batches of whole graphs
    graphs = [
        pyg.Data(x=torch.full((n, 1), float(n)), edge_index=torch.zeros(2, 0, dtype=torch.long)) for n in range(1, 7)
    ]
    thirds = split_batch(pyg.Batch.from_data_list(graphs), 3, "modo")
    assert [b.num_graphs for b in thirds] == [2, 2, 2] and thirds[2].x.flatten().tolist() == [5.0] * 5 + [6.0] * 6
    with pytest.raises(MTLError, match="which a batch of str does not allow"):
        split_batch("text", 2, "modo")


def test_gcs_drops_auxiliaries_that_conflict_with_the_target():
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])  # target a; b agrees (cos 0.71), c conflicts (-0.71)
    assert torch.allclose(combine(make("gcs"), J)[1], torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(combine(make("gcs", variant="weighted"), J)[1], torch.tensor([1.0, 0.5**0.5, 0.0]))
    assert torch.allclose(combine(make("gcs", target="c"), J)[1], torch.tensor([0.0, 0.0, 1.0]))  # b _|_ c


def test_ol_aux_accumulates_cosines_every_interval():
    J = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.8, 0.6]])  # cosines with the target: 0.6 and -0.8
    m = make("ol_aux", beta=0.5, interval=5)
    weights = [combine(m, J)[1] for _ in range(10)]
    assert torch.equal(weights[3], torch.ones(3))  # unchanged until the 5th step
    assert torch.allclose(weights[4], torch.tensor([1.0, 1 + 5 * 0.5 * 0.6, 1 - 5 * 0.5 * 0.8]))
    assert torch.allclose(weights[9], torch.tensor([1.0, 1 + 10 * 0.5 * 0.6, 1 - 10 * 0.5 * 0.8]))


def test_arml_learns_the_auxiliary_combination_that_matches_the_target():
    aux = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    J = torch.cat([(0.5 * aux[0] + 2.0 * aux[1])[None], aux])  # g_target = 0.5 g_b + 2 g_c
    m = make("arml")
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(500):
        opt.zero_grad()
        m.extra_loss(torch.ones(3), J).backward()
        opt.step()
    assert torch.allclose(combine(m, J)[1], torch.tensor([1.0, 0.5, 2.0]), atol=1e-2)


def test_post_train_switches_to_the_target_after_joint_epochs():
    cls = WEIGHTINGS.get("post_train")
    m = cls(["a", "b", "c"], cls.Config(target="b", joint_epochs=2, aux_weight=0.5))
    losses = torch.ones(3)
    for epoch, expected in [(0, [0.5, 1.0, 0.5]), (1, [0.5, 1.0, 0.5]), (2, [0.0, 1.0, 0.0]), (5, [0.0, 1.0, 0.0])]:
        m.on_train_epoch_start(epoch)
        assert m(losses)[1].tolist() == expected
    with pytest.raises(MTLError, match="joint_epochs"):
        cls(["a", "b"], cls.Config(target="b"))


@pytest.mark.parametrize("name", [n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n).auxiliary])
def test_auxiliary_methods_need_a_target_task(name):
    cls = WEIGHTINGS.get(name)
    with pytest.raises(MTLError, match="weighting.target.*valid choices: a, b"):
        cls(["a", "b"], cls.Config(target="x", **({"joint_epochs": 1} if name == "post_train" else {})))


def test_imtl_g_equal_projections():
    # g = a (1, 0) + (1 - a)(0, 2) with equal projections on the unit gradients: a = 2 (1 - a), a = 2/3
    g, _ = combine(make("imtl_g", "ab"), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(g, torch.tensor([2 / 3, 2 / 3]), atol=1e-4)


def test_nash_mtl_bargaining_solution_of_orthogonal_gradients():
    # G alpha = 1/alpha with G = diag(|g_k|^2): alpha_k = 1 / |g_k|, so g = (1, 1) for g1 = (1, 0), g2 = (0, 2)
    g, w = combine(make("nash_mtl", "ab", max_norm=0.0), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(w, torch.tensor([1.0, 0.5]), atol=1e-3) and torch.allclose(g, torch.ones(2), atol=1e-3)


def test_gradnorm_equalises_weighted_gradient_norms():
    m = make("gradnorm", "ab", alpha=0.0)  # alpha = 0: the target is the mean weighted norm
    J, losses = torch.tensor([[4.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 1.0])
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        m.combine(J, J @ J.T)
        m.extra_loss(losses, J).backward()
        opt.step()
    w = m.combine(J, J @ J.T)[1]
    assert torch.allclose(w * J.norm(dim=1), (w * J.norm(dim=1)).mean(), rtol=0.05)  # w ~ 1/|g|: (0.2, 0.8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])

    def losses(self, x, y, detach=False):
        z = self.backbone(x)
        zz = z.detach() if detach else z
        return z, torch.stack([nn.functional.cross_entropy(h(zz), y[:, k]) for k, h in enumerate(self.heads)])


@pytest.mark.parametrize("mode", ["param", "rep"])
@pytest.mark.parametrize("name", ["pcgrad", "mgda", "graddrop"])
def test_surrogate_backward_delivers_the_combined_gradient(name, mode):
    net, x, y = Tiny(), torch.randn(16, 5), torch.randint(0, 3, (16, 2))
    shared = list(net.backbone.parameters())
    # the expected gradients, computed directly: J rows per task, the method's g, heads' own task gradients
    z, losses = net.losses(x, y)
    if mode == "param":
        J = torch.stack(
            [torch.cat([g.flatten() for g in torch.autograd.grad(L, shared, retain_graph=True)]) for L in losses]
        )
    else:
        J = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0].flatten() for L in losses])
    g = combine(make(name, "ab", mode=mode), J)[0]
    if mode == "param":
        want_shared = torch.split(g, [p.numel() for p in shared])
    else:
        want_shared = torch.autograd.grad(z, shared, grad_outputs=g.view_as(z), retain_graph=True)
    want_heads = [
        torch.autograd.grad(losses[k], list(h.parameters()), retain_graph=True) for k, h in enumerate(net.heads)
    ]
    # through the surrogate
    z, losses = net.losses(x, y)
    heads_loss = net.losses(x, y, detach=True)[1].sum()
    torch.manual_seed(0)
    loss, w = make(name, "ab", mode=mode).surrogate(losses, heads_loss, z, shared)
    loss.backward()
    for p, want in zip(shared, want_shared):
        assert torch.allclose(p.grad.flatten(), want.flatten(), atol=1e-5)
    for h, want in zip(net.heads, want_heads):
        for p, gw in zip(h.parameters(), want):
            assert torch.allclose(p.grad, gw, atol=1e-6)  # each head: its own task's unweighted gradient


def test_unsupported_combinations_stop_at_start_up(make_cfg):
    with pytest.raises(MTLError, match="with several devices use weighting.mode=param"):
        make("graddrop", mode="rep").check("32-true", distributed=True)
    make("graddrop", mode="param").check("bf16-mixed", distributed=True)  # supported
    make("mgda_ub").check("bf16-mixed", distributed=True)
    with pytest.raises(MTLError, match="Unknown weighting.mode='both'"):
        make("pcgrad", mode="both")


def test_fp16_per_task_gradients_are_scaled_unscaled_and_an_overflow_skips_the_step():
    """In fp16 a small task gradient underflows unless its loss is scaled first; an overflowing scale gives a
    non-finite update that the GradScaler skips (parameters unchanged, scale lowered), without feeding the solver."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(16, 8)

    def losses_and_z(fp16=True):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            z = lin(x)
            return torch.stack([z.float().mean() * 1e-6, z.float().pow(2).mean() * 1e-6]), z

    shared = list(lin.parameters())
    want = make("mgda", "ab").jacobian(*losses_and_z(fp16=False), shared)
    lost = make("mgda", "ab").jacobian(*losses_and_z(), shared)  # unscaled: fp16 activations' gradients underflow
    got = make("mgda", "ab").jacobian(*losses_and_z(), shared, scale=torch.tensor(2.0**16))
    assert lost[0].abs().max() < 0.5 * want[0].abs().max()
    assert torch.allclose(got, want, rtol=2e-2, atol=1e-9)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 (max 65504) at once
    opt = torch.optim.SGD(shared, lr=0.1)
    before = [p.detach().clone() for p in shared]
    losses, z = losses_and_z()
    method = make("mgda", "ab")
    method.combine = lambda J, G: pytest.fail("the solver was fed a non-finite Jacobian")
    loss, w = method.surrogate(losses, losses.sum() * 0, z, shared, scale=scaler.scale(torch.ones(())))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(shared, before)) and scaler.get_scale() < 2.0**40


@pytest.mark.parametrize("name", GRADIENT)
def test_method_learns_digits_and_resumes_exactly(name, make_cfg, tmp_path):
    from test_train import method_learns_and_resumes

    method_learns_and_resumes(name, make_cfg, tmp_path)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", ["pcgrad", "graddrop", "mgda_ub"])
def test_mixed_precision_matches_fp32(name, precision, make_cfg, tmp_path):
    """fp16 on the CPU runs with a GradScaler, as on a GPU (train.fp16_cpu): the scaled per-task gradients."""
    args = ["data.train_size=640", "data.batch_size=64", "trainer.max_epochs=1", "test=false", f"weighting={name}"]
    args += ["model.depth=1", "model.width=32"]  # fp16 on a CPU is slow: a one-block ViT, ~3x faster than 3 x 64
    fp32 = run(make_cfg("digits_mtl", *args, out_dir=tmp_path / "a"))
    mixed = run(make_cfg("digits_mtl", *args, f"trainer.precision={precision}", out_dir=tmp_path / "b"))
    assert math.isfinite(mixed["val/loss/left"]) and abs(mixed["val/loss/left"] - fp32["val/loss/left"]) < 0.05


# pcgrad in param mode; in rep mode (the ranks' Gramians summed) the example plugin's aggregator, whose file the
# DDP rank Lightning launches imports again (examples/gradient_aggregator.py)
DDP = {
    "pcgrad": [],
    "unit_mean": [f"plugins=[{Path(__file__).parents[1] / 'examples/gradient_aggregator.py'}]", "weighting.mode=rep"],
}


@pytest.mark.parametrize("name", list(DDP))
def test_ddp_two_processes_match_one(name, tmp_path):
    """2 CPU processes x batch 32 = 1 process x batch 64, step for step: per-task gradients are synchronised."""
    common = [
        *DDP[name],
        f"weighting={name}",
        "data.train_size=640",
        "data.val_size=64",
        "data.test_size=64",
        "trainer.max_epochs=1",
        "model.depth=1",  # the ranks' start-up is most of the test: the smallest network that shows the sums
        "model.width=32",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "optim.scheduler=constant",
        "test=false",
        f"out_dir={tmp_path}",
    ]
    runs = {
        "ddp": ["trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=32"],
        "one": ["data.batch_size=64"],
    }
    if name == "pcgrad":  # a different trajectory: shows the tolerance below is discriminating (once is enough)
        runs["other"] = ["data.batch_size=32"]
    # the DDP run through the command line (Lightning launches rank 1 by running it again), into a timestamped
    # directory; the single-process runs in this process
    cmd = [sys.executable, "-m", "experiments.run", "exp=digits_mtl", *common, *runs["ddp"]]
    printed = {"ddp": subprocess.run(cmd, check=True, capture_output=True, text=True).stdout}
    for run_name in [r for r in runs if r != "ddp"]:
        run(compose("digits_mtl", [*common, *runs[run_name], f"run_name={run_name}"]))
    # one run, one directory, one report: the second rank neither makes its own directory nor prints
    dirs = {p.name for p in (tmp_path / "digits_mtl").iterdir()} - set(runs)
    assert len(dirs) == 1 and printed["ddp"].count("outputs:") == 1 and printed["ddp"].count("exp=digits_mtl:") == 1
    ddp = dirs.pop()
    w = {
        r: torch.load(tmp_path / "digits_mtl" / d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for r, d in [("ddp", ddp), *((r, r) for r in runs if r != "ddp")]
    }

    def dist(a, b):
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())

    assert dist(w["ddp"], w["one"]) < 5e-4
    if "other" in w:
        assert dist(w["other"], w["one"]) > 20 * dist(w["ddp"], w["one"])
