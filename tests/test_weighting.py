import math

import pytest
import torch

from mtl_lightning.errors import MTLError
from mtl_lightning.weighting import WEIGHTINGS, create_weighting
from mtl_lightning.weighting.preference import PreferenceScalarization

TASKS = ["a", "b", "c"]


def required_options(name, tasks):
    """The options a registered weighting cannot do without on `tasks` (the others keep their defaults)."""
    cls, out = WEIGHTINGS.get(name), {}
    if name == "fixed":
        out["weights"] = [1.0] * len(tasks)
    if name == "forkmerge":
        out["target"] = [tasks[0]]
    if cls.auxiliary:
        out["target"] = tasks[0]
    if name == "post_train":
        out["joint_epochs"] = 1
    return out


def make(name, tasks=TASKS, **kw):
    cls = WEIGHTINGS.get(name)
    return cls(tasks, cls.Config(**{**required_options(name, tasks), **kw}))


# loss weightings (ForkMerge's weighting only names its branches' weights: tests/test_forkmerge.py)
LOSS_LEVEL = [
    n for n in WEIGHTINGS.names() if not getattr(WEIGHTINGS.get(n), "gradient_based", False) and n != "forkmerge"
]


@pytest.mark.parametrize("name", LOSS_LEVEL)
def test_properties(name):
    w = make(name)
    losses = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    loss, weights = w(losses)
    assert loss.ndim == 0 and torch.isfinite(loss) and weights.shape == (3,)
    assert not weights.requires_grad
    loss.backward()
    assert torch.isfinite(losses.grad).all()
    if not w.signed:  # every task gets a learning signal (PBI's may be negative: it pulls losses onto a ray)
        assert (weights >= 0).all() and (losses.grad > 0).all()
    if w.stochastic:  # a fresh random draw per call: only the simplex can be checked
        assert torch.allclose(weights.sum(), torch.tensor(1.0))
        return
    # the weights are those of the loss's gradient
    assert torch.allclose(losses.grad, weights) or not isinstance(w, PreferenceScalarization)
    # identical tasks are treated alike, and a permutation of the tasks permutes the weights (each from a fresh
    # instance: a stateful method's next call differs)
    same = make(name)(torch.ones(3))[1]
    assert torch.allclose(same, same[0].expand(3))
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(make(name)(losses.detach()[perm])[1], weights[perm])
    assert name in repr(w) or "tasks=" in repr(w)


@pytest.mark.parametrize("name", ["uniform", "fixed"])
def test_scalarizations_define_mixture_probs(name):
    p = make(name).mixture_probs()
    assert torch.allclose(p.sum(), torch.tensor(1.0)) and (p >= 0).all()


def test_fixed_normalises_to_simplex_or_not():
    losses = torch.tensor([1.0, 1.0, 1.0])
    assert torch.allclose(make("fixed", weights=[3, 1, 0])(losses)[1], torch.tensor([0.75, 0.25, 0.0]))
    raw = make("fixed", weights=[3, 1, 0], normalize=False)
    assert torch.allclose(raw(losses)[0], torch.tensor(4.0))
    assert torch.allclose(raw.mixture_probs(), torch.tensor([0.75, 0.25, 0.0]))


@pytest.mark.parametrize(
    "weights, expected",
    [
        (None, "required"),
        ([1, 1], "2 values but there are 3 tasks"),
        ([1, -1, 1], "non-negative"),
        ([1, float("nan"), 1], "finite"),
        ([0, 0, 0], "all zero"),
    ],
)
def test_fixed_rejects_bad_weights(weights, expected):
    with pytest.raises(MTLError, match=expected):
        make("fixed", weights=weights)


def test_unknown_weighting_lists_choices():
    valid = ", ".join(sorted(WEIGHTINGS.names()))
    with pytest.raises(MTLError, match=f"Did you mean 'pcgrad'.*Valid choices: {valid}\\."):
        create_weighting(TASKS, type("C", (), {"name": "pcgradd"})())


def test_registry_holds_every_method_of_the_papers():
    loss_level = {"uniform", "fixed", "uncertainty", "imtl_l", "dwa", "rlw", "gls", "famo", "post_train", "stch"}
    loss_level |= {"cosmos", "pbi"}  # torchjd's preference scalarisations
    loss_level |= {"go4align"}  # the 2024-26 baselines from their authors' code
    loss_level |= {"auto_lambda", "forum", "ldc_mtl"}  # bilevel
    loss_level |= {"bayesagg_mtl"}  # its own step, on the heads' posteriors
    gradient = {"pcgrad", "cagrad", "graddrop", "mgda", "mgda_ub", "imtl_g", "nash_mtl", "upgrad", "gradnorm"}
    gradient |= {"aligned_mtl", "config", "dualproj", "fairgrad", "gradvac", "sdmgrad", "excess_mtl"}  # torchjd's
    gradient |= {"gcs", "ol_aux", "arml"}  # the auxiliary-task baselines of ForkMerge's tables (and post_train)
    gradient |= {"db_mtl", "moco", "cr_mogm", "modo"}  # the 2023-24 baselines (and stch)
    builtin = {n for n, cls in WEIGHTINGS.items() if cls.__module__.startswith("mtl_lightning.")}  # not plugins'
    assert set(LOSS_LEVEL) == loss_level and builtin == loss_level | gradient | {"forkmerge"}


@pytest.mark.parametrize("name", ["uncertainty", "imtl_l"])
def test_learned_scales_converge_to_inverse_losses(name):
    # Both objectives are minimised over s_k at exp(-+s_k) = 1 / L_k (derivative e^{-s}L - 1 = 0, resp. e^{s}L - 1).
    w = make(name, tasks=["a", "b"])
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    losses = torch.tensor([2.0, 0.5])
    for _ in range(500):
        opt.zero_grad()
        w(losses)[0].backward()
        opt.step()
    assert torch.allclose(w(losses)[1], torch.tensor([0.5, 2.0]), atol=1e-3)


def test_uncertainty_is_imtl_l_with_its_scale_negated():
    # e^{-s} L + s at s is e^{s'} L - s' at s' = -s, and both start at 0, so a sign-equivariant optimiser (SGD, Adam)
    # takes the same steps: why their study rows agree cell for cell (REPRODUCTION.md, claim 1)
    u, i = make("uncertainty", tasks=["a", "b"]), make("imtl_l", tasks=["a", "b"])
    opts = [torch.optim.Adam(w.parameters(), lr=0.05) for w in (u, i)]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        losses = 3 * torch.rand(2, generator=g)
        out = [w(losses) for w in (u, i)]
        assert torch.allclose(out[0][0], out[1][0]) and torch.allclose(out[0][1], out[1][1])
        for o, (loss, _) in zip(opts, out):
            o.zero_grad()
            loss.backward()
            o.step()
    assert torch.allclose(u.log_var, -i.s) and u.log_var.abs().min() > 0.1  # they moved, in mirror


def test_uncertainty_loss_by_hand():
    w = make("uncertainty", tasks=["a", "b"])
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.0, 1.0]))
    loss, weights = w(torch.tensor([3.0, 2.0]))
    assert torch.allclose(loss, torch.tensor(3.0 + 2.0 * math.exp(-1.0) + 1.0))
    assert torch.allclose(weights, torch.tensor([1.0, math.exp(-1.0)]))


def test_gls_is_geometric_mean_with_its_gradient():
    losses = torch.tensor([1.0, 4.0], requires_grad=True)
    loss, weights = make("gls", tasks=["a", "b"])(losses)
    assert torch.allclose(loss, torch.tensor(2.0))  # sqrt(1 * 4)
    loss.backward()
    # d sqrt(L1 L2) / d L1 = sqrt(L2 / L1) / 2 = 1, / d L2 = sqrt(L1 / L2) / 2 = 0.25
    assert torch.allclose(losses.grad, torch.tensor([1.0, 0.25])) and torch.allclose(weights, losses.grad)


def test_dwa_weights_from_epoch_loss_ratios():
    w = make("dwa", tasks=["a", "b"], temperature=2.0)
    for epoch_losses in ([2.0, 2.0], [1.0, 2.0]):  # task a halves its loss, task b does not move
        assert torch.allclose(w(torch.tensor(epoch_losses))[1], torch.tensor([0.5, 0.5]))  # uniform for two epochs
        w.on_train_epoch_end()
    r = torch.tensor([0.5, 1.0])
    expected = torch.exp(r / 2) / torch.exp(r / 2).sum()
    assert torch.allclose(w(torch.tensor([1.0, 1.0]))[1], expected)
    assert expected[1] > expected[0]  # the task that stalls gets more weight
    state = w.state_dict()  # the history is saved with the checkpoint
    fresh = make("dwa", tasks=["a", "b"])
    fresh.load_state_dict(state)
    assert torch.allclose(fresh(torch.tensor([1.0, 1.0]))[1], w(torch.tensor([1.0, 1.0]))[1])


def test_stch_warms_up_on_log_losses_then_smooths_the_maximum_from_the_nadir_point():
    def after_warm_up(mu):
        w = make("stch", tasks=["a", "b", "c"], mu=mu, warmup_epochs=1)
        w.train()
        for epoch, batches in enumerate(([[1.0, 1.0, 1.0]], [[2.0, 4.0, 1.0], [4.0, 2.0, 3.0]])):
            w.on_train_epoch_start(epoch)
            for losses in batches:
                x = torch.tensor(losses, requires_grad=True)
                loss, weights = w(x)
                loss.backward()
                assert torch.allclose(loss, x.log().sum()) and torch.allclose(weights, 1 / x.detach())  # log losses
        w.on_train_epoch_start(2)
        return w

    w = after_warm_up(1.0)
    losses = torch.tensor([6.0, 3.0, 1.0], requires_grad=True)
    loss, weights = w(losses)
    assert torch.allclose(w.nadir, torch.tensor([3.0, 3.0, 2.0]))  # the mean loss of the last warm-up epoch
    logs = (losses / w.nadir).log()  # the reference's objective: K mu log sum exp(log(L / n) / mu)
    assert torch.allclose(loss, 3 * torch.logsumexp(logs, 0))
    loss.backward()
    assert torch.allclose(weights, losses.grad)  # the logged weights are the gradient's
    # mu -> 0: the Tchebycheff scalarisation K max_k log(L_k / n_k), all its gradient on the worst task
    x = torch.tensor([6.0, 3.0, 1.0])
    loss, weights = after_warm_up(1e-3)(x)
    assert torch.allclose(loss, 3 * (x / w.nadir).log().max(), atol=1e-2)
    assert torch.allclose(weights, torch.tensor([3 / 6.0, 0.0, 0.0]), atol=1e-4)
    # mu large: the linear scalarisation of the log losses, whose gradient is 1 / L_k
    assert torch.allclose(after_warm_up(1e4)(x)[1], 1 / x, rtol=1e-3)
    fresh = make("stch", mu=1.0, warmup_epochs=1)  # the nadir point is saved with the checkpoint
    fresh.load_state_dict(w.state_dict())
    fresh.on_train_epoch_start(3)
    assert torch.equal(fresh(x)[0], w(x)[0])


class TinyTwoTask(torch.nn.Module):
    """A shared linear layer and two linear heads, squared errors: the part of a module Auto-Lambda's meta-step uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.heads = torch.nn.Linear(3, 4), torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
        self.global_step, self.device = 0, torch.device("cpu")

    def batch_losses(self, x, y):
        z = torch.tanh(self.shared(x))
        return torch.stack([((h(z).squeeze(1) - y[:, k]) ** 2).mean() for k, h in enumerate(self.heads)]), None, z

    def transfer_batch_to_device(self, batch, device, idx):
        return batch


def _front(name, r, **kw):
    """The point of the convex front L(t) = (t^2, (1 - t)^2), t in [0, 1], that the scalarisation picks."""
    w = make(name, tasks=["a", "b"], preference=r, **kw)
    t = torch.linspace(0, 1, 2001)
    front = torch.stack([t**2, (1 - t) ** 2], 1)
    values = torch.stack([w(loss)[0] for loss in front])
    return front[values.argmin()]


def _angle(loss, r):
    return math.degrees(math.acos(torch.nn.functional.cosine_similarity(loss, torch.tensor(r), 0).item()))


def test_cosmos_is_linear_at_lambda_0_and_turns_the_solution_toward_the_preference():
    r = [0.8, 0.2]
    losses = torch.tensor([0.5, 2.0])
    loss, w = make("cosmos", tasks=["a", "b"], preference=r, lambda_=0.0)(losses)
    assert torch.allclose(loss, torch.tensor(0.8 * 0.5 + 0.2 * 2.0)) and torch.allclose(w, torch.tensor(r))
    # the linear scalarisation picks t = 0.2 (L = (0.04, 0.64), 58 degrees off r); a growing cosine reward turns the
    # chosen loss vector toward r, monotonically
    angles = [_angle(_front("cosmos", r, lambda_=lam), r) for lam in (0.0, 0.1, 0.3, 1.0)]
    assert angles[0] == pytest.approx(_angle(torch.tensor([0.04, 0.64]), r), abs=0.2)
    assert all(a > b for a, b in zip(angles, angles[1:])) and angles[-1] < angles[0] / 3


def test_pbi_puts_the_solution_on_the_preference_ray():
    r = [0.8, 0.2]
    # theta = 0: d1 alone, the projection on r^: the linear scalarisation's t = 0.2 (up to |r|)
    assert _front("pbi", r, theta=0.0).tolist() == pytest.approx([0.04, 0.64], abs=1e-3)
    # theta = 5: on the ray L = c (0.8, 0.2), where t^2 / (1 - t)^2 = 4: t = 2/3
    t = 2 / 3
    assert _front("pbi", r, theta=5.0).tolist() == pytest.approx([t**2, (1 - t) ** 2], abs=2e-3)
    # a reference point moves the ray's origin: the solution is on z + c r
    z = [0.1, 0.0]
    loss = _front("pbi", r, theta=5.0, reference=z)
    assert _angle(loss - torch.tensor(z), r) < 0.5
    # below the ray, with theta > 1, a task's weight is negative: its loss may rise toward the ray
    w = make("pbi", tasks=["a", "b"], preference=[0.5, 0.5], theta=5.0)(torch.tensor([0.1, 1.0]))[1]
    assert w[0] < 0 < w[1]


@pytest.mark.parametrize("name", ["cosmos", "pbi"])
def test_preference_scalarisations_draw_r_from_a_dirichlet_when_asked(name):
    w = make(name, dirichlet=0.5)
    assert w.stochastic and not make(name).stochastic
    torch.manual_seed(0)
    first = w(torch.tensor([0.5, 2.0, 1.0]))[1]
    torch.manual_seed(0)
    assert torch.equal(w(torch.tensor([0.5, 2.0, 1.0]))[1], first)  # torch's generator: reproducible from the seed
    assert not torch.equal(w(torch.tensor([0.5, 2.0, 1.0]))[1], first)
    with pytest.raises(MTLError, match="dirichlet"):
        make(name, dirichlet=0.0)
    with pytest.raises(MTLError, match="weighting.preference"):
        make(name, preference=[1.0, -1.0, 1.0])


def test_go4align_weights_tasks_by_their_risk_indicator_shared_within_groups():
    eta = 0.1
    w = make("go4align", tasks=list("abcd"), num_groups=4, robust_step_size=eta)
    p = torch.full((4,), 0.25)
    for losses in ([0.5, 1.0, 2.0, 4.0], [0.4, 1.2, 1.5, 3.0]):  # the authors' GO4ALIGN.get_weighted_loss, written out
        L = torch.tensor(losses)
        p = p * torch.exp(-eta * L)
        p = p / p.sum()
        want = L.sum() / L * p
        loss, got = w(L)
        assert torch.allclose(got, want, atol=1e-6) and torch.allclose(loss, (want * L).sum(), atol=1e-5)
    # one group (the reference's default): every task gets the mean indicator
    one = make("go4align", tasks=list("abcd"), robust_step_size=eta)
    L = torch.tensor([0.5, 1.0, 2.0, 4.0])
    got = one(L)[1]
    assert torch.allclose(got, got.mean().expand(4)) and got.mean() == pytest.approx(want_first(L, eta).mean().item())
    # two groups: the two small-loss tasks (large indicators) share one weight, the two large-loss tasks another
    two = make("go4align", tasks=list("abcd"), num_groups=2, robust_step_size=0.0)
    got = two(torch.tensor([1.0, 1.1, 5.0, 5.2]))[1]
    assert got[0] == got[1] > got[2] == got[3]
    with pytest.raises(MTLError, match="num_groups=5 must be 1 to the number of tasks"):
        make("go4align", tasks=list("abcd"), num_groups=5)


def want_first(L, eta):
    p = torch.exp(-eta * L) / torch.exp(-eta * L).sum()
    return L.sum() / L * p


@pytest.mark.parametrize("seed", range(5))
def test_go4align_groups_are_the_exact_k_means_optimum(seed):
    """Against every assignment of 7 values to 3 groups: the dynamic programme's groups have the least within-group
    sum of squares."""
    import itertools

    from mtl_lightning.weighting.go4align import group_means, kmeans_1d

    x = torch.rand(7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10

    def sse(labels):
        return ((x - group_means(x, labels)) ** 2).sum().item()

    best = min(sse(torch.tensor(a)) for a in itertools.product(range(3), repeat=7) if len(set(a)) == 3)
    assert sse(kmeans_1d(x, 3)) == pytest.approx(best, abs=1e-9)


def test_auto_lambda_meta_gradient_is_the_unrolled_steps_hypergradient():
    g = torch.Generator().manual_seed(1)
    train, val = [(torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)) for _ in range(2)]
    model = TinyTwoTask()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    model.trainer = type("T", (), {"optimizers": [opt]})()
    w = make("auto_lambda", tasks=["a", "b"], target=["a"], weight_init=0.5)
    w.batches = type("B", (), {"next": lambda self, drawn: val})()
    before = [p.detach().clone() for p in model.parameters()]
    w.meta_step(model, train)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # theta restored
    # exact: d/dw_k La(theta - lr (grad sum_j w_j L_j + wd theta)) = -lr grad L_k(theta) . grad La(theta')
    params = list(model.parameters())
    train_losses = model.batch_losses(*train)[0]
    step = torch.autograd.grad((0.5 * train_losses).sum(), params, create_graph=False)
    moved = [p - 0.1 * (s + 0.01 * p) for p, s in zip(params, step)]
    with torch.no_grad():
        for p, m in zip(params, moved):
            p.copy_(m)
    d = torch.autograd.grad(model.batch_losses(*val)[0][0], params)  # primary task a only
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    exact = torch.stack(
        [
            -0.1 * sum((gk * dk).sum() for gk, dk in zip(torch.autograd.grad(L, params, retain_graph=True), d))
            for L in model.batch_losses(*train)[0]
        ]
    )
    assert torch.allclose(w.exp_avg / 0.1, exact, rtol=1e-3, atol=1e-7)  # Adam's first moment: 0.1 x the gradient
    assert torch.allclose(w.w, 0.5 - 1e-4 * torch.sign(exact), atol=1e-7)  # Adam's first step: lr x sign
    assert int(w.drawn) == 1


def test_auto_lambda_lowers_the_weight_of_a_harmful_auxiliary(make_cfg):
    from experiments.run import run
    from mtl_lightning.checkpoint import load_model

    # forkmerge_negative_transfer's setting: task1's labels are noise; task0 is the primary task
    over = ["data.num_tasks=2", "data.train_size=1000", "data.label_noise=[0,1.0]", "optim.lr=3e-3", "test=false"]
    out = run(
        make_cfg(
            "synthetic_mtl",
            *over,
            "trainer.max_epochs=3",
            "weighting=auto_lambda",
            "weighting.target=[task0]",
            "weighting.lr=1e-3",
        )
    )
    w = load_model(f"{out['run_dir']}/checkpoints/last.ckpt").weighting.w
    assert w[1] < 0.1 < w[0], w.tolist()  # both started at 0.1


def test_auto_lambda_refuses_to_learn_from_the_test_split(make_cfg, tmp_path):
    from fixtures import write_cifar10

    from experiments.run import run

    write_cifar10(tmp_path / "data")  # CIFAR-10 has no official validation split
    over = [f"data.root={tmp_path / 'data'}", "data.train_fraction=1", "data.batch_size=8", "trainer.max_steps=1"]
    with pytest.raises(MTLError, match="learn from the test set.*data.train_fraction below 1"):
        run(make_cfg("cifar10", *over, "weighting=auto_lambda", "model.pretrained=false"))


class TinyForum(TinyTwoTask):
    """TinyTwoTask with what FORUM's step also reads of a module: the epoch, and the finite-loss check."""

    current_epoch = 0

    def _check_finite(self, losses):
        pass


def test_forum_step_is_the_direction_libmtl_computes():
    """FORUM's update, written out as LibMTL's bacth_forward_FORUM computes it (the batch's halves for the two levels,
    a deep copy for the inner loop, cvxpy on the square root of A A^T for the program) and compared: the model's
    gradient, lambda, the logits' Adam step."""
    import copy

    import cvxpy as cp
    import numpy as np

    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(32, 3, generator=g), torch.randn(32, 2, generator=g))
    train, val = (batch[0][:16], batch[1][:16]), (batch[0][16:], batch[1][16:])  # the halves: lower, upper level
    model, phi = TinyForum(), 0.1
    w = make("forum", tasks=["a", "b"], inner_steps=3, phi=phi)
    logits = torch.tensor([0.3, -0.2])  # not uniform, so that the logits' own gradient is not symmetric
    w.logits.copy_(logits)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    loss = w.step_loss(model, batch)[0]
    got = torch.cat([gr.flatten() for gr in torch.autograd.grad(loss, params)])
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the inner loop undone

    def flat(grads):
        return torch.cat([gr.flatten() for gr in grads])

    a = logits.clone().requires_grad_()
    g_f = torch.autograd.grad((torch.softmax(a, 0) * model.batch_losses(*train)[0]).sum(), [a, *params])
    inner = copy.deepcopy(model)
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (torch.softmax(a, 0).detach() * inner.batch_losses(*train)[0]).sum().backward()
        opt.step()
    g_hat = torch.autograd.grad((torch.softmax(a, 0) * inner.batch_losses(*train)[0]).sum(), a)[0]
    g_q = torch.cat([g_f[0] - g_hat, flat(g_f[1:])])
    val_losses = model.batch_losses(*val)[0]
    F = torch.stack([flat(torch.autograd.grad(val_losses[k], params, retain_graph=True)) for k in range(2)])
    F = torch.cat([torch.zeros(2, 2), F / F.norm(dim=1, keepdim=True)], 1)
    qq = g_q.pow(2).sum().item() + 1e-8
    pi = [phi - (g_q @ F[k]).item() / qq for k in range(2)]
    A = torch.cat([F, g_q[None]]).double()
    c, v = np.linalg.eig((A @ A.T).numpy())
    root = np.real(v @ np.diag(np.sqrt(np.maximum(c, 0))) @ np.linalg.inv(v))
    x = cp.Variable(3, nonneg=True)
    cons = [cp.sum(x[:-1]) == 1, x[-1] >= pi[0] * x[0] + pi[1] * x[1]]
    cp.Problem(cp.Minimize(cp.quad_over_lin(root @ x, 1) - x[-1] * phi * qq), cons).solve()
    lam = torch.tensor(x.value[:2], dtype=torch.float32)  # epoch 0: the moving average's first step is 1
    nu = max(float(lam @ torch.tensor(pi)), 0.0)
    expected = lam @ F + nu * g_q
    assert torch.allclose(w.lam, lam, atol=1e-4)
    assert torch.allclose(got, expected[2:], rtol=1e-3, atol=1e-5)
    assert torch.allclose(w.logits, logits - 1e-3 * torch.sign(expected[:2]), atol=1e-7)  # Adam's first step


def test_ldc_mtl_loss_by_hand_and_its_discrepancy_term_equalises_the_weighted_losses():
    w = make("ldc_mtl", lamb=0.5)
    w(torch.tensor([0.5, 2.0, 1.0]))  # the first step fixes the ratios to the smallest loss
    assert torch.allclose(w.ratios, torch.tensor([1.0, 4.0, 2.0]))
    losses = torch.ones(3, requires_grad=True)
    loss, coef = w(losses)
    s, n = torch.sigmoid(torch.tensor(1.0)), torch.tensor([1.0, 0.25, 0.5])
    assert loss.item() == pytest.approx((s * n).sum() / (3 * s) + 0.5 * s * (0.75 + 0.25), rel=1e-6)
    loss.backward()
    assert torch.allclose(losses.grad, coef)  # the logged weights are the loss's coefficients
    # the router's form on fixed losses (h = 0: its bias alone is the softmax's input): the weighted mean alone puts
    # every weight on the easiest task; a large lamb makes the weighted losses w_k L_k equal (w proportional to 1/L)
    L, ends = torch.tensor([1.0, 0.25, 0.5]), {}
    for lamb in (0.0, 5.0):
        torch.manual_seed(0)
        w = make("ldc_mtl", lamb=lamb, normalize=False, router=True, low=0.0, high=1.0)
        w.bind(6)
        opt = torch.optim.Adam(w.parameters(), lr=0.05)
        for _ in range(500):
            opt.zero_grad()
            w(L, torch.zeros(6))[0].backward()
            opt.step()
        ends[lamb] = torch.softmax(w.router(torch.zeros(6)), 0).detach()
    assert ends[0.0][1] > 0.99
    wl = ends[5.0] * L
    assert wl.max() / wl.min() < 1.05, ends[5.0]
    with pytest.raises(MTLError, match="router=true reads the tasks' representations"):
        make("ldc_mtl", router=True)(L)


def test_bayesagg_regression_moments_are_exact():
    from mtl_lightning.weighting.bayesagg_mtl import regression_moments

    g = torch.Generator().manual_seed(0)
    h, r, mu = torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.randn(4, generator=g)
    A = torch.randn(4, 4, generator=g)
    cov = A @ A.T / 4 + 0.1 * torch.eye(4)
    E, V = regression_moments(h.double(), r.double(), mu.double(), cov.double())
    w = torch.distributions.MultivariateNormal(mu.double(), cov.double()).sample((400_000,))  # (S, D)
    grads = 2 * w[:, None, :] * (w @ h.double().T - r.double())[:, :, None]  # (S, B, D)
    assert torch.allclose(E, grads.mean(0), rtol=0.02, atol=0.02)
    assert torch.allclose(V, grads.var(0), rtol=0.03, atol=0.03)


@pytest.mark.parametrize("kind", ["classification", "binary"])
def test_bayesagg_laplace_posterior_is_a_newton_step_on_the_map_objective(kind):
    """Precision: the Hessian of the summed loss plus the prior's quadratic at the head's weights (for a linear
    softmax or sigmoid layer the Gauss-Newton matrix is the Hessian); mean: one Newton step from them."""
    from mtl_lightning.weighting.bayesagg_mtl import laplace

    g = torch.Generator().manual_seed(1)
    C = 3 if kind == "classification" else 1
    h, W = torch.randn(20, 4, generator=g).double(), torch.randn(C, 5, generator=g).double()
    y = torch.randint(0, 3 if C == 3 else 2, (20,), generator=g).double()
    m0, P0 = torch.randn(C * 5, generator=g).double(), 2 * torch.eye(C * 5).double()

    def objective(wf):
        logits = torch.cat([h, torch.ones(20, 1).double()], 1) @ wf.view(C, 5).T
        if C == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="sum")
        else:
            loss = torch.nn.functional.cross_entropy(logits, y.long(), reduction="sum")
        return loss + 0.5 * (wf - m0) @ P0 @ (wf - m0)

    mean, prec = laplace(h, y, W, m0, P0, kind)
    H = torch.autograd.functional.hessian(objective, W.flatten())
    grad = torch.autograd.functional.jacobian(objective, W.flatten())
    assert torch.allclose(prec, H, atol=1e-9)
    assert torch.allclose(mean, W.flatten() - torch.linalg.solve(H, grad), atol=1e-9)


def test_bayesagg_aggregates_by_inverse_variance_over_the_labelled_tasks():
    from mtl_lightning.weighting.bayesagg_mtl import inverse_variance

    E = torch.tensor([[[1.0, 2.0]], [[3.0, -2.0]]])  # (K=2, B=1, D=2)
    V = torch.tensor([[[1.0, 1e6]], [[3.0, 1.0]]])
    g, share = inverse_variance(E, V, torch.ones(2, 1, dtype=torch.bool))
    assert torch.allclose(g, torch.tensor([[(1 / 1 + 3 / 3) / (1 + 1 / 3), (2e-6 - 2) / (1e-6 + 1)]]))
    assert share.sum().item() == pytest.approx(1.0)  # the second feature is all task 2's: an uncertain task yields
    g, share = inverse_variance(E, V, torch.tensor([[False], [True]]))  # task 1 unlabelled: task 2's gradient alone
    assert torch.allclose(g, E[1]) and share.tolist() == [0.0, 1.0]


def test_rlw_is_reproducible_from_the_seed():
    w = make("rlw")
    torch.manual_seed(5)
    a = w(torch.ones(3))[1]
    torch.manual_seed(5)
    assert torch.equal(a, w(torch.ones(3))[1]) and not torch.equal(a, w(torch.ones(3))[1])


@pytest.mark.parametrize("name", [n for n in WEIGHTINGS.names() if n not in ("uniform", "fixed", "forkmerge")])
def test_loss_level_methods_reject_sample_mixing(name):
    with pytest.raises(MTLError, match="data.mixing=loss"):
        make(name).mixture_probs()
